"""The cluster file schema: parsing with field-path errors, CLI overrides, and the text table.

Kept apart from :mod:`autopar.cluster` so the dataclass stays small. Every error is a
:class:`~autopar.core.errors.ClusterError` whose message starts with the field path
(``intra_node.bandwidth_bytes_per_s: -3 must be > 0``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

from autopar.cluster.hardware import DTYPES, DeviceSpec, Link, canonical_dtype, device_kind
from autopar.core.errors import ClusterError
from autopar.core.text import did_you_mean, seconds_text, si_text

TOP_KEYS = (
    "name",
    "preset",
    "nodes",
    "devices_per_node",
    "device",
    "node_groups",
    "intra_node",
    "inter_node",
)
LINK_KEYS = ("bandwidth_bytes_per_s", "bandwidth_gbps", "latency_s", "latency_us", "source")
DEVICE_KEYS = ("name", "peak_flops_per_s", "memory_bytes", "hbm_bytes_per_s", "source")
GROUP_KEYS = ("nodes", "device")
_LINK_SUFFIXES = ("bandwidth_bytes_per_s", "gbps", "latency_s", "latency_us")
OVERRIDE_KEYS = (
    "nodes",
    "devices",
    "gpus",
    "ranks",
    "devices_per_node",
    "device",
    "name",
    *(f"{level}_{suffix}" for level in ("intra_node", "inter_node") for suffix in _LINK_SUFFIXES),
)
"""Keys of ``PRESET:k=v,...`` and ``Cluster.preset(name, **overrides)``."""
BITS_PER_GBIT = 1e9
"""``*_gbps`` values are gigabits per second (network convention): bytes/s = gbps * 1e9 / 8."""


# ------------------------------------------------------------------------------- numbers
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_float(path: str, value: object, *, allow_zero: bool = False) -> float:
    """A finite positive number; numeric strings (YAML 1.1 reads ``300e9`` as a string) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ClusterError(f"{path}: {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise ClusterError(f"{path}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ClusterError(f"{path}: {value!r} must be a finite number")
    if number < 0 or (number == 0 and not allow_zero):
        raise ClusterError(f"{path}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return number


def to_int(path: str, value: object) -> int:
    """A whole number >= 1 (ints, or strings of digits from the CLI)."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    check_count(path, value)
    return value


def check_count(path: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClusterError(f"{path}: {value!r} must be a whole number >= 1")
    if value < 1:
        raise ClusterError(f"{path}: {value!r} must be >= 1")


def check_keys(d: object, allowed: tuple[str, ...], path: str) -> dict:
    """``d`` must be a mapping with keys among ``allowed``; a typo gets a suggestion."""
    if not isinstance(d, dict):
        where = path or "cluster"
        raise ClusterError(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {d!r}")
    for key in d:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
            raise ClusterError(
                f"{_join(path, str(key))}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
            )
    return d


def _require(d: dict, key: str, path: str, required: tuple[str, ...]) -> object:
    if key not in d:
        raise ClusterError(f"{_join(path, key)}: missing field (required: {', '.join(required)})")
    return d[key]


# ---------------------------------------------------------------------------------- parts
def parse_link(d: object, path: str) -> Link:
    check_keys(d, LINK_KEYS, path)
    for a, b in (("bandwidth_bytes_per_s", "bandwidth_gbps"), ("latency_s", "latency_us")):
        if a in d and b in d:
            raise ClusterError(f"{path}: give {a} or {b}, not both")
    if "bandwidth_gbps" in d:
        bw = to_float(_join(path, "bandwidth_gbps"), d["bandwidth_gbps"]) * BITS_PER_GBIT / 8
    else:
        required = ("bandwidth_bytes_per_s (or bandwidth_gbps)", "latency_s (or latency_us)")
        bw = to_float(
            _join(path, "bandwidth_bytes_per_s"), _require(d, "bandwidth_bytes_per_s", path, required)
        )
    if "latency_us" in d:
        lat = to_float(_join(path, "latency_us"), d["latency_us"], allow_zero=True) / 1e6
    else:
        required = ("bandwidth_bytes_per_s", "latency_s (or latency_us)")
        lat = to_float(_join(path, "latency_s"), _require(d, "latency_s", path, required), allow_zero=True)
    return Link(bw, lat, str(d.get("source", "")))


def parse_device(value: object, path: str) -> DeviceSpec:
    """A known kind name, or a mapping ``{name, peak_flops_per_s, memory_bytes, hbm_bytes_per_s}``."""
    if isinstance(value, str):
        return device_kind(value, path)
    check_keys(value, DEVICE_KEYS, path)
    required = DEVICE_KEYS[:4]
    name = _require(value, "name", path, required)
    if not isinstance(name, str) or not name:
        raise ClusterError(f"{_join(path, 'name')}: {name!r} must be a non-empty string")
    peaks_in = _require(value, "peak_flops_per_s", path, required)
    peaks_path = _join(path, "peak_flops_per_s")
    if not isinstance(peaks_in, dict) or not peaks_in:
        raise ClusterError(
            f"{peaks_path}: expected a mapping dtype -> FLOP/s with keys among {', '.join(DTYPES)}"
        )
    peaks = {}
    for key, v in peaks_in.items():
        try:
            canon = canonical_dtype(key)
        except ClusterError as e:
            raise ClusterError(f"{_join(peaks_path, str(key))}: {e}") from None
        peaks[canon] = to_float(_join(peaks_path, str(key)), v)
    return DeviceSpec(
        name,
        peaks,
        to_float(_join(path, "memory_bytes"), _require(value, "memory_bytes", path, required)),
        to_float(_join(path, "hbm_bytes_per_s"), _require(value, "hbm_bytes_per_s", path, required)),
        str(value.get("source", "")),
    )


def parse_groups(value: object) -> list[tuple[int, DeviceSpec]]:
    if not isinstance(value, list) or not value:
        raise ClusterError(f"node_groups: expected a non-empty list of {{nodes, device}}, got {value!r}")
    out = []
    for i, g in enumerate(value):
        path = f"node_groups[{i}]"
        check_keys(g, GROUP_KEYS, path)
        nodes = to_int(_join(path, "nodes"), _require(g, "nodes", path, GROUP_KEYS))
        out.append((nodes, parse_device(_require(g, "device", path, GROUP_KEYS), _join(path, "device"))))
    return out


def _merge_preset(base: dict, d: dict) -> dict:
    """``d`` over ``base``; link mappings merge per field (a new bandwidth unit replaces the old)."""
    out = copy.deepcopy(base)
    for key, value in d.items():
        if key in ("intra_node", "inter_node") and isinstance(value, dict):
            link = dict(out.get(key, {}))
            if "bandwidth_bytes_per_s" in value or "bandwidth_gbps" in value:
                link.pop("bandwidth_bytes_per_s", None)
                link.pop("bandwidth_gbps", None)
            if "latency_s" in value or "latency_us" in value:
                link.pop("latency_s", None)
                link.pop("latency_us", None)
            link.pop("source", None)
            out[key] = {**link, **value}
        elif key == "node_groups":
            out.pop("device", None)
            out[key] = value
        else:
            out[key] = value
    return out


def parse_cluster_dict(d: object, *, preset_dict: Callable[[str, str], dict]) -> dict:
    """Schema dict -> keyword arguments of ``Cluster`` (node groups as ``(nodes, DeviceSpec)`` pairs)."""
    check_keys(d, TOP_KEYS, "")
    if "preset" in d:
        d = _merge_preset(
            preset_dict(str(d["preset"]), "preset"), {k: v for k, v in d.items() if k != "preset"}
        )
    if "device" in d and "node_groups" in d:
        raise ClusterError("device and node_groups: give one (node_groups declares a heterogeneous cluster)")
    kwargs: dict = {}
    required = ("nodes", "devices_per_node", "device (or node_groups)", "intra_node", "inter_node")
    if "node_groups" in d:
        kwargs["node_groups"] = parse_groups(d["node_groups"])
        total = sum(n for n, _ in kwargs["node_groups"])
        if "nodes" in d and to_int("nodes", d["nodes"]) != total:
            raise ClusterError(
                f"nodes: {d['nodes']!r} but node_groups hold {total} nodes; drop nodes or make them agree"
            )
    else:
        kwargs["nodes"] = to_int("nodes", _require(d, "nodes", "", required))
        kwargs["device"] = parse_device(_require(d, "device", "", required), "device")
    kwargs["devices_per_node"] = to_int("devices_per_node", _require(d, "devices_per_node", "", required))
    kwargs["intra_node"] = parse_link(_require(d, "intra_node", "", required), "intra_node")
    nodes = kwargs.get("nodes") or sum(n for n, _ in kwargs["node_groups"])
    if "inter_node" in d:
        kwargs["inter_node"] = parse_link(d["inter_node"], "inter_node")
    elif nodes > 1:
        _require(d, "inter_node", "", required)
    if d.get("name") is not None:
        kwargs["name"] = str(d["name"])
    return kwargs


def read_file(path: Path) -> dict:
    if path.is_dir():
        raise ClusterError(
            f"cluster file {str(path)!r} is a directory; give a .yaml/.json file in it or a preset"
        )
    if not path.is_file():
        raise ClusterError(
            f"cluster file {str(path)!r} not found; give an existing .yaml/.json file or a preset"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ClusterError(
            f"cluster file {str(path)!r} cannot be read ({e.strerror or e}); check its permissions"
        ) from None
    except UnicodeDecodeError as e:
        raise ClusterError(
            f"cluster file {str(path)!r} is not text (byte 0x{e.object[e.start]:02x} at offset {e.start} is "
            "not UTF-8); a cluster file is YAML or JSON (docs/cluster_format.md)"
        ) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ClusterError(f"{path}: not valid JSON: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ClusterError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- overrides
def parse_override_args(args: str, spec: str) -> dict[str, str]:
    """``"128"`` -> ``{devices: "128"}``; ``"nodes=16,inter_node_gbps=100"`` -> a dict of strings."""
    out: dict[str, str] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        if item.isdigit():
            key, value = "devices", item
        elif "=" in item:
            key, _, value = (s.strip() for s in item.partition("="))
        else:
            raise ClusterError(
                f"cluster {spec!r}: {item!r} is neither a device count nor key=value; "
                "write PRESET:N (N devices in all) or PRESET:nodes=4,inter_node_gbps=100"
            )
        _check_override_key(key, f"cluster {spec!r}")
        if key in out:
            raise ClusterError(f"cluster {spec!r}: {key} given twice")
        out[key] = value
    return out


def _check_override_key(key: str, where: str) -> None:
    if key not in OVERRIDE_KEYS:
        hint = did_you_mean(key, OVERRIDE_KEYS)
        raise ClusterError(f"{where}: unknown override {key!r}{hint}; known: {', '.join(OVERRIDE_KEYS)}")


def apply_overrides(base: dict, overrides: dict, label: str) -> dict:
    """Apply CLI-style overrides to a canonical cluster dict (returns a new dict)."""
    out = copy.deepcopy(base)
    overrides = dict(overrides)
    for key in overrides:
        _check_override_key(key, label)
    if "devices_per_node" in overrides:
        out["devices_per_node"] = to_int(f"{label}: devices_per_node", overrides.pop("devices_per_node"))
    if "device" in overrides:
        out.pop("node_groups", None)
        out["device"] = str(overrides.pop("device"))
    totals = [k for k in ("devices", "gpus", "ranks") if k in overrides]
    if len(totals) > 1:
        raise ClusterError(f"{label}: {' and '.join(totals)} both give the device count; give one")
    nodes_given = None
    if "nodes" in overrides:
        nodes_given = out["nodes"] = to_int(f"{label}: nodes", overrides.pop("nodes"))
    if totals:
        _apply_device_total(
            out, to_int(f"{label}: {totals[0]}", overrides.pop(totals[0])), label, nodes_given
        )
    for key, value in overrides.items():
        level, suffix = (
            ("intra_node", key[11:]) if key.startswith("intra_node_") else ("inter_node", key[11:])
        )
        link = out.setdefault(level, {})
        field = "bandwidth_gbps" if suffix == "gbps" else suffix
        for k in (
            ("bandwidth_bytes_per_s", "bandwidth_gbps")
            if "bandwidth" in field
            else ("latency_s", "latency_us")
        ):
            link.pop(k, None)
        link[field] = value
        old = link.get("source", "")
        link["source"] = f"override {key}={value}" + (f"; otherwise: {old}" if old else "")
    return out


def _apply_device_total(out: dict, total: int, label: str, nodes_given: int | None) -> None:
    """``devices=N``: N devices in all; fewer than a node's worth means one partial node."""
    per_node = out["devices_per_node"]
    if total < per_node:
        nodes, per_node = 1, total
    elif total % per_node == 0:
        nodes = total // per_node
    else:
        raise ClusterError(
            f"{label}: {total} devices is not a whole number of {per_node}-device nodes; "
            f"choose a multiple of {per_node} (or fewer than {per_node} for one partial node)"
        )
    if nodes_given is not None and nodes_given != nodes:
        raise ClusterError(
            f"{label}: nodes={nodes_given} disagrees with {total} devices ({nodes} node(s) of {per_node}); give one"
        )
    out["nodes"], out["devices_per_node"] = nodes, per_node


# --------------------------------------------------------------------------------- table
def device_line(dev: DeviceSpec) -> str:
    peaks = ", ".join(f"{k} {si_text(v, 'FLOP/s')}" for k, v in dev.peak_flops_per_s.items())
    return f"{dev.name}: {peaks}; {si_text(dev.memory_bytes, 'B')}, {si_text(dev.hbm_bytes_per_s, 'B/s')} memory bw"


def link_line(link: Link) -> str:
    return f"{si_text(link.bandwidth_bytes_per_s, 'B/s')} per device per direction, {seconds_text(link.latency_s, micro='us')} per hop"

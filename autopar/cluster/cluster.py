"""Cluster declarations: how many devices, of which kind, joined by which links.

A cluster is ``nodes x devices_per_node`` devices with one :class:`~autopar.cluster.hardware.Link` per
topology level (``intra_node``: NVLink/NVSwitch; ``inter_node``: InfiniBand/Ethernet). Ranks are
numbered node-major: rank ``r`` lives on node ``r // devices_per_node``. Units and the per-device,
one-direction bandwidth convention are documented in :mod:`autopar.cluster.hardware` and
``docs/cluster_format.md``.

Ways to get one::

    Cluster.preset("dgx-a100-80g", nodes=4)
    Cluster.parse("dgx-a100-80g:nodes=16,inter_node_gbps=100")   # CLI form; also a file path
    Cluster.from_yaml("cluster.yaml")                             # YAML or JSON
    Cluster.local(ranks=4)                                        # 4 CPU processes on this machine

Heterogeneous clusters (node groups of different device kinds) are representable
(``node_groups``, :meth:`Cluster.device_of`); the planner and estimator do not handle them yet, so
``cluster.device`` raises a :class:`~autopar.core.errors.ClusterError` saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autopar.cluster import schema
from autopar.cluster.hardware import DEVICES, LOOPBACK_GLOO, PRESETS, DeviceSpec, Link, cpu_spec
from autopar.core.errors import ClusterError
from autopar.core.text import did_you_mean

__all__ = ["Cluster", "DeviceSpec", "Link", "NodeGroup", "DEVICES", "PRESETS"]


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """``nodes`` consecutive nodes that all hold ``device``."""

    nodes: int
    device: DeviceSpec

    def __post_init__(self) -> None:
        schema.check_count("node_groups[].nodes", self.nodes)
        if not isinstance(self.device, DeviceSpec):
            raise ClusterError(f"node group device {self.device!r}: must be a DeviceSpec")


class _DeviceField:
    """``Cluster.device``: the one device kind, or a ClusterError on a heterogeneous cluster."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = "_" + name

    def __get__(self, obj: Cluster | None, objtype: type | None = None) -> DeviceSpec | None:
        if obj is None:
            return None  # the dataclass default
        groups = getattr(obj, "node_groups", ())
        if not groups:  # during __init__, before __post_init__ normalised the groups
            return getattr(obj, self._attr, None)
        if obj.is_heterogeneous:
            kinds = ", ".join(f"{g.nodes} node(s) of {g.device.name}" for g in groups)
            raise ClusterError(
                f"cluster {obj.name!r} is heterogeneous ({kinds}); it has no single device kind. "
                "Use cluster.device_of(rank) / cluster.device_kinds (autopar.estimate costs each "
                "pipeline stage on its own device kind)"
            )
        return groups[0].device

    def __set__(self, obj: Cluster, value: DeviceSpec | None) -> None:
        object.__setattr__(obj, self._attr, value)


@dataclass(kw_only=True, repr=False, eq=False)
class Cluster:
    """``nodes x devices_per_node`` devices and one link per topology level."""

    nodes: int | None = None
    """Number of nodes (>= 1). Derived from ``node_groups`` when those are given."""
    devices_per_node: int
    """Devices (GPUs, or CPU ranks) per node; every node has the same count."""
    device: DeviceSpec | None = _DeviceField()
    """The device kind of every rank. Raises ClusterError on a heterogeneous cluster."""
    intra_node: Link
    """Link between two devices of the same node (per device, one direction)."""
    inter_node: Link | None = None
    """Link between devices of different nodes (per device share, one direction).
    Optional for a single node (then equal to ``intra_node``; never used)."""
    name: str = ""
    """A label for reports; derived from the shape when empty."""
    node_groups: tuple[NodeGroup, ...] = ()
    """Node groups in rank order; one group for a homogeneous cluster (filled in automatically)."""

    def __post_init__(self) -> None:
        device = object.__getattribute__(self, "_device")
        schema.check_count("devices_per_node", self.devices_per_node)
        groups = tuple(self.node_groups)
        if device is not None and len(groups) == 1 and groups[0].device == device:
            self.node_groups = ()  # dataclasses.replace() passes both: nodes/device win
        if self.node_groups:
            if device is not None:
                raise ClusterError("give either device or node_groups, not both")
            self.node_groups = tuple(self.node_groups)
            for i, g in enumerate(self.node_groups):
                if not isinstance(g, NodeGroup):
                    raise ClusterError(f"node_groups[{i}]={g!r}: must be a NodeGroup")
            total = sum(g.nodes for g in self.node_groups)
            if self.nodes is not None and self.nodes != total:
                raise ClusterError(
                    f"nodes={self.nodes} but node_groups hold {total} nodes; drop nodes or make them agree"
                )
            self.nodes = total
        else:
            if not isinstance(device, DeviceSpec):
                raise ClusterError(f"device={device!r}: must be a DeviceSpec (or give node_groups)")
            schema.check_count("nodes", self.nodes)
            self.node_groups = (NodeGroup(nodes=self.nodes, device=device),)
        if not isinstance(self.intra_node, Link):
            raise ClusterError(f"intra_node={self.intra_node!r}: must be a Link")
        if self.inter_node is None:
            if self.nodes > 1:
                raise ClusterError(f"inter_node is required for nodes={self.nodes} > 1")
            self.inter_node = self.intra_node
        if not isinstance(self.inter_node, Link):
            raise ClusterError(f"inter_node={self.inter_node!r}: must be a Link")
        if not self.name:
            kinds = "+".join(g.device.name for g in self.node_groups)
            self.name = f"{self.nodes}x{self.devices_per_node} {kinds}"

    # ---------------------------------------------------------------------------- topology
    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def is_heterogeneous(self) -> bool:
        return len({g.device for g in self.node_groups}) > 1

    @property
    def device_kinds(self) -> list[DeviceSpec]:
        """Distinct device kinds in rank order."""
        out: list[DeviceSpec] = []
        for g in self.node_groups:
            if g.device not in out:
                out.append(g.device)
        return out

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.num_devices:
            raise ClusterError(f"rank {rank!r} is outside 0..{self.num_devices - 1} of cluster {self.name!r}")

    def node_of(self, rank: int) -> int:
        """Node index of ``rank`` (ranks are node-major)."""
        self._check_rank(rank)
        return rank // self.devices_per_node

    def device_of(self, rank: int) -> DeviceSpec:
        """Device kind of ``rank``; works on heterogeneous clusters too."""
        node = self.node_of(rank)
        for g in self.node_groups:
            if node < g.nodes:
                return g.device
            node -= g.nodes
        raise AssertionError("node groups do not cover every node")  # pragma: no cover

    def ranks_of_node(self, node: int) -> list[int]:
        if not isinstance(node, int) or not 0 <= node < self.nodes:
            raise ClusterError(f"node {node!r} is outside 0..{self.nodes - 1} of cluster {self.name!r}")
        start = node * self.devices_per_node
        return list(range(start, start + self.devices_per_node))

    def link_between(self, rank_a: int, rank_b: int) -> Link:
        """``intra_node`` when both ranks share a node, ``inter_node`` otherwise."""
        same = self.node_of(rank_a) == self.node_of(rank_b)
        return self.intra_node if same else self.inter_node

    # -------------------------------------------------------------------------- serialise
    def to_dict(self) -> dict:
        """Canonical form (SI units, every field explicit); ``from_dict`` reads it back."""
        d: dict = {"name": self.name, "nodes": self.nodes, "devices_per_node": self.devices_per_node}
        if self.is_heterogeneous:
            d["node_groups"] = [{"nodes": g.nodes, "device": g.device.to_dict()} for g in self.node_groups]
        else:
            d["device"] = self.node_groups[0].device.to_dict()
        d["intra_node"] = self.intra_node.to_dict()
        d["inter_node"] = self.inter_node.to_dict()
        return d

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cluster):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        kinds = " + ".join(f"{g.nodes}x{self.devices_per_node} {g.device.name}" for g in self.node_groups)
        return f"Cluster({self.name!r}: {kinds}, {self.num_devices} devices)"

    def describe(self) -> str:
        """A short human-readable table: the devices of each node group and the links (units by
        :mod:`autopar.core.text`)."""
        c = self
        rows = [
            f"cluster {c.name}: {c.nodes} node(s) x {c.devices_per_node} devices = {c.num_devices} devices"
        ]
        start = 0
        for g in c.node_groups:
            span = f"nodes {start}-{start + g.nodes - 1}" if c.is_heterogeneous else "device"
            rows.append(f"  {span:<11} {schema.device_line(g.device)}")
            start += g.nodes
        rows.append(f"  {'intra-node':<11} {schema.link_line(c.intra_node)}")
        if c.nodes > 1:
            rows.append(f"  {'inter-node':<11} {schema.link_line(c.inter_node)}")
        return "\n".join(rows)

    def with_overrides(self, **overrides: object) -> Cluster:
        """A copy with CLI-style overrides applied (``nodes=``, ``inter_node_gbps=``, ...)."""
        base = self.to_dict()
        base.pop("name")
        name = str(overrides.pop("name", "")) or _override_name(self.name, overrides)
        return Cluster.from_dict({**schema.apply_overrides(base, overrides, self.name), "name": name})

    # ---------------------------------------------------------------------------- loaders
    @classmethod
    def from_dict(cls, d: dict, *, where: str = "") -> Cluster:
        """Build from the YAML/JSON schema (see ``docs/cluster_format.md``); errors name the field path.

        ``where`` prefixes error messages (the file name when loading a file).
        """
        try:
            kwargs = schema.parse_cluster_dict(d, preset_dict=_preset_dict)
            groups = kwargs.pop("node_groups", None)
            if groups:
                kwargs["node_groups"] = tuple(NodeGroup(nodes=n, device=dev) for n, dev in groups)
            return cls(**kwargs)
        except ClusterError as e:
            if where:
                raise ClusterError(f"{where}: {e}") from None
            raise

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Cluster:
        """Load a cluster file: YAML, or JSON (``.json``; JSON is also valid YAML)."""
        path = Path(path)
        return cls.from_dict(schema.read_file(path), where=str(path))

    @classmethod
    def preset(cls, name: str, **overrides: object) -> Cluster:
        """A known preset (``autopar hardware`` lists them), e.g. ``preset("dgx-h100", nodes=4)``.

        Overrides: ``nodes``, ``devices`` (alias ``gpus``: total devices), ``devices_per_node``,
        ``device`` (a kind name), ``name``, and per link ``{intra,inter}_node_`` +
        ``bandwidth_bytes_per_s | gbps | latency_s | latency_us``. ``gbps`` is gigabits/s per device.
        """
        if name == "local":
            return cls.local(**overrides)
        base = _preset_dict(name, "preset")
        label = str(overrides.pop("name", "")) or _override_name(name, overrides)
        d = schema.apply_overrides(base, overrides, name)
        return cls.from_dict({**d, "name": label})

    @classmethod
    def local(cls, ranks: int | str | None = None, **overrides: object) -> Cluster:
        """``ranks`` CPU processes on this machine (one node, gloo over loopback).

        Each rank gets ``cpu_count / ranks`` cores' worth of the nominal ``cpu`` numbers
        (:func:`autopar.cluster.hardware.cpu_spec`) and that share of RAM; the profiler's measurements
        replace these numbers once it has run. Default ``ranks``: the number of cores.
        """
        for alias in ("devices", "gpus"):
            if alias in overrides:
                if ranks is not None:
                    raise ClusterError(f"local: give ranks or {alias}, not both")
                ranks = overrides.pop(alias)
        ranks = schema.to_int("local ranks", ranks if ranks is not None else (os.cpu_count() or 1))
        nodes = overrides.pop("nodes", 1)
        if schema.to_int("local nodes", nodes) != 1:
            raise ClusterError(f"local: nodes={nodes} but a local cluster is this one machine; use nodes=1")
        cores = (os.cpu_count() or 1) / ranks
        base = {
            "nodes": 1,
            "devices_per_node": ranks,
            "device": cpu_spec(cores).to_dict(),
            "intra_node": LOOPBACK_GLOO.to_dict(),
            "inter_node": LOOPBACK_GLOO.to_dict(),
        }
        label = str(overrides.pop("name", "")) or _override_name(
            f"local:{ranks}", overrides, f"ranks={ranks}"
        )
        return cls.from_dict({**schema.apply_overrides(base, overrides, "local"), "name": label})

    @classmethod
    def parse(cls, spec: str) -> Cluster:
        """The CLI's ``--cluster`` value: a file path, ``PRESET``, ``PRESET:N`` (N devices in all),
        ``PRESET:k=v,...`` or ``local:N`` (N ranks).

        >>> Cluster.parse("dgx-a100-80g:128").nodes      # 128 GPUs = 16 nodes of 8
        16
        """
        spec = str(spec).strip()
        if not spec:
            raise ClusterError("empty cluster spec; give a preset (see `autopar hardware`) or a file path")
        path = Path(spec)
        name = spec.partition(":")[0]
        is_dir = path.is_dir() and name not in cls.presets()
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file() or is_dir:
            return cls.from_yaml(path)
        name, _, args = spec.partition(":")
        overrides = schema.parse_override_args(args, spec)
        if name == "local":
            return cls.local(**overrides)
        _preset_dict(name, f"cluster {spec!r}")  # unknown name: error before parsing overrides
        return cls.preset(name, **overrides)

    @staticmethod
    def presets() -> list[str]:
        """Names accepted by :meth:`preset` and :meth:`parse`."""
        return [*PRESETS, "local"]


def _preset_dict(name: str, where: str) -> dict:
    if name not in PRESETS:
        hint = did_you_mean(str(name), [*PRESETS, "local"])
        raise ClusterError(
            f"{where}: unknown cluster preset {name!r}{hint}; known presets: "
            f"{', '.join([*PRESETS, 'local'])}; or give a path to a .yaml/.json cluster file"
        )
    p = PRESETS[name]
    return {
        "nodes": 1,
        "devices_per_node": p.devices_per_node,
        "device": p.device.to_dict(),
        "intra_node": p.intra_node.to_dict(),
        "inter_node": p.inter_node.to_dict(),
    }


def _override_name(base: str, overrides: dict, keep: str = "") -> str:
    """``dgx-a100-80g`` + ``{nodes: 4}`` -> ``dgx-a100-80g:nodes=4``."""
    if not overrides:
        return base
    args = [keep] if keep else []
    args += [f"{k}={v}" for k, v in overrides.items()]
    return base.split(":")[0] + ":" + ",".join(args)

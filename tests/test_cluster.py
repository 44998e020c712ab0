"""Cluster declarations: loaders, validation messages, presets against their datasheets, overrides,
heterogeneous node groups. Oracles: the datasheet numbers in ../shared/data/hardware.json (copied
here so the test runs without shared/) and hand-computed per-GPU shares."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from autopar import Cluster, ClusterError, DeviceSpec, Link
from autopar.cluster.hardware import DEVICES, PRESETS

# Datasheet figures (shared/data/hardware.json), re-stated as the test oracle.
DATASHEET = {
    "v100-16g": ({"fp16": 125e12, "fp32": 15.7e12}, 16e9, 900e9),
    "v100-32g": ({"fp16": 125e12, "fp32": 15.7e12}, 32e9, 900e9),
    "a100-40g": ({"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 40e9, 1555e9),
    "a100-80g": ({"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 80e9, 2039e9),
    "h100-sxm": ({"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "fp32": 67e12}, 80e9, 3.35e12),
    "h200": ({"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "fp32": 67e12}, 141e9, 4.8e12),
}

GOOD = {
    "nodes": 4,
    "devices_per_node": 8,
    "device": "a100-80g",
    "intra_node": {"bandwidth_bytes_per_s": 300.0e9, "latency_s": 5.0e-6},
    "inter_node": {"bandwidth_bytes_per_s": 25.0e9, "latency_s": 1.0e-5},
}


def _with(**changes) -> dict:
    d = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = d
        for p in parents:
            target = target[p]
        if value is ...:
            del target[leaf]
        else:
            target[leaf] = value
    return d


# ---------------------------------------------------------------------------- device kinds
@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_device_kinds_match_datasheets(name):
    peaks, memory, hbm = DATASHEET[name]
    dev = DEVICES[name]
    for dtype, value in peaks.items():
        assert dev.peak_flops(dtype) == value
    assert dev.memory_bytes == memory and dev.hbm_bytes_per_s == hbm
    assert "datasheet" in dev.source


SHARED_HARDWARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hardware.json"


@pytest.mark.skipif(not SHARED_HARDWARE.is_file(), reason="../shared/data/hardware.json not beside the repo")
def test_package_constants_equal_the_shared_reference_data():
    ref = json.loads(SHARED_HARDWARE.read_text())
    for name, d in ref["devices"].items():
        dev = DEVICES[name]
        assert dev.peak_flops_per_s == {**dev.peak_flops_per_s, **d["peak_flops_per_s"]}, name
        assert (dev.memory_bytes, dev.hbm_bytes_per_s) == (d["memory_bytes"], d["hbm_bytes_per_s"]), name
    nets = ref["networks"]
    assert (
        PRESETS["dgx-a100-80g"].inter_node.bandwidth_bytes_per_s
        == nets["infiniband_hdr"]["bytes_per_s_per_port"]
    )
    assert (
        PRESETS["dgx-h100"].inter_node.bandwidth_bytes_per_s == nets["infiniband_ndr"]["bytes_per_s_per_port"]
    )
    p3 = nets["aws_p3_16xlarge"]["bytes_per_s_per_node"] / 8
    assert PRESETS["aws-p3.16xlarge"].inter_node.bandwidth_bytes_per_s == pytest.approx(p3)
    for name in ("dgx-a100-80g", "dgx-h100", "aws-p3.16xlarge"):
        nvlink = ref["devices"][PRESETS[name].device.name]["nvlink_bytes_per_s_per_direction"]
        assert PRESETS[name].intra_node.bandwidth_bytes_per_s == nvlink


def test_every_required_kind_exists_and_cites_a_source():
    for name in ("a100-40g", "a100-80g", "h100-sxm", "h200", "v100-16g", "v100-32g", "cpu"):
        assert DEVICES[name].source


def test_dtype_aliases_and_missing_dtype():
    a100 = DEVICES["a100-80g"]
    assert a100.peak_flops("bfloat16") == a100.peak_flops("torch.bfloat16") == 312e12
    assert a100.preferred_dtype == "bf16"
    assert DEVICES["v100-16g"].preferred_dtype == "fp16"
    with pytest.raises(ClusterError, match=r"v100-16g.*no bf16 peak.*it has fp32, fp16"):
        DEVICES["v100-16g"].peak_flops("bf16")
    with pytest.raises(ClusterError, match="dtype 'fp64' is not known"):
        a100.peak_flops("fp64")


# --------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "name, device, intra_bytes_per_s, inter_bytes_per_s",
    [
        ("dgx-a100-80g", "a100-80g", 300e9, 200e9 / 8),  # NVLink3; 8x HDR 200 Gb/s, one per GPU
        ("dgx-a100-40g", "a100-40g", 300e9, 200e9 / 8),
        ("dgx-h100", "h100-sxm", 450e9, 400e9 / 8),  # NVLink4; 8x NDR 400 Gb/s
        ("hgx-h200", "h200", 450e9, 400e9 / 8),
        ("aws-p3.16xlarge", "v100-16g", 150e9, 25e9 / 8 / 8),  # one 25 Gb/s NIC shared by 8 GPUs
    ],
)
def test_presets(name, device, intra_bytes_per_s, inter_bytes_per_s):
    c = Cluster.preset(name)
    assert (c.nodes, c.devices_per_node, c.num_devices) == (1, 8, 8)
    assert c.device == DEVICES[device]
    assert c.intra_node.bandwidth_bytes_per_s == pytest.approx(intra_bytes_per_s)
    assert c.inter_node.bandwidth_bytes_per_s == pytest.approx(inter_bytes_per_s)
    assert 0 < c.intra_node.latency_s < c.inter_node.latency_s < 1e-4
    assert c.intra_node.source and c.inter_node.source
    assert Cluster.preset(name, nodes=3).num_devices == 24


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ClusterError) as e:
        Cluster.preset("dgx-a100")
    msg = str(e.value)
    assert "unknown cluster preset 'dgx-a100' (did you mean 'dgx-a100-80g' or 'dgx-a100-40g'?)" in msg
    for name in (*PRESETS, "local"):
        assert name in msg


# ------------------------------------------------------------------------------ CLI specs
def test_parse_forms():
    assert Cluster.parse("dgx-h100") == Cluster.preset("dgx-h100")
    c = Cluster.parse("dgx-a100-80g:nodes=16,inter_node_gbps=100")
    assert c.nodes == 16 and c.inter_node.bandwidth_bytes_per_s == 100e9 / 8
    assert c.inter_node.latency_s == PRESETS["dgx-a100-80g"].inter_node.latency_s  # untouched
    assert "override inter_node_gbps=100" in c.inter_node.source
    # A bare number is the total device count, the same as gpus= / devices=.
    assert Cluster.parse("dgx-a100-80g:128").nodes == 16
    assert Cluster.parse("dgx-a100-80g:gpus=128").nodes == Cluster.parse("dgx-a100-80g:devices=128").nodes
    assert Cluster.parse("dgx-a100-80g:gpus=128").num_devices == 128
    partial = Cluster.parse("dgx-h100:4")
    assert (partial.nodes, partial.devices_per_node) == (1, 4)
    c = Cluster.parse("dgx-h100:nodes=2,intra_node_latency_us=2,inter_node_bandwidth_bytes_per_s=1e10")
    assert c.intra_node.latency_s == pytest.approx(2e-6) and c.inter_node.bandwidth_bytes_per_s == 1e10
    assert Cluster.parse("dgx-a100-80g:device=a100-40g").device.name == "a100-40g"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dgx-a100-80g:100", "100 devices is not a whole number of 8-device nodes; choose a multiple of 8"),
        ("dgx-a100-80g:nodes=0", "dgx-a100-80g: nodes: 0 must be >= 1"),
        ("dgx-a100-80g:nodes=two", "nodes: 'two' must be a whole number >= 1"),
        ("dgx-a100-80g:node=4", "unknown override 'node' (did you mean 'nodes'?)"),
        ("dgx-a100-80g:inter_node_gbps=-5", "inter_node.bandwidth_gbps: '-5' must be > 0"),
        ("dgx-a100-80g:inter_node_gbps=fast", "inter_node.bandwidth_gbps: 'fast' is not a number"),
        ("dgx-a100-80g:nodes=2,gpus=128", "nodes=2 disagrees with 128 devices"),
        ("dgx-a100-80g:gpus=8,devices=8", "both give the device count"),
        ("dgx-a100-80g:fast", "neither a device count nor key=value"),
        ("dgx-a100-80g:device=a100", "unknown device kind 'a100'"),
        ("h100:8", "unknown cluster preset 'h100'"),
        ("missing.yaml", "cluster file 'missing.yaml' not found"),
        ("local:nodes=2", "a local cluster is this one machine"),
        ("", "empty cluster spec"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ClusterError) as e:
        Cluster.parse(spec)
    assert message in str(e.value)


def test_local():
    c = Cluster.local(ranks=4)
    assert (c.nodes, c.devices_per_node, c.num_devices) == (1, 4, 4)
    assert c.device.name == "cpu" and c.name == "local:4"
    # Each rank owns cpu_count/4 cores of nominal peak.
    cores = (os.cpu_count() or 1) / 4
    assert c.device.peak_flops("fp32") == pytest.approx(96e9 * cores)
    assert Cluster.parse("local:4") == c
    assert Cluster.parse("local:ranks=2").num_devices == 2
    assert Cluster.local().num_devices == (os.cpu_count() or 1)


# ------------------------------------------------------------------------------- from_dict
def test_from_dict_issue_example_and_round_trip():
    c = Cluster.from_dict(GOOD)
    assert c.num_devices == 32 and c.device == DEVICES["a100-80g"]
    assert c.intra_node == Link(300e9, 5e-6) and c.inter_node == Link(25e9, 1e-5)
    assert Cluster.from_dict(c.to_dict()) == c
    assert Cluster.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_human_units_and_numeric_strings():
    d = _with(intra_node={"bandwidth_gbps": 2400, "latency_us": 5}, inter_node__bandwidth_bytes_per_s="25e9")
    c = Cluster.from_dict(d)
    assert c.intra_node == Link(300e9, 5e-6)
    assert c.inter_node.bandwidth_bytes_per_s == 25e9  # YAML 1.1 reads 25e9 (no dot) as a string


def test_device_mapping():
    d = _with(device={"name": "my-gpu", "peak_flops_per_s": {"bfloat16": 1e15, "fp32": 5e13},
                      "memory_bytes": 96e9, "hbm_bytes_per_s": 3e12})  # fmt: skip
    c = Cluster.from_dict(d)
    assert c.device.peak_flops("bf16") == 1e15 and c.device.memory_bytes == 96e9


def test_preset_key_in_file():
    c = Cluster.from_dict({"preset": "dgx-h100", "nodes": 4, "inter_node": {"bandwidth_gbps": 200}})
    assert c.nodes == 4 and c.device.name == "h100-sxm"
    assert c.inter_node.bandwidth_bytes_per_s == 25e9
    assert c.inter_node.latency_s == PRESETS["dgx-h100"].inter_node.latency_s


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"intra_node__bandwidth_bytes_per_s": -3}, "intra_node.bandwidth_bytes_per_s: -3 must be > 0"),
        ({"inter_node__bandwidth_bytes_per_s": "fast"}, "inter_node.bandwidth_bytes_per_s: 'fast' is not a number"),
        ({"inter_node__latency_s": True}, "inter_node.latency_s: True is not a number"),
        ({"inter_node__latency_s": float("nan")}, "inter_node.latency_s: nan must be a finite number"),
        ({"nodes": 0}, "nodes: 0 must be >= 1"),
        ({"nodes": 2.5}, "nodes: 2.5 must be a whole number >= 1"),
        ({"devices_per_node": ...}, "devices_per_node: missing field"),
        ({"intra_node__latency_s": ...}, "intra_node.latency_s: missing field"),
        ({"inter_node": ...}, "inter_node: missing field"),
        ({"device": "a100"}, "device: unknown device kind 'a100' (did you mean 'a100-40g' or 'a100-80g'?)"),
        ({"device": {"name": "x", "memory_bytes": 1e9}}, "device.peak_flops_per_s: missing field"),
        ({"device": {"name": "x", "peak_flops_per_s": {"fp64": 1e12}, "memory_bytes": 1, "hbm_bytes_per_s": 1}},
         "device.peak_flops_per_s.fp64: dtype 'fp64' is not known"),
        ({"devices_per_nod": 8}, "devices_per_nod: unknown key (did you mean 'devices_per_node'?)"),
        ({"intra_node__bandwith_gbps": 8}, "intra_node.bandwith_gbps: unknown key (did you mean 'bandwidth_gbps'?)"),
        ({"intra_node__bandwidth_gbps": 8}, "intra_node: give bandwidth_bytes_per_s or bandwidth_gbps, not both"),
        ({"intra_node": [1, 2]}, "intra_node: expected a mapping"),
        ({"preset": "dgx"}, "unknown cluster preset 'dgx'"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(changes, message):
    with pytest.raises(ClusterError) as e:
        Cluster.from_dict(_with(**changes))
    assert message in str(e.value), str(e.value)


def test_single_node_needs_no_inter_node_link():
    d = _with(nodes=1, inter_node=...)
    c = Cluster.from_dict(d)
    assert c.inter_node == c.intra_node


# ----------------------------------------------------------------------------------- files
def test_from_yaml_and_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "nodes: 4\ndevices_per_node: 8\ndevice: a100-80g   # a known kind\n"
        "intra_node: {bandwidth_bytes_per_s: 300.0e9, latency_s: 5.0e-6}\n"
        "inter_node: {bandwidth_bytes_per_s: 25.0e9, latency_s: 1.0e-5}\n"
    )
    j = tmp_path / "c.json"
    j.write_text(json.dumps(GOOD))
    assert Cluster.from_yaml(y) == Cluster.from_dict(GOOD)
    assert Cluster.parse(str(j)) == Cluster.from_dict(GOOD)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "nodes: 4\ndevices_per_node: 8\ndevice: a100-80g\nintra_node: {bandwidth_bytes_per_s: -3, latency_s: 0}\n"
    )
    with pytest.raises(ClusterError, match=r"bad.yaml: intra_node.bandwidth_bytes_per_s: -3 must be > 0"):
        Cluster.from_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [4\n")
    with pytest.raises(ClusterError, match="broken.yaml: not valid YAML"):
        Cluster.from_yaml(broken)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("4")
    with pytest.raises(ClusterError, match="expected a mapping at the top level"):
        Cluster.from_yaml(scalar)


# --------------------------------------------------------------------------- heterogeneous
def test_heterogeneous_is_representable():
    d = {
        "devices_per_node": 8,
        "node_groups": [{"nodes": 2, "device": "a100-80g"}, {"nodes": 2, "device": "v100-32g"}],
        "intra_node": GOOD["intra_node"],
        "inter_node": GOOD["inter_node"],
    }
    c = Cluster.from_dict(d)
    assert c.is_heterogeneous and c.nodes == 4 and c.num_devices == 32
    assert [c.device_of(r).name for r in (0, 15, 16, 31)] == ["a100-80g", "a100-80g", "v100-32g", "v100-32g"]
    assert [c.node_of(r) for r in (0, 7, 8, 31)] == [0, 0, 1, 3]
    assert [k.name for k in c.device_kinds] == ["a100-80g", "v100-32g"]
    assert c.link_between(0, 7) is c.intra_node and c.link_between(7, 8) is c.inter_node
    with pytest.raises(ClusterError, match="heterogeneous .* no single device kind"):
        _ = c.device
    assert Cluster.from_dict(c.to_dict()) == c
    assert "nodes 2-3" in c.describe() and "v100-32g" in repr(c)
    with pytest.raises(ClusterError, match="nodes: 3 but node_groups hold 4 nodes"):
        Cluster.from_dict({**d, "nodes": 3})
    with pytest.raises(ClusterError, match="device and node_groups: give one"):
        Cluster.from_dict({**d, "device": "a100-80g"})


def test_constructor_validates():
    a100 = DEVICES["a100-80g"]
    nv = Link(300e9, 5e-6)
    c = Cluster(nodes=2, devices_per_node=8, device=a100, intra_node=nv, inter_node=Link(25e9, 1e-5))
    assert c.num_devices == 16 and not c.is_heterogeneous and c.device is a100
    assert dataclasses.replace(c, nodes=8).num_devices == 64 and c.num_devices == 16
    with pytest.raises(ClusterError, match="nodes: 0 must be >= 1"):
        Cluster(nodes=0, devices_per_node=8, device=a100, intra_node=nv, inter_node=nv)
    with pytest.raises(ClusterError, match="inter_node is required for nodes=2"):
        Cluster(nodes=2, devices_per_node=8, device=a100, intra_node=nv)
    with pytest.raises(ClusterError, match=r"link.bandwidth_bytes_per_s=0: must be a finite number > 0"):
        Link(0, 1e-6)
    with pytest.raises(ClusterError, match="memory_bytes=-1"):
        DeviceSpec("x", {"fp32": 1e12}, -1, 1e9)
    with pytest.raises(ClusterError, match="rank 16 is outside 0..15"):
        c.device_of(16)


def test_describe_and_overrides():
    c = Cluster.preset("dgx-a100-80g", nodes=4)
    text = c.describe()
    assert "4 node(s) x 8 devices = 32 devices" in text
    assert "300 GB/s per device per direction" in text and "25 GB/s per device per direction" in text
    assert "bf16 312 TFLOP/s" in text
    bigger = c.with_overrides(nodes=16, inter_node_gbps=400)
    assert bigger.nodes == 16 and bigger.inter_node.bandwidth_bytes_per_s == 50e9
    assert c.nodes == 4  # unchanged

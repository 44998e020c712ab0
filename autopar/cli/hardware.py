"""``autopar hardware``: the device kinds and cluster presets autopar knows, with their sources."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from autopar.core.text import gb_text

if TYPE_CHECKING:
    from autopar.cluster.hardware import DeviceSpec, Preset

ORDER = 80


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "hardware",
        help="list known device kinds and cluster presets",
        description="List the device kinds (peak FLOP/s per dtype, memory, bandwidth) and cluster presets "
        "(devices per node, intra/inter-node links per device, one direction), with their sources.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--sources", action="store_true", help="also print where every number comes from")
    p.set_defaults(func=run)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tflops(dev: DeviceSpec, dtype: str) -> str:
    value = dev.peak_flops_per_s.get(dtype)
    if value is None:
        return "-"
    return f"{value / 1e12:.4g}"


def device_table(devices: dict[str, DeviceSpec]) -> str:
    dtypes = ("fp32", "tf32", "fp16", "bf16", "fp8")
    header = ["device", *(f"{d} TFLOP/s" for d in dtypes), "memory GB", "mem bw GB/s"]
    rows = [
        [
            d.name,
            *(_tflops(d, t) for t in dtypes),
            gb_text(d.memory_bytes, ".4g", unit=False),
            gb_text(d.hbm_bytes_per_s, ".4g", unit=False),
        ]
        for d in devices.values()
    ]
    return _table(header, rows)


def preset_table(presets: dict[str, Preset]) -> str:
    header = [
        "preset",
        "device",
        "per node",
        "intra GB/s",
        "intra us",
        "inter GB/s",
        "inter us",
        "description",
    ]
    rows = []
    for p in presets.values():
        rows.append(
            [
                p.name,
                p.device.name,
                str(p.devices_per_node),
                gb_text(p.intra_node.bandwidth_bytes_per_s, ".4g", unit=False),
                f"{p.intra_node.latency_s * 1e6:.3g}",
                gb_text(p.inter_node.bandwidth_bytes_per_s, ".4g", unit=False),
                f"{p.inter_node.latency_s * 1e6:.3g}",
                p.description,
            ]
        )
    rows.append(["local", "cpu", "N ranks", "(gloo)", "", "", "", "N CPU processes on this machine: local:N"])
    return _table(header, rows)


def run(args: argparse.Namespace) -> int:
    from autopar.cluster.hardware import DEVICES, PRESETS

    if args.json:
        out = {
            "devices": {name: d.to_dict() for name, d in DEVICES.items()},
            "presets": {
                name: {
                    "device": p.device.name,
                    "devices_per_node": p.devices_per_node,
                    "intra_node": p.intra_node.to_dict(),
                    "inter_node": p.inter_node.to_dict(),
                    "description": p.description,
                }
                for name, p in PRESETS.items()
            },
        }
        print(json.dumps(out, indent=2))
        return 0
    print("Device kinds (dense peaks; GB = 1e9 bytes)")
    print(device_table(DEVICES))
    print()
    print("Cluster presets (bandwidth per device, one direction; latency per hop)")
    print(preset_table(PRESETS))
    print()
    print(
        "Use a preset as --cluster PRESET, PRESET:N (N devices in all) or PRESET:nodes=4,inter_node_gbps=100."
    )
    if args.sources:
        print("\nSources")
        for d in DEVICES.values():
            print(f"  {d.name}: {d.source}")
        for p in PRESETS.values():
            print(f"  {p.name} intra-node: {p.intra_node.source}")
            print(f"  {p.name} inter-node: {p.inter_node.source}")
    return 0

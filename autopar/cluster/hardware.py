"""Hardware constants: device kinds, links and cluster presets, each citing its source.

Conventions (the same everywhere in autopar):

* ``peak_flops_per_s`` is the *dense* peak (no 2:4 sparsity) of one device, per dtype key
  ``fp32 tf32 fp16 bf16 fp8``. A dtype the device has no fast path for is absent
  (:meth:`DeviceSpec.peak_flops` names what it has).
* ``memory_bytes`` is the datasheet capacity with ``GB = 1e9 bytes``. The physical HBM of an
  "80 GB" part is 80 GiB (85.9e9 B) of which CUDA exposes ~79.2 GiB; using 80e9 keeps ~5% headroom for
  the CUDA context, NCCL buffers and allocator fragmentation.
* A :class:`Link` bandwidth is **per device, one direction**: the bytes per second one device can
  send while every device of its node sends at the same time. NVLink "600 GB/s" (A100) is
  bidirectional, so 300e9 here. Inter-node bandwidth is the node's NIC bandwidth divided by the
  devices per node (DGX A100: 8x 200 Gb/s HDR, one NIC per GPU -> 25e9 per GPU; AWS
  p3.16xlarge: one 25 Gb/s NIC shared by 8 GPUs -> 0.39e9 per GPU).
* A link ``latency_s`` is the latency of one hop (one step of a ring), not of a whole collective.
  :data:`NCCL_COLLECTIVE_BASE_LATENCY_S` is NCCL's fixed cost per collective call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from autopar.core.errors import ClusterError
from autopar.core.text import did_you_mean

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")
"""Canonical keys of :attr:`DeviceSpec.peak_flops_per_s`."""

_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "tensorfloat32": "tf32",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "torch.float8_e4m3fn": "fp8",
    "torch.float8_e5m2": "fp8",
}


def canonical_dtype(dtype: object) -> str:
    """``'bfloat16'``, ``torch.bfloat16`` or ``'bf16'`` -> ``'bf16'``; unknown names raise ClusterError."""
    key = str(dtype).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ClusterError(f"dtype {dtype!r} is not known; use one of {', '.join(DTYPES)}")
    return key


def _check_positive(owner: str, name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ClusterError(f"{owner}.{name}={value!r}: must be a finite number {rule}")


# ------------------------------------------------------------------------------------ types
@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or CPU rank) kind."""

    name: str
    """Kind name, e.g. ``a100-80g``."""
    peak_flops_per_s: dict[str, float]
    """Dense peak FLOP/s per dtype key (``fp32 tf32 fp16 bf16 fp8``); absent = no fast path."""
    memory_bytes: float
    """Device memory capacity in bytes (datasheet GB = 1e9 B)."""
    hbm_bytes_per_s: float
    """Device memory bandwidth in bytes/s."""
    source: str = ""
    """Where the numbers come from (datasheet, paper, measurement)."""

    def __post_init__(self) -> None:
        owner = f"device {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ClusterError(f"device name {self.name!r}: must be a non-empty string")
        if not isinstance(self.peak_flops_per_s, dict) or not self.peak_flops_per_s:
            raise ClusterError(
                f"{owner}.peak_flops_per_s={self.peak_flops_per_s!r}: must be a non-empty mapping "
                f"dtype -> FLOP/s with keys among {', '.join(DTYPES)}"
            )
        peaks = {}
        for key, value in self.peak_flops_per_s.items():
            canon = canonical_dtype(key)
            _check_positive(f"{owner}.peak_flops_per_s", canon, value)
            peaks[canon] = float(value)
        object.__setattr__(self, "peak_flops_per_s", peaks)
        _check_positive(owner, "memory_bytes", self.memory_bytes)
        _check_positive(owner, "hbm_bytes_per_s", self.hbm_bytes_per_s)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.peak_flops_per_s.items())), self.memory_bytes))

    def peak_flops(self, dtype: object) -> float:
        """Dense peak FLOP/s for ``dtype`` (``'bf16'``, ``torch.float16``, ...)."""
        key = canonical_dtype(dtype)
        if key not in self.peak_flops_per_s:
            have = ", ".join(self.peak_flops_per_s)
            raise ClusterError(
                f"device {self.name!r} lists no {key} peak (it has {have}); "
                f"run in one of those dtypes or declare a {key} peak in the device mapping"
            )
        return self.peak_flops_per_s[key]

    @property
    def preferred_dtype(self) -> str:
        """The 16-bit training dtype with the highest peak (bf16 over fp16 on ties), else fp32."""
        best = "fp32"
        for key in ("bf16", "fp16"):
            if self.peak_flops_per_s.get(key, 0.0) > self.peak_flops_per_s.get(best, 0.0):
                best = key
        return best

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "peak_flops_per_s": dict(self.peak_flops_per_s),
            "memory_bytes": self.memory_bytes,
            "hbm_bytes_per_s": self.hbm_bytes_per_s,
            "source": self.source,
        }


@dataclass(frozen=True)
class Link:
    """One topology level. Bandwidth is per device, one direction (see the module docstring)."""

    bandwidth_bytes_per_s: float
    """Bytes/s one device sends (and, at the same time, receives) over this level."""
    latency_s: float
    """Latency of one hop (one ring step) in seconds."""
    source: str = field(default="", compare=False)
    """Where the numbers come from."""

    def __post_init__(self) -> None:
        _check_positive("link", "bandwidth_bytes_per_s", self.bandwidth_bytes_per_s)
        _check_positive("link", "latency_s", self.latency_s, allow_zero=True)

    def to_dict(self) -> dict:
        return {
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "latency_s": self.latency_s,
            "source": self.source,
        }


# --------------------------------------------------------------------------------- devices
_A100_PEAKS = {"fp32": 19.5e12, "tf32": 156e12, "fp16": 312e12, "bf16": 312e12}
_H100_PEAKS = {"fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12, "bf16": 989.4e12, "fp8": 1978.9e12}
_V100_PEAKS = {"fp32": 15.7e12, "fp16": 125e12}  # no bf16/tf32 units on Volta

V100_16G = DeviceSpec(
    "v100-16g",
    _V100_PEAKS,
    16e9,
    900e9,
    "NVIDIA Tesla V100 datasheet (SXM2): FP32 15.7 TFLOPS, tensor FP16 125 TFLOPS, 16 GB HBM2, 900 GB/s",
)
V100_32G = DeviceSpec(
    "v100-32g",
    _V100_PEAKS,
    32e9,
    900e9,
    "NVIDIA Tesla V100 datasheet (SXM2): FP32 15.7 TFLOPS, tensor FP16 125 TFLOPS, 32 GB HBM2, 900 GB/s",
)
V100_SXM3_32G = DeviceSpec(
    "v100-sxm3-32g",
    {"fp32": 15.7e12 * 130 / 125, "fp16": 130e12},
    32e9,
    900e9,
    "V100 SXM3 32GB as in the NVIDIA DGX-2H (450 W, higher clocks than SXM2): tensor FP16 130 TFLOPS "
    "(Shoeybi et al. 2019, arXiv 1909.08053, sec. 5.1: 39 TFLOPS 'is 30% of the theoretical peak FLOPS "
    "for a single GPU in a DGX-2H server' -> 130, derived); "
    "FP32 the SXM2 datasheet's 15.7 scaled by the same clock ratio (derived); 32 GB HBM2, 900 GB/s "
    "(V100 datasheet)",
)
A100_40G = DeviceSpec(
    "a100-40g",
    _A100_PEAKS,
    40e9,
    1555e9,
    "NVIDIA A100 Tensor Core GPU datasheet, SXM4 40GB: FP32 19.5, TF32 156, BF16/FP16 312 TFLOPS "
    "(dense), 40 GB HBM2, 1,555 GB/s",
)
A100_80G = DeviceSpec(
    "a100-80g",
    _A100_PEAKS,
    80e9,
    2039e9,
    "NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB: FP32 19.5, TF32 156, BF16/FP16 312 TFLOPS "
    "(dense), 80 GB HBM2e, 2,039 GB/s",
)
H100_SXM = DeviceSpec(
    "h100-sxm",
    _H100_PEAKS,
    80e9,
    3.35e12,
    "NVIDIA H100 Tensor Core GPU datasheet, SXM5: FP32 67, TF32 494.7, BF16/FP16 989.4, FP8 1,978.9 "
    "TFLOPS (dense: half the datasheet's with-sparsity figures), 80 GB HBM3, 3.35 TB/s",
)
H200 = DeviceSpec(
    "h200",
    _H100_PEAKS,
    141e9,
    4.8e12,
    "NVIDIA H200 Tensor Core GPU datasheet, SXM: same compute as H100 SXM (BF16 989.4 TFLOPS dense), "
    "141 GB HBM3e, 4.8 TB/s",
)

CPU_CORE_PEAK_FLOPS_PER_S = 96e9
"""One x86 core with AVX2 FMA: 2 FMA ports x 8 fp32 lanes x 2 FLOP x 3.0 GHz (Intel 64 and IA-32
Optimization Reference Manual, Haswell+ / AMD Zen 2+). Measured on the dev machine (AMD EPYC, torch
2.13 sgemm 2048^3, 1 thread): 90 GFLOP/s."""
CPU_CORE_MEMORY_BYTES_PER_S = 30e9
"""One core streaming memory: measured on the dev machine (torch copy of 64 MiB, 1 thread: 31 GB/s
read+write)."""


def _machine_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 16e9


def cpu_spec(cores: float = 1.0) -> DeviceSpec:
    """A CPU rank that owns ``cores`` cores of this machine (fractional when oversubscribed).

    Nominal numbers: the profiler's measurements replace them once it has run on this machine.
    Memory is this machine's RAM shared by core count.
    """
    if not cores > 0:
        raise ClusterError(f"cpu cores={cores!r}: must be > 0")
    ncpu = os.cpu_count() or 1
    return DeviceSpec(
        "cpu",
        {k: CPU_CORE_PEAK_FLOPS_PER_S * cores for k in ("fp32", "bf16", "fp16")},
        _machine_memory_bytes() * cores / ncpu,
        CPU_CORE_MEMORY_BYTES_PER_S * cores,
        f"nominal x86 AVX2 core x {cores:g} (96 GFLOP/s fp32, 30 GB/s per core; no reduced-precision "
        "speedup assumed); memory = this machine's RAM / cores; replaced by profiled numbers",
    )


DEVICES: dict[str, DeviceSpec] = {
    d.name: d for d in (A100_40G, A100_80G, H100_SXM, H200, V100_16G, V100_32G, V100_SXM3_32G, cpu_spec(1.0))
}
"""Known device kinds by name. ``cpu`` is one core of this machine."""


def device_kind(name: str, where: str = "device") -> DeviceSpec:
    """The known device kind ``name``; a ClusterError listing the known kinds otherwise."""
    if name in DEVICES:
        return DEVICES[name]
    hint = did_you_mean(str(name), list(DEVICES))
    raise ClusterError(
        f"{where}: unknown device kind {name!r}{hint}; known kinds: {', '.join(DEVICES)}; "
        "or give a mapping {name, peak_flops_per_s, memory_bytes, hbm_bytes_per_s}"
    )


# ----------------------------------------------------------------------------------- links
NCCL_TUNING_SOURCE = "NCCL src/graph/tuning.cc hwLat, Ring/Simple per-step latency"
NVLINK_HOP_LATENCY_S = 3.4e-6
"""NCCL's model of one NVLink ring step (Simple protocol): 3.4 us."""
NET_HOP_LATENCY_S = 14.0e-6
"""NCCL's model of one network ring step (Simple protocol, NCCL >= 2.12): 14 us."""
NCCL_COLLECTIVE_BASE_LATENCY_S = 8.4e-6
"""NCCL's fixed latency per ring collective call (baseLat, Ring/Simple): 8.4 us."""

NVLINK3 = Link(
    300e9,
    NVLINK_HOP_LATENCY_S,
    "NVLink 3 via NVSwitch: 12 links x 25 GB/s = 300 GB/s per GPU per direction (A100 datasheet "
    f"'600 GB/s' is bidirectional); latency: {NCCL_TUNING_SOURCE}",
)
NVLINK4 = Link(
    450e9,
    NVLINK_HOP_LATENCY_S,
    "NVLink 4 via NVSwitch: 18 links x 25 GB/s = 450 GB/s per GPU per direction (H100 datasheet "
    f"'900 GB/s' is bidirectional); latency: {NCCL_TUNING_SOURCE}",
)
NVLINK2_V100 = Link(
    150e9,
    NVLINK_HOP_LATENCY_S,
    "NVLink 2 hybrid cube-mesh: 6 links x 25 GB/s = 150 GB/s per V100 per direction (V100 datasheet "
    f"'300 GB/s' is bidirectional; not all pairs are direct); latency: {NCCL_TUNING_SOURCE}",
)
NVSWITCH_V100 = Link(
    150e9,
    NVLINK_HOP_LATENCY_S,
    "NVLink 2 via NVSwitch (DGX-2/DGX-2H): 6 links x 25 GB/s = 150 GB/s per V100 per direction to any "
    "other GPU of the node (Shoeybi et al. 2019 sec. 5: '300 GB/sec bandwidth between GPUs inside a "
    f"server via NVSwitch', bidirectional); latency: {NCCL_TUNING_SOURCE}",
)
IB_EDR_DGX2 = Link(
    100e9 / 16,
    NET_HOP_LATENCY_S,
    "DGX-2H: 8 InfiniBand EDR 100 Gb/s adapters per 16-GPU node = 100 GB/s per node (Shoeybi et al. "
    "2019 sec. 5: '100 GB/sec of interconnect bandwidth between servers using 8 InfiniBand adapters "
    f"per server') = 6.25 GB/s per GPU per direction; latency: {NCCL_TUNING_SOURCE}",
)
IB_HDR_PER_GPU = Link(
    25e9,
    NET_HOP_LATENCY_S,
    "DGX A100 datasheet: 8x single-port ConnectX-6 HDR 200 Gb/s InfiniBand, one per GPU = 25 GB/s "
    f"per GPU per direction; latency: {NCCL_TUNING_SOURCE}",
)
IB_NDR_PER_GPU = Link(
    50e9,
    NET_HOP_LATENCY_S,
    "DGX H100 / DGX H200 datasheets: 8x ConnectX-7 NDR 400 Gb/s InfiniBand, one per GPU = 50 GB/s "
    f"per GPU per direction; latency: {NCCL_TUNING_SOURCE}",
)
AWS_P3_NET_PER_GPU = Link(
    25e9 / 8 / 8,
    NET_HOP_LATENCY_S,
    "AWS EC2 P3 instance page: p3.16xlarge 25 Gb/s network per instance (3.125 GB/s) shared by 8 "
    f"GPUs = 0.39 GB/s per GPU (Alpa OSDI'22 testbed); latency: {NCCL_TUNING_SOURCE} "
    "(TCP sockets are slower in practice)",
)
LOOPBACK_GLOO = Link(
    2e9,
    150e-6,
    "gloo send/recv ping-pong between 2 processes over 127.0.0.1 on the dev machine: ~150 us, "
    "1.8-3 GB/s for 16-64 MiB; replaced by the profiler's measurement",
)


# --------------------------------------------------------------------------------- presets
@dataclass(frozen=True, kw_only=True)
class Preset:
    """A cluster preset: one node type, ``nodes=1`` unless overridden."""

    name: str
    device: DeviceSpec
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="dgx-a100-80g",
            device=A100_80G,
            devices_per_node=8,
            intra_node=NVLINK3,
            inter_node=IB_HDR_PER_GPU,
            description="NVIDIA DGX A100 640GB: 8x A100 SXM4 80GB, NVSwitch, 8x HDR 200 Gb/s IB",
        ),
        Preset(
            name="dgx-a100-40g",
            device=A100_40G,
            devices_per_node=8,
            intra_node=NVLINK3,
            inter_node=IB_HDR_PER_GPU,
            description="NVIDIA DGX A100 320GB: 8x A100 SXM4 40GB, NVSwitch, 8x HDR 200 Gb/s IB",
        ),
        Preset(
            name="dgx-h100",
            device=H100_SXM,
            devices_per_node=8,
            intra_node=NVLINK4,
            inter_node=IB_NDR_PER_GPU,
            description="NVIDIA DGX H100: 8x H100 SXM5 80GB, NVSwitch, 8x NDR 400 Gb/s IB",
        ),
        Preset(
            name="hgx-h200",
            device=H200,
            devices_per_node=8,
            intra_node=NVLINK4,
            inter_node=IB_NDR_PER_GPU,
            description="NVIDIA HGX H200 8-GPU (as in DGX H200): 8x H200 141GB, NVSwitch, 8x NDR 400 Gb/s",
        ),
        Preset(
            name="aws-p3.16xlarge",
            device=V100_16G,
            devices_per_node=8,
            intra_node=NVLINK2_V100,
            inter_node=AWS_P3_NET_PER_GPU,
            description="AWS p3.16xlarge: 8x V100 SXM2 16GB, NVLink hybrid cube-mesh, 25 Gb/s network",
        ),
        Preset(
            name="dgx-2h",
            device=V100_SXM3_32G,
            devices_per_node=16,
            intra_node=NVSWITCH_V100,
            inter_node=IB_EDR_DGX2,
            description="NVIDIA DGX-2H: 16x V100 SXM3 32GB, NVSwitch, 8x EDR 100 Gb/s IB (Megatron-LM 2019)",
        ),
    )
}
"""Known cluster presets by name (``local`` is handled by :meth:`autopar.Cluster.local`)."""

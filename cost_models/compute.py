"""Compute time of one op on one device: a roofline with size-dependent GEMM efficiency.

For a memory-bound op with ``Q`` bytes of traffic on a device with HBM bandwidth ``W``::

    t = Q / (W * eff_hbm) + t_kernel

A GEMM of ``batch`` independent ``m x k @ k x n`` products (``F = 2 batch m n k`` FLOPs, elements
of ``e`` bytes) on a device with dense peak ``P``::

    t = max(F / (P * eff_gemm), batch (m k + k n) e / (W eff_hbm))      main loop over k
        + batch m n e / (W eff_hbm)                                     epilogue: store C
        + t_kernel

    eff_gemm = e_max * x / (x + x_wave),   x = batch * m * n * k / 256

The main loop is a roofline (tensor cores against streaming A and B). The epilogue follows it: each
thread block stores its output tile after its k-loop (Ampere cuBLAS/CUTLASS kernels are not
persistent), so writing C adds to the time instead of overlapping. ``x / (x + x_wave)`` is the
smooth form of wave quantisation: a GEMM with too little parallel work leaves SMs idle. The work
is counted in output elements times 256-deep slices of k, because cuBLAS splits the reduction
(split-K) when a GEMM has too few output tiles to fill the GPU (a GEMV streams its matrix at full
bandwidth instead of idling 107 of 108 SMs). Both effects vanish
for large GEMMs and grow for small ones (small models; a large model cut 8 ways by tensor
parallelism; a short reduction depth k), which is why per-GPU throughput rises with model size in
weak-scaling runs (NVIDIA, "Matrix Multiplication Background User's Guide": tile and wave
quantisation, arithmetic intensity). Constants: :mod:`.constants`.

Backward of a GEMM ``(m, n, k)`` is two GEMMs: the input gradient ``(m, k, n)`` and the weight
gradient ``(n, k, m)`` (for a batched activation-activation matmul, two GEMMs of the same batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.constants import DEFAULT, Calibration

SPLIT_K_DEPTH = 256
"""k-depth of one unit of parallel GEMM work (a CUTLASS split-K slice; 4 main-loop iterations of a
64-deep k tile)."""


@dataclass(frozen=True, kw_only=True)
class DeviceRates:
    """What the compute model needs to know about a device, for the dtype in use."""

    peak_flops_per_s: float
    """Dense peak FLOP/s for the compute dtype."""
    hbm_bytes_per_s: float
    """Memory bandwidth."""

    def __post_init__(self) -> None:
        if not (self.peak_flops_per_s > 0 and self.hbm_bytes_per_s > 0):
            raise ValueError(
                f"DeviceRates(peak_flops_per_s={self.peak_flops_per_s}, hbm_bytes_per_s="
                f"{self.hbm_bytes_per_s}): both must be > 0"
            )


def gemm_efficiency(batch: float, m: float, n: float, k: float, calib: Calibration = DEFAULT) -> float:
    """Fraction of peak the main loop of a ``batch x (m x k @ k x n)`` GEMM reaches (<= e_max)."""
    if min(batch, m, n, k) <= 0:
        raise ValueError(f"GEMM dims must be positive, got batch={batch} m={m} n={n} k={k}")
    x = batch * m * n * k / SPLIT_K_DEPTH
    return calib.gemm_max_efficiency * x / (x + calib.gemm_wave_elements)


def gemm_bytes(batch: float, m: float, n: float, k: float, elem_bytes: float) -> float:
    """Minimum traffic of a GEMM: read both operands once, write the output once (the epilogue's
    share is ``batch * m * n * elem_bytes``)."""
    return batch * (m * k + k * n + m * n) * elem_bytes


def gemm_time_s(
    batch: float,
    m: float,
    n: float,
    k: float,
    device: DeviceRates,
    *,
    elem_bytes: float = 2.0,
    calib: Calibration = DEFAULT,
) -> float:
    """Time of one (batched) GEMM: main-loop roofline, then the epilogue's store of C."""
    flops = 2.0 * batch * m * n * k
    bandwidth = device.hbm_bytes_per_s * calib.hbm_efficiency
    t_main = max(
        flops / (device.peak_flops_per_s * gemm_efficiency(batch, m, n, k, calib)),
        batch * (m * k + k * n) * elem_bytes / bandwidth,
    )
    return t_main + batch * m * n * elem_bytes / bandwidth + calib.kernel_overhead_s


def gemm_backward_time_s(
    batch: float,
    m: float,
    n: float,
    k: float,
    device: DeviceRates,
    *,
    elem_bytes: float = 2.0,
    calib: Calibration = DEFAULT,
    weight_grad: bool = True,
    input_grad: bool = True,
) -> float:
    """Input-gradient GEMM ``(m, k, n)`` plus weight-gradient GEMM ``(n, k, m)``."""
    t = 0.0
    if input_grad:
        t += gemm_time_s(batch, m, k, n, device, elem_bytes=elem_bytes, calib=calib)
    if weight_grad:
        t += gemm_time_s(batch, n, k, m, device, elem_bytes=elem_bytes, calib=calib)
    return t


def memory_op_time_s(bytes_moved: float, device: DeviceRates, *, calib: Calibration = DEFAULT) -> float:
    """A memory-bound kernel (elementwise, norm, softmax, copy): traffic over achievable bandwidth."""
    if bytes_moved <= 0:
        return 0.0
    return bytes_moved / (device.hbm_bytes_per_s * calib.hbm_efficiency) + calib.kernel_overhead_s


def roofline_time_s(
    flops: float,
    bytes_moved: float,
    device: DeviceRates,
    *,
    efficiency: float = 1.0,
    calib: Calibration = DEFAULT,
) -> float:
    """Generic roofline for an op that is neither a GEMM nor purely memory-bound."""
    if flops <= 0 and bytes_moved <= 0:
        return 0.0
    t_flops = flops / (device.peak_flops_per_s * efficiency)
    t_bytes = bytes_moved / (device.hbm_bytes_per_s * calib.hbm_efficiency)
    return max(t_flops, t_bytes) + calib.kernel_overhead_s

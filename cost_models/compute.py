"""Compute time of one op on one device: a roofline with size-dependent GEMM efficiency.

For an op with ``F`` FLOPs and ``Q`` bytes of memory traffic on a device with dense peak ``P``
FLOP/s and HBM bandwidth ``W`` bytes/s::

    t = max(F / (P * eff_gemm), Q / (W * eff_hbm)) + t_kernel

GEMM efficiency (a GEMM of ``batch`` independent ``m x k @ k x n`` products)::

    eff_gemm(batch, m, n, k) = e_max * x / (x + x_wave) * k / (k + k_half),   x = batch * m * n

``x / (x + x_wave)`` is the smooth form of wave quantisation (a GEMM with fewer output tiles than
SMs leaves SMs idle), ``k / (k + k_half)`` the per-tile fixed cost (prologue, epilogue, output
write) against the main loop over k. Both factors -> 1 for large GEMMs, so small GEMMs (small
models, or a large model cut 8 ways by tensor parallelism) run further from peak: the reason
per-GPU throughput rises with model size in weak-scaling runs. Constants: :mod:`.constants`.

Backward of a GEMM ``(m, n, k)`` is two GEMMs: the input gradient ``(m, k, n)`` and the weight
gradient ``(n, k, m)`` (for a batched activation-activation matmul, two GEMMs of the same batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.constants import DEFAULT, Calibration


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
    """Fraction of peak a ``batch x (m x k @ k x n)`` GEMM reaches (0 < eff <= gemm_max_efficiency)."""
    if min(batch, m, n, k) <= 0:
        raise ValueError(f"GEMM dims must be positive, got batch={batch} m={m} n={n} k={k}")
    x = batch * m * n
    waves = x / (x + calib.gemm_wave_elements)
    depth = k / (k + calib.gemm_k_half)
    return calib.gemm_max_efficiency * waves * depth


def gemm_bytes(batch: float, m: float, n: float, k: float, elem_bytes: float) -> float:
    """Minimum traffic of a GEMM: read both operands once, write the output once."""
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
    """Roofline time of one (batched) GEMM."""
    flops = 2.0 * batch * m * n * k
    t_flops = flops / (device.peak_flops_per_s * gemm_efficiency(batch, m, n, k, calib))
    t_bytes = gemm_bytes(batch, m, n, k, elem_bytes) / (device.hbm_bytes_per_s * calib.hbm_efficiency)
    return max(t_flops, t_bytes) + calib.kernel_overhead_s


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
    flops: float, bytes_moved: float, device: DeviceRates, *, efficiency: float = 1.0, calib=DEFAULT
) -> float:
    """Generic roofline for an op that is neither a GEMM nor purely memory-bound."""
    if flops <= 0 and bytes_moved <= 0:
        return 0.0
    t_flops = flops / (device.peak_flops_per_s * efficiency)
    t_bytes = bytes_moved / (device.hbm_bytes_per_s * calib.hbm_efficiency)
    return max(t_flops, t_bytes) + calib.kernel_overhead_s

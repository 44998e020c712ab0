"""Per-device-kind constants and per-framework software behaviour, each with its source.

One :class:`~cost_models.constants.Calibration` fitted on A100 runs used to be applied to every
device kind. Here each kind gets the efficiencies *measured on it* in isolation (microbenchmarks,
not training runs), and the training-level factors the fit owns stay kind-independent:

    gemm_max_efficiency(kind) = gemm_max_efficiency(fitted, A100) * gemm_isolated(kind) / gemm_isolated(A100)

i.e. the fitted sustained-load factor (clocks, kernel gaps; 0.693 / 0.822 = 0.84 on A100) is assumed to
carry over, and the kind's measured matmul ceiling replaces A100's. HBM, fused-attention and
intra-node collective efficiencies are the kind's own measurements. Nothing here is fitted to the
validation rows (``benchmarks/data/``); ``benchmarks/fidelity.py --sets`` reports the error they give.

Sources (read for this module; quoted figures are the source's, the ratios are derived):

* ``AZ``: github.com/Azure/AI-benchmarking-guide @ 8fd0c6e1bd0f, ``Azure_Results/ND_A100_v4_results.md``,
  ``ND_H100_v5_results.md``, ``ND_H200_v5_results.md`` (cuBLASLt GEMM, BabelStream-style HBM copy,
  FlashAttention-2 at batch 2 / seq 8192, nccl-tests all-reduce bus bandwidth, one 8-GPU VM each).
* ``NT212``: NCCL maintainer in NVIDIA/nccl-tests issue 212: H100 NVLink ring bus bandwidth ~370 GB/s
  (``/work/shared/data/hardware.json`` ``achievable``).
* ``NT149``: NVIDIA/nccl-tests issue 149: A100 NVSwitch all-reduce bus bandwidth ~230 GB/s.

Worked example: ``calibration_for("h100-sxm").gemm_max_efficiency`` = 0.693 * 0.698 / 0.822 = 0.588.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.constants import DEFAULT, Calibration


@dataclass(frozen=True, kw_only=True)
class KindConstants:
    """Measured efficiencies of one device kind (fractions of its datasheet peaks)."""

    gemm_isolated: float
    """Largest measured GEMM throughput / dense tensor peak, isolated cuBLASLt runs."""
    hbm_efficiency: float
    """Measured stream copy bandwidth / datasheet HBM bandwidth."""
    fused_attention_efficiency: float
    """Measured FlashAttention-2 throughput / dense 16-bit peak (forward + backward)."""
    intra_node_efficiency: float
    """Measured NCCL ring bus bandwidth / per-GPU NVLink bandwidth (one direction)."""
    gemm_wave_elements: float
    """SMs x one 128 x 128 output tile: the work of one full wave (see :mod:`.compute`)."""
    source: str


KINDS: dict[str, KindConstants] = {
    "a100-80g": KindConstants(
        gemm_isolated=256.5 / 312.0,
        hbm_efficiency=1.61 / 2.039,
        fused_attention_efficiency=179.5 / 312.0,
        intra_node_efficiency=230.0 / 300.0,
        gemm_wave_elements=108 * 128 * 128,
        source="AZ ND A100 v4 (A100-SXM4-80GB): FP16 GEMM 16384^3 256.5 TFLOPS of 312; HBM copy "
        "1.61 TB/s of 2.039; FlashAttention-2 (head dim 64) 179.5 TFLOPS; all-reduce busbw 231.6 GB/s "
        "at 8 GB (NT149: 230) of 300 GB/s; 108 SMs",
    ),
    "h100-sxm": KindConstants(
        gemm_isolated=1382.2 / 1978.9,
        hbm_efficiency=2.90 / 3.35,
        fused_attention_efficiency=327.9 / 989.4,
        intra_node_efficiency=370.0 / 450.0,
        gemm_wave_elements=132 * 128 * 128,
        source="AZ ND H100 v5 (H100 80GB HBM3): GEMM 32768^3 1382.2 TFLOPS of 1978.9 -- measured in FP8; "
        "no BF16 measurement was read, the FP8 ratio is ASSUMED to hold for BF16; HBM copy 2.90 TB/s of "
        "3.35; FlashAttention-2 (head dim 128) 327.9 TFLOPS of 989.4; NT212 ring busbw 370 GB/s of 450 "
        "(AZ all-reduce 478.9 GB/s at 8 GB uses NVLS, which all-gather/reduce-scatter do not); 132 SMs",
    ),
    "h200": KindConstants(
        gemm_isolated=1366.3 / 1978.9,
        hbm_efficiency=4.01 / 4.8,
        fused_attention_efficiency=329.3 / 989.4,
        intra_node_efficiency=370.0 / 450.0,
        gemm_wave_elements=132 * 128 * 128,
        source="AZ ND H200 v5: GEMM 16384^3 1366.3 TFLOPS of 1978.9 (FP8; ratio ASSUMED for BF16); HBM "
        "copy 4.01 TB/s of 4.8; FlashAttention-2 (head dim 128) 329.3 TFLOPS; NVLink as H100 (NT212); "
        "132 SMs",
    ),
}
"""Kinds with measurements; ``a100-40g`` reuses ``a100-80g``'s compute ratios (same SXM4 die, 108 SMs)
but not its HBM figure (its 1.555 TB/s part was not measured in the sources: 80GB's ratio ASSUMED)."""
KINDS["a100-40g"] = KINDS["a100-80g"]

REFERENCE_KIND = "a100-80g"
"""The kind the fitted constants of :data:`cost_models.DEFAULT` were fitted on (SC'21, DGX A100)."""

FRAMEWORKS: dict[str, dict[str, float | bool]] = {
    "megatron": {},
    "fsdp": {"fuse_elementwise": False, "zero3_regather_for_recompute": False},
    "composer": {
        "fuse_elementwise": False,
        "zero3_regather_for_recompute": False,
        "train_metric_passes": 2.0,
    },
}
"""Software behaviour by training framework (no numbers fitted). ``megatron``: the defaults (fused
kernels, DeepSpeed-style ZeRO-3). ``fsdp``: eager PyTorch with FSDP (llm-foundry, torchtitan without
``torch.compile``): LayerNorm, GELU and residual adds run as separate kernels, and the checkpointed
forward reuses the backward's parameter gather. ``composer``: ``fsdp`` under MosaicML Composer
(llm-foundry), whose trainer also runs two train-metric cross-entropies over the logits after every
micro-batch (``Calibration.train_metric_passes``; sources there)."""


def calibration_for(kind: str, base: Calibration = DEFAULT, *, framework: str = "megatron") -> Calibration:
    """``base`` with ``kind``'s measured efficiencies and ``framework``'s behaviour.

    The reference kind (A100, whose measurements :data:`DEFAULT` already cites) keeps ``base`` bit for
    bit under ``megatron``, so SC'21 numbers do not move; an unknown kind keeps ``base`` too (its
    datasheet peaks still apply through DeviceRates)."""
    if framework not in FRAMEWORKS:
        raise KeyError(f"unknown framework {framework!r}; known: {sorted(FRAMEWORKS)}")
    changes: dict[str, float | bool] = dict(FRAMEWORKS[framework])
    k, ref = KINDS.get(kind), KINDS[REFERENCE_KIND]
    if k is not None and k is not ref:
        changes.update(
            gemm_max_efficiency=base.gemm_max_efficiency * k.gemm_isolated / ref.gemm_isolated,
            hbm_efficiency=base.hbm_efficiency * k.hbm_efficiency / ref.hbm_efficiency,
            fused_attention_efficiency=k.fused_attention_efficiency,
            intra_node_efficiency=k.intra_node_efficiency,
            gemm_wave_elements=k.gemm_wave_elements,
        )
    return base.with_(**changes) if changes else base

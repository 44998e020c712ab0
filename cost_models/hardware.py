"""Per-device-kind constants and per-framework software behaviour, each with its source.

One :class:`~cost_models.constants.Calibration` fitted on A100 runs used to be applied to every
device kind. Here each kind gets the efficiencies *measured on it* in isolation (microbenchmarks,
not training runs), and the training-level factors the fit owns stay kind-independent:

    gemm_max_efficiency(kind) = gemm_max_efficiency(fitted, A100) * gemm_isolated(kind) / gemm_isolated(A100)

i.e. the fitted sustained-load factor (clocks, kernel gaps; 0.693 / 0.859 = 0.81 on A100) is assumed to
carry over, and the kind's measured BF16 matmul ceiling replaces A100's. HBM, fused-attention and
intra-node collective efficiencies are the kind's own measurements, used as they are (a kernel
never streams faster than the kind's measured copy bandwidth). Nothing here is fitted to the
validation rows (``benchmarks/data/``); ``benchmarks/fidelity.py --sets`` reports the error they give.

Sources (read for this module; quoted figures are the source's, the ratios are derived):

* ``MAMF``: github.com/stas00/ml-engineering, ``compute/accelerator/README.md``, "Maximum Achievable
  Matmul FLOPS comparison table" (BF16 ``matmul``, best shape of a brute-force search, CUDA 12.1):
  A100 SXM 267.9 of 312 TFLOPS (85.9%), H100 SXM 792.1 of 989 (80.1%). One source and one dtype
  for both kinds (the BF16/FP16 the validation runs use).

* ``AZ``: github.com/Azure/AI-benchmarking-guide @ 8fd0c6e1bd0f, ``Azure_Results/ND_A100_v4_results.md``,
  ``ND_H100_v5_results.md``, ``ND_H200_v5_results.md`` (cuBLASLt GEMM, BabelStream-style HBM copy,
  FlashAttention-2 at batch 2 / seq 8192, nccl-tests all-reduce bus bandwidth, one 8-GPU VM each).
* ``NT212``: NCCL maintainer in NVIDIA/nccl-tests issue 212: H100 NVLink ring bus bandwidth ~370 GB/s
  (``/work/shared/data/hardware.json`` ``achievable``).
* ``NT149``: NVIDIA/nccl-tests issue 149: A100 NVSwitch all-reduce bus bandwidth ~230 GB/s.
* V100: Markidis et al. 2018 (arXiv 1803.04014): cuBLAS FP16 GEMM on Tensor Cores up to 83 of 125
  TFLOPS. No V100 HBM-copy or NCCL measurement was read: those stay the base calibration's (``None``).

Worked example: ``calibration_for("h100-sxm").gemm_max_efficiency`` = 0.693 * 0.801 / 0.859 = 0.646.
(Before the BF16 measurement was read, H100's ratio came from AZ's FP8 GEMM, 1382.2 of 1978.9 = 0.698,
assumed for BF16: 0.588.)
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.constants import DEFAULT, Calibration


@dataclass(frozen=True, kw_only=True)
class KindConstants:
    """Measured efficiencies of one device kind (fractions of its datasheet peaks)."""

    gemm_isolated: float
    """Largest measured BF16 GEMM throughput / dense BF16 peak, isolated runs (``MAMF``; V100: FP16)."""
    hbm_efficiency: float | None
    """Measured stream copy bandwidth / datasheet HBM bandwidth (None: not measured, ``base`` kept)."""
    fused_attention_efficiency: float | None
    """Measured FlashAttention-2 throughput / dense 16-bit peak, forward + backward (None: no
    measurement or no flash kernel on the kind; ``base`` kept)."""
    intra_node_efficiency: float | None
    """Measured NCCL ring bus bandwidth / per-GPU NVLink bandwidth, one direction (None: ``base`` kept)."""
    gemm_wave_elements: float
    """SMs x one 128 x 128 output tile: the work of one full wave (see :mod:`.compute`)."""
    source: str
    native_attention_efficiency: float | None = None
    """Throughput of the fused attention kernel written for the kind's own architecture, forward +
    backward / dense 16-bit peak, where it differs from FlashAttention-2 (Hopper: FlashAttention-3
    and cuDNN 9's fused attention, which Transformer Engine selects). None: FlashAttention-2 is
    the kind's best kernel. Used by frameworks that run it (:data:`FRAMEWORKS` ``native_attention``)."""


KINDS: dict[str, KindConstants] = {
    "a100-80g": KindConstants(
        gemm_isolated=267.9 / 312.0,
        hbm_efficiency=1.61 / 2.039,
        fused_attention_efficiency=179.5 / 312.0,
        intra_node_efficiency=230.0 / 300.0,
        gemm_wave_elements=108 * 128 * 128,
        source="MAMF A100 SXM: BF16 matmul 267.9 TFLOPS of 312 (AZ ND A100 v4 FP16 GEMM 16384^3: 256.5); "
        "AZ ND A100 v4 (A100-SXM4-80GB): HBM copy "
        "1.61 TB/s of 2.039; FlashAttention-2 (head dim 64) 179.5 TFLOPS; all-reduce busbw 231.6 GB/s "
        "at 8 GB (NT149: 230) of 300 GB/s; 108 SMs",
    ),
    "h100-sxm": KindConstants(
        gemm_isolated=792.1 / 989.4,
        hbm_efficiency=2.90 / 3.35,
        fused_attention_efficiency=327.9 / 989.4,
        intra_node_efficiency=370.0 / 450.0,
        gemm_wave_elements=132 * 128 * 128,
        native_attention_efficiency=1.5 * 327.9 / 989.4,
        # FA3: Shah et al. 2024 (arXiv 2407.08608): 1.5-2.0x FlashAttention-2 in the forward, 1.5-1.75x in
        # the backward on H100 (FP16/BF16); the lower bound of both, times the measured FA2 figure
        source="MAMF H100 SXM: BF16 matmul 792.1 TFLOPS of 989 (AZ ND H100 v5 measured FP8 only: 1382.2 "
        "of 1978.9); AZ ND H100 v5 (H100 80GB HBM3): HBM copy 2.90 TB/s of "
        "3.35; FlashAttention-2 (head dim 128) 327.9 TFLOPS of 989.4; NT212 ring busbw 370 GB/s of 450 "
        "(AZ all-reduce 478.9 GB/s at 8 GB uses NVLS, which all-gather/reduce-scatter do not); 132 SMs",
    ),
    "h200": KindConstants(
        gemm_isolated=792.1 / 989.4,
        hbm_efficiency=4.01 / 4.8,
        fused_attention_efficiency=329.3 / 989.4,
        intra_node_efficiency=370.0 / 450.0,
        gemm_wave_elements=132 * 128 * 128,
        native_attention_efficiency=1.5 * 329.3 / 989.4,
        # FA3: Shah et al. 2024 (arXiv 2407.08608): 1.5-2.0x FlashAttention-2 in the forward, 1.5-1.75x in
        # the backward on H100 (FP16/BF16); the lower bound of both, times the measured FA2 figure
        source="GEMM: H100's MAMF BF16 ratio ASSUMED (same GH100 die and SM count; no H200 BF16 "
        "measurement read; AZ's FP8 GEMMs agree within 1%: H200 1366.3, H100 1382.2 of 1978.9); AZ ND "
        "H200 v5: HBM "
        "copy 4.01 TB/s of 4.8; FlashAttention-2 (head dim 128) 329.3 TFLOPS; NVLink as H100 (NT212); "
        "132 SMs",
    ),
}
"""Kinds with measurements; ``a100-40g`` reuses ``a100-80g``'s compute ratios (same SXM4 die, 108 SMs)
but not its HBM figure (its 1.555 TB/s part was not measured in the sources: 80GB's ratio ASSUMED)."""
KINDS["a100-40g"] = KINDS["a100-80g"]

V100 = KindConstants(
    gemm_isolated=83.0 / 125.0,
    hbm_efficiency=None,
    fused_attention_efficiency=None,
    intra_node_efficiency=None,
    gemm_wave_elements=80 * 128 * 128,
    source="GEMM: Markidis et al. 2018, 'NVIDIA Tensor Core Programmability, Performance & Precision' "
    "(IPDPSW, arXiv 1803.04014), abstract: cuBLAS GEMM on Tesla V100 Tensor Cores 'up to 83 Tflops/s' "
    "in mixed precision of 125 (CUDA 9, the software generation of the 2019 runs); 80 SMs (V100 "
    "datasheet). NOT measured in a source read: HBM copy, NCCL NVLink/NVSwitch bus bandwidth (base "
    "kept: A100's 0.85 of HBM and 230/300 ring efficiency ASSUMED); no FlashAttention kernel exists for "
    "Volta (sm70), so the V100 rows run explicit attention and the fused-attention constant is unused",
)
"""V100 (SXM2 16/32 GB and the DGX-2H's SXM3 32 GB): the GEMM ratio is of the part's own peak, so it
applies to the SXM3's 130 TFLOPS as to the SXM2's 125 (same GV100 die and SM count)."""
for _name in ("v100-16g", "v100-32g", "v100-sxm3-32g"):
    KINDS[_name] = V100

REFERENCE_KIND = "a100-80g"
"""The kind the fitted constants of :data:`cost_models.DEFAULT` were fitted on (SC'21, DGX A100)."""

FRAMEWORKS: dict[str, dict[str, float | bool | tuple[float, ...]]] = {
    "megatron": {},
    "megatron-deepspeed-2021": {"ring_node_nics": False},
    "megatron-2019": {"fuse_elementwise": False, "dp_overlap": False},
    "fsdp": {
        "fuse_elementwise": False,
        "fused_norms": False,
        "zero3_regather_for_recompute": False,
        "loss_bytes_factor": (7.0, 11.0),
        "grad_reduce_bytes": 4.0,
    },
    "composer": {
        "fuse_elementwise": False,
        "fused_norms": False,
        "zero3_regather_for_recompute": False,
        "train_metric_passes": 2.0,
        "grad_reduce_bytes": 4.0,
        "loss_bytes_factor": (1.0, 2.0),
        "causal_attention_skip": False,
    },
    "automodel": {
        "fuse_elementwise": False,
        "zero3_regather_for_recompute": False,
        "native_attention": True,
        "ep_dispatch_per_rank": True,
        "loss_bytes_factor": (2.0, 4.0),
    },
    "autopar": {
        "fuse_elementwise": False,
        "fused_norms": False,
        "fuse_sibling_gemms": False,
        "zero3_regather_for_recompute": False,
        "zero_fsdp2": True,
        "loss_bytes_factor": (),
    },
    "nemo-mcore": {
        "native_attention": True,
        "tp_comm_pipelined": True,
        "pp_p2p_overlap_interleaved": True,
        "megatron_distributed_optimizer": True,
        "dp_last_bucket_bytes": 2 * 128 * 2**20,  # 128 Mi parameters (MCore counts parameters), bf16
        "loss_bytes_factor": (1.0, 2.0),
    },
}
"""Software behaviour by training framework (no numbers fitted). ``megatron``: the defaults (fused
kernels, DeepSpeed-style ZeRO-3). ``megatron-deepspeed-2021``: the SC'21 software (Megatron-LM with
DeepSpeed ZeRO-3, NCCL of 2021) whose ZeRO-3 rows (Narayanan et al. 2021, Table 2) move their
gathers at the per-GPU NIC rate, not at the node-aggregate rate current NCCL reaches
(``Calibration.ring_node_nics``): with aggregation those rows are predicted 50-70% too fast. This is
an *inference from those rows* (no source says why; candidates: DeepSpeed's per-parameter gathers,
NCCL 2.8's rings on 1536 ranks); it changes nothing for the PTD-P rows, whose data-parallel groups
hold one rank per node. ``megatron-2019``: Megatron-LM as of its 2019 paper (NVIDIA/Megatron-LM
@ ebbe40cd, 2019-10): apex ``FusedLayerNorm`` and ``FusedAdam`` and a fused QKV GEMM, but GELU as a
Python expression and an explicit softmax (no fused bias-GELU or scaled-masked-softmax kernels yet),
and ``--DDP-impl local`` by default, whose gradient all-reduce runs after the backward (its hooks
are commented out): no overlap. ``fsdp``: eager PyTorch with FSDP (llm-foundry, torchtitan without
``torch.compile``): LayerNorm, GELU and residual adds run as separate kernels, and the checkpointed
forward reuses the backward's parameter gather. ``composer``: ``fsdp`` under MosaicML Composer
(llm-foundry), whose trainer also runs two train-metric cross-entropies over the logits after every
micro-batch (``Calibration.train_metric_passes``; sources there) and, under its FSDP
``mixed_precision: DEFAULT``, reduces gradients in float32 (``Calibration.grad_reduce_bytes``).
Each framework's loss kernel is ``Calibration.loss_bytes_factor`` (sources there). The eager frameworks (``fsdp``, ``composer``,
``autopar``) also run a normalisation written as tensor ops one kernel per op (``fused_norms``
off); ``automodel`` keeps it on (Transformer Engine's ``RMSNorm``: its config's ``rms_norm: te``). ``nemo-mcore``: NeMo on
Megatron-Core with Transformer Engine (the dgxc-benchmarking rows: NeMo Megatron 24.11 for GPT-3
175B, NeMo 2 in the 25.02 container for Nemotron-4; both set the same features): Megatron's fused
kernels, TE's fused attention (cuDNN; FlashAttention-3-class on Hopper: ``native_attention`` picks
:attr:`KindConstants.native_attention_efficiency` where the kind has one) and TE's userbuffers
tensor-parallel overlap, which NeMo's performance recipes switch on (``tp_comm_overlap=True``;
``Calibration.tp_comm_pipelined``), and the data- and pipeline-parallel overlaps its
``MegatronCommOverlapCallback`` sets (``megatron_distributed_optimizer``, buckets of 128 Mi
parameters: Megatron-Core's ``bucket_size`` counts parameters, here of bf16 gradients,
``pp_p2p_overlap_interleaved``; NVIDIA/NeMo ``nemo/lightning/pytorch/callbacks/megatron_comm_overlap.py``).
``automodel``: NeMo AutoModel (eager PyTorch with FSDP2, Transformer Engine's RMSNorm, Linear and
DotProductAttention, DeepEP; its performance summary's "TE" column): ``fsdp``'s behaviour with
TE's fused attention (``native_attention``) and DeepEP's dispatch (``ep_dispatch_per_rank``). ``autopar``: autopar's own runtime on a GPU, as the
profiled mode runs it on this machine (``autopar.estimator.local.local_calibration``): the
lowered fx graph's ops run eagerly (no elementwise fusion, sibling Linears as separate GEMMs),
ZeRO-2/3 as FSDP2 (``zero_fsdp2``), the recomputed forward inside FSDP's gathered window. Not
yet the planner's default on GPU clusters (no GPU run has checked it; docs/cost_model.md)."""


def calibration_for(kind: str, base: Calibration = DEFAULT, *, framework: str = "megatron") -> Calibration:
    """``base`` with ``kind``'s measured efficiencies and ``framework``'s behaviour.

    The reference kind (A100, whose measurements :data:`DEFAULT` already cites) keeps ``base`` bit for
    bit under ``megatron``, so SC'21 numbers do not move; an unknown kind keeps ``base`` too (its
    datasheet peaks still apply through DeviceRates)."""
    if framework not in FRAMEWORKS:
        raise KeyError(f"unknown framework {framework!r}; known: {sorted(FRAMEWORKS)}")
    changes: dict[str, float | bool | tuple[float, ...]] = dict(FRAMEWORKS[framework])
    native_attention = bool(changes.pop("native_attention", False))
    k, ref = KINDS.get(kind), KINDS[REFERENCE_KIND]
    if k is not None and k is not ref:
        changes.update(
            gemm_max_efficiency=base.gemm_max_efficiency * k.gemm_isolated / ref.gemm_isolated,
            gemm_wave_elements=k.gemm_wave_elements,
        )
        measured = {
            "hbm_efficiency": k.hbm_efficiency,
            "fused_attention_efficiency": k.fused_attention_efficiency,
            "intra_node_efficiency": k.intra_node_efficiency,
        }
        changes.update({name: value for name, value in measured.items() if value is not None})
    if native_attention and k is not None and k.native_attention_efficiency is not None:
        changes["fused_attention_efficiency"] = k.native_attention_efficiency
    return base.with_(**changes) if changes else base

"""Step time of a whole plan: per-stage compute and collectives, pipeline bubble, p2p, DP sync.

Per micro-batch, stage ``s`` (all its virtual chunks) takes ::

    t_s = fwd_s + bwd_s + recompute_s + tp_s + zero3_exposed_s + p2p_s

``recompute_s`` re-runs the forward of the recomputed ops (all of a layer under ``full``, the
attention-score region under ``selective``) including its forward collectives. ``tp_s`` is the
exposed part ``(1 - tp_comm_overlap)`` of the tensor-parallel collectives. ZeRO-3 gathers each
block's parameters before its forward, before its recompute and before its backward, and
reduce-scatters its gradients after it; with prefetching the block costs ``max(compute, gather)``.
``p2p_s`` is ``2 v`` blocking sends (forward activation, backward gradient, per chunk).

A pipeline of ``p`` stages, ``m`` micro-batches and ``v`` virtual chunks per stage (1F1B, GPipe and
interleaved 1F1B all have the same critical path, they differ in memory)::

    T_pipe = m * max_s t_s + (sum_s t_s - max_s t_s) / v      bubble = (p - 1) / (v m) for equal stages

Data parallelism adds the exposed gradient reduction after the last backward: an all-reduce
(ZeRO-0); the all-reduce and then an all-gather of the updated rows (ZeRO-1 as autopar's runtime
runs it: DDP, then ``ShardedOptimizer``); a reduce-scatter and an all-gather of the updated
parameters (ZeRO-2, FSDP2). With DDP-style overlap the reduction hides behind the last
micro-batch's backward except for the last bucket; the all-gather after the optimizer step is
exposed. The optimizer
step is memory-bound: ``optimizer_bytes_per_param * params_per_device / (W * eff_hbm)``.

Inference: forward only, the same pipeline formula with forward times (a filled and drained
pipeline: ``(m + p - 1) * t`` for equal stages).

Heterogeneous clusters: :func:`step_time` takes one :class:`DeviceRates` per stage (a sequence)
instead of one for all, and ``StepSpec.stage_groups`` gives each stage its own tensor- and
data-parallel groups. Each ``t_s`` is then computed on its own stage's device, the pipeline formula
is unchanged (the slowest stage sets the pace), the exposed DP sync is the worst stage's and the
optimizer step the slowest stage's ``params_s / (W_s * eff_hbm)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cost_models.comm import GroupSpec, LinkSpec, collective_time_s, p2p_time_s
from cost_models.compute import (
    DeviceRates,
    gemm_backward_time_s,
    gemm_efficiency,
    gemm_time_s,
    memory_op_time_s,
    roofline_time_s,
)
from cost_models.constants import DEFAULT, Calibration
from cost_models.workload import BlockWork, CommWork, OpWork, StageWork

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")


# ------------------------------------------------------------------------------------ ops
def overlapped_s(compute_s: float, comm_s: float, calib: Calibration = DEFAULT) -> float:
    """Wall time of compute and communication that run concurrently: ``(C^p + K^p)^(1/p)``."""
    if compute_s <= 0 or comm_s <= 0:
        return max(compute_s, comm_s, 0.0)
    p = calib.overlap_sharpness
    hi = max(compute_s, comm_s)
    return hi * ((compute_s / hi) ** p + (comm_s / hi) ** p) ** (1.0 / p)


LOSS_OP_PREFIXES = ("cross_entropy", "nll_loss")
"""Names (the traced node's) of the ops whose input is the logits a training loop's metrics re-read."""


def is_loss_op(op: OpWork) -> bool:
    """Whether ``op`` is the loss over the logits (by name: OpWork carries no op kind)."""
    return op.op_class != "gemm" and op.name.startswith(LOSS_OP_PREFIXES)


def attention_efficiency(score_gemm: tuple[float, float, float], calib: Calibration) -> float:
    """Fraction of peak a fused attention kernel reaches: the flash kernel's measured efficiency
    times the wave factor of its score product ``(batch, m, k)`` (a short sequence fills fewer SMs)."""
    b, m, k = score_gemm
    return calib.fused_attention_efficiency * gemm_efficiency(b, m, k, k, calib) / calib.gemm_max_efficiency


CAUSAL_TILE = 128
"""Key/query tile length of flash attention kernels (FlashAttention-2's 128 x 128 / 128 x 64 blocks)."""


def causal_fraction(op: OpWork, calib: Calibration) -> float:
    """Share of a fused attention kernel's whole-square FLOPs it executes: ``1/2 + t/(2s)`` for a
    causal kernel that skips the tiles above the diagonal (``calib.causal_attention_skip``), else 1."""
    if not (op.causal and op.attention_gemm is not None and calib.causal_attention_skip):
        return 1.0
    s = op.attention_gemm[1]
    return min(1.0, 0.5 + CAUSAL_TILE / (2.0 * s)) if s > 0 else 1.0


def op_time_s(op: OpWork, device: DeviceRates, calib: Calibration = DEFAULT) -> tuple[float, float]:
    """(forward, backward) seconds of ``op`` (all ``count`` copies)."""
    if op.op_class == "gemm":
        b, m, n, k = op.gemm
        fwd = gemm_time_s(b, m, n, k, device, elem_bytes=op.elem_bytes, calib=calib)
        bwd = gemm_backward_time_s(
            b,
            m,
            n,
            k,
            device,
            elem_bytes=op.elem_bytes,
            calib=calib,
            weight_grad=op.weight_grad,
            input_grad=op.input_grad,
        )
    else:
        bytes_bwd = op.bytes_bwd if op.bytes_bwd is not None else calib.bwd_bytes_factor * op.bytes_fwd
        if op.op_class == "memory":
            fwd = memory_op_time_s(op.bytes_fwd, device, calib=calib)
            bwd = memory_op_time_s(bytes_bwd, device, calib=calib)
        else:
            eff = (
                op.efficiency if op.attention_gemm is None else attention_efficiency(op.attention_gemm, calib)
            )
            executed = causal_fraction(op, calib)
            fwd = roofline_time_s(executed * op.flops_fwd, op.bytes_fwd, device, efficiency=eff, calib=calib)
            bwd = roofline_time_s(executed * op.flops_bwd, bytes_bwd, device, efficiency=eff, calib=calib)
    if calib.loss_bytes_factor and op.op_class == "memory" and is_loss_op(op):
        fwd_factor, bwd_factor = calib.loss_bytes_factor
        fwd = memory_op_time_s(fwd_factor * op.bytes_fwd, device, calib=calib)
        bwd = memory_op_time_s(bwd_factor * op.bytes_fwd, device, calib=calib)
    if op.measured_fwd_s is not None:
        fwd = op.measured_fwd_s
    if calib.train_metric_passes > 0 and is_loss_op(op):
        fwd += calib.train_metric_passes * memory_op_time_s(
            calib.train_metric_bytes_factor * op.bytes_fwd, device, calib=calib
        )
    if op.measured_bwd_s is not None:
        bwd = op.measured_bwd_s
    return fwd * op.count, bwd * op.count


@dataclass(frozen=True, kw_only=True)
class BlockTime:
    """Seconds one device spends on one block for one micro-batch."""

    fwd_s: float = 0.0
    bwd_s: float = 0.0
    recompute_s: float = 0.0
    tp_fwd_s: float = 0.0
    """Exposed tensor-parallel collective time of the forward pass."""
    tp_recompute_s: float = 0.0
    tp_bwd_s: float = 0.0
    zero_comm_s: float = 0.0
    """ZeRO-3 parameter gathers and gradient reduce-scatters (before overlap)."""
    zero_exposed_s: float = 0.0

    @property
    def tp_s(self) -> float:
        return self.tp_fwd_s + self.tp_recompute_s + self.tp_bwd_s

    @property
    def compute_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.tp_s + self.zero_exposed_s

    def scaled(self, k: float) -> BlockTime:
        return BlockTime(**{f: getattr(self, f) * k for f in self.__dataclass_fields__})

    def __add__(self, other: BlockTime) -> BlockTime:
        return BlockTime(**{f: getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__})


def _tp_times(
    block: BlockWork, groups: dict[str, GroupSpec], recompute: str, calib: Calibration
) -> tuple[float, float, float]:
    """Exposed (forward, recompute, backward) collective seconds of the block."""
    fwd = bwd = 0.0
    for c in block.comms:
        group = groups.get(c.axis)
        if group is None or group.size == 1:
            continue
        t = collective_time_s(c.collective, c.nbytes, group, calib=calib) * c.count
        t *= _exposed_fraction(c, group, calib)
        if c.phase == "fwd":
            fwd += t
        else:
            bwd += t
    rec = fwd if (block.recomputable and recompute == "full") else 0.0
    return fwd, rec, bwd


PIPELINED_COLLECTIVES = ("all_gather", "reduce_scatter")
"""The sequence-parallel collectives Transformer Engine's userbuffers pipeline with their GEMMs."""


def _exposed_fraction(comm: CommWork, group: GroupSpec, calib: Calibration) -> float:
    """Part of a block collective on the critical path: ``1 / tp`` when pipelined with its GEMM in
    ``tp`` chunks (``calib.tp_comm_pipelined``), else ``1 - tp_comm_overlap``."""
    if calib.tp_comm_pipelined and comm.axis == "tp" and comm.collective in PIPELINED_COLLECTIVES:
        return 1.0 / group.size
    return 1.0 - calib.tp_comm_overlap


def _zero3_time(
    block: BlockWork,
    dp_group: GroupSpec | None,
    recompute: str,
    bytes_per_param: tuple[float, float],
    calib: Calibration,
    counts: tuple[float, float] = (2.0, 1.0),
) -> float:
    if dp_group is None or dp_group.size == 1 or block.param_count == 0:
        return 0.0
    param_b, grad_b = bytes_per_param
    gather = collective_time_s("all_gather", block.param_count * param_b, dp_group, calib=calib)
    scatter = collective_time_s("reduce_scatter", block.param_count * grad_b, dp_group, calib=calib)
    regather = recompute == "full" and block.recomputable and calib.zero3_regather_for_recompute
    gathers, scatters = counts
    return (gathers + (1 if regather else 0)) * gather + scatters * scatter


def zero3_counts(step: StepSpec, index: int | None, calib: Calibration) -> tuple[float, float]:
    """ZeRO-3's all-gathers and reduce-scatters of a block per micro-batch on stage ``index`` (the
    regather for recompute apart): DeepSpeed's two and one; autopar's FSDP2
    (``calib.zero_fsdp2``) reduce-scatters once per step and, under a 1F1B pipeline, skips the
    gather of every forward that follows a backward (see ``Calibration.zero_fsdp2``)."""
    if not calib.zero_fsdp2:
        return 2.0, 1.0
    m, p = step.num_micro_batches, len(step.stages)
    if p == 1 or step.schedule == "gpipe":
        return 2.0, 1.0 / m
    first = min(m, p - (index or 0))  # forwards that do not follow a backward (warm-up, then one)
    return 1.0 + first / m, 1.0 / m


def block_time(
    block: BlockWork,
    device: DeviceRates,
    groups: dict[str, GroupSpec],
    *,
    recompute: str = "none",
    zero_stage: int = 0,
    bytes_per_param: tuple[float, float] = (2.0, 2.0),
    calib: Calibration = DEFAULT,
    zero3: tuple[float, float] = (2.0, 1.0),
) -> BlockTime:
    """Time of one block for one micro-batch on one device; ``zero3``: ZeRO-3's all-gathers and
    reduce-scatters per micro-batch (:func:`zero3_counts`)."""
    fwd = bwd = rec = 0.0
    for op in block.ops:
        f, b = op_time_s(op, device, calib)
        fwd += f
        bwd += b
        if block.recomputable and (
            recompute == "full" or (recompute == "selective" and op.selective_recompute)
        ):
            rec += f
    tp_fwd, tp_rec, tp_bwd = _tp_times(block, groups, recompute, calib)
    zero = (
        _zero3_time(block, groups.get("dp"), recompute, bytes_per_param, calib, zero3)
        if zero_stage == 3
        else 0.0
    )
    compute = fwd + bwd + rec
    exposed = overlapped_s(compute, zero, calib) - compute if calib.zero3_prefetch_overlap else zero
    return BlockTime(
        fwd_s=fwd,
        bwd_s=bwd,
        recompute_s=rec,
        tp_fwd_s=tp_fwd,
        tp_recompute_s=tp_rec,
        tp_bwd_s=tp_bwd,
        zero_comm_s=zero,
        zero_exposed_s=exposed,
    )


# --------------------------------------------------------------------------------- the step
@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """A whole training (or inference) step: stages, schedule and data parallelism."""

    stages: tuple[StageWork, ...]
    num_micro_batches: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    mode: str = "train"
    zero_stage: int = 0
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    """Process groups by mesh axis (``tp``, ``dp``); absent = size 1."""
    pp_link: LinkSpec | None = None
    """Link between consecutive pipeline stages."""
    pp_link_inter_node: bool = True
    tp: int = 1
    param_bytes: float = 2.0
    """Bytes per parameter of the compute copy (fp16/bf16: 2)."""
    grad_bytes: float = 2.0
    """Bytes per gradient element communicated (fp16/bf16 DDP: 2)."""
    stage_groups: tuple[dict[str, GroupSpec], ...] | None = None
    """Per pipeline stage, its own process groups by axis (heterogeneous clusters, where stages sit
    on different nodes); None = ``groups`` for every stage."""

    def groups_of(self, index: int | None) -> dict[str, GroupSpec]:
        """The process groups of stage ``index`` (``groups`` when None or no per-stage groups)."""
        if index is None or self.stage_groups is None:
            return self.groups
        return self.stage_groups[index]

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} not in {SCHEDULES}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} not in {RECOMPUTE}")
        if self.num_micro_batches < 1 or self.virtual_stages < 1 or not self.stages:
            raise ValueError("need at least one stage, one micro-batch and one virtual stage")


@dataclass(kw_only=True)
class StepTime:
    step_time_s: float
    breakdown_s: dict[str, float]
    stage_times: list[BlockTime]
    """Per pipeline stage, per micro-batch (all chunks)."""
    stage_p2p_s: list[float]


def stage_time(
    stage: StageWork, step: StepSpec, device: DeviceRates, calib: Calibration, *, index: int | None = None
) -> BlockTime:
    """One micro-batch of ``stage`` on ``device``; ``index``: the stage's position (selects its
    ``step.stage_groups``)."""
    total = BlockTime()
    groups = step.groups_of(index)
    zero3 = zero3_counts(step, index, calib)
    for block, count in stage.blocks:
        t = block_time(
            block,
            device,
            groups,
            recompute=step.recompute,
            zero_stage=step.zero_stage,
            bytes_per_param=(step.param_bytes, step.grad_bytes),
            calib=calib,
            zero3=zero3,
        )
        total = total + t.scaled(count)
    return total


def stage_p2p_s(stage: StageWork, step: StepSpec, calib: Calibration, index: int | None = None) -> float:
    """Blocking sends per micro-batch on this stage: per chunk one forward (and, when training, one
    backward) transfer."""
    if len(step.stages) == 1 or step.pp_link is None or stage.p2p_bytes <= 0:
        return 0.0
    nbytes = stage.p2p_bytes
    extra = 0.0
    tp_group = step.groups_of(index).get("tp")
    if calib.pp_scatter_gather and step.tp > 1 and step.pp_link_inter_node and tp_group is not None:
        extra = collective_time_s("all_gather", nbytes, tp_group, calib=calib)
        nbytes /= step.tp
    one = p2p_time_s(nbytes, step.pp_link, inter=step.pp_link_inter_node, calib=calib) + extra
    per_mb = (2 if step.mode == "train" else 1) * step.virtual_stages * one
    if calib.pp_p2p_overlap_interleaved and step.virtual_stages > 1:
        return 0.0
    return per_mb if calib.pp_p2p_blocking else 0.0


def fsdp_units(stage: StageWork) -> list[tuple[float, int]]:
    """(parameters, instances) of the units FSDP2 wraps on a stage: each repeated (recomputable)
    block, and the stage itself holding the rest (embeddings, head, final norm)."""
    blocks = [(b.param_count, c) for b, c in stage.blocks if b.recomputable and b.param_count]
    rest = stage.param_count - sum(n * c for n, c in blocks)
    return blocks + ([(rest, 1)] if rest > 0 else [])


def dp_exposed_s(
    step: StepSpec, stage_times: list[BlockTime], calib: Calibration | Sequence[Calibration]
) -> float:
    """The data-parallel gradient sync left exposed after the last backward (the worst stage's)."""
    dp = step.groups.get("dp")
    if step.mode != "train" or dp is None or dp.size == 1 or step.zero_stage == 3:
        return 0.0
    worst = 0.0
    calibs = stage_calibs(step, calib)
    for index, (stage, t) in enumerate(zip(step.stages, stage_times)):
        calib = calibs[index]
        dp = step.groups_of(index).get("dp", dp)
        grads = stage.param_count * step.grad_bytes
        if step.zero_stage == 0:
            reduce_s = collective_time_s("all_reduce", grads, dp, calib=calib)
            after_s = 0.0
        elif step.zero_stage == 1 and calib.megatron_distributed_optimizer:
            reduce_s = collective_time_s("reduce_scatter", grads, dp, calib=calib)
            gather_s = collective_time_s("all_gather", stage.param_count * step.param_bytes, dp, calib=calib)
            after_s = overlapped_s(t.fwd_s, gather_s, calib) - t.fwd_s  # under the next forward
        elif step.zero_stage == 1:
            # What autopar's ZeRO-1 runs: DDP's bucketed all-reduce of the gradients (overlapped with
            # backward like ZeRO-0), then, after the sharded optimizer step, the all-gather of every
            # rank's updated rows (autopar.runtime.engines.ShardedOptimizer), exposed.
            reduce_s = collective_time_s("all_reduce", grads, dp, calib=calib)
            after_s = collective_time_s("all_gather", stage.param_count * step.param_bytes, dp, calib=calib)
        elif calib.zero_fsdp2:  # ZeRO-2 as FSDP2 runs it: each unit its own reduce-scatter and gather
            units = fsdp_units(stage)
            reduce_s = sum(
                c * collective_time_s("reduce_scatter", n * step.grad_bytes, dp, calib=calib)
                for n, c in units
            )
            after_s = sum(
                c * collective_time_s("all_gather", n * step.param_bytes, dp, calib=calib) for n, c in units
            )
        else:
            reduce_s = collective_time_s("reduce_scatter", grads, dp, calib=calib)
            after_s = collective_time_s("all_gather", stage.param_count * step.param_bytes, dp, calib=calib)
        if calib.dp_overlap:
            last = collective_time_s("all_reduce", min(grads, calib.dp_last_bucket_bytes), dp, calib=calib)
            window = t.bwd_s + t.recompute_s
            reduce_s = max(overlapped_s(window, reduce_s, calib) - window, min(last, reduce_s))
        worst = max(worst, reduce_s + after_s)
    return worst


def optimizer_step_s(
    step: StepSpec,
    device: DeviceRates | Sequence[DeviceRates],
    calib: Calibration | Sequence[Calibration],
) -> float:
    """The optimizer step of the stage that takes longest (all stages step at once)."""
    if step.mode != "train":
        return 0.0
    dp = step.groups.get("dp")
    shard = dp.size if (dp is not None and step.zero_stage >= 1) else 1
    # ZeRO-1 (autopar's ShardedOptimizer) packs this rank's rows into one buffer for the all-gather
    # and copies the gathered parameters back: 5/dp + 2 passes over the parameter bytes
    copies = (5 / shard + 2) * step.param_bytes if step.zero_stage == 1 and shard > 1 else 0.0
    rates = stage_rates(step, device)
    return max(
        s.param_count
        * (c.optimizer_bytes_per_param / shard + copies)
        / (r.hbm_bytes_per_s * c.hbm_efficiency)
        for s, r, c in zip(step.stages, rates, stage_calibs(step, calib))
    )


def stage_calibs(step: StepSpec, calib: Calibration | Sequence[Calibration]) -> list[Calibration]:
    """One Calibration per stage: ``calib`` repeated, or the per-stage sequence checked."""
    if isinstance(calib, Calibration):
        return [calib] * len(step.stages)
    out = list(calib)
    if len(out) != len(step.stages):
        raise ValueError(f"{len(out)} calibrations for {len(step.stages)} stages")
    return out


def stage_rates(step: StepSpec, device: DeviceRates | Sequence[DeviceRates]) -> list[DeviceRates]:
    """One DeviceRates per stage: ``device`` repeated, or the per-stage sequence checked."""
    if isinstance(device, DeviceRates):
        return [device] * len(step.stages)
    rates = list(device)
    if len(rates) != len(step.stages) or not all(isinstance(r, DeviceRates) for r in rates):
        raise ValueError(
            f"got {len(rates)} per-stage device rates for {len(step.stages)} stages; give one "
            "DeviceRates per pipeline stage, or a single DeviceRates for all"
        )
    return rates


def step_time(
    step: StepSpec,
    device: DeviceRates | Sequence[DeviceRates],
    calib: Calibration | Sequence[Calibration] = DEFAULT,
) -> StepTime:
    """Predicted time of one optimizer step, with a breakdown whose parts sum to the total.

    ``device``: one :class:`DeviceRates` for every stage, or one per pipeline stage (heterogeneous
    clusters); ``calib`` likewise (each stage timed with its device kind's constants)."""
    rates = stage_rates(step, device)
    calibs = stage_calibs(step, calib)
    if step.stage_groups is not None and len(step.stage_groups) != len(step.stages):
        raise ValueError(f"stage_groups has {len(step.stage_groups)} entries for {len(step.stages)} stages")
    times = [
        stage_time(s, step, r, c, index=i) for i, (s, r, c) in enumerate(zip(step.stages, rates, calibs))
    ]
    p2p = [stage_p2p_s(s, step, c, i) for i, (s, c) in enumerate(zip(step.stages, calibs))]
    m, v = step.num_micro_batches, step.virtual_stages
    if step.mode != "train":
        per = [t.fwd_s + t.tp_fwd_s + p for t, p in zip(times, p2p)]
        worst = max(range(len(per)), key=per.__getitem__)
        breakdown = {
            "compute": m * times[worst].fwd_s,
            "tp_comm": m * times[worst].tp_fwd_s,
            "pp_p2p": m * p2p[worst],
            "pp_bubble": (sum(per) - per[worst]) / v,
        }
        total = sum(breakdown.values())
        return StepTime(step_time_s=total, breakdown_s=breakdown, stage_times=times, stage_p2p_s=p2p)
    per = [t.total_s + p for t, p in zip(times, p2p)]
    worst = max(range(len(per)), key=per.__getitem__)
    bubble = (sum(per) - per[worst]) / v
    t = times[worst]
    breakdown = {
        "compute": m * (t.fwd_s + t.bwd_s),
        "recompute": m * t.recompute_s,
        "tp_comm": m * t.tp_s,
        "zero_comm_exposed": m * t.zero_exposed_s,
        "pp_p2p": m * p2p[worst],
        "pp_bubble": bubble,
        "dp_comm_exposed": dp_exposed_s(step, times, calib),
        "optimizer": optimizer_step_s(step, device, calib),
    }
    return StepTime(
        step_time_s=sum(breakdown.values()), breakdown_s=breakdown, stage_times=times, stage_p2p_s=p2p
    )

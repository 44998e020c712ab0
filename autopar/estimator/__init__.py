"""``estimate(graph, cluster, plan)``: the predicted step time and memory of a plan.

The glue between the analysed graph and :mod:`cost_models`: it turns an
:class:`~autopar.core.ir.OpGraph`, a :class:`~autopar.cluster.Cluster` and a
:class:`~autopar.core.plan.Plan` into per-device, per-micro-batch workloads (``cost_models.workload``)
and reads the answer back into a :class:`~autopar.core.plan.PredictedCost`.

Steps (each a small function below):

1. **Validate** the plan against the cluster and the graph (device count, head / FFN / vocab
   divisibility by ``tp``). Errors name the value, the rule and the fix.
2. **Tensor-parallel sharding.** With ``plan.placements`` empty, the layout the lowering runs by
   default (the sharding rules' Megatron-like placements, :func:`autopar.sharding.megatron_placements`,
   then :func:`autopar.sharding.layout.choose`): per node the strategy, hence the share of its FLOPs
   each rank runs, which GEMM dimension is divided (``column``: n, ``row``: k), whether what it saves
   is split, which parameters are sharded, and the collectives the reshardings imply (GPT: per layer
   one all-reduce per row-parallel Linear forward, one per distinct column-parallel input backward;
   under sequence parallelism all-gather / reduce-scatter pairs). A hand-built OpGraph without an fx
   module is costed by the Megatron walk over op kinds instead (:func:`autopar.estimator.tensor_parallel.megatron_walk`).
3. **Workload per block type**: the first instance of each repeated block is costed once and
   multiplied by the number of instances on each stage. Memory-bound ops are fused the way
   Megatron's kernels (or torch.compile) fuse them (``Calibration.fuse_elementwise``): a tensor made
   by a memory-bound op and read in full by exactly one memory-bound op that does not save it is
   never written. Linears reading the same tensor (q, k, v) run as one GEMM (Megatron's fused QKV).
4. **Activation memory** comes from the graph's measured ``saved_bytes`` scaled to the micro-batch
   and divided by ``tp`` where the saved tensor is split. ``selective`` recompute drops what the
   attention-score region (from the first activation-activation matmul to the next one) saves
   besides its inputs; ``full`` keeps each layer's input only.
5. **Step time and memory** from :func:`cost_models.step_time` and :mod:`cost_models.memory`.
6. **Heterogeneous clusters** (:mod:`autopar.estimator.devices`): each pipeline stage is timed on
   its own ranks' device kind (the slowest one if they mix kinds) with that kind's constants
   (:func:`stage_calibrations`), has its own memory capacity and
   its own tp/dp groups; the plan fits when every stage fits; MFU is against the sum of all
   devices' peaks.

Public API (``from autopar.estimator import ...``):

* :func:`estimate`: graph + cluster + plan -> :class:`~autopar.core.plan.PredictedCost`; it is
  exactly :func:`workload` then :func:`predicted_cost` (:class:`Workload` holds what the first
  derives, reusable across calibrations and memory knobs).
* :func:`default_calibration`: the constants a cluster is costed with when the caller names none
  (its device kind's measured efficiencies, ``cost_models.hardware.calibration_for``);
  :func:`stage_calibrations`: each pipeline stage's on a cluster mixing kinds.
* :func:`validate_plan`: the plan rules of :mod:`autopar.core.plan_rules` checked against a traced
  graph (the degrees use every device, ``tp`` divides the heads and every Linear's width).
* :func:`attention_heads` / :func:`kv_heads`: the head counts read off a traced graph (the
  planner's search space uses them).
* :func:`stage_memory`: the bytes of each pipeline stage by category, for the planner's memory
  screen (no timing).

The modules are the steps and share their public helpers with each other only:
:mod:`.tensor_parallel` (step 2), :mod:`.blocks` (steps 3-4), :mod:`.stages` (validation, stages,
groups, memory, FLOPs), :mod:`.devices` (step 6), :mod:`.moe` (mixture-of-experts nodes under
``Plan.ep``: work, all-to-alls reported as ``breakdown_s["ep_comm"]``, expert memory, the
all-to-all volume per step and the expert placement, the expert gradients' sync over edp
(``expert_grad_sync``) and the MoE collectives per step (``moe_collectives``); docs/moe_cost.md);
:mod:`.profile` is the profiler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cluster import Cluster
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan, PredictedCost
from autopar.estimator import moe
from autopar.estimator.blocks import Scale
from autopar.estimator.devices import StageDevices, check_profiled, stage_devices, stage_groups
from autopar.estimator.stages import (
    attention_heads,
    axis_group,
    compute_dtype,
    kv_bytes_per_block,
    kv_heads,
    stage_kv_bytes,
    stage_memory,
    stage_works,
    step_flops,
    validate_plan,
)
from autopar.estimator.tensor_parallel import cached, megatron_tp, tp_from_placements
from cost_models import DEFAULT, Calibration, DeviceRates, StageWork, StepSpec, step_time
from cost_models.hardware import calibration_for

if TYPE_CHECKING:
    from autopar.estimator.local import LocalProfile as LocalProfileLike

__all__ = [
    "Workload",
    "attention_heads",
    "default_calibration",
    "estimate",
    "kv_heads",
    "predicted_cost",
    "stage_calibrations",
    "stage_memory",
    "validate_plan",
    "workload",
]


# ------------------------------------------------------------------------------ entry point
@dataclass(kw_only=True)
class Workload:
    """Everything :func:`estimate` derives from the graph before timing it (reusable across
    calibrations: the fidelity fit times one workload under many constants)."""

    spec: StepSpec
    rates: DeviceRates | tuple[DeviceRates, ...]
    """The device rates :func:`cost_models.step_time` takes: one DeviceRates on a homogeneous
    cluster, the per-stage tuple (``stage_rates``) on a heterogeneous one."""
    stage_rates: list[DeviceRates]
    """Per pipeline stage, the rates of its devices (the slowest kind where they mix)."""
    stage_capacity_bytes: list[float]
    """Per pipeline stage, the memory capacity of its devices (the smallest where they mix)."""
    stage_devices: list[StageDevices]
    peak_flops_per_s_total: float
    """Sum of every device's peak in the compute dtype (the MFU denominator)."""
    stages: list[StageWork]
    memory_per_stage: list[dict[str, float]]
    model_flops_per_step: float
    hardware_flops_per_step: float
    dtype: str
    seq: int
    calib: Calibration | None = None
    """The workload's own constants, which :func:`predicted_cost` times it with instead of the
    caller's: in profiled mode the ones measured on this machine; when the caller passed none, the
    cluster's device-kind constants (:func:`default_calibration`); None when the caller chose."""
    stage_calibs: tuple[Calibration, ...] | None = None
    """On a heterogeneous cluster, when the caller passed no constants: each pipeline stage's own
    (its device kind's; ``DEFAULT`` for a stage that mixes kinds), which :func:`predicted_cost`
    times the stages with. None otherwise."""
    fixed_step_s: float = 0.0
    """Per-step cost outside the step model (profiled mode: the runtime's scalar loss all-reduce)."""
    experts: moe.MoEMemory | None = None
    """Expert parameters and dispatch buffers per block (mixture-of-experts graphs), for the memory
    model (:func:`stage_memory`)."""


def default_calibration(cluster: Cluster) -> Calibration:
    """The constants a cluster is costed with when the caller names none: its device kind's measured
    efficiencies (:func:`cost_models.hardware.calibration_for`; A100 and kinds without measurements
    keep :data:`cost_models.DEFAULT`). A cluster mixing kinds gets ``DEFAULT`` here, and each of
    its pipeline stages its own kind's constants when timed (:func:`stage_calibrations`)."""
    kinds = cluster.device_kinds
    return calibration_for(kinds[0].name) if len(kinds) == 1 else DEFAULT


def stage_calibrations(placed: list[StageDevices]) -> tuple[Calibration, ...]:
    """Each stage's constants on a heterogeneous cluster: its device kind's, ``DEFAULT`` where the
    stage's ranks mix kinds (a stage is timed on its slowest kind's rates, whose efficiencies are
    not one kind's)."""
    return tuple(DEFAULT if s.mixed else calibration_for(s.kinds[0].name) for s in placed)


def workload(
    graph: OpGraph,
    cluster: Cluster,
    plan: Plan,
    *,
    calib: Calibration | None = None,
    dtype: str | None = None,
    kv_cache: bool = False,
    op_times: Mapping[str, tuple[float, float]] | None = None,
) -> Workload:
    """Validate ``plan`` and turn graph + cluster + plan into the cost model's inputs (``calib``:
    the constants; by default the cluster's device kind's, :func:`default_calibration`)."""
    chosen = calib is not None
    calib = calib or default_calibration(cluster)
    local = profiled_for(graph, cluster) if op_times is None else None
    if local is not None:  # profiled mode (autopar.estimator.local): measured numbers of this machine
        op_times = local.times_for(graph.batch_size, local.slowdown_for(plan))
        calib = local.calibration(calib)
    if op_times:  # the profiled program is the eager one: no fused kernels, no merged GEMMs
        calib = calib.with_(fuse_elementwise=False, fused_norms=False, fuse_sibling_gemms=False)
    check_profiled(cluster, op_times)
    validate_plan(graph, cluster, plan)
    placed = stage_devices(cluster, plan)
    key, act = compute_dtype(graph, cluster.device_kinds, dtype)
    sc = Scale(
        batch=plan.micro_batch_size / max(graph.batch_size, 1),
        tp=plan.tp,
        sp=plan.sequence_parallel and plan.tp > 1,
        graph_batch=graph.batch_size,
        act=act,
        ep=plan.ep,
    )
    if plan.placements:
        # Placements are cached by identity: the planner costs many plans with one placements dict
        # (the cache holds the dict, so its id cannot be reused while the entry lives).
        tp_key = ("placements", id(plan.placements), plan.tp, sc.sp)
        tp = cached(graph, tp_key, lambda: (plan.placements, tp_from_placements(graph, plan)))[1]
    else:
        tp = megatron_tp(graph, plan.tp, sc.sp)
        tp_key = ("megatron", plan.tp, sc.sp)
    stages = stage_works(graph, plan, tp, sc, calib, tp_key, dict(op_times or {}))
    pp_group = axis_group(plan, cluster, "pp")
    elem = 2.0 if key in ("fp16", "bf16", "fp8") else 4.0
    groups = {axis: axis_group(plan, cluster, axis) for axis in ("tp", "dp")}
    per_stage_groups = stage_groups(cluster, plan) if cluster.is_heterogeneous else None
    if plan.ep > 1:  # the all-to-alls of MoE layers (autopar.estimator.moe)
        groups["ep"] = moe.ep_group(plan, cluster)
        for g in per_stage_groups or ():
            g["ep"] = groups["ep"]
    spec = StepSpec(
        stages=tuple(stages),
        num_micro_batches=plan.num_micro_batches,
        schedule=plan.schedule,
        virtual_stages=plan.virtual_stages,
        recompute=plan.recompute,
        mode=plan.mode,
        zero_stage=plan.zero_stage,
        groups=groups,
        pp_link=pp_group.inter if pp_group.spans_nodes else pp_group.intra,
        pp_link_inter_node=pp_group.spans_nodes,
        tp=plan.tp,
        param_bytes=elem,
        grad_bytes=calib.grad_reduce_bytes or elem,
        stage_groups=per_stage_groups,
    )
    experts = moe.moe_memory(graph, plan, batch=sc.batch, act=act)
    kv_block = kv_bytes_per_block(graph, tp, sc) if (kv_cache and plan.mode != "train") else {}
    model_flops, hw_flops = step_flops(graph, plan, stages)
    rates = [s.rates(key) for s in placed]
    if local is not None:
        calib = calib.with_(
            optimizer_bytes_per_param=local.optimizer_bytes_per_param(
                graph, rates[0], calib, zero_stage=plan.zero_stage, dp=plan.dp
            )
        )
    if cluster.is_heterogeneous:
        peak_total = sum(s.peak_flops_per_s(key) for s in placed)
    else:
        peak_total = rates[0].peak_flops_per_s * cluster.num_devices
    return Workload(
        spec=spec,
        rates=tuple(rates) if cluster.is_heterogeneous else rates[0],
        stage_rates=rates,
        stage_capacity_bytes=[s.capacity_bytes for s in placed],
        stage_devices=placed,
        peak_flops_per_s_total=peak_total,
        stages=stages,
        memory_per_stage=stage_memory(
            stages, plan, elem, calib, [stage_kv_bytes(s, kv_block) for s in stages], experts
        ),
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hw_flops,
        dtype=key,
        seq=_seq_len(graph),
        calib=calib if (local is not None or not chosen) else None,
        stage_calibs=stage_calibrations(placed) if (cluster.is_heterogeneous and not chosen) else None,
        fixed_step_s=local.fixed_step_s(plan, _fsdp_units(stages)) if local is not None else 0.0,
        experts=experts,
    )


def estimate(
    graph: OpGraph,
    cluster: Cluster,
    plan: Plan,
    *,
    calib: Calibration | None = None,
    dtype: str | None = None,
    kv_cache: bool = False,
    op_times: Mapping[str, tuple[float, float]] | None = None,
) -> PredictedCost:
    """Predicted step time, throughput and memory of ``plan`` for ``graph`` on ``cluster``.

    ``calib``: the cost-model constants (default: the cluster's device kind's,
    :func:`default_calibration`). ``dtype``: the compute
    dtype key (``fp16``, ``bf16``, ``fp32``); by default the graph's, except that a fp32 graph is
    costed in the device's 16-bit dtype (mixed precision). ``kv_cache``: in inference mode, add the
    keys/values of every attention layer for the traced sequence length. ``op_times``: profiled
    ``(forward_s, backward_s)`` per graph node name, measured at the graph's batch size on one
    device of the cluster's kind (``autopar.profile``); they replace the roofline for those nodes
    (scaled to the micro-batch and divided by the tensor-parallel shards; not on heterogeneous
    clusters). On a heterogeneous cluster each pipeline stage is costed on its own devices (see
    :mod:`autopar.estimator.devices`). Raises
    :class:`~autopar.core.errors.PlanError` for a plan that does not fit the cluster or the model.
    """
    w = workload(graph, cluster, plan, calib=calib, dtype=dtype, kv_cache=kv_cache, op_times=op_times)
    return predicted_cost(w, plan, cluster, calib or DEFAULT)


def _fsdp_units(stages: list) -> int:
    """Modules FSDP2 wraps on the busiest rank under ZeRO-2/3 (runtime/engines.py): each repeated
    block and the stage itself."""
    return max(sum(c for b, c in s.blocks if b.recomputable) for s in stages) + 1


def predicted_cost(w: Workload, plan: Plan, cluster: Cluster, calib: Calibration) -> PredictedCost:
    """Time a :class:`Workload` under ``calib`` (the workload's own constants in profiled mode)
    and fill a PredictedCost."""
    calib = w.calib or calib
    t = step_time(w.spec, w.rates, w.stage_calibs or calib)
    _split_ep_comm(t, w, plan, calib)
    moe.expert_grad_sync(t, w, plan, cluster, calib)  # ep > 1: experts over edp, after the backward
    if w.fixed_step_s:
        t.step_time_s += w.fixed_step_s
        t.breakdown_s["step_overhead"] = w.fixed_step_s
    totals = [sum(m.values()) for m in w.memory_per_stage]
    capacities = w.stage_capacity_bytes
    worst = _binding_stage(totals, capacities, cluster.is_heterogeneous)
    used, capacity = totals[worst], capacities[worst]
    extra = {
        "dtype": w.dtype,
        "largest_memory_stage": worst,
        "memory_bytes_per_stage": totals,
        "overflow_bytes": max(0.0, used - capacity),
        "stage_time_per_micro_batch_s": [s.total_s + p for s, p in zip(t.stage_times, t.stage_p2p_s)],
        "tp_default": "placements" if plan.placements else "megatron",
        "memory_capacity_bytes_per_stage": list(capacities),
    }
    if cluster.is_heterogeneous:
        extra.update(_hetero_extra(w))
        mfu = w.model_flops_per_step / (t.step_time_s * w.peak_flops_per_s_total)
    else:  # the same expression as always, bit for bit
        mfu = w.model_flops_per_step / (
            t.step_time_s * w.stage_rates[0].peak_flops_per_s * cluster.num_devices
        )
    return PredictedCost(
        step_time_s=t.step_time_s,
        breakdown_s=dict(t.breakdown_s),
        tokens_per_s=plan.global_batch * w.seq / t.step_time_s,
        model_flops_per_step=w.model_flops_per_step,
        hardware_flops_per_step=w.hardware_flops_per_step,
        mfu=mfu,
        memory_bytes_per_device=used,
        memory_breakdown_bytes=dict(w.memory_per_stage[worst]),
        memory_capacity_bytes=capacity,
        fits=all(u <= c for u, c in zip(totals, capacities)),
        extra=extra,
    )


def _split_ep_comm(t, w: Workload, plan: Plan, calib: Calibration) -> None:
    """Report the MoE all-to-alls, which the step model times with the block's tensor-parallel
    collectives, as ``breakdown_s["ep_comm"]``: the worst stage's all-to-all seconds per micro-batch
    times the micro-batches, moved out of ``tp_comm`` (the total does not change)."""
    if w.spec.groups.get("ep") is None:
        return
    per = [s.total_s + p for s, p in zip(t.stage_times, t.stage_p2p_s)]
    if plan.mode != "train":
        per = [s.fwd_s + s.tp_fwd_s + p for s, p in zip(t.stage_times, t.stage_p2p_s)]
    worst = max(range(len(per)), key=per.__getitem__)
    ep_s = plan.num_micro_batches * moe.ep_seconds_per_micro_batch(
        w.stages[worst],
        w.spec.groups_of(worst).get("ep"),
        recompute=plan.recompute,
        mode=plan.mode,
        calib=calib,
    )
    ep_s = min(ep_s, t.breakdown_s.get("tp_comm", 0.0))
    t.breakdown_s["tp_comm"] = t.breakdown_s.get("tp_comm", 0.0) - ep_s
    t.breakdown_s["ep_comm"] = ep_s


def _binding_stage(totals: list[float], capacities: list[float], heterogeneous: bool) -> int:
    """The stage whose memory the cost reports: the largest one on a homogeneous cluster; on a
    heterogeneous one the stage with the largest overflow (or, when all fit, the least headroom)."""
    if not heterogeneous:
        return max(range(len(totals)), key=totals.__getitem__)
    return max(range(len(totals)), key=lambda s: totals[s] - capacities[s])


def _hetero_extra(w: Workload) -> dict:
    totals = [sum(m.values()) for m in w.memory_per_stage]
    out = {
        "stage_devices": [s.names for s in w.stage_devices],
        "overflow_bytes_per_stage": [max(0.0, u - c) for u, c in zip(totals, w.stage_capacity_bytes)],
        "stage_peak_flops_per_s": [r.peak_flops_per_s for r in w.stage_rates],
    }
    mixed = [i for i, s in enumerate(w.stage_devices) if s.mixed]
    if mixed:
        out["mixed_device_stages"] = mixed
        out["mixed_device_note"] = (
            f"stage(s) {mixed} run on more than one device kind; each is costed at its slowest kind's "
            "peak FLOP/s and memory bandwidth and its smallest memory capacity. Put pp outermost in "
            "the mesh and align stages with node groups so each stage has one kind"
        )
    return out


def profiled_for(graph: OpGraph, cluster: Cluster) -> LocalProfileLike | None:
    """The graph's local profile when it was measured for this cluster's layout (same number of
    local CPU ranks), else None: a profile of this machine says nothing about other hardware."""
    prof = graph.local_profile
    if prof is None or cluster.is_heterogeneous or cluster.num_devices != prof.layout.ranks:
        return None
    return prof if cluster.device.name == "cpu" else None


def _seq_len(graph: OpGraph) -> int:
    for name in graph.inputs:
        n = graph[name]
        if n.output_shape and len(n.output_shape) >= 2:
            return int(n.output_shape[1])
    return 1

"""Mixture-of-experts layers in the estimator: the ``moe`` node of a graph under a plan with ``ep``.

A traced MoE layer is one node (op kind ``moe``) whose ``meta["moe"]`` gives its shape (experts
``E``, top-``k``, width ``h``, expert width ``f``, shared experts ``S``, capacity factor, tokens
``T`` at the graph's batch). Its expert parameters are stacked ``[E, ...]`` tensors. Under a plan
with expert-parallel degree ``ep`` (folded into dp: the dp group splits into dp/ep replicas of ep
ranks, ``Plan.groups("ep")``):

* work (:func:`cost_models.moe.moe_ops`): the router, the busiest rank's experts (``E / ep`` of
  them, the imbalance factor on one), the shared experts, each expert's width split over ``tp``;
* collectives (:func:`cost_models.moe.moe_comms`): 3 all-to-alls forward (counts, dispatch,
  combine) and 2 backward on the ``ep`` group, and the layer's tensor-parallel all-reduces on
  ``tp`` (output forward; input and gate gradients backward). The step
  model times them with the block (they sit on the critical path); the estimator reports the
  all-to-all share as ``breakdown_s["ep_comm"]`` (taken out of ``tp_comm``);
* memory: expert parameters ``/ (ep tp)`` per rank with their gradients and optimizer state (no
  ZeRO with ``ep > 1``: the runtime does not build it, :func:`check_plan` refuses it), the dispatch
  buffers of one layer (:class:`MoEMemory`), and the layer's activations (the graph's measured
  bytes, scaled by the model's ratio between this plan's degrees and one device);
* gradients (:func:`expert_grad_sync`): the expert gradients are summed over the ``dp / ep``
  ranks holding the same experts (``Plan.groups("edp")``) after the backward, exposed; the other
  gradients over dp, overlapped with the backward (DDP), as for a dense model.

The load-imbalance factor is ``node.meta["moe"]["imbalance"]`` when routing was measured, else
:data:`DEFAULT_IMBALANCE` (balanced routing, what the auxiliary load-balancing loss aims at).
``node.meta["moe"]["routing"]`` (:data:`cost_models.moe.ROUTINGS`, default ``uniform``) says how a
token's experts spread over ranks, which sets a per-rank (DeepEP) dispatch's volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.core.ir import OpGraph, OpNode
from autopar.core.plan import Plan
from autopar.core.plan_rules import check_moe_knobs
from autopar.estimator.devices import link_spec
from autopar.estimator.tensor_parallel import DTYPE_BYTES, cached
from cost_models import (
    CommWork,
    GroupSpec,
    OpWork,
    StageWork,
    StepSpec,
    StepTime,
    collective_time_s,
    dp_exposed_s,
)
from cost_models import moe as moe_model

T = TypeVar("T", OpWork, CommWork)

DEFAULT_IMBALANCE = 1.0
"""Max / mean expert load assumed when the graph carries no measured routing: balanced."""


def is_moe(node: OpNode) -> bool:
    """Whether ``node`` is a mixture-of-experts region with its shape recorded."""
    return node.op_kind == "moe" and isinstance(node.meta.get("moe"), dict)


def moe_nodes(graph: OpGraph) -> list[OpNode]:
    """The MoE regions of ``graph`` in order."""
    return cached(graph, ("moe_nodes",), lambda: [n for n in graph.nodes if is_moe(n)])


def expert_count(graph: OpGraph) -> int | None:
    """The routed experts of the graph's MoE layers (the smallest count if they differ); None
    without MoE layers."""
    counts = [int(n.meta["moe"]["experts"]) for n in moe_nodes(graph)]
    return min(counts) if counts else None


def shape_of(node: OpNode, batch_scale: float = 1.0) -> moe_model.MoEShape:
    """The cost model's shape of ``node`` over ``batch_scale`` times its traced tokens."""
    m = node.meta["moe"]
    return moe_model.MoEShape(
        experts=int(m["experts"]),
        top_k=int(m["top_k"]),
        hidden=int(m["hidden"]),
        ffn=int(m["ffn"]),
        tokens=float(m["tokens"]) * batch_scale,
        shared=int(m.get("shared", 0) or 0),
        capacity_factor=m.get("capacity_factor"),
        gated=bool(m.get("gated", True)),
        routing=str(m.get("routing", "uniform")),
    )


def expert_tp(node: OpNode, tp: int) -> int:
    """The tensor-parallel degree the lowering splits the node's experts over: ``tp`` for autopar's
    MoE layer (stacked ``w1, w3, w2``: :class:`autopar.lower.expert.ExpertParallelMoE`), 1 for a
    region it runs whole on every tp rank (a HuggingFace block, whose fused ``gate_up_proj`` does not
    split along one dim: ``HFExpertParallelMoE``); ``meta["moe"]["tp_split"]`` decides when present."""
    split = node.meta["moe"].get("tp_split")
    if split is None:
        split = any(p.rsplit(".", 1)[-1] == "w1" for p in node.param_names)
    return tp if split else 1


def imbalance_of(node: OpNode) -> float:
    """The node's measured max/mean expert load, or :data:`DEFAULT_IMBALANCE`."""
    return float(node.meta["moe"].get("imbalance", DEFAULT_IMBALANCE))


def elem_bytes(node: OpNode, act: float) -> float:
    """Bytes per activation element as costed (``act`` converts a fp32 graph to 16-bit)."""
    return DTYPE_BYTES.get(str(node.output_dtype), 4) * act


# ------------------------------------------------------------------------------ validation
def check_plan(graph: OpGraph, plan: Plan) -> None:
    """``ep`` divides every MoE layer's experts (and dp: the Plan checks that), ``tp`` the experts'
    width; a plan with ``ep > 1`` needs MoE layers; a graph with MoE layers gets only the knobs the
    runtime builds (:func:`~autopar.core.plan_rules.check_moe_knobs`: no sequence parallelism, no
    ZeRO with ``ep > 1``), so what is costed is what runs."""
    error = cached(graph, ("moe_check", plan.ep, plan.tp), lambda: _plan_error(graph, plan.ep, plan.tp))
    if error:
        raise PlanError(error)
    if moe_nodes(graph):
        check_moe_knobs(ep=plan.ep, zero=plan.zero_stage, sp=plan.sequence_parallel and plan.tp > 1)


def _plan_error(graph: OpGraph, ep: int, tp: int) -> str:
    nodes = moe_nodes(graph)
    if ep > 1 and not nodes:
        return f"ep={ep}: the model has no mixture-of-experts layers to shard; use ep=1"
    for n in nodes:
        try:
            moe_model.check_degrees(shape_of(n), ep, tp)
        except ValueError as e:
            return f"{n.module_path or n.name}: {e}"
    return ""


# ------------------------------------------------------------------------------ work
def node_ops(node: OpNode, *, batch: float, ep: int, tp: int, act: float) -> list[OpWork]:
    """The MoE node's kernels on the busiest rank for one micro-batch, named after the node."""
    shape, tp = shape_of(node, batch), expert_tp(node, tp)
    ops = moe_model.moe_ops(
        shape, ep=ep, tp=tp, imbalance=imbalance_of(node), elem_bytes=elem_bytes(node, act)
    )
    return [_renamed(op, node.name) for op in ops]


def _renamed(op: T, prefix: str) -> T:
    return replace(op, name=f"{prefix}:{op.name}")


def node_comms(
    node: OpNode, *, batch: float, ep: int, tp: int, act: float, per_rank: bool = False
) -> list[CommWork]:
    """The MoE node's all-to-alls (axis ``ep``) and expert tensor-parallel all-reduces (``tp``);
    ``per_rank``: DeepEP's dispatch (``Calibration.ep_dispatch_per_rank``), not autopar's."""
    shape, tp = shape_of(node, batch), expert_tp(node, tp)
    comms = moe_model.moe_comms(
        shape,
        ep=ep,
        tp=tp,
        imbalance=imbalance_of(node),
        elem_bytes=elem_bytes(node, act),
        per_rank=per_rank,
    )
    return [_renamed(c, node.name) for c in comms]


def expert_param_names(graph: OpGraph, node: OpNode) -> list[str]:
    """The node's stacked expert parameters: at least 3-D with ``E`` rows."""
    e = int(node.meta["moe"]["experts"])
    return [
        p
        for p in node.param_names
        if p in graph.params and len(graph.params[p]["shape"]) >= 3 and graph.params[p]["shape"][0] == e
    ]


def node_params(graph: OpGraph, node: OpNode, *, ep: int, tp: int) -> tuple[float, float]:
    """(all parameter elements one rank holds for the node, of which expert parameters).

    Experts ``/ (ep tp)``; the shared experts (the layer's other parameters beyond the router's
    ``E h``) ``/ tp``; the router whole."""
    experts, tp = set(expert_param_names(graph, node)), expert_tp(node, tp)
    numel = {p: math.prod(graph.params[p]["shape"]) for p in node.param_names if p in graph.params}
    expert = sum(v for p, v in numel.items() if p in experts) / (ep * tp)
    shape = shape_of(node)
    router = min(float(shape.experts * shape.hidden), sum(v for p, v in numel.items() if p not in experts))
    shared = sum(v for p, v in numel.items() if p not in experts) - router
    return expert + shared / tp + router, expert


def node_saved_bytes(node: OpNode, *, batch: float, ep: int, tp: int, act: float) -> float:
    """Activations the node keeps for backward on the busiest rank: the measured bytes scaled to
    the micro-batch, times the model's ratio between (ep, tp, imbalance) and one balanced device."""
    shape, e, tp = shape_of(node, batch), elem_bytes(node, act), expert_tp(node, tp)
    here = moe_model.activation_bytes(shape, ep=ep, tp=tp, imbalance=imbalance_of(node), elem_bytes=e)
    one = moe_model.activation_bytes(shape, elem_bytes=e)
    return node.saved_bytes * batch * act * (here / one if one > 0 else 1.0)


def node_dispatch_bytes(node: OpNode, *, batch: float, ep: int, act: float) -> float:
    """Send + receive buffers of the node's dispatch (0 without expert parallelism)."""
    shape = shape_of(node, batch)
    return moe_model.dispatch_buffer_bytes(
        shape, ep=ep, imbalance=imbalance_of(node), elem_bytes=elem_bytes(node, act)
    )


# ------------------------------------------------------------------------------ memory
@dataclass(kw_only=True)
class MoEMemory:
    """Per block name, what the memory model needs beyond ``BlockWork.param_count``."""

    ep: int = 1
    expert_params: dict[str, float] = field(default_factory=dict)
    """Expert parameter elements one rank holds for one block (already ``/ (ep tp)``)."""
    dispatch_bytes: dict[str, float] = field(default_factory=dict)
    """Dispatch buffers of one block's MoE layer (live while that layer runs)."""

    def stage_expert_params(self, stage: StageWork) -> float:
        return sum(self.expert_params.get(b.name, 0.0) * c for b, c in stage.blocks)

    def stage_dispatch_bytes(self, stage: StageWork) -> float:
        return max((self.dispatch_bytes.get(b.name, 0.0) for b, c in stage.blocks if c), default=0.0)


def moe_memory(graph: OpGraph, plan: Plan, *, batch: float, act: float) -> MoEMemory | None:
    """The expert memory facts of ``graph``'s blocks under ``plan`` (None without MoE layers)."""
    if not moe_nodes(graph):
        return None
    key = ("moe_memory", plan.ep, plan.tp, batch, act)
    return cached(graph, key, lambda: _moe_memory(graph, plan.ep, plan.tp, batch, act))


def _moe_memory(graph: OpGraph, ep: int, tp: int, batch: float, act: float) -> MoEMemory:
    nodes = moe_nodes(graph)
    out = MoEMemory(ep=ep)
    for key, bt in graph.block_types.items():
        names = set(bt.node_names[0]) if bt.node_names else set()
        inside = [n for n in nodes if n.name in names]
        out.expert_params[key] = sum(node_params(graph, n, ep=ep, tp=tp)[1] for n in inside)
        out.dispatch_bytes[key] = sum(node_dispatch_bytes(n, batch=batch, ep=ep, act=act) for n in inside)
    return out


def memory_adjustment(
    stage: StageWork,
    moe: MoEMemory | None,
    *,
    plan: Plan,
    param_bytes: float,
    grad_bytes: float,
    optimizer_bytes: float,
) -> dict[str, float]:
    """What to add to the dense memory model's categories for the stage's expert parameters and
    its dispatch buffers. The expert state is what the dense model already counts (ZeRO shards it
    over dp only with ``ep = 1``; with ``ep > 1`` the plan has ``zero = 0``,
    :func:`check_plan`), so only the dispatch buffers are added."""
    if moe is None:
        return {}
    x = moe.stage_expert_params(stage)
    kw = dict(zero_stage=plan.zero_stage, mode=plan.mode, param_bytes=param_bytes, grad_bytes=grad_bytes)
    experts = moe_model.expert_state_bytes(x, dp=plan.dp, ep=moe.ep, optimizer_bytes=optimizer_bytes, **kw)
    dense = moe_model.expert_state_bytes(x, dp=plan.dp, ep=1, optimizer_bytes=optimizer_bytes, **kw)
    out = {k: experts[k] - dense[k] for k in experts}
    out["moe_dispatch"] = moe.stage_dispatch_bytes(stage)
    return out


# ------------------------------------------------------------------------------ topology and time
def ep_group(plan: Plan, cluster: Cluster) -> GroupSpec:
    """The first expert-parallel group (``ep`` consecutive dp ranks) placed on the nodes."""
    ranks = plan.groups("ep")[0] if plan.ep > 1 else [0]
    return ranks_group(ranks, cluster)


def ranks_group(ranks: Sequence[int], cluster: Cluster) -> GroupSpec:
    """A group of ``ranks`` placed on ``cluster``'s nodes."""
    dpn = cluster.devices_per_node
    nodes = {r // dpn for r in ranks}
    return GroupSpec(
        size=len(ranks),
        ranks_per_node=math.ceil(len(ranks) / len(nodes)),
        intra=link_spec(cluster.intra_node),
        inter=link_spec(cluster.inter_node) if len(nodes) > 1 else None,
    )


def ep_seconds_per_micro_batch(
    stage: StageWork, group: GroupSpec | None, *, recompute: str, mode: str, calib
) -> float:
    """The stage's all-to-all seconds per micro-batch, as :func:`cost_models.step_time` counts
    them in its tensor-parallel share (forward, recomputed forward, backward)."""
    if group is None or group.size == 1:
        return 0.0
    fwd = bwd = rec = 0.0
    for block, count in stage.blocks:
        f = b = 0.0
        for c in block.comms:
            if c.axis != "ep":
                continue
            t = collective_time_s(c.collective, c.nbytes, group, calib=calib) * c.count
            if c.phase == "fwd":
                f += t
            else:
                b += t
        fwd += f * count
        bwd += b * count
        if block.recomputable and recompute == "full":
            rec += f * count
    keep = 1.0 - calib.tp_comm_overlap
    return (fwd if mode != "train" else fwd + rec + bwd) * keep


# ------------------------------------------------------------------------------ volume
@dataclass(frozen=True, kw_only=True)
class AllToAllVolume:
    """The all-to-alls one rank runs per step and the bytes it sends to other ranks."""

    count: int
    """All-to-all calls per step (its stage's MoE layers, all micro-batches)."""
    bytes: float
    """Their input buffers summed (own share included)."""
    sent_bytes: float
    """What leaves the rank: ``(ep - 1) / ep`` of ``bytes`` under balanced routing."""
    layers: int
    """MoE layers on the rank's stage."""

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "bytes": self.bytes,
            "sent_bytes": self.sent_bytes,
            "layers": self.layers,
        }


def all_to_all_volume(graph: OpGraph, plan: Plan, *, act: float = 1.0, stage: int = 0) -> AllToAllVolume:
    """The all-to-alls of pipeline stage ``stage``'s ranks in one step, balanced routing: per MoE
    layer on the stage and micro-batch the calls of :func:`cost_models.moe.all_to_all_calls` (counts,
    dispatch, combine; their backward in training), the forward ones again for a layer recomputed
    under ``recompute=full``. Elements are the graph's activation bytes times ``act``."""
    layers = _stage_moe_nodes(graph, plan, stage)
    if plan.ep == 1 or not layers:
        return AllToAllVolume(count=0, bytes=0.0, sent_bytes=0.0, layers=len(layers))
    batch = plan.micro_batch_size / max(graph.batch_size, 1)
    count, total = 0, 0.0
    for n in layers:
        calls = moe_model.all_to_all_calls(shape_of(n, batch), mode=plan.mode, elem_bytes=elem_bytes(n, act))
        if plan.mode == "train" and plan.recompute == "full":
            calls += [c for c in calls if not c[0].endswith("_backward")]
        count += len(calls)
        total += sum(b for _, b in calls)
    m = plan.num_micro_batches
    return AllToAllVolume(
        count=count * m,
        bytes=total * m,
        sent_bytes=moe_model.all_to_all_sent_bytes(total * m, plan.ep),
        layers=len(layers),
    )


def _stage_moe_nodes(graph: OpGraph, plan: Plan, stage: int) -> list[OpNode]:
    nodes = moe_nodes(graph)
    if plan.pp == 1 or not graph.block_order:
        return nodes
    stage_of = plan.stage_of_layers(len(graph.block_order))
    keep: set[str] = set()
    for i, (key, idx) in enumerate(graph.block_order):
        if stage_of[i] % plan.pp == stage:
            keep |= set(graph.block_types[key].node_names[idx])
    return [n for n in nodes if n.name in keep]


def expert_placement(plan: Plan, experts: int) -> dict[int, list[int]]:
    """Rank -> the experts it holds (every MoE layer alike): ``E / ep`` consecutive experts by the
    rank's position in its ep group; all of them with ``ep = 1``."""
    per = experts // plan.ep
    out = {}
    for r in range(plan.world_size):
        i = plan.ep_index(r) if plan.ep > 1 else 0
        out[r] = list(range(i * per, (i + 1) * per))
    return out


# ------------------------------------------------------------------------------ gradients
def edp_group(plan: Plan, cluster: Cluster, stage: int = 0) -> GroupSpec | None:
    """The expert-data-parallel group of pipeline stage ``stage`` (the ``dp / ep`` ranks holding
    the same experts, ``Plan.groups("edp")``) placed on the nodes; None without one."""
    if plan.ep == 1 or plan.dp == plan.ep:
        return None
    for ranks in plan.groups("edp"):
        if plan.coords(ranks[0]).get("pp", 0) == stage:
            return ranks_group(ranks, cluster)
    return None


def expert_grad_sync(t: StepTime, w, plan: Plan, cluster: Cluster, calib) -> float:
    """Cost the gradient sync as the runtime runs it under ``ep > 1`` (``runtime/engines.py``:
    DDP leaves the experts out, ``sync_expert_grads`` reduces them after the backward): per stage,
    the non-expert gradients' all-reduce over dp, overlapped with the backward as for a dense
    model (:func:`cost_models.dp_exposed_s` on the stage without its expert parameters), plus the
    expert gradients' all-reduce over the stage's edp group, exposed
    (:func:`cost_models.moe.expert_grad_sync_s`). The worst stage's sum replaces
    ``breakdown_s["dp_comm_exposed"]`` (and the step time moves with it); returns the expert part
    of that stage. ``w``: the :class:`~autopar.estimator.Workload`."""
    if plan.mode != "train" or plan.ep == 1 or w.experts is None:
        return 0.0
    spec: StepSpec = w.spec
    worst, expert_s = -1.0, 0.0
    for i, (stage, times) in enumerate(zip(spec.stages, t.stage_times)):
        experts = w.experts.stage_expert_params(stage)
        # the stage as DDP sees it: its parameters minus the experts it leaves out
        dense = replace(stage, shared_param_count=stage.shared_param_count + experts)
        one = replace(spec, stages=(dense,), stage_groups=(spec.groups_of(i),) if spec.stage_groups else None)
        dp_s = dp_exposed_s(one, [times], calib)
        sync_s = moe_model.expert_grad_sync_s(
            experts, edp_group(plan, cluster, i), grad_bytes=spec.grad_bytes, calib=calib
        )
        if dp_s + sync_s > worst:
            worst, expert_s = dp_s + sync_s, sync_s
    old = t.breakdown_s.get("dp_comm_exposed", 0.0)
    t.breakdown_s["dp_comm_exposed"] = worst
    t.step_time_s += worst - old
    return expert_s


# ------------------------------------------------------------------------------ collectives
def moe_collectives(graph: OpGraph, plan: Plan, *, act: float = 1.0, stage: int = 0) -> dict[str, dict]:
    """The collectives of the MoE layers on pipeline stage ``stage``'s ranks in one step, as the
    step model times them (:func:`node_comms`, balanced routing): per ``"axis:collective"``
    (``ep:all_to_all``, ``tp:all_reduce``) the ``count`` of calls and their ``bytes`` (input
    buffers, own share included), forward and backward over all micro-batches, the forward ones
    again for a layer recomputed under ``recompute=full``. Elements are the graph's activation
    bytes times ``act``."""
    out: dict[str, dict] = {}
    if plan.ep == 1 and plan.tp == 1:
        return out
    batch = plan.micro_batch_size / max(graph.batch_size, 1)
    recompute = plan.mode == "train" and plan.recompute == "full"
    for n in _stage_moe_nodes(graph, plan, stage):
        for c in node_comms(n, batch=batch, ep=plan.ep, tp=plan.tp, act=act):
            if plan.mode != "train" and c.phase != "fwd":
                continue
            times = c.count * (2 if recompute and c.phase == "fwd" else 1) * plan.num_micro_batches
            item = out.setdefault(f"{c.axis}:{c.collective}", {"count": 0, "bytes": 0.0})
            item["count"] += times
            item["bytes"] += c.nbytes * times
    return out

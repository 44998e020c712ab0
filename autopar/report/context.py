"""Everything a report shows, gathered once: the plan, its cluster and graph (when known), the
estimator's per-stage detail, the timed pipeline schedule and measurements from a run.

Nothing here draws; :mod:`autopar.report.figures` and :mod:`autopar.report.html` read a
:class:`ReportData`. What a report cannot know (costs on a heterogeneous cluster, shardings without
the model) becomes a note that the report prints instead of the figure.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from autopar.cluster import Cluster
from autopar.core.errors import AutoparError, PlanError, ReportError
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan, PredictedCost
from autopar.core.text import gb_text
from autopar.report import timeline as tl
from autopar.report.measured import check_measured
from autopar.report.sharding_table import sharding_table
from autopar.report.table import Table

if TYPE_CHECKING:
    from autopar.models.spec import LoadedModel

log = logging.getLogger(__name__)

INPUTS_KEY = "report_inputs"
"""Key of :attr:`Plan.search` under which :func:`attach_inputs` stores the model and cluster."""
FWD_SHARE = 1.0 / 3.0
"""Forward share of a stage's time when only the per-micro-batch total is known (backward = 2x)."""


@dataclass(kw_only=True)
class StageDetail:
    """One pipeline stage (all its chunks), per micro-batch, and its memory per device."""

    fwd_s: float
    bwd_s: float
    """Backward, recompute and exposed backward collectives."""
    p2p_s: float
    memory_bytes: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class ReportData:
    plan: Plan
    predicted: PredictedCost | None = None
    """The plan's stored prediction; for a plan without one, the cost model's (when it can run)."""
    cluster: Cluster | None = None
    graph: OpGraph | None = None
    """The traced OpGraph when the model was given (or re-traced); None when read from storage."""
    facts: dict | None = None
    """Model facts (parameters, blocks, FLOPs per sample...): from the graph or stored."""
    model: str = ""
    seq: int | None = None
    measured: dict | None = None
    stages: list[StageDetail] | None = None
    """From the estimator (graph and homogeneous cluster known) or stored; None otherwise."""
    sharding: Table | None = None
    """The per-layer sharding :class:`~autopar.report.tables.Table`."""
    timing: str = "unit"
    """Where the schedule's durations come from: ``estimator``, ``plan`` (per-stage totals split
    1:2) or ``unit`` (no costs: forward 1, backward 2)."""
    timeline: tl.Timeline | None = None
    stage_kinds: list[str] | None = None
    """Per pipeline stage, its device kind(s) (``a100-80g``, or ``a100-80g+v100-32g`` where a stage
    mixes kinds); None when the cluster is unknown."""
    stage_capacity_bytes: list[float] | None = None
    """Per pipeline stage, the memory capacity of its devices (the smallest where kinds mix)."""
    settings: dict = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    """Per report section: what is missing or approximate, and why."""
    moe: dict | None = None
    """Mixture-of-experts facts (:func:`autopar.report.experts.moe_facts`): from the graph or
    stored; None for a dense model."""

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)


def graph_facts(graph: OpGraph) -> dict:
    """What the report shows about the model, from the traced graph (JSON-able)."""
    per_sample = (graph.flops_fwd + graph.flops_bwd) / graph.batch_size if graph.batch_size else 0.0
    first = graph[graph.inputs[0]] if graph.inputs else None
    shape = first.output_shape if first is not None else None
    return {
        "seq": int(shape[1]) if shape and len(shape) >= 2 else None,
        "num_params": graph.num_params,
        "param_bytes": graph.param_bytes,
        "num_blocks": len(graph.block_order),
        "num_nodes": len(graph.nodes),
        "tracer": graph.tracer,
        "flops_per_sample": per_sample,
    }


# --------------------------------------------------------------------------- stored inputs
def attach_inputs(
    plan: Plan,
    *,
    cluster: Cluster | None = None,
    model: str = "",
    seq: int | None = None,
    settings: dict | None = None,
    graph: OpGraph | None = None,
) -> None:
    """Store what ``autopar report plan.json`` needs in ``plan.search["report_inputs"]``: the model
    spec, sequence length, cluster and planner settings, and with ``graph`` the model facts, the
    per-layer shardings and the per-stage costs, so that the report needs neither torch nor a
    re-trace (~0.1 s for GPT-3 175B). Plans without a search (hand-written) are left alone: give
    ``--model`` / ``--cluster`` to the report instead."""
    if plan.search is None:
        return
    stored: dict[str, Any] = {
        "model": model or "",
        "seq": seq,
        "cluster": cluster.to_dict() if cluster is not None else None,
        "settings": dict(settings or {}),
    }
    if graph is not None:
        stored["facts"] = graph_facts(graph)
        stored["sharding"] = sharding_table(plan, graph).to_dict()
        moe = _moe_facts(plan, graph, cluster)
        if moe is not None:
            stored["moe"] = moe
        if cluster is not None:
            try:
                stages, _ = _estimator_detail(graph, cluster, plan)
                stored["stages"] = [asdict(s) for s in stages]
            except AutoparError as e:
                log.info("no per-stage costs stored: %s", e)
    plan.search[INPUTS_KEY] = stored


def stored_inputs(plan: Plan) -> dict:
    return dict((plan.search or {}).get(INPUTS_KEY) or {})


def resolve_cluster(plan: Plan, cluster: Cluster | str | None = None) -> Cluster | None:
    """The cluster given, else the one stored with the plan, else the planner's cluster label."""
    if cluster is not None:
        return cluster if isinstance(cluster, Cluster) else Cluster.parse(str(cluster))
    stored = stored_inputs(plan).get("cluster")
    if stored:
        return Cluster.from_dict(stored, where="plan search.report_inputs.cluster")
    label = ((plan.search or {}).get("stats") or {}).get("cluster")
    if label:
        try:
            return Cluster.parse(label)
        except AutoparError:
            log.info("cluster label %r of the plan is not a parsable spec", label)
    return None


def resolve_graph(
    plan: Plan,
    model: str | LoadedModel | OpGraph | None = None,
    graph: OpGraph | None = None,
    seq: int | None = None,
) -> tuple[OpGraph | None, str, int | None]:
    """(graph, model label, seq) from ``graph``, a model spec or a LoadedModel given now. The
    stored spec is traced only when nothing was stored from the graph at planning time."""
    if isinstance(model, OpGraph):
        model, graph = "", model
    stored = stored_inputs(plan)
    seq = seq if seq is not None else stored.get("seq")
    label = model if isinstance(model, str) else getattr(model, "spec", "") or ""
    if graph is not None:
        return graph, label or stored.get("model", ""), seq
    if model is not None and not isinstance(model, str):  # a LoadedModel
        return model.trace(batch=1), label, getattr(model, "seq", seq)
    if not label and "facts" not in stored:
        label = stored.get("model", "")
    if label:
        from autopar.models.spec import load_model

        loaded = load_model(label, seq=seq)
        return loaded.trace(batch=1), label, loaded.seq
    return None, stored.get("model", ""), seq


# ------------------------------------------------------------------------------- detail
def _estimator_detail(
    graph: OpGraph, cluster: Cluster, plan: Plan
) -> tuple[list[StageDetail], PredictedCost]:
    """Per-stage detail and today's PredictedCost (the stored prediction may be older)."""
    from autopar.estimator import predicted_cost, workload
    from cost_models import DEFAULT, step_time

    w = workload(graph, cluster, plan)
    t = step_time(w.spec, w.rates, w.stage_calibs or w.calib or DEFAULT)  # the workload's own constants
    out = []
    for bt, p2p, mem in zip(t.stage_times, t.stage_p2p_s, w.memory_per_stage):
        out.append(
            StageDetail(
                fwd_s=bt.fwd_s + bt.tp_fwd_s,
                bwd_s=bt.bwd_s + bt.recompute_s + bt.tp_recompute_s + bt.tp_bwd_s + bt.zero_exposed_s,
                p2p_s=p2p,
                memory_bytes=dict(mem),
            )
        )
    return out, predicted_cost(w, plan, cluster, DEFAULT)


def _detail(data: ReportData) -> None:
    plan, cluster, graph = data.plan, data.cluster, data.graph
    if graph is None:
        stored = stored_inputs(plan).get("stages")
        if stored and len(stored) == plan.pp:
            data.stages = [StageDetail(**s) for s in stored]
            return
    if graph is None or cluster is None:
        missing = " and ".join(x for x, v in (("the model", graph), ("the cluster", cluster)) if v is None)
        data.note("costs", f"per-stage detail needs {missing} (give --model / --cluster)")
        return
    try:
        data.stages, now = _estimator_detail(graph, cluster, plan)
    except AutoparError as e:
        data.note("costs", f"the estimator cannot cost this plan on this cluster: {e}")
        return
    if plan.predicted is not None:
        _compare_stored(data, now.step_time_s)
    else:
        data.predicted = now
        data.note("costs", "the plan carried no prediction: the numbers are the cost model's, computed now")


def _model(data: ReportData) -> None:
    """Model facts and the sharding table: live from the graph, else as stored with the plan."""
    stored = stored_inputs(data.plan)
    if data.graph is not None:
        data.facts = graph_facts(data.graph)
        data.sharding = sharding_table(data.plan, data.graph)
        return
    data.facts = stored.get("facts")
    if stored.get("sharding"):
        data.sharding = Table.from_dict(stored["sharding"])
    else:
        data.sharding = sharding_table(data.plan, None)


def _moe_facts(plan: Plan, graph: OpGraph, cluster: Cluster | None) -> dict | None:
    """MoE facts with activations in the dtype the estimator costs on ``cluster``."""
    from autopar.estimator.moe import moe_nodes
    from autopar.report.experts import moe_facts

    if not moe_nodes(graph):
        return None
    act = 1.0
    if cluster is not None:
        from autopar.estimator.stages import compute_dtype

        act = compute_dtype(graph, cluster.device_kinds, None)[1]
    return moe_facts(plan, graph, act=act)


def _moe(data: ReportData) -> None:
    if data.graph is not None:
        data.moe = _moe_facts(data.plan, data.graph, data.cluster)
    else:
        data.moe = stored_inputs(data.plan).get("moe")
    tokens = (data.measured or {}).get("expert_tokens")
    if tokens and data.moe and len(tokens[0]) != data.moe["experts"]:
        raise ReportError(
            f"measured expert_tokens has {len(tokens[0])} counts per layer; the model has "
            f"{data.moe['experts']} experts (one count each)"
        )


def _stage_devices(data: ReportData) -> None:
    """Device kind and memory capacity of each pipeline stage: from the prediction's per-stage
    lists (the estimator's), else from the cluster (the kinds of each stage's ranks)."""
    plan, cluster = data.plan, data.cluster
    extra = (data.predicted.extra or {}) if data.predicted is not None else {}
    names = extra.get("stage_devices")
    caps = extra.get("memory_capacity_bytes_per_stage")
    if cluster is not None and not cluster.is_heterogeneous:
        names = [[cluster.device_kinds[0].name]] * plan.pp
    elif cluster is not None and not (names and len(names) == plan.pp):
        names = [[] for _ in range(plan.pp)]
        for rank in range(plan.world_size):
            kind = cluster.device_of(rank)
            s = plan.coords(rank).get("pp", 0)
            if kind.name not in names[s]:
                names[s].append(kind.name)
    if cluster is not None and not (caps and len(caps) == plan.pp):
        caps = [min(k.memory_bytes for k in cluster.device_kinds if k.name in n) for n in names]
    if names and len(names) == plan.pp:
        data.stage_kinds = ["+".join(n) for n in names]
    if caps and len(caps) == plan.pp:
        data.stage_capacity_bytes = [float(c) for c in caps]
    elif data.predicted is not None and data.predicted.memory_capacity_bytes:
        data.stage_capacity_bytes = [data.predicted.memory_capacity_bytes] * plan.pp
    if extra.get("mixed_device_note"):
        data.note("costs", extra["mixed_device_note"])


def _differs(a: float, b: float) -> bool:
    return b > 0 and abs(a / b - 1.0) > 0.01


def _compare_stored(data: ReportData, now_s: float) -> None:
    """Plans written by an older cost model: say so rather than show two numbers silently."""
    stored = data.plan.predicted
    now = [sum(s.memory_bytes.values()) for s in data.stages]
    # The stage the cost reports: the largest, or on a heterogeneous cluster the least headroom.
    worst = (stored.extra or {}).get("largest_memory_stage")
    now_mem = now[worst] if isinstance(worst, int) and 0 <= worst < len(now) else max(now)
    diffs = []
    if _differs(now_s, stored.step_time_s):
        diffs.append(f"step time {stored.step_time_s:.4g} s stored, {now_s:.4g} s now")
    if _differs(now_mem, stored.memory_bytes_per_device):
        diffs.append(f"memory {gb_text(stored.memory_bytes_per_device)} stored, {gb_text(now_mem)} now")
    if diffs:
        data.note(
            "costs",
            "the plan was costed by an older cost model (" + "; ".join(diffs) + "): the summary and "
            "tables show the stored numbers, the schedule and memory bars today's. Re-plan to refresh.",
        )


def _durations(data: ReportData) -> tuple[list[float], list[float], list[float]]:
    plan = data.plan
    v, p = plan.virtual_stages, plan.pp
    if data.stages:
        data.timing = "estimator"
        return (
            [s.fwd_s / v for s in data.stages],
            [s.bwd_s / v for s in data.stages],
            [s.p2p_s / ((2 if plan.mode == "train" else 1) * v) for s in data.stages],
        )
    cost = data.predicted
    per_mb = (cost.extra or {}).get("stage_time_per_micro_batch_s") if cost is not None else None
    if per_mb and len(per_mb) == p:
        data.timing = "plan"
        share = FWD_SHARE if plan.mode == "train" else 1.0
        return [t * share / v for t in per_mb], [t * (1 - share) / v for t in per_mb], [0.0] * p
    data.timing = "unit"
    return [1.0 / v] * p, [2.0 / v] * p, [0.0] * p


def _timeline(data: ReportData) -> None:
    plan = data.plan
    fwd, bwd, p2p = _durations(data)
    inference = plan.mode != "train"
    try:
        orders, note = tl.orders(
            plan.schedule, plan.pp, plan.num_micro_batches, plan.virtual_stages, forward_only=inference
        )
        data.timeline = tl.simulate(
            orders,
            fwd_s=fwd,
            bwd_s=bwd,
            p2p_s=p2p,
            virtual_stages=plan.virtual_stages,
            schedule=plan.schedule,
            num_micro_batches=plan.num_micro_batches,
        )
    except PlanError as e:
        data.note("schedule", f"the schedule cannot be drawn: {e}")
        return
    if note:
        data.timeline.note = note
        data.note("schedule", note)


def gather(
    plan: Plan,
    *,
    cluster: Cluster | str | None = None,
    model: str | LoadedModel | OpGraph | None = None,
    graph: OpGraph | None = None,
    seq: int | None = None,
    measured: dict | None = None,
) -> ReportData:
    """Resolve the inputs and compute what every section needs."""
    if not isinstance(plan, Plan):
        raise PlanError(f"write_report needs a Plan, got {type(plan).__name__}")
    data = ReportData(plan=plan, predicted=plan.predicted, measured=check_measured(measured, plan))
    data.cluster = resolve_cluster(plan, cluster)
    if data.cluster is not None and plan.world_size > data.cluster.num_devices:
        raise PlanError(
            f"the plan uses {plan.world_size} ranks but cluster {data.cluster.name!r} has "
            f"{data.cluster.num_devices} devices; give the cluster the plan was made for (--cluster)"
        )
    data.graph, data.model, data.seq = resolve_graph(plan, model, graph, seq)
    data.settings = stored_inputs(plan).get("settings", {})
    if data.cluster is None:
        data.note("device_map", "cluster unknown: devices drawn in rows of 8 (give --cluster)")
    _model(data)
    _moe(data)
    _detail(data)
    _stage_devices(data)
    _timeline(data)
    return data

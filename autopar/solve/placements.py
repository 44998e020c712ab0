"""The intra-op level of the planner: per-node placements from the ILP, tried on the best plans.

The outer search is exact over plans with the layout the sharding rules derive (Megatron's on
transformers, the estimator's validated accounting). Then, for each tp of the best plans, the
intra-op ILP (:mod:`autopar.solve.intra_op`) is solved once on the collapsed graph (stem, first
block, head), and each of those plans is costed again with the ILP's placements; a variant that
fits and is faster joins the candidates. So the planner never does worse than the exact optimum
over the default layout, and does better where the ILP finds a cheaper layout (the estimator
decides). Sequence parallelism is a variant of the default layout: ``sp=1`` plans are not re-tried.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from autopar.cluster import Cluster
from autopar.core.errors import AutoparError
from autopar.core.ir import OpGraph
from autopar.core.plan import NodePlacement, Plan, PredictedCost, Shard
from autopar.estimator import estimate, workload
from autopar.sharding import ShardingGraph
from autopar.solve.candidate import Candidate
from autopar.solve.intra_op import CostModel, expand_placements, solve_placements
from autopar.tracing.collapse import first_blocks_module
from cost_models import DEFAULT, collective_time_s

log = logging.getLogger(__name__)
MIN_GAIN = 1e-3
"""Relative step-time gain the ILP placements need to replace the default (ties keep the default,
whose accounting the cost model was validated with)."""


@dataclass(kw_only=True)
class TpChoice:
    """What the intra-op ILP gave at one tp: its placements when adopted, and both step times."""

    tp: int
    placements: dict | None
    """The ILP's placements when adopted, else None (the default layout)."""
    default_s: float | None = None
    ilp_s: float | None = None
    solve_time_s: float = 0.0
    note: str = ""

    def better_than(self, graph: OpGraph, cluster: Cluster, cand: Candidate) -> Candidate | None:
        """``cand`` re-costed with the ILP's placements, if that fits and is faster; else None."""
        if self.placements is None or not shards_a_parameter(self.placements):
            return None  # all-replicated placements: tp would buy nothing (the lowering refuses them)
        plan = dataclasses.replace(cand.plan, placements=self.placements, predicted=None)
        try:
            cost = estimate(graph, cluster, plan)
        except AutoparError:
            return None
        if not cost.fits or cost.step_time_s >= cand.time_s * (1 - MIN_GAIN):
            return None
        return type(cand)(keys=dict(cand.keys, placements="intra-op ILP"), plan=plan, cost=cost)

    def to_dict(self) -> dict:
        return {
            "tp": self.tp,
            "adopted": self.placements is not None,
            "default_step_time_s": self.default_s,
            "ilp_step_time_s": self.ilp_s,
            "solve_time_s": self.solve_time_s,
            "note": self.note,
        }


def shards_a_parameter(placements: dict[str, NodePlacement]) -> bool:
    """Whether any node's placement splits one of its parameters."""
    return any(isinstance(pl, Shard) for p in placements.values() for pl in p.params.values())


def solve_for_tp(
    graph: OpGraph, cluster: Cluster, plan: Plan
) -> tuple[dict[str, NodePlacement] | None, float]:
    """The intra-op ILP's placements for ``plan.tp`` (expanded to every block), and its solve time."""
    t0 = time.perf_counter()
    w = workload(graph, cluster, plan)
    rates = w.stage_rates[0] if getattr(w, "stage_rates", None) else w.rates
    group = w.spec.groups.get("tp")
    if group is None:
        return None, 0.0
    costs = CostModel(
        peak_flops_per_s=rates.peak_flops_per_s,
        hbm_bytes_per_s=rates.hbm_bytes_per_s,
        collective_s=lambda kind, nbytes: collective_time_s(kind, nbytes, group, calib=w.calib or DEFAULT),
    )
    try:
        sg = ShardingGraph(first_blocks_module(graph), plan.tp)
        solution = solve_placements(sg, graph, costs, time_limit_s=10.0)
    except AutoparError as e:  # a graph the rules cannot shard further: keep the default
        log.info("intra-op ILP skipped at tp=%d: %s", plan.tp, e)
        return None, time.perf_counter() - t0
    if solution is None:
        return None, time.perf_counter() - t0
    return expand_placements(solution.placements, graph), time.perf_counter() - t0


def choose(graph: OpGraph, cluster: Cluster, plan: Plan, default_cost: PredictedCost) -> TpChoice:
    """Solve the ILP at ``plan.tp``; keep its placements (for :meth:`TpChoice.better_than`) if the
    estimator prefers them on ``plan``, the best plan at this tp."""
    placements, solve_s = solve_for_tp(graph, cluster, plan)
    choice = TpChoice(tp=plan.tp, placements=None, default_s=default_cost.step_time_s, solve_time_s=solve_s)
    if placements is None:
        choice.note = "the ILP found no placements; rules default kept"
        return choice
    try:
        ilp_cost = estimate(graph, cluster, dataclasses.replace(plan, placements=placements, predicted=None))
    except AutoparError as e:
        choice.note = f"ILP placements rejected by the estimator ({e}); rules default kept"
        return choice
    choice.ilp_s = ilp_cost.step_time_s
    if ilp_cost.step_time_s < default_cost.step_time_s * (1 - MIN_GAIN):
        choice.placements = placements
        choice.note = "intra-op ILP placements adopted"
    else:
        choice.note = "rules default kept (the ILP's placements are not faster under the estimator)"
    return choice

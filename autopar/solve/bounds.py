"""The planner's pruning bounds: lower bounds on step times, all valid under the cost model, so
pruning never loses the optimum (the arguments are in ``docs/planner.md`` §3, and
``tests/test_planner.py`` checks each against the estimator).

* B1 :func:`pipeline_bound`: every knob and split of a pipeline, from one block's time.
* B2 :func:`interleaved_bound`: an interleaved pipeline, from its 1F1B twin.
* B3 :func:`knob_bound`: the other memory knobs of a pipeline, from its first costed knob (B4 where
  the blocks may be split unevenly).
* B4 :func:`split_lower_bound`: any split of a 1F1B pipeline's blocks (and any recompute / ZeRO).
"""

from __future__ import annotations

from autopar.cluster import Cluster
from autopar.core.plan import Plan, PredictedCost
from autopar.solve.candidate import Candidate


def splittable(plan: Plan, num_blocks: int) -> bool:
    """An uneven split applies: a pipeline without virtual stages and blocks to move."""
    return plan.pp > 1 and plan.virtual_stages == 1 and num_blocks > plan.pp


def pipeline_sum_s(cost: PredictedCost, m: int) -> float:
    """``sum_s T_s`` of a ``v = 1`` candidate from its breakdown: step = m max + (Σ - max) + sync."""
    b = cost.breakdown_s
    pipe = (
        cost.step_time_s
        - b.get("dp_comm_exposed", 0.0)
        - b.get("optimizer", 0.0)
        - b.get("step_overhead", 0.0)
    )
    bubble = b.get("pp_bubble", 0.0)
    return bubble + (pipe - bubble) / m


def split_lower_bound(cost: PredictedCost, plan: Plan, cluster: Cluster) -> float:
    """B4: a lower bound on the step time of ``plan``'s keys under any split of the blocks (and,
    since recompute and ZeRO-3 only lengthen stages, under any recompute / ZeRO setting). It relies
    on every stage running a block in the same time, so it is 0 on a heterogeneous cluster."""
    if cluster.is_heterogeneous:
        return 0.0
    m, S = plan.num_micro_batches, plan.pp
    total = pipeline_sum_s(cost, m)
    return (m - 1) * total / S + total + cost.breakdown_s.get("step_overhead", 0.0)


def pipeline_bound(
    block_s: float | None, *, num_micro_batches: int, pp: int, vpp: int, num_blocks: int, heterogeneous: bool
) -> float:
    """B1: a lower bound on every knob and split of a pipeline from one number, ``block_s``: the
    time of one block for one micro-batch at its (tp, sp, micro-batch), which does not depend on dp
    or pp (None: not known yet, no bound). Any split has a stage of at least ``L / pp`` blocks and
    stages summing to at least ``L`` blocks, so ``T >= (m - 1/v) L t / pp + L t / v`` (the classic
    bubble formula). 0 on a heterogeneous cluster (stages on other devices: other block times)."""
    if block_s is None or heterogeneous:
        return 0.0
    m, v, L, t = num_micro_batches, vpp, num_blocks, block_s
    return ((m - 1 / v) * L * t / pp + L * t / v) * (1 - 1e-9)


def interleaved_bound(twin: PredictedCost, vpp: int) -> float:
    """B2: an interleaved pipeline has the same blocks per device as its 1F1B ``twin``, at least its
    stage times and ``v`` times the p2p; only the bubble shrinks, at best to ``1/v`` of the twin's."""
    b = twin.breakdown_s
    floor_s = twin.step_time_s - b.get("optimizer", 0.0) - b.get("dp_comm_exposed", 0.0)
    return floor_s - b.get("pp_bubble", 0.0) * (1 - 1 / vpp)


def knob_bound(first: Candidate, zero: int, num_blocks: int, cluster: Cluster) -> float:
    """B3: a lower bound on the step time of a memory knob with ZeRO stage ``zero`` at ``first``'s
    mesh and pipeline (``first``: the least recompute and ZeRO allowed, costed).

    Recompute and ZeRO-3 only lengthen every stage; a longer backward can hide more of the
    gradient all-reduce, but never more than it adds. So at ``first``'s ZeRO stage the step is
    at least ``first``'s; at another ZeRO stage at least ``first``'s minus its data-parallel
    sync and optimizer step. When the blocks may be split unevenly, any split of any knob
    costs at least :func:`split_lower_bound` of ``first``."""
    if splittable(first.plan, num_blocks):
        return split_lower_bound(first.cost, first.plan, cluster)
    if zero == first.keys["zero"]:
        return first.time_s
    b = first.cost.breakdown_s
    return first.time_s - b.get("optimizer", 0.0) - b.get("dp_comm_exposed", 0.0)

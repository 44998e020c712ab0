"""Re-split blocks over pipeline stages with the inter-op ILP, for the best candidates.

The estimator's workload for the even split gives, per stage, the repeated block's time and the
stage's fixed part (stem, head, p2p); memory per stage is linear in its block count, so its slope
``w_s`` and intercept ``G_s`` come from the memory model at ``n_s`` and ``n_s + 1`` blocks. The
ILP's split is then re-costed by the estimator and kept only if it is faster and fits.
"""

from __future__ import annotations

import dataclasses
import logging

from autopar.errors import PlanError
from autopar.solve.inter_op import StageProblem, even_split, solve_stages

log = logging.getLogger(__name__)


def refine_stages(graph, cluster, candidates: list, search) -> list:
    out = []
    for cand in candidates:
        better = None
        if cand.plan.pp > 1 and cand.plan.virtual_stages == 1 and len(graph.block_order) > cand.plan.pp:
            try:
                better = _refine(graph, cluster, cand, search)
            except PlanError as e:  # an ILP split the estimator rejects: keep the even split
                log.debug("stage refinement skipped for %s: %s", cand.plan.summary(), e)
        out.append(better or cand)
    return out


def _refine(graph, cluster, cand, search):
    from autopar.estimator import estimate

    problem = stage_problem(graph, cluster, cand.plan)
    if problem is None:
        return None
    solution = solve_stages(problem, time_limit_s=5.0)
    if solution is None or solution.blocks_per_stage == even_split(problem.num_blocks, problem.num_stages):
        return None
    layer_stages = [s for s, n in enumerate(solution.blocks_per_stage) for _ in range(n)]
    plan = dataclasses.replace(cand.plan, layer_stages=layer_stages, predicted=None)
    cost = estimate(graph, cluster, plan)
    search.stats.evaluated += 1
    if not cost.fits or cost.step_time_s >= cand.time_s:
        return None
    return type(cand)(keys=dict(cand.keys, layer_stages=layer_stages), plan=plan, cost=cost)


def stage_problem(graph, cluster, plan) -> StageProblem | None:
    """Linear per-stage time and memory model of ``plan``'s pipeline around its current split."""
    from autopar import estimator
    from cost_models import DEFAULT
    from cost_models.step import _p2p_time, stage_time

    w = estimator.workload(graph, cluster, plan)
    repeated = [_repeated(stage) for stage in w.stages]
    if any(r is None for r in repeated):
        return None
    times, fixed_t, per_block_b, fixed_b = [], [], [], []
    for s, stage in enumerate(w.stages):
        block, count = repeated[s]
        t_block = stage_time(_with(stage, block, 1), w.spec, w.rates, DEFAULT).total_s
        t_block -= stage_time(_with(stage, block, 0), w.spec, w.rates, DEFAULT).total_s
        t_stage = stage_time(stage, w.spec, w.rates, DEFAULT).total_s
        mem_n = _stage_bytes(w, plan, s, stage)
        mem_n1 = _stage_bytes(w, plan, s, _with(stage, block, count + 1))
        times.append(t_block)
        fixed_t.append(t_stage + _p2p_time(stage, w.spec, DEFAULT) - count * t_block)
        per_block_b.append(mem_n1 - mem_n)
        fixed_b.append(mem_n - count * (mem_n1 - mem_n))
    return StageProblem(
        num_blocks=len(graph.block_order),
        num_micro_batches=plan.num_micro_batches,
        block_time_s=times,
        block_bytes=per_block_b,
        fixed_time_s=fixed_t,
        fixed_bytes=fixed_b,
        capacity_bytes=[cluster.device.memory_bytes] * plan.pp,
    )


def _repeated(stage):
    blocks = [(b, c) for b, c in stage.blocks if b.recomputable]
    return blocks[0] if len(blocks) == 1 else None


def _with(stage, block, count: int):
    blocks = tuple((b, count if b is block else c) for b, c in stage.blocks)
    return dataclasses.replace(stage, blocks=blocks)


def _stage_bytes(w, plan, s: int, stage) -> float:
    from autopar import estimator
    from cost_models import DEFAULT

    stages = list(w.stages)
    stages[s] = stage
    memory = estimator._stage_memory(stages, plan, w.spec.param_bytes, DEFAULT, [0.0] * len(stages))
    return sum(memory[s].values())

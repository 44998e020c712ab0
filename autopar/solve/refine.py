"""Uneven pipeline splits: the inter-op ILP applied to the candidates that could still win.

The outer search costs every candidate with its blocks split evenly over the stages. For a 1F1B
(or GPipe) pipeline, a split that gives the stem's stage or the head's stage fewer blocks can be
faster, use less memory on stage 0 (which holds the most micro-batches in flight), or both.

**Which candidates.** Every stage runs the same block on the same kind of device, so the sum of
the per-micro-batch stage times ``Σ = sum_s T_s`` does not depend on the split, and the pipeline
part of any split costs at least ``(m - 1) Σ / S + Σ`` (the slowest stage is at least the mean).
:func:`~autopar.solve.bounds.split_lower_bound` reads ``Σ`` off a candidate's even-split breakdown; only candidates whose
bound is below the incumbent are re-split, best bound first, so the optimum over all splits is
never missed.

**The problem.** :func:`stage_problem` builds the ILP's data from the estimator's own workload: per
stage the time of one block and the stage's fixed time (the difference of the stage's time with
one block more or less), the memory per block and fixed memory (likewise), and per block count
the exposed data-parallel sync and the optimizer step of that stage. With these the ILP's
objective is the estimator's step time for every split (a test checks it), and the split it
returns is re-costed by the estimator before it is used.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Iterator, Sequence

from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan
from autopar.estimator import Workload, estimate, stage_memory, workload
from autopar.solve.bounds import split_lower_bound, splittable
from autopar.solve.candidate import Candidate, SearchView
from autopar.solve.inter_op import (
    NO_SOLVER,
    StageProblem,
    bound_stages,
    can_fit,
    even_split,
    latency_s,
    solve_stages,
)
from cost_models import (
    DEFAULT,
    BlockTime,
    BlockWork,
    Calibration,
    DeviceRates,
    StageWork,
    StepSpec,
    block_time,
    dp_exposed_s,
    optimizer_step_s,
    stage_p2p_s,
    stage_time,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the problem
def stage_problem(graph: OpGraph, cluster: Cluster, plan: Plan) -> StageProblem | None:
    """The ILP's data for ``plan``'s keys (any split), or None when stages mix block types."""
    even = dataclasses.replace(plan, layer_stages=None, predicted=None, search=None)
    w = workload(graph, cluster, even)
    calib = w.calib or DEFAULT  # profiled mode replaces some constants
    repeated = [_repeated(stage) for stage in w.stages]
    if any(r is None for r in repeated):
        return None
    L = len(graph.block_order)
    train = plan.mode == "train"
    p = StageProblem(
        num_blocks=L,
        num_micro_batches=plan.num_micro_batches,
        block_time_s=[],
        fixed_time_s=[],
        block_bytes=[],
        fixed_bytes=[],
        capacity_bytes=stage_capacities(w, cluster),
        sync_time_s=None,
        optimizer_block_s=[],
        optimizer_fixed_s=[],
    )
    syncs = []
    mem_n, mem_n1 = _memory_points(w, even, repeated)
    for s, (stage, (block, count)) in enumerate(zip(w.stages, repeated)):
        rates, c = _rates(w, s), _calib(w, s, calib)
        t0 = stage_time(_with(stage, block, 0), w.spec, rates, c, index=s)
        t1 = stage_time(_with(stage, block, 1), w.spec, rates, c, index=s)
        per0, per1 = _per_micro_batch(t0, train), _per_micro_batch(t1, train)
        p.block_time_s.append(per1 - per0)
        p.fixed_time_s.append(per0 + stage_p2p_s(stage, w.spec, c, s))
        p.block_bytes.append(mem_n1[s] - mem_n[s])
        p.fixed_bytes.append(mem_n[s] - count * (mem_n1[s] - mem_n[s]))
        if train:
            one = [_one_stage(w.spec, s, _with(stage, block, k)) for k in (0, 1)]
            o0, o1 = (optimizer_step_s(spec, rates, c) for spec in one)
            p.optimizer_block_s.append(o1 - o0)
            p.optimizer_fixed_s.append(o0)
            syncs.append((stage, block, t0, t1 + t0.scaled(-1.0)))
    if train:
        p.sync_time_s = functools.cache(lambda s, k: _sync(w.spec, s, *syncs[s], k, _calib(w, s, calib)))
    return p


def block_time_s(w: Workload, mode: str) -> float | None:
    """One repeated block's time per micro-batch (no recompute, no ZeRO) on ``w``'s devices and
    tensor-parallel group; None when the stages hold more than one block type."""
    blocks = {id(b): b for stage in w.stages for b, c in stage.blocks if b.recomputable and c > 0}
    if len(blocks) != 1 or isinstance(w.rates, (tuple, list)):
        return None
    (block,) = blocks.values()
    t = block_time(
        block,
        w.rates,
        w.spec.groups,
        recompute="none",
        zero_stage=0,
        bytes_per_param=(w.spec.param_bytes, w.spec.grad_bytes),
        calib=w.calib or DEFAULT,
    )
    return _per_micro_batch(t, mode == "train")


def _sync(
    spec: StepSpec,
    index: int,
    stage: StageWork,
    block: BlockWork,
    t0: BlockTime,
    block_t: BlockTime,
    k: int,
    calib: Calibration,
) -> float:
    """``D_s(k)``: the exposed data-parallel sync of stage ``index`` holding ``k`` blocks."""
    return dp_exposed_s(_one_stage(spec, index, _with(stage, block, k)), [t0 + block_t.scaled(k)], calib)


def _calib(w: Workload, index: int, calib: Calibration) -> Calibration:
    """Stage ``index``'s constants: its own on a heterogeneous cluster (``w.stage_calibs``), else ``calib``."""
    return w.stage_calibs[index] if w.stage_calibs else calib


def _one_stage(spec: StepSpec, index: int, stage: StageWork) -> StepSpec:
    """``spec`` reduced to its stage ``index`` (for the per-stage sync and optimizer terms)."""
    groups = getattr(spec, "stage_groups", None)
    if groups is None:
        return dataclasses.replace(spec, stages=(stage,))
    return dataclasses.replace(spec, stages=(stage,), stage_groups=(groups[index],))


def _rates(w: Workload, index: int) -> DeviceRates:
    """Stage ``index``'s device rates (one DeviceRates for all stages on a homogeneous cluster)."""
    return w.rates[index] if isinstance(w.rates, (tuple, list)) else w.rates


def stage_capacities(w: Workload, cluster: Cluster) -> list[float]:
    """Per stage, the memory of its devices."""
    caps = getattr(w, "stage_capacity_bytes", None)
    return list(caps) if caps is not None else [cluster.device.memory_bytes] * len(w.stages)


def _per_micro_batch(t: BlockTime, train: bool) -> float:
    """A stage's time per micro-batch as ``cost_models.step`` counts it (p2p apart)."""
    return t.total_s if train else t.fwd_s + t.tp_fwd_s


def _repeated(stage: StageWork) -> tuple[BlockWork, int] | None:
    blocks = [(b, c) for b, c in stage.blocks if b.recomputable]
    return blocks[0] if len(blocks) == 1 else None


def _with(stage: StageWork, block: BlockWork, count: int) -> StageWork:
    blocks = tuple((b, count if b is block else c) for b, c in stage.blocks)
    return dataclasses.replace(stage, blocks=blocks)


def stage_totals(w: Workload, plan: Plan, stages: Sequence[StageWork] | None = None) -> list[float]:
    """Bytes per stage of ``plan`` on ``w``'s stages (default: all of them, as they are), as the
    estimator counts them. The stages do not depend on recompute or ZeRO, so one workload serves
    every memory knob of a pipeline."""
    stages = w.stages if stages is None else stages
    memory = stage_memory(
        stages, plan, w.spec.param_bytes, w.calib or DEFAULT, [0.0] * len(stages), getattr(w, "experts", None)
    )
    return [sum(m.values()) for m in memory]


def _memory_points(
    w: Workload, plan: Plan, repeated: list[tuple[BlockWork, int]]
) -> tuple[list[float], list[float]]:
    """Bytes per stage with its current block count and with one block more (memory is linear in
    the count, so these two points give every count)."""
    more = [_with(st, b, c + 1) for st, (b, c) in zip(w.stages, repeated)]
    return stage_totals(w, plan), stage_totals(w, plan, more)


def split_can_fit(w: Workload, plan: Plan, capacity_bytes: list[float]) -> bool:
    """Whether some split of ``plan``'s blocks fits memory (``w``: a workload of its pipeline,
    ``capacity_bytes``: per stage)."""
    repeated = [_repeated(stage) for stage in w.stages]
    if any(r is None for r in repeated):
        return True  # cannot tell: let the estimator decide
    mem_n, mem_n1 = _memory_points(w, plan, repeated)
    S = len(w.stages)
    per_block = [b - a for a, b in zip(mem_n, mem_n1)]
    problem = StageProblem(
        num_blocks=sum(c for _, c in repeated),
        num_micro_batches=plan.num_micro_batches,
        block_time_s=[0.0] * S,
        fixed_time_s=[0.0] * S,
        block_bytes=per_block,
        fixed_bytes=[a - c * d for a, (_, c), d in zip(mem_n, repeated, per_block)],
        capacity_bytes=list(capacity_bytes),
    )
    return can_fit(problem)


def layer_stages(counts: list[int]) -> list[int]:
    """The stage of each block, for ``counts[s]`` consecutive blocks on stage ``s``."""
    return [s for s, n in enumerate(counts) for _ in range(n)]


# ------------------------------------------------------------------------------ the phase
def refine_splits(search: SearchView) -> None:
    """Re-split every candidate that might beat the incumbent under some split (module docstring);
    better splits join ``search.fitting`` (replacing their even-split twin)."""
    num_blocks = len(search.graph.block_order)
    pool = [c for c in search.fitting + search.overflowing if splittable(c.plan, num_blocks)]
    pool.sort(key=lambda c: split_lower_bound(c.cost, c.plan, search.cluster))
    for cand in pool:
        if split_lower_bound(cand.cost, cand.plan, search.cluster) >= search.best_s * (1 - 1e-12):
            break
        if search.out_of_time():
            return
        try:
            better = _refine(search, cand)
        except PlanError as e:  # a split the estimator rejects: keep the even split
            log.debug("stage refinement skipped for %s: %s", cand.plan.summary(), e)
            continue
        if better is not None:
            search.add_split(cand, better)


def unit_times(graph: OpGraph, w: Workload, plan: Plan) -> tuple[list[float], float, float] | None:
    """Per pipeline unit (block instance, in order), its time per micro-batch on stage 0's devices,
    and the stem's and head's times: from the estimator's own block costs, so units of different
    types (a ResNet's stages, an MLP's unequal layers) weigh what they cost. None when a unit's
    work cannot be found (a workload without per-type blocks)."""
    rates = _rates(w, 0)
    train = plan.mode == "train"
    by_name = {b.name: b for stage in w.stages for b, _ in stage.blocks}

    def time_of(block: BlockWork) -> float:
        one = StageWork(blocks=((block, 1),), p2p_bytes=0.0)
        return _per_micro_batch(
            stage_time(one, w.spec, rates, _calib(w, 0, w.calib or DEFAULT), index=0), train
        )

    times = []
    for key, _ in graph.block_order:
        if key not in by_name:
            return None
        times.append(time_of(by_name[key]))
    stem = time_of(by_name["stem"]) if "stem" in by_name else 0.0
    head = time_of(by_name["head"]) if "head" in by_name else 0.0
    return times, stem, head


def balanced_split(times: Sequence[float], stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """Units per stage (contiguous, each stage >= 1) minimising the slowest stage's time, the stem's
    time ``first`` on stage 0 and the head's ``last`` on the last stage: the linear-partition
    dynamic programme (exact for the bottleneck, ``O(S U^2)``)."""
    n = len(times)
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    # best[s][u]: the smallest bottleneck placing the first u units on stages 0..s-1.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        extra = (first if s == 1 else 0.0) + (last if s == stages else 0.0)
        for u in range(s, n - (stages - s) + 1):
            for v in range(s - 1, u):
                value = max(best[s - 1][v], prefix[u] - prefix[v] + extra)
                if value < best[s][u]:
                    best[s][u], cut[s][u] = value, v
    counts, u = [], n
    for s in range(stages, 0, -1):
        v = cut[s][u]
        counts.append(u - v)
        u = v
    return counts[::-1]


EXHAUSTIVE_SPLITS = 32
"""Up to this many contiguous splits of mixed units, the estimator costs every one (the exact
objective); beyond it, the bottleneck-balanced split (:func:`balanced_split`) is costed."""


def _splits(num_units: int, stages: int) -> Iterator[list[int]]:
    for cuts in itertools.combinations(range(1, num_units), stages - 1):
        yield [b - a for a, b in zip((0, *cuts), (*cuts, num_units))]


def _refine_mixed(search: SearchView, cand: Candidate) -> Candidate | None:
    """Units of different types (a ResNet's stages, an MLP's unequal layers): the fastest
    contiguous split the estimator finds, among every split when there are few
    (:data:`EXHAUSTIVE_SPLITS`), else the split balancing the units' estimated times."""
    plan = cand.plan
    if plan.virtual_stages > 1:
        return None
    num_units = len(search.graph.block_order)
    even_counts = even_split(num_units, plan.pp)
    if math.comb(num_units - 1, plan.pp - 1) <= EXHAUSTIVE_SPLITS:
        options = [c for c in _splits(num_units, plan.pp) if c != even_counts]
    else:
        even = dataclasses.replace(plan, layer_stages=None, predicted=None, search=None)
        found = unit_times(search.graph, workload(search.graph, search.cluster, even), plan)
        if found is None:
            return None
        times, stem, head = found
        options = [c for c in [balanced_split(times, plan.pp, first=stem, last=head)] if c != even_counts]
    best: Candidate | None = None
    for counts in options:
        if search.out_of_time():
            break
        split = dataclasses.replace(plan, layer_stages=layer_stages(counts), predicted=None)
        try:
            cost = estimate(search.graph, search.cluster, split)
        except PlanError:
            continue
        search.stats.evaluated += 1
        if not cost.fits or (cand.cost.fits and cost.step_time_s >= cand.time_s):
            continue
        if best is None or cost.step_time_s < best.time_s:
            best = type(cand)(keys=dict(cand.keys), plan=split, cost=cost)
    return best


def _refine(search: SearchView, cand: Candidate) -> Candidate | None:
    problem = stage_problem(search.graph, search.cluster, cand.plan)
    if problem is None:
        return _refine_mixed(search, cand)
    bound = bound_stages(problem)
    if bound is None or bound.lower_s >= search.best_s * (1 - 1e-12):
        return None
    solution = solve_stages(problem, time_limit_s=max(1.0, min(10.0, search.time_left_s())), bound=bound)
    if solution is not None and solution.result.solver != NO_SOLVER:
        search.stats.ilp_solves += 1
    if solution is None or solution.blocks_per_stage == even_split(problem.num_blocks, problem.num_stages):
        return None
    split = layer_stages(solution.blocks_per_stage)
    plan = dataclasses.replace(cand.plan, layer_stages=split, predicted=None)
    cost = estimate(search.graph, search.cluster, plan)
    search.stats.evaluated += 1
    if abs(cost.step_time_s - latency_s(problem, solution.blocks_per_stage)) > 1e-6 * cost.step_time_s:
        log.warning(
            "inter-op ILP objective %.6g s differs from the estimator's %.6g s for %s split %s",
            solution.latency_s,
            cost.step_time_s,
            plan.summary(),
            solution.blocks_per_stage,
        )
    if not cost.fits or (cand.cost.fits and cost.step_time_s >= cand.time_s):
        return None
    return type(cand)(keys=dict(cand.keys), plan=plan, cost=cost)

r"""Inter-op ILP: how many repeated blocks each pipeline stage runs.

Identical blocks make this small: one integer per stage instead of one binary per (block, stage),
and contiguity is free (any composition of the blocks into ordered stages is contiguous).

Given ``S`` stages, ``L`` identical blocks, ``m`` micro-batches and for each stage ``s``:
``t_s`` (time of one block for one micro-batch on the stage's devices, forward + backward when
training), ``F_s`` (the stage's fixed time per micro-batch: the stem on stage 0, the head and loss
on stage S-1, the p2p sends), ``w_s`` / ``G_s`` (bytes one block adds to the stage: parameters,
gradients, optimizer state and the activations of the micro-batches the schedule keeps in flight
on that stage; and the fixed bytes), capacity ``C_s``, the exposed data-parallel gradient sync
``D_s(k)`` of the stage when it holds ``k`` blocks (a table or function: the overlap with the
backward makes it non-linear in ``k``) and the optimizer step ``O_s(k) = o_s k + O^0_s``::

    minimise    (m - 1) T_max + sum_s T_s + D + O                    the cost model's step time
    subject to  sum_s n_s = L                                         [blocks_all_placed]
                n_s >= 1                                              [stage_nonempty_s]
                w_s n_s + G_s <= C_s                                  [memory_s]
                lo_s <= n_s <= hi_s                                   [window_s]
                n_s = lo_s + sum_{lo_s < k <= hi_s} u_{s,k},  u binary   (block_count_s)
                u_{s,k} >= u_{s,k+1}                                  [count_order_s_k]
                T_s = t_s n_s + F_s                                   (stage_time_s)
                T_max >= T_s                                          [bottleneck_s]
                D >= D_s(lo_s) + sum_k (D_s(k) - D_s(k-1)) u_{s,k}    [sync_bound_s]
                O >= o_s n_s + O^0_s                                  [optimizer_bound_s]

``(m - 1) T_max + sum_s T_s`` is the synchronous-pipeline latency (GPipe and 1F1B: the slowest
stage once per micro-batch after the fill, every stage once while it fills and drains); the data-
parallel sync and the optimizer step run after the last backward and are paid once, for the
slowest stage. This is the estimator's step time exactly (``cost_models.step``), so the ILP's
optimum is the best split under the cost model, not a proxy for it.

``u_{s,k} = [n_s >= k]`` is the unary ("incremental") encoding of ``n_s``: the ordering rows make
it unique for every integer ``n_s``, so ``sync_bound_s`` is ``D >= D_s(n_s)`` exactly, whatever
the shape of ``D_s``, and its LP relaxation interpolates ``D_s`` between neighbouring counts.

``memory_s`` and ``stage_nonempty_s`` involve one variable each, so they are folded into ``n_s``'s
bounds (:func:`memory_caps` finds the largest ``n`` with ``w_s n + G_s <= C_s`` in the arithmetic
:func:`fits` uses): no solver tolerance can let a split overflow by a byte.

**Windows and bounds, before any solver runs** (:func:`bound_stages`). The split that minimises
``T_max`` comes from a greedy fill (each block to the stage it lengthens least; optimal for a
bottleneck objective), and its exact objective ``J0`` is an upper bound. Any split at least as
good has ``(m - 1) T_s <= (m - 1) T_max <= J0 - min sum T - D_min - O_min``, which bounds ``n_s``
from above (``hi_s``); ``sum_s n_s = L`` bounds it from below (``lo_s = L - sum_{r != s} hi_r``).
With many micro-batches the windows are a few blocks wide. The lower bound
``(m - 1) T_max^greedy + min sum T + max_s min_{lo_s <= k <= hi_s} D_s(k) + min O`` lets the
planner skip the ILP for a candidate that cannot beat its incumbent, and when it meets ``J0`` the
greedy split is optimal and no ILP is solved at all.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pulp

from autopar.solve.ilp import SolveResult, solve

NO_SOLVER = "none (bounds met)"
_TRIVIAL = SolveResult(status="optimal", objective=None, solve_time_s=0.0, solver=NO_SOLVER)


@dataclass(kw_only=True)
class StageProblem:
    num_blocks: int
    num_micro_batches: int
    block_time_s: list[float]
    """Per stage ``t_s``: one block, one micro-batch, on that stage's devices."""
    fixed_time_s: list[float]
    """Per stage ``F_s``: stem / head / p2p time per micro-batch."""
    block_bytes: list[float]
    """Per stage ``w_s``: device bytes one block adds (static state + in-flight activations)."""
    fixed_bytes: list[float]
    capacity_bytes: list[float]
    sync_time_s: list[list[float]] | Callable[[int, int], float] | None = None
    """``D_s(k)``: a table indexed ``[s][k - 1]`` for ``k = 1 .. L - S + 1``, or a function
    ``(s, k) -> seconds`` (evaluated only inside the windows); None = no data-parallel sync."""
    optimizer_block_s: list[float] = field(default_factory=list)
    """``o_s``; empty = no optimizer term."""
    optimizer_fixed_s: list[float] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.block_time_s)

    @property
    def max_blocks(self) -> int:
        """The most blocks one stage can hold (every other stage keeps one)."""
        return self.num_blocks - self.num_stages + 1


@dataclass(kw_only=True)
class StageSolution:
    blocks_per_stage: list[int]
    stage_time_s: list[float]
    stage_bytes: list[float]
    latency_s: float
    """The objective: (m - 1) max_s T_s + sum_s T_s + max_s D_s + max_s O_s."""
    result: SolveResult


@dataclass(kw_only=True)
class StageBound:
    """What :func:`bound_stages` knows before any solver runs."""

    lower_s: float
    """No split that fits is faster."""
    upper_s: float
    """The greedy split's objective."""
    greedy: list[int]
    lo: list[int]
    hi: list[int]
    """Windows holding every split at least as good as the greedy one."""


# ------------------------------------------------------------------------------ the objective
def stage_times(p: StageProblem, counts: list[int]) -> list[float]:
    return [n * t + f for n, t, f in zip(counts, p.block_time_s, p.fixed_time_s)]


def stage_bytes(p: StageProblem, counts: list[int]) -> list[float]:
    return [n * w + g for n, w, g in zip(counts, p.block_bytes, p.fixed_bytes)]


def sync_at(p: StageProblem, s: int, k: int) -> float:
    """``D_s(k)``."""
    if p.sync_time_s is None:
        return 0.0
    if callable(p.sync_time_s):
        return p.sync_time_s(s, k)
    return p.sync_time_s[s][k - 1]


def sync_s(p: StageProblem, counts: list[int]) -> float:
    return max(sync_at(p, s, n) for s, n in enumerate(counts))


def optimizer_s(p: StageProblem, counts: list[int]) -> float:
    if not p.optimizer_block_s:
        return 0.0
    return max(n * o + f for n, o, f in zip(counts, p.optimizer_block_s, p.optimizer_fixed_s))


def latency_s(p: StageProblem, counts: list[int]) -> float:
    """The objective of one split (what the ILP minimises)."""
    times = stage_times(p, counts)
    return (p.num_micro_batches - 1) * max(times) + sum(times) + sync_s(p, counts) + optimizer_s(p, counts)


def fits(p: StageProblem, counts: list[int]) -> bool:
    return all(b <= c for b, c in zip(stage_bytes(p, counts), p.capacity_bytes))


# ------------------------------------------------------------------------------ bounds
def memory_caps(p: StageProblem) -> list[int]:
    """Per stage, the most blocks its memory holds (``memory_s``), capped by ``max_blocks``;
    exact in the arithmetic :func:`fits` uses (``n * w + g <= c``)."""
    caps = []
    for w, g, c in zip(p.block_bytes, p.fixed_bytes, p.capacity_bytes):
        if w <= 0:
            caps.append(p.max_blocks if g <= c else 0)
            continue
        n = max(0, min(p.max_blocks, math.floor((c - g) / w)))
        while n < p.max_blocks and (n + 1) * w + g <= c:
            n += 1
        while n > 0 and n * w + g > c:
            n -= 1
        caps.append(n)
    return caps


def can_fit(p: StageProblem) -> bool:
    """Whether some split fits every stage's memory (no solver needed: memory is linear)."""
    caps = memory_caps(p)
    return p.num_blocks >= p.num_stages and min(caps) >= 1 and sum(caps) >= p.num_blocks


def greedy_split(p: StageProblem) -> list[int] | None:
    """The split with the least ``T_max`` that fits (each block goes to the stage it lengthens
    least; optimal for a bottleneck objective with per-stage costs that grow with the count)."""
    if not can_fit(p):
        return None
    caps = memory_caps(p)
    counts = [1] * p.num_stages
    heap = [(2 * t + f, s) for s, (t, f) in enumerate(zip(p.block_time_s, p.fixed_time_s)) if caps[s] > 1]
    heapq.heapify(heap)
    for _ in range(p.num_blocks - p.num_stages):
        _, s = heapq.heappop(heap)
        counts[s] += 1
        if counts[s] < caps[s]:
            heapq.heappush(heap, ((counts[s] + 1) * p.block_time_s[s] + p.fixed_time_s[s], s))
    return counts


def _sum_floor_s(p: StageProblem) -> float:
    """The least ``sum_s T_s`` of any split (every stage one block, the rest on the fastest)."""
    S, L = p.num_stages, p.num_blocks
    return sum(t + f for t, f in zip(p.block_time_s, p.fixed_time_s)) + (L - S) * min(p.block_time_s)


def windows(p: StageProblem, caps: list[int], upper_s: float) -> tuple[list[int], list[int]]:
    """``[lo_s, hi_s]`` holding every split whose objective is at most ``upper_s``."""
    S, L, m = p.num_stages, p.num_blocks, p.num_micro_batches
    hi = list(caps)
    if m > 1:
        t_max = (upper_s - _sum_floor_s(p) - optimizer_s(p, [1] * S)) / (m - 1)
        slack = 1e-9 * abs(upper_s)  # round-off: never cut the incumbent itself
        for s in range(S):
            if p.block_time_s[s] > 0:
                hi[s] = min(hi[s], math.floor((t_max + slack - p.fixed_time_s[s]) / p.block_time_s[s]))
    hi = [max(1, h) for h in hi]
    lo = [max(1, L - (sum(hi) - hi[s])) for s in range(S)]
    return lo, hi


def bound_stages(p: StageProblem) -> StageBound | None:
    """Bounds and windows without a solver (module docstring); None when no split fits."""
    greedy = greedy_split(p)
    if greedy is None:
        return None
    upper = latency_s(p, greedy)
    lo, hi = windows(p, memory_caps(p), upper)
    S = p.num_stages
    sync_floor = 0.0
    if p.sync_time_s is not None:
        sync_floor = max(min(sync_at(p, s, k) for k in range(lo[s], hi[s] + 1)) for s in range(S))
    lower = (p.num_micro_batches - 1) * max(stage_times(p, greedy)) + _sum_floor_s(p)
    lower += sync_floor + optimizer_s(p, [1] * S)
    return StageBound(lower_s=min(lower, upper), upper_s=upper, greedy=greedy, lo=lo, hi=hi)


# ------------------------------------------------------------------------------ the ILP
def solve_stages(
    p: StageProblem, time_limit_s: float | None = 10.0, *, bound: StageBound | None = None
) -> StageSolution | None:
    """The optimal blocks per stage, or None when no split fits every stage's memory."""
    S, L = p.num_stages, p.num_blocks
    if L < S:
        return None
    bound = bound or bound_stages(p)
    if bound is None:
        return None
    if S == 1 or bound.upper_s <= bound.lower_s * (1 + 1e-12):
        return _solution(p, bound.greedy, _TRIVIAL)
    counts, result = _solve(p, bound.lo, bound.hi, time_limit_s)
    if counts is None or not fits(p, counts) or latency_s(p, counts) > bound.upper_s:
        return _solution(p, bound.greedy, result)
    return _solution(p, counts, result)


def _solve(
    p: StageProblem, lo: list[int], hi: list[int], time_limit_s: float | None
) -> tuple[list[int] | None, SolveResult]:
    S, L = p.num_stages, p.num_blocks
    prob = pulp.LpProblem("inter_op_stages", pulp.LpMinimize)
    u = [
        {k: prob.add_variable(f"u_{s}_{k}", cat="Binary") for k in range(lo[s] + 1, hi[s] + 1)}
        for s in range(S)
    ]
    n = [lo[s] + pulp.lpSum(u[s].values()) for s in range(S)]
    t_max = prob.add_variable("T_max", lowBound=0)
    t = [n[s] * p.block_time_s[s] + p.fixed_time_s[s] for s in range(S)]
    objective = (p.num_micro_batches - 1) * t_max + pulp.lpSum(t)
    prob += pulp.lpSum(n) == L, "blocks_all_placed"
    for s in range(S):
        for k in range(lo[s] + 2, hi[s] + 1):
            prob += u[s][k] <= u[s][k - 1], f"count_order_{s}_{k}"
        prob += t_max >= t[s], f"bottleneck_{s}"
    if p.optimizer_block_s:
        o_max = prob.add_variable("O", lowBound=0)
        objective += o_max
        for s in range(S):
            prob += o_max >= n[s] * p.optimizer_block_s[s] + p.optimizer_fixed_s[s], f"optimizer_bound_{s}"
    if p.sync_time_s is not None:
        d_max = prob.add_variable("D", lowBound=0)
        objective += d_max
        for s in range(S):
            steps = [(sync_at(p, s, k) - sync_at(p, s, k - 1)) * u[s][k] for k in u[s]]
            prob += d_max >= sync_at(p, s, lo[s]) + pulp.lpSum(steps), f"sync_bound_{s}"
    prob += objective
    result = solve(prob, time_limit_s)
    if result.status not in ("optimal", "time_limit"):
        return None, result
    return [lo[s] + sum(round(v.value()) for v in u[s].values()) for s in range(S)], result


def _solution(p: StageProblem, counts: list[int], result: SolveResult) -> StageSolution | None:
    if not fits(p, counts):
        return None
    return StageSolution(
        blocks_per_stage=counts,
        stage_time_s=stage_times(p, counts),
        stage_bytes=stage_bytes(p, counts),
        latency_s=latency_s(p, counts),
        result=result,
    )


def even_split(num_blocks: int, num_stages: int) -> list[int]:
    base, extra = divmod(num_blocks, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]

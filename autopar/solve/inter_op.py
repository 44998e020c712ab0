r"""Inter-op ILP: how many repeated blocks each pipeline stage runs.

Identical blocks make this small: one integer per stage instead of one binary per (block, stage),
and contiguity is free (any composition of the blocks into ordered stages is contiguous).

Given ``S`` stages, ``L`` identical blocks, ``m`` micro-batches and for each stage ``s``:
``t_s`` (time of one block for one micro-batch on the stage's devices, forward + backward when
training), ``F_s`` (the stage's fixed time per micro-batch: the stem on stage 0, the head and loss
on stage S-1, the p2p sends), ``w_s`` / ``G_s`` (bytes one block adds to the stage: parameters,
gradients, optimizer state and the activations of the micro-batches the schedule keeps in flight
on that stage; and the fixed bytes), capacity ``C_s``, the exposed data-parallel gradient sync
``D_s(k)`` of the stage when it holds ``k`` blocks (a table: the overlap with the backward makes it
non-linear in ``k``) and the optimizer step ``O_s(k) = o_s k + O^0_s``::

    minimise    (m - 1) T_max + sum_s T_s + D + O                    the cost model's step time
    subject to  sum_s n_s = L                                         [blocks_all_placed]
                1 <= n_s, integer                                     [stage_nonempty_s]
                w_s n_s + G_s <= C_s                                  [memory_s]
                lo_s <= n_s <= hi_s                                   [window_s]
                T_s = t_s n_s + F_s                                   (stage_time_s)
                T_max >= T_s                                          [bottleneck_s]
                sum_k y_{s,k} = 1,  y binary, lo_s <= k <= hi_s       [sync_choice_s]
                sum_k k y_{s,k} = n_s                                 [sync_count_s]
                D >= sum_k D_s(k) y_{s,k}                             [sync_bound_s]
                O >= o_s n_s + O^0_s                                  [optimizer_bound_s]

``(m - 1) T_max + sum_s T_s`` is the synchronous-pipeline latency (GPipe and 1F1B: the slowest
stage once per micro-batch after the fill, every stage once while it fills and drains); the data-
parallel sync and the optimizer step run after the last backward and are paid once, for the
slowest stage. This is the estimator's step time exactly (``cost_models.step``), so the ILP's
optimum is the best split under the cost model, not a proxy for it.

**Windows.** The binaries ``y`` are what make ``D`` exact; they are only created inside a window
per stage. A first solve without ``D`` gives a split whose exact objective ``J0`` is an upper bound;
any split at least as good has ``(m - 1) T_s <= (m - 1) T_max <= J0 - min sum T - D_min - O_min``,
which bounds ``n_s`` from above (``hi_s``), and ``sum_s n_s = L`` bounds it from below
(``lo_s = L - sum_{r != s} hi_r``). With many micro-batches the windows are a few blocks wide.

``memory_s`` and ``stage_nonempty_s`` are one variable each, so they are the bounds of ``n_s``
(the largest ``n`` with ``w_s n + G_s <= C_s``, computed exactly, :func:`memory_caps`): no solver
tolerance can let a split overflow by a byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pulp

from autopar.solve.ilp import SolveResult, solve

_TRIVIAL = SolveResult(status="optimal", objective=None, solve_time_s=0.0, solver="trivial")


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
    sync_time_s: list[list[float]] | None = None
    """``D_s(k)`` for ``k = 1 .. L - S + 1`` (index ``k - 1``); None = no data-parallel sync."""
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


def stage_times(p: StageProblem, counts: list[int]) -> list[float]:
    return [n * t + f for n, t, f in zip(counts, p.block_time_s, p.fixed_time_s)]


def stage_bytes(p: StageProblem, counts: list[int]) -> list[float]:
    return [n * w + g for n, w, g in zip(counts, p.block_bytes, p.fixed_bytes)]


def sync_s(p: StageProblem, counts: list[int]) -> float:
    if p.sync_time_s is None:
        return 0.0
    return max(p.sync_time_s[s][n - 1] for s, n in enumerate(counts))


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


def memory_caps(p: StageProblem) -> list[int]:
    """Per stage, the most blocks its memory holds (``memory_s``), capped by ``max_blocks``;
    exact in the arithmetic :func:`fits` uses (``n * w + g <= c``), so no solver tolerance enters."""
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


def solve_stages(p: StageProblem, time_limit_s: float | None = 10.0) -> StageSolution | None:
    """The optimal blocks per stage, or None when no split fits every stage's memory."""
    S, L = p.num_stages, p.num_blocks
    if L < S or not can_fit(p):
        return None
    if S == 1:
        return _solution(p, [L], _TRIVIAL)
    caps = memory_caps(p)
    first, result = _solve(p, [1] * S, caps, with_sync=False, time_limit_s=time_limit_s)
    if first is None:
        return None
    if p.sync_time_s is None or result.status != "optimal":
        return _solution(p, first, result)
    lo, hi = windows(p, caps, latency_s(p, first))
    exact, result = _solve(p, lo, hi, with_sync=True, time_limit_s=time_limit_s)
    if exact is None or latency_s(p, exact) > latency_s(p, first):
        return _solution(p, first, result)
    return _solution(p, exact, result)


def windows(p: StageProblem, caps: list[int], upper_s: float) -> tuple[list[int], list[int]]:
    """``[lo_s, hi_s]`` holding every split whose objective is at most ``upper_s``."""
    S, L, m = p.num_stages, p.num_blocks, p.num_micro_batches
    hi = list(caps)
    if m > 1:
        sum_min = sum(t + f for t, f in zip(p.block_time_s, p.fixed_time_s)) + (L - S) * min(p.block_time_s)
        sync_min = max(min(row) for row in p.sync_time_s) if p.sync_time_s else 0.0
        opt_min = optimizer_s(p, [1] * S)
        t_max = (upper_s - sum_min - sync_min - opt_min) / (m - 1)
        slack = 1e-9 * abs(upper_s)  # round-off: never cut the incumbent itself
        for s in range(S):
            if p.block_time_s[s] > 0:
                hi[s] = min(hi[s], math.floor((t_max + slack - p.fixed_time_s[s]) / p.block_time_s[s]))
    hi = [max(1, h) for h in hi]
    lo = [max(1, L - (sum(hi) - hi[s])) for s in range(S)]
    return lo, hi


def _solve(
    p: StageProblem, lo: list[int], hi: list[int], *, with_sync: bool, time_limit_s: float | None
) -> tuple[list[int] | None, SolveResult]:
    S, L = p.num_stages, p.num_blocks
    prob = pulp.LpProblem("inter_op_stages", pulp.LpMinimize)
    n = [prob.add_variable(f"n_{s}", lowBound=lo[s], upBound=hi[s], cat="Integer") for s in range(S)]
    t_max = prob.add_variable("T_max", lowBound=0)
    t = [n[s] * p.block_time_s[s] + p.fixed_time_s[s] for s in range(S)]
    objective = (p.num_micro_batches - 1) * t_max + pulp.lpSum(t)
    prob += pulp.lpSum(n) == L, "blocks_all_placed"
    for s in range(S):  # memory_s is the upper bound of n_s (memory_caps): exact, no tolerance
        prob += t_max >= t[s], f"bottleneck_{s}"
    if p.optimizer_block_s:
        o_max = prob.add_variable("O", lowBound=0)
        objective += o_max
        for s in range(S):
            prob += o_max >= n[s] * p.optimizer_block_s[s] + p.optimizer_fixed_s[s], f"optimizer_bound_{s}"
    if with_sync and p.sync_time_s is not None:
        objective += _sync_rows(prob, p, n, lo, hi)
    prob += objective
    result = solve(prob, time_limit_s)
    if result.status not in ("optimal", "time_limit"):
        return None, result
    return [round(v.value()) for v in n], result


def _sync_rows(prob, p: StageProblem, n, lo: list[int], hi: list[int]):
    d_max = prob.add_variable("D", lowBound=0)
    for s in range(p.num_stages):
        ks = range(lo[s], hi[s] + 1)
        y = {k: prob.add_variable(f"y_{s}_{k}", cat="Binary") for k in ks}
        prob += pulp.lpSum(y.values()) == 1, f"sync_choice_{s}"
        prob += pulp.lpSum(k * y[k] for k in ks) == n[s], f"sync_count_{s}"
        prob += d_max >= pulp.lpSum(p.sync_time_s[s][k - 1] * y[k] for k in ks), f"sync_bound_{s}"
    return d_max


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

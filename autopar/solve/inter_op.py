r"""Inter-op ILP: how many repeated blocks each pipeline stage runs.

Identical blocks make this small: one integer per stage instead of one binary per (block, stage),
and contiguity is free (any composition of the blocks into ordered stages is contiguous).

Given ``S`` stages, ``L`` identical blocks, ``m`` micro-batches and for each stage ``s``:
``t_s`` (forward+backward time of one block for one micro-batch on the stage's devices),
``w_s`` (bytes one block adds to the stage: parameters, gradients, optimizer state and the
activations of its in-flight micro-batches under the schedule), ``F_s`` / ``G_s`` (fixed time and
bytes: the stem on stage 0, the head and loss on stage S-1, p2p buffers) and capacity ``C_s``::

    minimise    (m - 1) * T_max + sum_s T_s                          pipeline latency (GPipe/1F1B)
    subject to  sum_s n_s = L                                         [blocks_all_placed]
                n_s >= 1, integer                                     [stage_nonempty_s]
                T_s = n_s * t_s + F_s                                 [stage_time_s]
                T_max >= T_s                                          [bottleneck_s]
                n_s * w_s + G_s <= C_s                                [memory_s]

The objective is the classic synchronous-pipeline latency: the slowest stage is paid once per
micro-batch after the pipeline fills, every stage once while it fills and drains.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulp

from autopar.solve.ilp import SolveResult, solve


@dataclass(kw_only=True)
class StageProblem:
    num_blocks: int
    num_micro_batches: int
    block_time_s: list[float]
    """Per stage: forward+backward time of one block, one micro-batch, on that stage's devices."""
    block_bytes: list[float]
    """Per stage: device bytes one block adds (static state + in-flight activations)."""
    fixed_time_s: list[float]
    fixed_bytes: list[float]
    capacity_bytes: list[float]

    @property
    def num_stages(self) -> int:
        return len(self.block_time_s)


@dataclass(kw_only=True)
class StageSolution:
    blocks_per_stage: list[int]
    stage_time_s: list[float]
    stage_bytes: list[float]
    latency_s: float
    """(m - 1) * max_s T_s + sum_s T_s."""
    result: SolveResult


def stage_times(p: StageProblem, counts: list[int]) -> list[float]:
    return [n * t + f for n, t, f in zip(counts, p.block_time_s, p.fixed_time_s)]


def stage_bytes(p: StageProblem, counts: list[int]) -> list[float]:
    return [n * w + g for n, w, g in zip(counts, p.block_bytes, p.fixed_bytes)]


def latency_s(p: StageProblem, counts: list[int]) -> float:
    times = stage_times(p, counts)
    return (p.num_micro_batches - 1) * max(times) + sum(times)


def solve_stages(p: StageProblem, time_limit_s: float | None = 10.0) -> StageSolution | None:
    """Optimal blocks per stage, or None when no split fits every stage's memory."""
    S, L = p.num_stages, p.num_blocks
    if L < S:
        return None
    if S == 1:
        return _solution(p, [L], None)
    prob = pulp.LpProblem("inter_op_stages", pulp.LpMinimize)
    n = [prob.add_variable(f"n_{s}", lowBound=1, upBound=L - S + 1, cat="Integer") for s in range(S)]
    t_max = prob.add_variable("T_max", lowBound=0)
    t = [n[s] * p.block_time_s[s] + p.fixed_time_s[s] for s in range(S)]
    prob += (p.num_micro_batches - 1) * t_max + pulp.lpSum(t)
    prob += pulp.lpSum(n) == L, "blocks_all_placed"
    for s in range(S):
        prob += t_max >= t[s], f"bottleneck_{s}"
        prob += n[s] * p.block_bytes[s] + p.fixed_bytes[s] <= p.capacity_bytes[s], f"memory_{s}"
    result = solve(prob, time_limit_s)
    if result.status not in ("optimal", "time_limit"):
        return None
    return _solution(p, [round(v.value()) for v in n], result)


def _solution(p: StageProblem, counts: list[int], result: SolveResult | None) -> StageSolution | None:
    mem = stage_bytes(p, counts)
    if any(b > c for b, c in zip(mem, p.capacity_bytes)):
        return None
    return StageSolution(
        blocks_per_stage=counts,
        stage_time_s=stage_times(p, counts),
        stage_bytes=mem,
        latency_s=latency_s(p, counts),
        result=result or SolveResult(status="optimal", objective=None, solve_time_s=0.0, solver="trivial"),
    )


def even_split(num_blocks: int, num_stages: int) -> list[int]:
    base, extra = divmod(num_blocks, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]

"""The inter-op stage ILP against brute force: on many random small instances (seeded), the ILP's
split has the objective of the best of all compositions of the blocks into stages that fit memory,
and it returns None exactly when no composition fits."""

from __future__ import annotations

import itertools
import random

import pytest

from autopar.solve.inter_op import (
    StageProblem,
    can_fit,
    even_split,
    fits,
    latency_s,
    memory_caps,
    solve_stages,
    stage_bytes,
    windows,
)


def compositions(total: int, parts: int):
    """Every way to put ``total`` blocks into ``parts`` ordered stages, each non-empty."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(p: StageProblem) -> tuple[float, list[int]] | None:
    best = None
    for counts in compositions(p.num_blocks, p.num_stages):
        if fits(p, counts):
            value = latency_s(p, counts)
            if best is None or value < best[0]:
                best = (value, counts)
    return best


def random_problem(rng: random.Random, *, sync: bool, memory: str) -> StageProblem:
    """Stem-heavy first stage, head-heavy last stage, in-flight memory falling along the stages,
    an exposed-sync table with a kink (overlap floor) and a capacity chosen so memory binds."""
    S = rng.randint(2, 5)
    L = rng.randint(S, 11)
    m = rng.choice([1, 2, 3, S, 2 * S, 8 * S])
    t = rng.uniform(0.5, 2.0)
    block_time = [t] * S if rng.random() < 0.7 else [t * rng.uniform(0.6, 1.6) for _ in range(S)]
    fixed_time = [rng.uniform(0.0, 0.3) * t for _ in range(S)]
    fixed_time[0] += rng.uniform(0.0, 2.0) * t  # the stem
    fixed_time[-1] += rng.uniform(0.0, 3.0) * t  # the head and the loss
    block_bytes = [rng.uniform(1.0, 2.0) * (1 + (S - s) * rng.uniform(0.0, 1.0)) for s in range(S)]
    fixed_bytes = [rng.uniform(0.0, 3.0) for _ in range(S)]
    p = StageProblem(
        num_blocks=L,
        num_micro_batches=m,
        block_time_s=block_time,
        fixed_time_s=fixed_time,
        block_bytes=block_bytes,
        fixed_bytes=fixed_bytes,
        capacity_bytes=[1e30] * S,
    )
    if sync:
        floor = rng.uniform(0.0, 0.5) * t
        p.sync_time_s = [
            [
                max(floor, rng.uniform(0.0, 0.4) * t * (k**0.5) - 0.1 * k * t) + (0.2 * t if s == 0 else 0.0)
                for k in range(1, p.max_blocks + 1)
            ]
            for s in range(S)
        ]
        p.optimizer_block_s = [rng.uniform(0.0, 0.05) * t for _ in range(S)]
        p.optimizer_fixed_s = [rng.uniform(0.0, 0.2) * t for _ in range(S)]
    need = sorted(max(stage_bytes(p, c)) for c in compositions(L, S))
    if memory == "binding":
        capacity = need[rng.randrange(len(need))]
    elif memory == "infeasible":
        capacity = need[0] * rng.uniform(0.5, 0.999)
    else:
        capacity = need[-1] * 2
    p.capacity_bytes = [capacity] * S
    return p


@pytest.mark.parametrize("seed", range(40))
def test_ilp_equals_brute_force(seed):
    """The ILP's objective equals the best composition that fits; None iff none fits."""
    rng = random.Random(seed)
    for memory in ("loose", "binding", "binding", "infeasible"):
        p = random_problem(rng, sync=seed % 4 != 0, memory=memory)
        expected = brute_force(p)
        got = solve_stages(p, time_limit_s=30)
        if expected is None:
            assert got is None, (memory, got)
            assert not can_fit(p)
            continue
        assert got is not None, (memory, expected)
        assert fits(p, got.blocks_per_stage)
        assert sum(got.blocks_per_stage) == p.num_blocks and min(got.blocks_per_stage) >= 1
        assert got.latency_s == pytest.approx(expected[0], rel=1e-9), (memory, got.blocks_per_stage, expected)
        assert got.result.status == "optimal"


def test_windows_keep_every_split_at_least_as_good_as_the_bound():
    """[lo_s, hi_s] derived from an upper bound U contains every composition whose objective is
    at most U (the windows cut nothing the ILP needs)."""
    rng = random.Random(7)
    for _ in range(30):
        p = random_problem(rng, sync=True, memory="loose")
        values = sorted((latency_s(p, c), c) for c in compositions(p.num_blocks, p.num_stages))
        upper = values[len(values) // 3][0]
        lo, hi = windows(p, memory_caps(p), upper)
        for value, counts in values:
            if value <= upper:
                assert all(a <= n <= b for a, n, b in zip(lo, counts, hi)), (counts, lo, hi)


def test_stem_and_head_get_fewer_blocks():
    """With many micro-batches the bottleneck stage dominates: a heavy stem and head push blocks
    to the middle stages (the classic reason to split unevenly)."""
    p = StageProblem(
        num_blocks=12,
        num_micro_batches=64,
        block_time_s=[1.0] * 4,
        fixed_time_s=[2.0, 0.0, 0.0, 3.0],
        block_bytes=[1.0] * 4,
        fixed_bytes=[0.0] * 4,
        capacity_bytes=[100.0] * 4,
    )
    got = solve_stages(p)
    assert max(got.stage_time_s) == 5.0  # e.g. 3+2, 5, 2, 2+3; 4 is impossible (at most 11 blocks)
    assert got.latency_s == pytest.approx(brute_force(p)[0])
    assert got.blocks_per_stage != even_split(12, 4)


def test_memory_moves_blocks_off_the_first_stage():
    """1F1B keeps p - s micro-batches in flight on stage s: with tight memory the first stage holds
    fewer blocks even though time alone would split evenly."""
    S = 4
    p = StageProblem(
        num_blocks=8,
        num_micro_batches=8,
        block_time_s=[1.0] * S,
        fixed_time_s=[0.0] * S,
        block_bytes=[float(S - s) for s in range(S)],
        fixed_bytes=[0.0] * S,
        capacity_bytes=[6.0] * S,
    )
    got = solve_stages(p)
    assert got.blocks_per_stage[0] == 1
    assert all(b <= 6.0 for b in got.stage_bytes)
    assert got.latency_s == pytest.approx(brute_force(p)[0])
    p.capacity_bytes = [3.0] * S  # stage 0 cannot hold even one block
    assert solve_stages(p) is None and not can_fit(p)


def test_single_stage_and_too_few_blocks():
    p = StageProblem(
        num_blocks=3,
        num_micro_batches=4,
        block_time_s=[1.0],
        fixed_time_s=[0.5],
        block_bytes=[1.0],
        fixed_bytes=[0.0],
        capacity_bytes=[10.0],
    )
    got = solve_stages(p)
    assert got.blocks_per_stage == [3] and got.latency_s == pytest.approx(4 * 3.5)
    p.block_time_s, p.fixed_time_s, p.block_bytes, p.fixed_bytes = [1.0] * 4, [0.0] * 4, [1.0] * 4, [0.0] * 4
    p.capacity_bytes = [10.0] * 4
    assert solve_stages(p) is None  # 3 blocks cannot fill 4 stages

"""Pipeline schedules as plain data (no processes): orders, dependencies, grids, bubbles, JSON."""

from __future__ import annotations

import pytest

from autopar.core.errors import PlanError
from autopar.runtime.schedule import Action, Schedule, for_plan, gpipe, interleaved, one_f_one_b


@pytest.mark.parametrize("make", [gpipe, one_f_one_b])
@pytest.mark.parametrize("pp,m", [(2, 2), (2, 5), (4, 4), (4, 8)])
def test_every_stage_runs_each_forward_and_backward_once_in_dependency_order(make, pp, m):
    sched = make(pp, m)
    for s, order in enumerate(sched.orders):
        assert sorted(order) == sorted([Action(s, k, i) for k in "FB" for i in range(m)])
        for i in range(m):
            assert order.index(Action(s, "F", i)) < order.index(Action(s, "B", i))
    # The grid respects cross-stage dependencies: F(s,i) after F(s-1,i); B(s,i) after B(s+1,i).
    when = {a: t for t, row in enumerate(sched.steps()) for a in row if a is not None}
    for s in range(pp):
        for i in range(m):
            if s > 0:
                assert when[Action(s, "F", i)] > when[Action(s - 1, "F", i)]
            if s < pp - 1:
                assert when[Action(s, "B", i)] > when[Action(s + 1, "B", i)]


def test_gpipe_bubble_is_the_textbook_fraction():
    # Unit-time F and B: 2(m + pp - 1) steps of which 2m busy per stage.
    for pp, m in [(2, 4), (4, 8), (8, 8)]:
        assert gpipe(pp, m).bubble_fraction() == pytest.approx((pp - 1) / (m + pp - 1))


def test_one_f_one_b_limits_micro_batches_in_flight():
    pp, m = 4, 8
    sched = one_f_one_b(pp, m)
    for s, order in enumerate(sched.orders):
        in_flight = peak = 0
        for a in order:
            in_flight += 1 if a.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == pp - s  # torch's 1F1B: one more than Megatron's pp - s - 1
    assert max(sum(a.kind == "F" for a in gpipe(pp, m).orders[0]), 0) == m  # GPipe holds all m


def test_grid_prints_actions_per_step_and_rank():
    grid = one_f_one_b(2, 3).grid().splitlines()
    assert grid[0].split() == ["step", "rank0", "rank1"]
    assert grid[1].split() == ["0", "0F0", "."]
    assert grid[2].split() == ["1", "0F1", "1F0"]
    assert grid[3].split() == ["2", ".", "1B0"]


def test_json_round_trip_and_action_parse():
    sched = gpipe(3, 2)
    back = Schedule.from_json(sched.to_json())
    assert back.orders == sched.orders and back.name == "gpipe"
    assert str(Action.parse("12B3")) == "12B3"
    with pytest.raises(ValueError):
        Action.parse("1X0")


def test_unsupported_and_infeasible_schedules_raise_plan_errors():
    with pytest.raises(PlanError, match="at least as many micro-batches as stages"):
        one_f_one_b(4, 2)
    with pytest.raises(PlanError, match="not supported by the runtime"):
        for_plan("zero-bubble", 2, 4)


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 4), (4, 2, 8), (2, 3, 2)])
def test_interleaved_runs_each_virtual_stage_on_its_rank_in_dependency_order(pp, vpp, m):
    sched = interleaved(pp, vpp, m)
    assert sched.num_ranks == pp and sched.num_stages == pp * vpp
    for r, order in enumerate(sched.orders):
        mine = [v for v in range(pp * vpp) if v % pp == r]  # Megatron's layout, as torch's
        assert sorted(order) == sorted(Action(v, k, i) for v in mine for k in "FB" for i in range(m))
    when = {a: t for t, row in enumerate(sched.steps()) for a in row if a is not None}
    for v in range(1, pp * vpp):
        for i in range(m):
            assert when[Action(v, "F", i)] > when[Action(v - 1, "F", i)]
            assert when[Action(v - 1, "B", i)] > when[Action(v, "B", i)]
    # Interleaving shrinks the bubble against plain 1F1B on the same pipeline.
    if m >= pp:
        assert sched.bubble_fraction() < one_f_one_b(pp, m).bubble_fraction()

"""Live re-planning: a training run moves to another plan in memory and goes on exactly.

Oracle: 6 uninterrupted AdamW steps of the same tiny GPT (hidden 32, 2 layers, dropout 0.1) on one
device (:func:`autopar.testing.equivalence.reference`). A run that moves to another plan after some
steps must report every loss, every full gradient and every full state dict of that run within
rtol 1e-6 / atol 1e-6 (the plans reduce in other orders than one device: not bit-identical).

* ``replan_to``: dp2 with ZeRO-3 for 3 steps, then tp2 (another sharding of parameters *and*
  optimizer state) for 3 more: the move itself, independent of the planner.
* ``compile(replan_after=2, replan_threshold=0)``: a pipeline of 8 one-sample micro-batches on 2
  ranks (pp2, m=8: every micro-batch pays the fixed per-op and p2p costs), which the planner would
  not choose. Threshold 0 forces the re-plan; the ranks measure this machine, rank 0 re-plans with
  the measured numbers, and the run moves to the plan predicted fastest, recorded on
  ``compiled.replans`` and in the report.

One 2-rank launch runs both; the decision rule and the bad-input errors are checked in-process.
"""

from __future__ import annotations

import logging
import os

import pytest

import autopar
from autopar import Plan
from autopar.core.errors import InputError, PlanError, RuntimeFailure
from autopar.estimator import local
from autopar.report import write_report
from autopar.runtime import replan
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import Trajectory, clone_case, compare, gpt_case, reference

CASE = clone_case(gpt_case(hidden=32, layers=2, heads=4, dropout=0.1), steps=6)
B = CASE.global_batch
RTOL, ATOL = 1e-6, 1e-6
SLOW_PLAN = dict(pp=2, micro_batch_size=1, global_batch=B)


def _compile(plan: Plan, **kw) -> autopar.ParallelModule:
    batches = CASE.make_batches(CASE.steps)
    return autopar.compile(
        CASE.build(),
        autopar.Cluster.local(plan.world_size),
        example_inputs=batches[0],
        loss_fn=CASE.loss_fn,
        optimizer=CASE.optimizer,
        plan=plan,
        global_batch=B,
        **kw,
    )


def _train(compiled: autopar.ParallelModule, steps: range, out: Trajectory) -> None:
    batches = CASE.make_batches(CASE.steps)
    for step in steps:
        out.losses.append(compiled.step(batches[step]))
        out.grads.append(compiled.full_grads())
        out.params.append(compiled.state_dict())


def _no_spawn(*args, **kwargs):
    raise AssertionError("calibrate_layout spawned processes from inside a job")


def _rank(cache: str) -> dict:
    os.environ["AUTOPAR_CACHE"] = cache  # the layout and op measurements of this test only
    local.calibrate_layout = _no_spawn  # this forked worker only: inside a job nothing is spawned
    other_size = replan.layout_for(autopar.Cluster.local(4), True)
    moved = Trajectory()
    compiled = _compile(Plan.manual(dp=2, zero_stage=3, micro_batch_size=2, global_batch=B))
    _train(compiled, range(3), moved)
    compiled.replan_to(Plan.manual(tp=2, micro_batch_size=2, global_batch=B))
    plan_after_move = compiled.plan.summary()
    _train(compiled, range(3, 6), moved)

    live = Trajectory()
    compiled = _compile(Plan.manual(**SLOW_PLAN), replan_after=2, replan_threshold=0.0)
    _train(compiled, range(6), live)
    return {
        "other_size": other_size,
        "moved": moved,
        "plan_after_move": plan_after_move,
        "live": live,
        "replans": compiled.replans,
        "plan": compiled.plan.to_json(),
        "measured": compiled.measured(),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    cache = tmp_path_factory.mktemp("autopar_cache")
    return run_ranks(_rank, 2, args=(str(cache),), timeout_s=120, deadline_s=400)


@pytest.mark.multiproc
@pytest.mark.slow
def test_replan_to_moves_the_state_and_continues_exactly(runs):
    ref = reference(CASE)
    for rank, r in enumerate(runs):
        assert r["plan_after_move"].startswith("dp=1 pp=1 tp=2 mbs=2 m=4"), r["plan_after_move"]
        problems = compare(ref, r["moved"], RTOL, ATOL)
        assert not problems, f"rank {rank}: " + "\n".join(problems[:10])


@pytest.mark.multiproc
@pytest.mark.slow
def test_live_replan_moves_off_a_slow_plan_and_continues_exactly(runs, tmp_path):
    ref = reference(CASE)
    for rank, r in enumerate(runs):
        assert len(r["replans"]) == 1, r["replans"]  # replan_after checks once
        rec = r["replans"][0]
        assert rec["step"] == 2 and rec["threshold"] == 0.0
        assert rec["decision"] == "moved", rec
        assert rec["from_plan"].startswith("dp=1 pp=2 tp=1 mbs=1 m=8"), rec
        assert rec["to_plan"] == Plan.from_json(r["plan"]).summary() != rec["from_plan"]
        # the choice was made with measured numbers, against the current plan under the same numbers
        assert rec["profiled"]["ranks"] == 2 and rec["profiled"]["profiled_ops"] > 0
        assert rec["candidate_predicted_s"] < rec["current_measured_model_s"] * (1 - replan.MIN_GAIN)
        assert rec["measured_step_time_s"] > 0 and rec["move_s"] > 0
        problems = compare(ref, r["live"], RTOL, ATOL)
        assert not problems, f"rank {rank}: " + "\n".join(problems[:10])
    # every rank took the same decision on the same numbers (only its own timings differ)
    same = [
        [{k: v for k, v in x.items() if k not in ("replan_s", "move_s")} for x in r["replans"]] for r in runs
    ]
    assert same[0] == same[1]
    # the report shows the re-plan
    plan = Plan.from_json(runs[0]["plan"])
    page = write_report(plan, tmp_path / "report.html", cluster="local:2", measured=runs[0]["measured"])
    text = page.read_text()
    assert "Live re-planning" in text and runs[0]["replans"][0]["from_plan"] in text


# ------------------------------------------------------------------------------ in-process
def _candidate(plan: Plan, current_s: float, candidate_s: float) -> replan.Candidate:
    return replan.Candidate(
        plan_json=plan.to_json(), current_s=current_s, candidate_s=candidate_s, profiled={}
    )


def test_decide_keeps_within_threshold_same_plan_or_small_gain_and_moves_otherwise():
    current, other = Plan.manual(pp=2, global_batch=B), Plan.manual(dp=2, global_batch=B)
    kw = dict(step=3, threshold=0.25, current=current)
    within = replan.decide(measured_s=1.2, predicted_s=1.0, candidate=None, **kw)
    assert within.decision == "kept" and "within 25%" in within.reason
    same = replan.decide(measured_s=2.0, predicted_s=1.0, candidate=_candidate(current, 1.0, 1.0), **kw)
    assert same.decision == "kept" and "chose the current plan" in same.reason
    small = replan.decide(measured_s=2.0, predicted_s=1.0, candidate=_candidate(other, 1.0, 0.97), **kw)
    assert small.decision == "kept" and "less than 5% faster" in small.reason
    move = replan.decide(measured_s=2.0, predicted_s=1.0, candidate=_candidate(other, 1.0, 0.5), **kw)
    assert move.decision == "moved" and move.to_plan == other.summary() and move.off == pytest.approx(1.0)


def test_bad_replan_arguments_are_typed_errors():
    batches = CASE.make_batches(1)
    args = dict(
        example_inputs=batches[0], loss_fn=CASE.loss_fn, global_batch=B, plan=Plan.manual(global_batch=B)
    )
    with pytest.raises(InputError, match="replan_after=0"):
        autopar.compile(CASE.build(), autopar.Cluster.local(1), replan_after=0, **args)
    with pytest.raises(InputError, match="replan_threshold=-1"):
        autopar.compile(CASE.build(), autopar.Cluster.local(1), replan_after=2, replan_threshold=-1, **args)
    with pytest.raises(InputError, match="needs mode='train' and an autopar.Cluster"):
        autopar.compile(CASE.build(), 1, replan_after=2, **args)
    compiled = autopar.compile(CASE.build(), autopar.Cluster.local(1), **args)
    with pytest.raises(PlanError, match="the running job has 1 ranks"):
        compiled.replan_to(Plan.manual(dp=2, global_batch=B))


@pytest.mark.multiproc
@pytest.mark.slow
def test_planning_inside_a_job_for_another_size_uses_the_nominal_model_without_spawning(runs):
    assert [r["other_size"] for r in runs] == [False, False]


def test_planning_falls_back_to_the_nominal_model_when_spawning_fails(monkeypatch, caplog):
    """No process group: the layout would be measured by spawned processes; when that fails the
    planner still plans, with the nominal model, and says so."""

    def fail(ranks, **kw):
        raise RuntimeFailure(f"calibrate_layout: no result from {ranks} local gloo ranks (timed out)")

    monkeypatch.setattr(local, "calibrate_layout", fail)
    batches = CASE.make_batches(1)
    with caplog.at_level(logging.WARNING, logger="autopar.runtime.replan"):
        compiled = autopar.compile(
            CASE.build(),
            autopar.Cluster.local(2),
            example_inputs=batches[0],
            loss_fn=CASE.loss_fn,
            global_batch=B,
        )
    assert "could not measure 2 local processes" in caplog.text and "nominal cost model" in caplog.text
    assert compiled.plan.world_size == 2 and "profiled" not in (compiled.plan.search or {})

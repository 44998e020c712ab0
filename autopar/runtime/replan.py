"""Planning inside a running job, and live re-planning.

**Inside a job** (:func:`plan_in_job`, used by ``autopar.compile(plan=None)``): every rank calls
it, rank 0 plans and broadcasts the plan (a time-limited search may differ by rank). With an
initialised default group nothing is spawned: torchrun's workers (and ``run_local``'s) cannot start
N more gloo processes of their own without contending with themselves, and under torchrun's agent
they time out. So the layout of a profiled plan is measured by the running ranks
(:func:`autopar.estimator.local.calibrate_in_group`) when the cluster is their world; for a cluster
of another size the plan uses the nominal model (logged). Without a group the layout is measured by
spawned processes (:func:`~autopar.estimator.local.calibrate_layout`), and if that fails the plan
falls back to the nominal model with a warning. The broadcast runs on a group of its own whose
timeout covers the planner's time limit, so the ranks waiting for rank 0 do not time out first,
and an error of rank 0's planner is raised on every rank.

**Live re-planning** (:func:`measure_and_replan`, used by ``ParallelModule.maybe_replan``): after
some measured steps, the slowest rank's median step time is compared with the plan's prediction.
Within ``threshold`` (relative) the plan is kept. Otherwise the ranks measure this machine (the
layout in the group, the model's ops on rank 0) and rank 0 plans again with those numbers; the new
plan is adopted when the same measured model predicts it at least :data:`MIN_GAIN` faster than
the current plan. Every check is returned as a :class:`Replan` record (what was measured, what was
predicted, what was decided and why), logged, and kept on ``compiled.replans``.
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopar.cluster import Cluster
from autopar.core.errors import AutoparError, PlanError, RuntimeFailure
from autopar.core.plan import Plan
from autopar.estimator import estimate, local
from autopar.tracing import trace
from autopar.tracing.wrap import split_inputs

log = logging.getLogger(__name__)

PLANNER_TIME_LIMIT_S = 60.0
"""The planner's search time limit inside a job (its default)."""
PLAN_WAIT_S = 600.0
"""How long the other ranks wait for rank 0's plan: the search limit plus tracing and profiling."""
MIN_GAIN = 0.05
"""A live re-plan moves only to a plan predicted at least this much (relative) faster."""


# ------------------------------------------------------------------------------ planning in a job
def layout_for(cluster: Cluster, profile: bool) -> bool | local.LayoutCalibration:
    """The measured layout to plan with: ``False`` (nominal model) or a
    :class:`~autopar.estimator.local.LayoutCalibration` (collective when a group is initialised)."""
    if not profile:
        return False
    if dist.is_initialized():
        world = dist.get_world_size()
        if world == cluster.num_devices:
            return local.calibrate_in_group()
        log.info(
            "planning for %d devices from inside a job of %d ranks: the layout cannot be measured "
            "without spawning processes, so this plan uses the nominal cost model",
            cluster.num_devices,
            world,
        )
        return False
    try:
        return local.calibrate_layout(cluster.num_devices, progress=False)
    except (RuntimeFailure, OSError) as e:
        log.warning(
            "could not measure %d local processes (%s); planning with the nominal cost model instead",
            cluster.num_devices,
            e,
        )
        return False


def plan_in_job(
    model: nn.Module,
    cluster: Cluster,
    *,
    example_inputs: Sequence[Any],
    loss_fn: Callable | None,
    num_targets: int | None,
    global_batch: int,
    mode: str,
    profile: bool,
) -> Plan:
    """The planner's plan, the same on every rank (see the module docstring)."""
    layout = layout_for(cluster, profile)

    def run() -> Plan:
        from autopar.solve import plan as planner  # lazy: the solver loads pulp

        inputs, targets = split_inputs(example_inputs, loss_fn, num_targets)
        args = (*inputs, *targets) if mode == "train" else inputs
        return planner(
            model,
            cluster,
            global_batch=global_batch,
            mode=mode,
            example_inputs=args,
            loss_fn=loss_fn if mode == "train" else None,
            num_targets=len(targets) if mode == "train" else None,
            progress=False,
            profile=layout,
            time_limit_s=PLANNER_TIME_LIMIT_S,
        )

    chosen = on_rank_zero(run)
    log.info("planner chose %s", chosen.summary())
    return chosen


def on_rank_zero(fn: Callable[[], Plan]) -> Plan:
    """``fn()`` on rank 0 (or here without a group), its plan on every rank; rank 0's error is
    raised on every rank. Collective."""
    if not dist.is_initialized():
        return fn()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PLAN_WAIT_S))
    box: list = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn().to_json())
        except Exception as e:  # noqa: BLE001 - every rank raises it, rank 0 the original
            failure = e
            shared = e if isinstance(e, AutoparError) else RuntimeFailure(f"rank 0's planner failed: {e!r}")
            box[0] = ("error", shared)
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    status, payload = box[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise payload
    return Plan.from_json(payload)


# ------------------------------------------------------------------------------ live re-planning
@dataclass(kw_only=True)
class Replan:
    """One live re-planning check (``compiled.replans``)."""

    step: int
    """The global step after which the check ran."""
    measured_step_time_s: float
    """The slowest rank's median step time of the current plan (its first step excluded)."""
    predicted_step_time_s: float
    """The current plan's prediction (its own, or the measured model's when it had none)."""
    threshold: float
    off: float
    """``|measured - predicted| / predicted``."""
    decision: str
    """``kept`` or ``moved``."""
    reason: str
    from_plan: str
    to_plan: str | None = None
    current_measured_model_s: float | None = None
    """The current plan under the re-measured model (the yardstick of the candidate)."""
    candidate_predicted_s: float | None = None
    """The re-planned plan's prediction under the re-measured model."""
    replan_s: float = 0.0
    """Seconds spent measuring and planning."""
    move_s: float = 0.0
    """Seconds spent moving the state to the new plan (gather, rebuild, scatter)."""
    profiled: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measured_step_time_s(step_times_s: list[float]) -> float:
    """The slowest rank's median step time, first step excluded (collective; the same number on
    every rank, so every rank takes the same decision)."""
    times = step_times_s[1:] or step_times_s
    mine = statistics.median(times) if times else 0.0
    if not dist.is_initialized():
        return mine
    value = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def plan_key(plan: Plan) -> str:
    """What makes two plans run differently (not their predictions or search notes)."""
    d = plan.to_dict()
    d.pop("predicted", None)
    d.pop("search", None)
    return json.dumps(d, sort_keys=True)


@dataclass(kw_only=True)
class Candidate:
    """Rank 0's re-planning result (broadcast to every rank)."""

    plan_json: str
    current_s: float
    candidate_s: float
    profiled: dict


def replan_measured(
    model: nn.Module,
    cluster: Cluster,
    current: Plan,
    *,
    example_inputs: Sequence[Any],
    loss_fn: Callable | None,
    num_targets: int | None,
    mode: str,
) -> Candidate:
    """Measure this machine (collective: the layout in the group), then on rank 0 plan with the
    measured numbers and cost the current plan with the same numbers; the result on every rank."""
    if not local.is_local(cluster):
        raise PlanError(
            f"live re-planning measures this machine, but cluster {cluster.name!r} is not a local CPU "
            "cluster (Cluster.local(N))"
        )
    layout = layout_for(cluster, True)
    if not isinstance(layout, local.LayoutCalibration):
        raise PlanError("live re-planning needs the running group's world to be the cluster's devices")
    box: dict = {}

    def run() -> Plan:
        from autopar.solve import plan as planner  # lazy: the solver loads pulp

        inputs, targets = split_inputs(example_inputs, loss_fn, num_targets)
        train = mode == "train"
        args = (*inputs, *targets) if train else tuple(inputs)
        n = len(targets) if train else None
        fn = loss_fn if train else None
        graph = trace(model, args, loss_fn=fn, num_targets=n)

        def retrace(batch: tuple) -> Any:
            return trace(model, batch, loss_fn=fn, num_targets=n)

        prof = local.profile_model(graph, args, retrace, layout, progress=False)
        measured = local.apply(cluster, graph, prof)
        chosen = planner(
            graph,
            measured,
            global_batch=current.global_batch,
            mode=mode,
            progress=False,
            time_limit_s=PLANNER_TIME_LIMIT_S,
        )
        chosen.search = {**(chosen.search or {}), "profiled": prof.summary()}
        box["current_s"] = estimate(graph, measured, current).step_time_s
        box["profiled"] = prof.summary()
        return chosen

    # The plan travels through on_rank_zero; the numbers beside it through a second broadcast.
    chosen = on_rank_zero(run)
    extra = [box if box else None]
    if dist.is_initialized():
        dist.broadcast_object_list(extra, src=0)
    numbers = extra[0]
    return Candidate(
        plan_json=chosen.to_json(),
        current_s=numbers["current_s"],
        candidate_s=chosen.predicted.step_time_s if chosen.predicted else float("inf"),
        profiled=numbers["profiled"],
    )


def decide(
    *,
    step: int,
    measured_s: float,
    predicted_s: float,
    threshold: float,
    current: Plan,
    candidate: Candidate | None,
) -> Replan:
    """The record of one check: keep or move, and why (pure)."""
    off = abs(measured_s - predicted_s) / predicted_s if predicted_s > 0 else float("inf")
    rec = Replan(
        step=step,
        measured_step_time_s=measured_s,
        predicted_step_time_s=predicted_s,
        threshold=threshold,
        off=off,
        decision="kept",
        reason="",
        from_plan=current.summary(),
    )
    if candidate is not None:
        rec.current_measured_model_s = candidate.current_s
        rec.candidate_predicted_s = candidate.candidate_s
        rec.profiled = candidate.profiled
    if off <= threshold:
        rec.reason = f"measured within {100 * threshold:.0f}% of the prediction ({100 * off:.1f}% off)"
        return rec
    if candidate is None:
        rec.reason = f"{100 * off:.1f}% off the prediction, but no re-planning was done"
        return rec
    new = Plan.from_json(candidate.plan_json)
    if plan_key(new) == plan_key(current):
        rec.reason = "re-planned with the measured numbers: the planner chose the current plan"
    elif candidate.candidate_s > candidate.current_s * (1 - MIN_GAIN):
        rec.to_plan = new.summary()
        rec.reason = (
            f"re-planned with the measured numbers: {new.summary()} is predicted "
            f"{candidate.candidate_s:.4g} s against {candidate.current_s:.4g} s for the current plan, "
            f"less than {100 * MIN_GAIN:.0f}% faster"
        )
    else:
        rec.decision = "moved"
        rec.to_plan = new.summary()
        rec.reason = (
            f"{100 * off:.1f}% off the prediction (threshold {100 * threshold:.0f}%); with the measured "
            f"numbers the current plan is predicted {candidate.current_s:.4g} s a step, "
            f"{new.summary()} {candidate.candidate_s:.4g} s"
        )
    return rec


def current_prediction_s(plan: Plan, candidate: Candidate | None) -> float | None:
    """The prediction a measured step time is compared with: the plan's own, else (a manual plan)
    the measured model's estimate of it when it is known."""
    if plan.predicted is not None:
        return plan.predicted.step_time_s
    return candidate.current_s if candidate is not None else None


__all__ = [
    "MIN_GAIN",
    "Candidate",
    "Replan",
    "current_prediction_s",
    "decide",
    "layout_for",
    "measured_step_time_s",
    "on_rank_zero",
    "plan_in_job",
    "plan_key",
    "replan_measured",
]

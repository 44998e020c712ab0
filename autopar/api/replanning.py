"""Live re-planning of :class:`autopar.api.ParallelModule` (the mechanism is
:mod:`autopar.runtime.replan`): compare the measured step time with the plan's prediction, re-plan
with measured numbers and move the running training to a faster plan in memory.

:class:`ReplanMethods` is a mixin: ``ParallelModule`` inherits :meth:`~ReplanMethods.maybe_replan`
and :meth:`~ReplanMethods.replan_to` and provides the move itself (``_move_to``: a module built for
the new plan, loaded with the running one's full state).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autopar.core.errors import InputError
from autopar.core.plan import Plan

log = logging.getLogger(__name__)


class ReplanMethods:
    """``maybe_replan`` and ``replan_to`` of a :class:`autopar.api.ParallelModule`."""

    def maybe_replan(self, *, threshold: float | None = None) -> dict:
        """Compare the measured step time with the plan's prediction; when it is off by more than
        ``threshold`` (default ``replan_threshold``), re-plan with numbers measured on this machine
        and move to the new plan if it is predicted faster (collective; runtime/replan.py). The
        check is returned, logged and appended to :attr:`replans`; ``compile(replan_after=N)``
        runs it once, at the start of the step after N measured steps. A move does not carry the
        last step's gradients (the next step starts from zero gradients anyway)."""
        from autopar.runtime import replan  # lazy: loads the estimator and the solver

        self._require_runtime()
        threshold = self.replan_threshold if threshold is None else threshold
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise InputError(f"threshold={threshold!r}: a relative error >= 0 (0.25: 25% off the prediction)")
        if self.cluster is None:
            raise InputError(
                "maybe_replan() needs the autopar.Cluster the module was compiled for, not a count"
            )
        measured = replan.measured_step_time_s(self._measure.step_times_s)
        predicted = self.plan.predicted.step_time_s if self.plan.predicted is not None else None
        candidate, t0 = None, time.perf_counter()
        if predicted is None or abs(measured - predicted) > threshold * predicted:
            candidate = replan.replan_measured(
                self._source_model,
                self.cluster,
                self.plan,
                **{k: self._rebuild[k] for k in ("example_inputs", "loss_fn", "num_targets", "mode")},
            )
        record = replan.decide(
            step=self._step,
            measured_s=measured,
            predicted_s=replan.current_prediction_s(self.plan, candidate) or 0.0,
            threshold=threshold,
            current=self.plan,
            candidate=candidate,
        )
        record.replan_s = time.perf_counter() - t0
        if record.decision == "moved":
            record.move_s = self._move_to(Plan.from_json(candidate.plan_json))
        return self._record_replan(record)

    def replan_to(self, plan: Plan, *, reason: str = "requested") -> dict:
        """Move the running training to ``plan`` in memory (collective): gather the full state,
        rebuild this rank's program for ``plan`` on the same ranks, scatter the state into it.
        Recorded in :attr:`replans` like a re-plan of :meth:`maybe_replan`."""
        from autopar.runtime import replan  # lazy: loads the estimator and the solver

        self._require_runtime()
        measured = replan.measured_step_time_s(self._measure.step_times_s)
        predicted = self.plan.predicted.step_time_s if self.plan.predicted is not None else 0.0
        record = replan.Replan(
            step=self._step,
            measured_step_time_s=measured,
            predicted_step_time_s=predicted,
            threshold=0.0,
            off=abs(measured - predicted) / predicted if predicted else float("inf"),
            decision="moved",
            reason=reason,
            from_plan=self.plan.summary(),
            to_plan=plan.summary(),
        )
        record.move_s = self._move_to(plan)
        return self._record_replan(record)

    def _record_replan(self, record: Any) -> dict:
        entry = record.to_dict()
        self.replans.append(entry)
        level = logging.WARNING if record.decision == "moved" else logging.INFO
        log.log(level, "live re-planning after step %d: %s (%s)", record.step, record.decision, record.reason)
        return entry

"""The measurements behind :meth:`autopar.api.ParallelModule.measured` and the plan report.

:class:`StepMeasurements` is the bookkeeping one ``ParallelModule`` owns: step times, optimizer
times, each step split as the cost model splits it, the resident set size at compile.
:class:`MeasuredMethods` is a mixin: ``ParallelModule`` inherits ``measured()`` and ``report()``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.runtime.memory import current_rss_bytes, peak_rss_bytes
from autopar.tracing import trace


class StepMeasurements:
    """The step-time bookkeeping of one compiled module (this rank's numbers only)."""

    def __init__(self) -> None:
        self.step_times_s: list[float] = []
        self.optimizer_times_s: list[float] = []
        self.step_parts: list[dict[str, float]] = []
        self.last_optimizer_s = 0.0
        self.rss_at_start = current_rss_bytes()

    def record_parts(self, events: list[dict], tp_comm_s: float) -> None:
        """The step just run split as the cost model splits it: this rank's forward/backward work
        (its pipeline events, less the tensor-parallel collectives issued inside them), those
        collectives, the optimizer step, and the rest (DP/ZeRO sync, p2p and waiting for other
        stages, the runtime's own work). ``events``: the step's timeline of this rank's pipeline."""
        work = sum(e["end_s"] - e["start_s"] for e in events)
        step = self.step_times_s[-1]
        opt, self.last_optimizer_s = self.last_optimizer_s, 0.0
        compute = max(work - tp_comm_s, 0.0)
        self.step_parts.append({
            "step_s": step,
            "compute_s": compute,
            "tp_comm_s": tp_comm_s,
            "optimizer_s": opt,
            "other_s": max(step - compute - tp_comm_s - opt, 0.0),
        })  # fmt: skip

    def components(self) -> dict[str, float]:
        """The parts of this rank's median step (after the first): one step's parts, so they add
        up to its time."""
        parts = self.step_parts[1:] or self.step_parts
        if not parts:
            return {k: 0.0 for k in ("step_s", "compute_s", "tp_comm_s", "optimizer_s", "other_s")}
        return sorted(parts, key=lambda p: p["step_s"])[len(parts) // 2]


class MeasuredMethods:
    """``measured()`` and ``report()`` of a :class:`autopar.api.ParallelModule`."""

    def measured(self) -> dict:
        """This run's measurements for the plan report (collective): the median step time after the
        first (warm-up) step, the last step's forward/backward timeline of this rank's pipeline
        (seconds from each rank's step start), on CUDA the peak memory of every rank."""
        times = sorted(self._measure.step_times_s[1:] or self._measure.step_times_s)
        out: dict = {
            "source": f"{self.plan.world_size} ranks, {len(self._measure.step_times_s)} steps (first excluded)"
        }
        if times:
            out["step_time_s"] = times[len(times) // 2]
        if self._program is not None:
            out["events"] = self._pipeline_events()
        if self._program is not None and dist.is_initialized():
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
            else:  # CPU: the process's peak resident set grown since compile (an upper bound)
                peak = max(peak_rss_bytes() - self._measure.rss_at_start, 0)
            mem = [None] * self.plan.world_size
            dist.all_gather_object(mem, peak)
            out["memory_bytes_per_rank"] = mem
            mine = self._measure.components()
            every: list = [None] * self.plan.world_size
            dist.all_gather_object(every, mine)
            out["components_per_rank"] = every
        if self.plan.predicted is not None:
            out["predicted"] = {
                "step_time_s": self.plan.predicted.step_time_s,
                "breakdown_s": dict(self.plan.predicted.breakdown_s),
            }
        if self.replans:
            out["replans"] = [dict(r) for r in self.replans]
        return out

    def _pipeline_events(self) -> list[dict]:
        """The last step's timeline of this rank's pipeline (collective over pp); virtual stage
        ``v`` is reported as stage ``v % pp``, chunk ``v // pp``."""
        mine = (self._pipeline.events if self._pipeline is not None else self._events).events
        pp = self.plan.pp
        if self.plan.virtual_stages > 1:
            mine = [{**e, "stage": e["stage"] % pp, "chunk": e["stage"] // pp} for e in mine]
        if self._groups is None or pp == 1:
            return list(mine)
        parts: list = [None] * pp
        dist.all_gather_object(parts, mine, group=self._groups.group("pp"))
        return [e for part in parts for e in part]

    def report(self, path: str | os.PathLike, *, measured: dict | None = None) -> Path:
        """Write the plan report (HTML) with this run's measurements overlaid; returns the path."""
        from autopar.report import write_report  # lazy: optional, loads the figure code

        loss_fn = self._loss_fn if self._train else None
        n = len(self.target_names)
        graph = trace(self._model, self._trace_args, loss_fn=loss_fn, num_targets=n)
        return write_report(self.plan, path, cluster=self.cluster, graph=graph, measured=measured)

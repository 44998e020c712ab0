"""Running one rank's stage over the micro-batches of a step.

* ``pp == 1``: a plain gradient-accumulation loop (DDP ``no_sync`` / FSDP gradient sync only on
  the last micro-batch); each micro-batch loss enters the backward scaled by ``1/m``.
* ``pp > 1``: ``torch.distributed.pipelining``'s ``PipelineStage`` with ``ScheduleGPipe`` or
  ``Schedule1F1B``. Our stage modules fit it as they are; two adaptations:

  - the loss is part of the traced graph (it may itself be tensor-parallel), so the last stage
    *returns* the micro-batch loss and the schedule's ``loss_fn`` is the identity; targets (and all
    other graph inputs) reach the stages as keyword arguments, which the schedule splits into
    micro-batches and passes to every stage;
  - stage input/output shapes are inferred by us once (a no-grad forward of micro-batch 0, shapes
    sent stage to stage) and given to ``PipelineStage`` (its static mode). Its own dynamic
    inference runs a forward *and backward* outside DDP's control, which leaves DDP's reducer
    expecting gradients that never come.

  ``scale_grads=True`` divides the accumulated gradients by ``m`` (mean-reduced micro-batch losses).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopar.lower.stages import SIDE_PREFIX, StageSpec
from autopar.runtime.groups import ProcessGroups
from autopar.runtime.microbatch import split_micro_batches
from autopar.runtime.schedule import runs_as

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """The module's buffers as they were before: the shape-inference forward is no training step,
    so it must not advance BatchNorm's running statistics (one device runs one forward a step)."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _identity_loss(output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    return output


def _no_sync(module: nn.Module, last: bool, keep_gathered: bool = False) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce except on the last micro-batch. FSDP2: the same via its flag;
    with ``keep_gathered`` (ZeRO-2) the parameters also stay gathered after a backward that is not
    the last, as ``PipelineStage`` keeps them under ``pp > 1``, so each unit gathers once per step
    (``cost_models.step``). ZeRO-3 reshards after every backward: keeping its parameters would hold
    all of them at once, the memory it is chosen to save."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(last)
        if keep_gathered:
            module.set_reshard_after_backward(last)
    return contextlib.nullcontext()


class Events:
    """Start and end of every forward / backward of this rank's stage in the current step, seconds
    from the step's start: the "measured" timeline the plan report overlays on the predicted one."""

    def __init__(self, stage: int):
        self.stage = stage
        self.events: list[dict] = []
        self.t0 = time.perf_counter()

    def reset(self) -> None:
        self.events, self.t0 = [], time.perf_counter()

    @contextlib.contextmanager
    def record(self, kind: str, micro_batch: int, stage: int | None = None) -> Iterator[None]:
        start = time.perf_counter() - self.t0
        yield
        end = time.perf_counter() - self.t0
        stage = self.stage if stage is None else stage
        self.events.append(
            {"stage": stage, "kind": kind, "micro_batch": micro_batch, "start_s": start, "end_s": end}
        )

    def wrap(self, fn: Callable, kind: str, stage: int | None = None) -> Callable:
        """``fn(chunk_id, ...)`` recorded as ``kind`` of micro-batch ``chunk_id`` on ``stage``."""

        def timed(chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            with self.record(kind, chunk_id, stage):
                return fn(chunk_id, *args, **kwargs)

        return timed


def run_accumulation(
    module: nn.Module,
    spec: StageSpec,
    inputs: tuple,
    side: dict,
    m: int,
    train: bool,
    events: Events | None = None,
    keep_gathered: bool = False,
) -> list:
    """pp == 1: forward (and backward) of ``m`` micro-batches; returns per-micro-batch outputs.
    ``keep_gathered``: ZeRO-2's parameters stay gathered between micro-batches (:func:`_no_sync`)."""
    events = events or Events(spec.index)
    names = list(side)
    chunks = split_micro_batches(tuple(inputs) + tuple(side[k] for k in names), m)
    outs = []
    for i, chunk in enumerate(chunks):
        args, kw = chunk[: len(inputs)], dict(zip(names, chunk[len(inputs) :]))
        if not train:
            with torch.no_grad(), events.record("F", i):
                outs.append(module(*args, **kw))
            continue
        with _no_sync(module, i == m - 1, keep_gathered):
            with events.record("F", i):
                loss = module(*args, **kw)
            with events.record("B", i):
                (loss / m).backward()
        outs.append(loss.detach())
    return outs


class Pipeline:
    """One rank's ``PipelineStage`` (one per virtual stage when interleaved) and schedule, created at
    the first step (see the module docstring)."""

    def __init__(
        self,
        modules: list[nn.Module],
        specs: list[StageSpec],
        groups: ProcessGroups,
        device: torch.device,
        schedule: str,
        m: int,
    ):
        self.modules, self.specs, self.groups, self.device = modules, specs, groups, device
        self.schedule_name, self.m = schedule, m
        self.events = Events(specs[0].index)
        self.pp_ranks = groups.ranks["pp"]
        self._schedules: dict[bool, object] = {}
        self._stages: list | None = None

    @property
    def is_first(self) -> bool:
        return any(spec.is_first for spec in self.specs)

    @property
    def is_last(self) -> bool:
        return any(spec.is_last for spec in self.specs)

    def _rank_of(self, stage: int) -> int:
        return self.pp_ranks[stage % len(self.pp_ranks)]

    def _infer_shapes(
        self, module: nn.Module, spec: StageSpec, inputs: tuple, side: dict
    ) -> tuple[tuple, tuple]:
        group = self.groups.group("pp")
        mb = split_micro_batches(tuple(inputs) + tuple(side.values()), self.m)[0]
        mb_side = dict(zip(side, mb[len(inputs) :]))
        with torch.no_grad(), _buffers_restored(module):
            if spec.is_first:
                args = tuple(mb[: len(inputs)])
            else:
                metas: list = [None]
                dist.recv_object_list(metas, src=self._rank_of(spec.index - 1), group=group)
                args = tuple(torch.zeros(s, dtype=d, device=self.device) for s, d in metas[0])
            out = module(*args, **mb_side)
        outs = out if isinstance(out, tuple) else (out,)
        if not spec.is_last:
            shapes = [(tuple(t.shape), t.dtype) for t in outs]
            dist.send_object_list([shapes], dst=self._rank_of(spec.index + 1), group=group)
        # requires_grad in the metadata is what tells PipelineStage that gradients flow back.
        in_args = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in args)
        out_args = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in outs)
        return in_args, out_args

    def _build_stages(self, inputs: tuple, side: dict) -> list:
        from torch.distributed.pipelining import PipelineStage

        stages = []
        for module, spec in zip(self.modules, self.specs):  # virtual stages in order: no deadlock
            in_args, out_args = self._infer_shapes(module, spec, inputs, side)
            stage = PipelineStage(
                module, spec.index, spec.num_stages, self.device,
                input_args=in_args, output_args=out_args, group=self.groups.group("pp"),
            )  # fmt: skip
            # Instance attributes shadow the methods the schedules call: timings for the report.
            stage.forward_one_chunk = self.events.wrap(stage.forward_one_chunk, "F", spec.index)
            stage.backward_one_chunk = self.events.wrap(stage.backward_one_chunk, "B", spec.index)
            stages.append(stage)
        return stages

    def _schedule(self, train: bool, inputs: tuple, side: dict) -> Any:
        if train in self._schedules:
            return self._schedules[train]
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        if self._stages is None:
            self._stages = self._build_stages(inputs, side)
        loss_fn = _identity_loss if train else None
        if len(self._stages) > 1:
            sched = ScheduleInterleaved1F1B(
                self._stages, n_microbatches=self.m, loss_fn=loss_fn, scale_grads=True
            )
        else:
            name = runs_as(self.schedule_name, self.specs[0].num_stages, self.m)
            cls = Schedule1F1B if (train and name == "1f1b") else ScheduleGPipe
            sched = cls(self._stages[0], n_microbatches=self.m, loss_fn=loss_fn, scale_grads=True)
        self._schedules[train] = sched
        return sched

    def run(self, inputs: tuple, side: dict, train: bool) -> Any:
        """One step; returns the per-micro-batch losses (train) or the merged output (inference) on
        the rank of the last stage, None elsewhere."""
        side = {SIDE_PREFIX + k: v for k, v in side.items()}
        sched = self._schedule(train, inputs, side)
        self.events.reset()
        args = tuple(inputs) if self.is_first else ()
        if not train:
            with torch.no_grad():
                out = sched.step(*args, **side)
            return out if self.is_last else None
        losses: list = []
        target = None
        if self.is_last:
            n = next(iter(side.values())).shape[0] if side else inputs[0].shape[0]
            target = torch.zeros(n, device=self.device)
        sched.step(
            *args, target=target, losses=losses if self.is_last else None, return_outputs=False, **side
        )
        return [loss.detach() for loss in losses] if self.is_last else None

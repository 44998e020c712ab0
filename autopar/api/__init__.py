"""``autopar.compile`` and the ``ParallelModule`` it returns.

Every rank calls ``autopar.compile(...)`` with the same model, inputs and plan (under torchrun, or
inside :func:`autopar.runtime.launch.run_local`); each gets its own program: its pipeline stage of
its tensor-parallel graph, wrapped in DDP or FSDP on its data-parallel group. Without an
initialised process group a 1-rank plan runs in-process and any plan can still be inspected
(``plan``, ``rank_code(r)``).

Batches: ``step(batch)`` takes the *global* batch ``(inputs..., targets...)`` (the order of
``example_inputs``) and uses this rank's data-parallel share; a batch of exactly ``global_batch/dp``
samples is taken as the share itself. The returned loss is the mean over the global batch, the
same number on every rank. Inference: ``module(inputs...)`` returns the full output (all samples)
on every rank.

Public API: :func:`compile`, :class:`ParallelModule`. Its parts live in the package's modules:
the argument and input checks (:mod:`autopar.api.checks`), the step measurements and ``measured()``
(:mod:`autopar.api.measure`), live re-planning (:mod:`autopar.api.replanning`), state dicts and
checkpoints (:mod:`autopar.api.state`); ``ParallelModule`` inherits the methods of the last three.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopar.api.checks import (
    check_optimizer,
    check_replan,
    check_scalar_loss,
    check_sequence_length,
    explain_index_errors,
    first_samples,
    non_finite_grads,
    num_devices,
    plan_with_planner,
)
from autopar.api.measure import MeasuredMethods, StepMeasurements
from autopar.api.replanning import ReplanMethods
from autopar.api.state import StateMethods
from autopar.cluster import Cluster
from autopar.core.errors import InputError, NonFiniteError, PlanError, RuntimeFailure
from autopar.core.plan import Plan
from autopar.core.plan_file import load_plan
from autopar.lower import TPContext, moe_aux, rng
from autopar.lower import batchnorm as batchnorm_module
from autopar.lower.passes import SAMPLE_IDS, replace_dropout
from autopar.lower.program import RankProgram, build_program
from autopar.runtime.engines import (
    apply_data_parallel,
    apply_recompute,
    build_optimizer,
    expert_names,
    expert_params,
    sync_expert_grads,
)
from autopar.runtime.failure import FailureReporter, defer_termination, guard
from autopar.runtime.groups import DEFAULT_TIMEOUT_S, ProcessGroups, build_process_groups, init_from_env
from autopar.runtime.microbatch import check_batch, data_parallel_share, merge_micro_batches
from autopar.runtime.pipeline import Events, Pipeline, run_accumulation
from autopar.runtime.rank_code import render
from autopar.runtime.schedule import for_plan
from autopar.tracing import MODEL_PREFIX, fx_trace
from autopar.tracing.wrap import split_inputs

log = logging.getLogger(__name__)

PLAN_ENV = "AUTOPAR_PLAN"
"""Path of a plan file for ``compile(plan=None)``; set by ``autopar run PLAN.json``."""
RESUME_ENV = "AUTOPAR_RESUME"
"""Checkpoint for ``compile(resume_from=None)``; set by ``autopar run PLAN.json --resume CKPT``."""


def compile(  # noqa: A001 - the public name autopar.compile
    model: nn.Module,
    cluster: Cluster | int,
    *,
    example_inputs: Sequence[Any],
    loss_fn: Callable | None = None,
    optimizer: Callable | None = None,
    plan: Plan | None = None,
    global_batch: int,
    mode: str = "train",
    num_targets: int | None = None,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batchnorm: str = "sync",
    nan_check: str = "loss",
    profile: bool | None = None,
    resume_from: str | os.PathLike | None = None,
    replan_after: int | None = None,
    replan_threshold: float = 0.25,
) -> ParallelModule:
    """Compile ``model`` for ``cluster`` under ``plan`` (see the module docstring).

    ``plan=None``: the plan file named by ``$AUTOPAR_PLAN`` (``autopar run``), else the planner's.
    ``profile``: plan with measured numbers of this machine (:mod:`autopar.estimator.local`); the
    default ``None`` does so when the cluster is local CPU processes (``Cluster.local(N)``), where
    nominal numbers mean little. The ranks measure their own layout once (cached on disk).

    ``optimizer``: ``callable(params) -> torch.optim.Optimizer`` (default AdamW, lr 1e-3), applied
    to this rank's parameters. ``seed`` seeds dropout masks (:mod:`autopar.lower.rng`).
    ``timeout_s`` is the timeout of every process group. ``batchnorm``: ``"sync"`` (train-mode
    BatchNorm normalises with the whole global batch's statistics, as on one device; needs one
    micro-batch per data-parallel replica) or ``"local"`` (per replica and micro-batch, with a
    warning); see :mod:`autopar.lower.batchnorm`.

    ``nan_check``: ``"loss"`` (default) checks the global loss of every step (a float every rank
    already holds: free), ``"grads"`` also this rank's gradients (one small all-reduce a step),
    ``"off"`` neither. A non-finite value raises :class:`NonFiniteError` naming the step (and the
    first parameters with non-finite gradients) *before* the optimizer steps: the parameters stay
    those of before the step, every rank raises at the same step, and a caller that wants the
    DeepSpeed/Megatron behaviour (skip the batch) catches it and goes on.

    ``resume_from``: a checkpoint directory written by :meth:`ParallelModule.save` (or its root:
    the newest complete one), under any plan and world size; the model, the optimizer state, the
    step count and the RNG state continue from it (docs/checkpoints.md).

    ``replan_after``: live re-planning (:meth:`ParallelModule.maybe_replan`). After this many
    steps, if the slowest rank's median step time is off the plan's prediction by more than
    ``replan_threshold`` (relative; a plan without a prediction is always checked), re-plan with
    numbers measured on this machine and move the state in memory to the new plan when it is
    predicted at least 5% faster. Needs ``Cluster.local(N)``; recorded on ``compiled.replans``.
    """
    if mode not in ("train", "inference"):
        raise PlanError(f"mode={mode!r}: choose 'train' or 'inference'")
    check_replan(replan_after, replan_threshold, cluster, mode)
    if nan_check not in NAN_CHECKS:
        raise InputError(f"nan_check={nan_check!r}: choose one of {', '.join(map(repr, NAN_CHECKS))}")
    check_optimizer(optimizer)
    check_sequence_length(model, example_inputs, loss_fn, num_targets)
    world = num_devices(cluster)
    if plan is None and os.environ.get(PLAN_ENV):
        plan = load_plan(os.environ[PLAN_ENV])  # set by `autopar run PLAN.json`
    if plan is None:
        plan = plan_with_planner(
            model, cluster, example_inputs, loss_fn, num_targets, global_batch, mode, profile, timeout_s
        )
    if plan.world_size != world:
        raise PlanError(
            f"the plan ({plan.summary()}) uses {plan.world_size} ranks but the cluster has {world} "
            "devices; choose degrees whose product is the device count"
        )
    if plan.pp > 1:  # PlanError for what we cannot run
        for_plan(plan.schedule, plan.pp, plan.num_micro_batches, plan.virtual_stages)
    elif plan.virtual_stages > 1:
        raise PlanError(f"vpp={plan.virtual_stages} needs pp > 1: virtual stages interleave a pipeline")
    if plan.global_batch != global_batch:
        raise PlanError(
            f"global_batch={global_batch} but the plan was made for {plan.global_batch}; pass the "
            "plan's global batch or re-plan"
        )
    module = ParallelModule(
        model,
        plan,
        cluster=None if isinstance(cluster, int) else cluster,
        example_inputs=example_inputs,
        loss_fn=loss_fn,
        optimizer=optimizer,
        mode=mode,
        num_targets=num_targets,
        seed=seed,
        timeout_s=timeout_s,
        batchnorm=batchnorm,
        nan_check=nan_check,
    )
    if resume_from is None and os.environ.get(RESUME_ENV):
        resume_from = os.environ[RESUME_ENV]  # set by `autopar run PLAN.json --resume CKPT`
    if resume_from is not None:
        module.load(resume_from)
    module.replan_after, module.replan_threshold = replan_after, replan_threshold
    return module


NAN_CHECKS = ("loss", "grads", "off")


class ParallelModule(MeasuredMethods, ReplanMethods, StateMethods):
    """The compiled model on this rank. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        *,
        cluster: Cluster | None = None,
        example_inputs: Sequence[Any],
        loss_fn: Callable | None,
        optimizer: Callable | None,
        mode: str,
        num_targets: int | None,
        seed: int,
        timeout_s: float,
        batchnorm: str = "sync",
        nan_check: str = "loss",
    ) -> None:
        # What a live re-plan rebuilds from (maybe_replan / replan_to; runtime/replan.py): every
        # keyword argument this was called with (read first, so nothing else is in locals()).
        self._rebuild = {
            k: v for k, v in locals().items() if k not in ("self", "model", "plan") and not k.startswith("__")
        }
        self._source_model = model
        self.plan = plan
        self.seed = seed
        self.nan_check = nan_check
        self.cluster = cluster
        self.replans: list[dict] = []
        """Every live re-planning check (:class:`autopar.runtime.replan.Replan` as a dict)."""
        self.replan_after: int | None = None
        self.replan_threshold = 0.25
        self._measure = StepMeasurements()  # step times and their parts, for measured()
        self._tp_contexts: list[TPContext] = []
        self.mode = mode
        self.timeout_s = timeout_s
        self._train = mode == "train"
        self._model = copy.deepcopy(model).train(self._train)
        config = getattr(self._model, "config", None)
        if getattr(config, "use_cache", False):
            # A KV cache is decoding state, not an output of one batched forward (and not traceable).
            config.use_cache = False
        inputs, targets = split_inputs(example_inputs, loss_fn, num_targets)
        # Trace at the micro-batch size: exported graphs (HuggingFace models) bake shapes in.
        trace_args = first_samples((*inputs, *targets) if self._train else inputs, plan.micro_batch_size)
        self._trace_args, self._loss_fn = trace_args, loss_fn
        self._gm = fx_trace(
            self._model,
            trace_args,
            loss_fn=loss_fn if self._train else None,
            num_targets=len(targets) if self._train else 0,
        )
        info = self._gm.meta["autopar"]
        self.input_names: list[str] = list(info["input_names"])
        self.target_names: list[str] = list(info["target_names"]) if self._train else []
        if self._train:
            check_scalar_loss(self._gm, loss_fn)
        self._has_sample_ids = replace_dropout(self._gm, train=self._train, seed=seed)
        self.batchnorm = batchnorm
        batchnorm_module.check_plan(self._gm, plan, batchnorm)
        moe_aux.check_plan(self._gm, plan)
        self._key_to_traced = self._map_state_keys()
        self._optimizer_fn = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self._step = 0
        self._groups: ProcessGroups | None = None
        self._program: RankProgram | None = None
        init_from_env(timeout_s)  # under torchrun without an init_process_group of the user's
        if dist.is_initialized():
            self._start(dist.get_rank())
        elif plan.world_size == 1:
            self._start(0)

    # ------------------------------------------------------------------------------ building
    def _map_state_keys(self) -> dict[str, str]:
        """Original state-dict key of every parameter and buffer -> its name in the traced graph."""
        by_id = {id(p): n for n, p in self._gm.named_parameters()}
        buffers = {id(b): n for n, b in self._gm.named_buffers()}
        names = set(by_id.values()) | set(buffers.values())
        out = {}
        for key, value in self._model.state_dict(keep_vars=True).items():
            if not isinstance(value, nn.Parameter):
                if id(value) in buffers or MODEL_PREFIX + key in names:  # BatchNorm statistics
                    out[key] = buffers.get(id(value), MODEL_PREFIX + key)
                continue
            if id(value) in by_id:
                out[key] = by_id[id(value)]
            elif MODEL_PREFIX + key in names:
                out[key] = MODEL_PREFIX + key
        return out

    def _start(self, rank: int) -> None:
        self.rank = rank
        if dist.is_initialized():
            self._groups = build_process_groups(self.plan, timeout_s=self.timeout_s)
        self._reporter = FailureReporter(rank) if dist.is_initialized() else None
        if self._reporter is not None and os.environ.get("TORCHELASTIC_RUN_ID"):
            # torchrun SIGTERMs the survivors of a dead rank at once: let them name it first.
            defer_termination()
        with guard(self._reporter, "compile", self.timeout_s):
            self._build(rank)

    def _build(self, rank: int) -> None:
        tp_group = self._groups.group("tp") if self._groups else None
        ep_group = self._groups.group("ep") if self._groups else None  # expert parallelism (lower/expert.py)
        prog = build_program(
            self._gm, self.plan, rank, self.input_names, tp_group=tp_group, ep_group=ep_group
        )
        self._sync_batch_norm(prog, self._groups.group("dp") if self._groups else None)
        self._buffer_slots = batchnorm_module.buffer_slots(prog)
        self._check_ties(prog)
        self.device = _device()
        modules = [self._wrap(stage.to(self.device), prog) for stage in prog.stages]
        self._program, self._module = prog, modules[0]
        self._tp_contexts = list(  # the lowered graphs' tensor-parallel handles (timed collectives)
            {
                id(c): c
                for stage in prog.stages
                for m in stage.modules()
                if isinstance(c := getattr(m, "autopar_tp", None), TPContext)
            }.values()
        )
        params = list({id(p): p for mod in modules for p in mod.parameters()}.values())
        dp_group = self._groups.group("dp") if self._groups and self.plan.dp > 1 else None
        self._optimizer = (
            build_optimizer(self._optimizer_fn, params, self.plan.zero_stage, dp_group)
            if self._train
            else None
        )
        self._pipeline = None
        self._events = Events(prog.stage.spec.index)
        if self.plan.pp > 1:
            for stage in prog.stages:
                stage.flat_output = not self._train
            specs = [stage.spec for stage in prog.stages]
            self._pipeline = Pipeline(
                modules, specs, self._groups, self.device, self.plan.schedule, self.plan.num_micro_batches
            )

    def _sync_batch_norm(self, prog: RankProgram, dp_group: dist.ProcessGroup | None) -> None:
        """Batch statistics over the dp group: train-mode BatchNorm (``batchnorm="sync"``, see
        lower/batchnorm.py) and HuggingFace MoE's load-balancing loss (lower/moe_aux.py)."""
        size = self.plan.dp if self.batchnorm == "sync" else 1
        stats = batchnorm_module.DPStats(dp_group, size)
        batchnorm_module.apply(prog.stages, stats, always=self._train and self.plan.recompute != "none")
        moe_aux.apply(prog.stages, batchnorm_module.DPStats(dp_group, self.plan.dp))  # HF MoE aux loss

    def _wrap(self, stage: nn.Module, prog: RankProgram) -> nn.Module:
        """Recompute, then the dp engine of the ZeRO stage (training only; see runtime/engines.py)."""
        if not self._train:
            return stage
        apply_recompute(stage, prog.block_segments, self.plan.recompute)
        if self.plan.dp == 1:
            return stage
        dp_group = self._groups.group("dp")
        ignore = expert_names(stage, prog.slots)  # reduced over edp by sync_expert_grads
        return apply_data_parallel(
            stage, dp_group, self.device, prog.block_segments, self.plan.zero_stage, ignore
        )

    def _check_ties(self, prog: RankProgram) -> None:
        """Weights held by several pipeline stages (tied embeddings; T5's shared embedding, read by
        the encoder, the decoder and the head) get their gradients summed in
        :meth:`_sync_tied_grads`; under ZeRO only the first and last stage may share one."""
        last = self.plan.pp - 1
        for name in prog.tied_names():
            holders = prog.tie_ranks(name)
            if self.plan.zero_stage > 0 and len(holders) > 1 and holders != [0, last]:
                raise PlanError(
                    f"parameter {name} is shared by pipeline ranks {holders}; with ZeRO (zero_stage="
                    f"{self.plan.zero_stage}) only the first and the last stage may share a parameter "
                    "(tied embeddings). Move the blocks with layer_stages, or use zero_stage=0"
                )

    # ------------------------------------------------------------------------------ running
    def _require_runtime(self) -> None:
        if self._program is None:
            raise RuntimeFailure(
                f"this plan needs {self.plan.world_size} ranks and torch.distributed is not initialised "
                "here; run under torchrun or autopar.runtime.launch.run_local (rank_code() works anyway)"
            )

    def _side_inputs(self, share: tuple) -> dict[str, torch.Tensor]:
        names = self.input_names + self.target_names
        side = {n: t.to(self.device) if isinstance(t, torch.Tensor) else t for n, t in zip(names, share)}
        if self._has_sample_ids:
            n = share[0].shape[0]
            dp_index = self.plan.coords(self.rank).get("dp", 0)
            ids = rng.sample_ids_for_step(self._step, self.plan.global_batch)
            side[SAMPLE_IDS] = ids[dp_index * n : (dp_index + 1) * n].to(self.device)
        return side

    def step(self, batch: Sequence[Any]) -> float:
        """One training step on this rank's share of ``batch``; returns the global mean loss."""
        if not self._train:
            raise RuntimeFailure("step() needs mode='train'; this module was compiled for inference")
        batch = self._checked(batch, "step()")
        self._require_runtime()
        if self.replan_after and not self.replans and len(self._measure.step_times_s) >= self.replan_after:
            self.maybe_replan()  # before the step: the last step's gradients stay readable
        start = time.perf_counter()
        comm0 = sum(c.comm_s for c in self._tp_contexts)
        with guard(self._reporter, f"step {self._step}", self.timeout_s), explain_index_errors(batch):
            loss, bad = self._train_step(batch)
        self._measure.step_times_s.append(time.perf_counter() - start)
        events = (self._pipeline.events if self._pipeline is not None else self._events).events
        self._measure.record_parts(events, sum(c.comm_s for c in self._tp_contexts) - comm0)
        self._step += 1
        if bad is not None:
            raise bad
        return loss

    # ------------------------------------------------------------------------------ live re-planning
    # maybe_replan() and replan_to() are ReplanMethods' (replanning.py); the move is built here.
    def _move_to(self, plan: Plan) -> float:
        """Adopt ``plan`` in place (the user holds this object): a module built for it from the
        original model, loaded with this one's full state (parameters, optimizer, step, RNG)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if plan.world_size != world or plan.global_batch != self.plan.global_batch:
            raise PlanError(
                f"cannot move to {plan.summary()} (global batch {plan.global_batch}): the running job "
                f"has {world} ranks and global batch {self.plan.global_batch}"
            )
        t0 = time.perf_counter()
        state = self.full_state_dict()
        fresh = ParallelModule(self._source_model, plan, **self._rebuild)
        fresh.load_full_state_dict(state)
        kept = {
            "replans": self.replans,
            "replan_after": self.replan_after,
            "replan_threshold": self.replan_threshold,
        }
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(kept)
        return time.perf_counter() - t0

    def _checked(self, batch: Any, what: str) -> tuple:
        """The batch as a tuple, checked against the traced example on every rank alike (so a bad
        batch is an error here, before any collective, not a hang or a torch shape error)."""
        if isinstance(batch, torch.Tensor) or not isinstance(batch, Sequence):
            raise InputError(
                f"{what} expected a tuple (inputs..., targets...) in the order of example_inputs, got "
                f"{type(batch).__name__}"
            )
        batch = tuple(batch)
        names = self.input_names + self.target_names
        sizes = (self.plan.global_batch, self.plan.global_batch // self.plan.dp)
        check_batch(batch, names, self._trace_args, sizes, what)
        return batch

    def _non_finite(self, loss: float) -> NonFiniteError | None:
        """The error for a non-finite loss or gradient of this step, alike on every rank (the loss
        is the global one; the gradient flag is all-reduced), or None."""
        if self.nan_check == "off":
            return None
        names: list[str] = []
        if self.nan_check == "grads":
            names = non_finite_grads(self._program.slots, self._key_to_traced, self.device)
        if math.isfinite(loss) and not names:
            return None
        what = [] if math.isfinite(loss) else [f"the global loss is {loss}"]
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            what.append(f"non-finite gradients in {shown}")
        return NonFiniteError(
            f"step {self._step}: {' and '.join(what)}; the optimizer did not step (the parameters are "
            "unchanged). Check this batch for NaN/inf values, lower the learning rate or use loss "
            "scaling; catch autopar.core.errors.NonFiniteError to skip the batch, or compile with "
            "nan_check='off' to train on regardless",
            step=self._step,
            parameters=names,
        )

    def _train_step(self, batch: tuple) -> tuple[float, NonFiniteError | None]:
        dp_index = self.plan.coords(self.rank).get("dp", 0)
        share = data_parallel_share(batch, self.plan.global_batch, self.plan.dp, dp_index)
        side = self._side_inputs(share)
        inputs = tuple(side[n] for n in self.input_names)
        self._optimizer.zero_grad(set_to_none=True)
        m = self.plan.num_micro_batches
        if self._pipeline is None:
            self._events.reset()
            losses = run_accumulation(
                self._module,
                self._program.stage.spec,
                inputs,
                side,
                m,
                True,
                self._events,
                keep_gathered=self.plan.zero_stage == 2,
            )
        else:
            losses = self._pipeline.run(inputs, side, True)
        self._sync_tied_grads()
        if self.plan.ep > 1:
            sync_expert_grads(expert_params(self._program.slots), self._groups.group("edp"), self.plan.dp)
        loss = self._global_loss(losses)
        bad = self._non_finite(loss)
        if bad is None:
            t0 = time.perf_counter()
            self._optimizer.step()
            self._measure.optimizer_times_s.append(time.perf_counter() - t0)
            self._measure.last_optimizer_s = self._measure.optimizer_times_s[-1]
        return loss, bad

    def _sync_tied_grads(self) -> None:
        """Sum the gradients of weights held by several pipeline ranks. The usual pair (first and
        last rank: embedding and head) sums over the tie group; a middle rank holds neither and
        does nothing (its ``group("tie")`` is None, which would mean the whole world). Any other
        set of holders sums over the whole pipeline group, the ranks without the weight adding
        zeros of its shape."""
        prog = self._program
        tied = prog.tied_names()
        if not tied or self._groups is None:
            return
        last, me = self.plan.pp - 1, prog.coords.get("pp", 0)
        by_name = {s.full_name: s for s in prog.slots}
        for name in tied:  # the same order and the same choices on every rank
            holders = prog.tie_ranks(name)
            if len(holders) < 2:
                continue  # virtual stages of one rank share one tensor
            pair = holders == [0, last]  # decided from the plan alone: alike on every rank
            if pair and me not in holders:
                continue
            if name in by_name:
                param = by_name[name].tensor()
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                g = param.grad
                buf = g.to_local() if hasattr(g, "to_local") else g
            else:
                buf = torch.zeros_like(prog.local_param(name), device=self.device)
            dist.all_reduce(buf, group=self._groups.group("tie" if pair else "pp"))

    def _global_loss(self, losses: list[torch.Tensor]) -> float:
        value = torch.stack(losses).mean() if losses else torch.zeros(())
        value = value.detach().to(torch.float32).reshape(1).to(self.device)
        if self._groups is not None and self.plan.pp > 1:
            dist.broadcast(value, src=self._groups.ranks["pp"][-1], group=self._groups.group("pp"))
        if self._groups is not None and self.plan.dp > 1:
            dist.all_reduce(value, group=self._groups.group("dp"))
            value /= self.plan.dp
        return float(value.item())

    def __call__(self, *inputs: Any) -> Any:
        """Inference: the full output for the global batch ``inputs``, on every rank."""
        if self._train:
            raise RuntimeFailure("calling the module runs inference; compile with mode='inference'")
        inputs = self._checked(inputs, "calling the module")
        self._require_runtime()
        with guard(self._reporter, "inference", self.timeout_s), explain_index_errors(inputs):
            return self._infer(inputs)

    def _infer(self, inputs: tuple) -> Any:
        dp_index = self.plan.coords(self.rank).get("dp", 0)
        share = data_parallel_share(inputs, self.plan.global_batch, self.plan.dp, dp_index)
        side = self._side_inputs(share)
        args = tuple(side[n] for n in self.input_names)
        m = self.plan.num_micro_batches
        if self._pipeline is None:
            out = merge_micro_batches(
                run_accumulation(self._module, self._program.stage.spec, args, side, m, False)
            )
        else:
            flat = self._pipeline.run(args, side, False)
            out = (
                self._program.stages[-1].unflatten(flat if isinstance(flat, tuple) else (flat,))
                if flat is not None
                else None
            )
            box = [out]
            dist.broadcast_object_list(box, src=self._groups.ranks["pp"][-1], group=self._groups.group("pp"))
            out = box[0]
        if self._groups is not None and self.plan.dp > 1:
            parts: list = [None] * self.plan.dp
            dist.all_gather_object(parts, out, group=self._groups.group("dp"))
            out = merge_micro_batches(parts)
        return out

    # ------------------------------------------------------------------------------ state, measurements
    # state_dict() ... save(), load(): StateMethods (state.py); measured(), report():
    # MeasuredMethods (measure.py).

    # ------------------------------------------------------------------------------ inspection
    def rank_code(self, rank: int) -> str:
        """The program of ``rank`` as Python source, collectives visible (no processes needed)."""
        if not 0 <= rank < self.plan.world_size:
            raise PlanError(f"rank {rank} is outside 0..{self.plan.world_size - 1}")
        prog = build_program(self._gm, self.plan, rank, self.input_names, tp_group=None)
        self._sync_batch_norm(prog, None)
        return render(prog, self.plan, train=self._train, has_sample_ids=self._has_sample_ids)

    @property
    def program(self) -> RankProgram | None:
        """This rank's program (None when not running)."""
        return self._program

    def __repr__(self) -> str:
        return f"ParallelModule({self.plan.summary()}, mode={self.mode})"


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

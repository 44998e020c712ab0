"""BatchNorm as one device computes it: statistics over the whole global batch.

A train-mode BatchNorm normalises each channel with the mean and variance of the batch it sees.
Split the batch (data parallelism, micro-batches) and each replica would see only its share: other
statistics, other outputs, other running averages than one device. ``autopar.compile`` offers two
semantics, ``batchnorm=``:

* ``"sync"`` (default): the statistics of the whole global batch. Each data-parallel replica sums
  its share per channel and the sums are all-reduced over the dp group (a two-pass mean, then
  variance, so the variance has no ``E[x^2] - E[x]^2`` cancellation); the backward all-reduces the
  two per-channel gradient sums (:class:`_BatchNormFunction`), summing in double on CPU as ATen's
  own kernel does. The running
  statistics are updated with the global mean and the unbiased global variance exactly as
  ``nn.BatchNorm`` does (``momentum``, ``num_batches_tracked``, ``momentum=None`` = cumulative
  average), once per forward (not again when a checkpointed block is recomputed in backward).
  Micro-batches cannot see the whole batch, so a plan with more than one micro-batch per replica
  is refused (:func:`check_plan`). ``torch.nn.SyncBatchNorm`` is not used: it runs only on CUDA.
* ``"local"``: per replica and per micro-batch statistics (plain BatchNorm on each share), with
  a warning naming the BatchNorm modules: the model's maths changes.

Eval-mode BatchNorm (inference) uses the running statistics: nothing to synchronise. Statistics
are per channel, so a BatchNorm whose channels are split over tensor-parallel ranks synchronises
its own channels over the dp group and composes with the split.

The rewrite runs on a rank's stage modules *after* the tensor-parallel lowering and the pipeline
split (:func:`apply`): each BatchNorm that uses batch statistics, whatever its form
(``nn.BatchNorm*d`` module, ``F.batch_norm``, ``aten.batch_norm``, sharded or not), becomes a call
of :func:`batch_norm` reading the graph attribute ``autopar_dp`` (a :class:`DPStats`, the dp
group; never a module global).
"""

from __future__ import annotations

import logging
import operator
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.fx
import torch.nn.functional as F
from torch import nn

from autopar.core.errors import PlanError, RuntimeFailure
from autopar.core.plan import Plan
from autopar.lower.program import ParamSlot, RankProgram, Shard
from autopar.lower.segments import module_paths
from autopar.tracing import MODEL_PREFIX

log = logging.getLogger(__name__)

POLICIES = ("sync", "local")
CTX_ATTR = "autopar_dp"


class DPStats:
    """The group batch statistics are summed over (BatchNorm; the MoE load-balancing loss,
    lower/moe_aux.py): ``group`` (None for a dry lowering) of ``world_size`` ranks (1: this rank's
    own statistics)."""

    def __init__(self, group: dist.ProcessGroup | None, world_size: int):
        self.group, self.world_size = group, world_size

    def require_group(self) -> dist.ProcessGroup | None:
        if self.group is None and self.world_size > 1:
            raise RuntimeFailure(
                "batch statistics (BatchNorm, the MoE load-balancing loss) need the data-parallel "
                "process group, but this program was "
                "built dry (for rank_code); build it again with the dp group to run it"
            )
        return self.group

    # A process group cannot be copied or pickled; the handle is shared by copies.
    def __deepcopy__(self, memo: dict) -> DPStats:
        return self

    def __reduce__(self) -> tuple[type[DPStats], tuple[None, int]]:
        return (DPStats, (None, self.world_size))

    def __repr__(self) -> str:
        return f"DPStats(world_size={self.world_size}, dry={self.group is None})"


def _all_reduce(x: torch.Tensor, dp: DPStats) -> torch.Tensor:
    if dp.world_size > 1:
        dist.all_reduce(x, group=dp.require_group())
    return x


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ATen's BatchNorm sums in (``acc_type``): double on CPU, float on accelerators.
    The backward subtracts two per-channel means from ``dy``: summed in fp32 on CPU the result
    is a few 1e-8 off the one-device kernel's, which Adam turns into visible weight differences."""
    if x.dtype == torch.float64 or x.device.type == "cpu":
        return torch.float64
    return torch.float32


class _BatchNormFunction(torch.autograd.Function):
    """Batch statistics over the dp group. Forward: all-reduce of the per-channel sums (mean),
    then of the squared deviations (variance, two-pass). Backward: all-reduce of ``sum(dy)`` and
    ``sum(dy * (x - mean))``, the only terms through which one sample's gradient depends on the
    others (``torch.nn.SyncBatchNorm``'s formulas). ``weight``/``bias`` gradients stay local:
    the data-parallel engine averages them like every other parameter gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        dp: DPStats,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acc, c = _accumulation_dtype(x), x.shape[1]
        dims, shape = [0, *range(2, x.dim())], [1, c] + [1] * (x.dim() - 2)
        n = x.numel() // c * dp.world_size  # every replica holds an equal share
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
            )
        mean = _all_reduce(x.sum(dims, dtype=acc), dp) / n
        centered = x.to(acc) - mean.view(shape)
        squares = _all_reduce((centered * centered).sum(dims), dp)
        invstd = torch.rsqrt(squares / n + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        y = (x.to(acc) * scale.view(shape) + shift.view(shape)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.dp, ctx.n, ctx.has_bias = dp, n, bias is not None
        return y, mean, squares

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor, *_: torch.Tensor
    ) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        acc, c = mean.dtype, x.shape[1]
        dims, shape = [0, *range(2, x.dim())], [1, c] + [1] * (x.dim() - 2)
        centered = x.to(acc) - mean.view(shape)
        dy_acc = dy.to(acc)
        local = torch.stack([dy_acc.sum(dims), (dy_acc * centered).sum(dims)])
        total = _all_reduce(local.clone(), ctx.dp)
        mean_dy, mean_dy_xmu = total[0] / ctx.n, total[1] / ctx.n
        scale = invstd if weight is None else invstd * weight.to(acc)
        proj = (mean_dy_xmu * invstd * invstd).view(shape)
        dx = ((dy_acc - mean_dy.view(shape) - centered * proj) * scale.view(shape)).to(x.dtype)
        dweight = (local[1] * invstd).to(weight.dtype) if weight is not None else None
        dbias = local[0].to(dy.dtype) if ctx.has_bias else None
        return dx, dweight, dbias, None, None


def _recomputing() -> bool:
    """Whether this forward runs inside backward (a checkpointed block being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    momentum: float | None,
    eps: float,
    num_batches_tracked: torch.Tensor | None,
    dp: DPStats,
) -> torch.Tensor:
    """``F.batch_norm(training=True)`` with the statistics of the batch summed over ``dp``, and
    ``nn.BatchNorm``'s update of the running statistics (see the module docstring)."""
    y, mean, squares = _BatchNormFunction.apply(x, weight, bias, eps, dp)
    if running_mean is not None and running_var is not None and not _recomputing():
        n = x.numel() // x.shape[1] * dp.world_size
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
            running_mean.copy_(factor * mean + (1 - factor) * running_mean)
            running_var.copy_(factor * (squares / (n - 1)) + (1 - factor) * running_var)
    return y


# ------------------------------------------------------------------------------- finding them
def _aten_batch_norm() -> object | None:
    packet = getattr(torch.ops.aten, "batch_norm", None)
    return packet.default if packet is not None else None


def _bound(node: torch.fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


_F_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None}


def _uses_batch_stats(node: torch.fx.Node, gm: torch.fx.GraphModule) -> dict | None:
    """The BatchNorm's arguments (as :func:`batch_norm`'s names) when ``node`` normalises with batch
    statistics; None for anything else (eval-mode BatchNorm included)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return None
        if not (mod.training or (mod.running_mean is None and mod.running_var is None)):
            return None
        return {"module": mod, "x": node.args[0] if node.args else node.kwargs["input"]}
    if node.op != "call_function":
        return None
    if node.target is F.batch_norm:  # also the tensor-parallel normalisation's form of nn.BatchNorm*d
        args = _bound(node, _F_ARGS, {**_DEFAULTS, "training": False, "momentum": 0.1, "eps": 1e-5})
    elif node.target is _aten_batch_norm():
        args = _bound(node, _ATEN_ARGS, {})
    else:
        return None
    training = args["training"]
    if isinstance(training, torch.fx.Node) and training.op == "get_attr":
        # The tensor-parallel normalisation reads the module's own flag: ``<path>.training``.
        training = _resolve(gm, str(training.target))
    return args if training is True else None


def _resolve(root: nn.Module, target: str) -> object:
    obj: object = root
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return obj


def _path(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        path = str(node.target)
    else:
        paths = module_paths(node)
        path = paths[-1] if paths else node.name
    return path[len(MODEL_PREFIX) :] if path.startswith(MODEL_PREFIX) else path


def batch_statistics_modules(gm: torch.fx.GraphModule) -> list[str]:
    """Module paths of the BatchNorms of ``gm`` that normalise with batch statistics."""
    found = [_path(n) for n in gm.graph.nodes if _uses_batch_stats(n, gm) is not None]
    return list(dict.fromkeys(found))


def whole_batch_refusal(what: str, plan: Plan, otherwise: str) -> PlanError:
    """The error for a statistic of the whole batch (``what``: which, and that it needs the whole
    batch) under a plan that splits each replica's batch into micro-batches; ``otherwise``: the
    user's other way out besides one micro-batch per replica."""
    return PlanError(
        f"{what}, but this plan ({plan.summary()}) runs {plan.num_micro_batches} micro-batches of "
        f"{plan.micro_batch_size} samples per data-parallel replica and no micro-batch sees the whole "
        f"batch. Use micro_batch_size={plan.global_batch // plan.dp} (global_batch/dp: one micro-batch "
        f"per replica), or {otherwise}"
    )


def check_plan(gm: torch.fx.GraphModule, plan: Plan, policy: str) -> list[str]:
    """The BatchNorms of ``gm`` using batch statistics; raises :class:`PlanError` when ``plan``
    cannot give them the whole batch under ``policy="sync"``, warns under ``"local"`` when the
    statistics are not the whole batch's."""
    if policy not in POLICIES:
        raise PlanError(f"batchnorm={policy!r}: choose 'sync' (one device's statistics) or 'local'")
    modules = batch_statistics_modules(gm)
    m = plan.num_micro_batches
    if not modules or (plan.dp == 1 and m == 1):
        return modules
    names = _names(modules)
    if policy == "sync" and m > 1:
        raise whole_batch_refusal(
            f"BatchNorm {names} normalises with the statistics of the whole batch",
            plan,
            "batchnorm='local' (statistics per replica and micro-batch: the model's maths changes)",
        )
    if policy == "local":
        log.warning(
            "batchnorm='local': BatchNorm %s normalises with the statistics of %d samples (one "
            "micro-batch of one data-parallel replica), not of the global batch of %d as on one "
            "device; outputs, gradients and running statistics differ from the single-device "
            "model. Use batchnorm='sync' with one micro-batch per replica for one device's maths",
            names,
            plan.micro_batch_size,
            plan.global_batch,
        )
    return modules


def _names(modules: list[str], limit: int = 6) -> str:
    shown = ", ".join(modules[:limit])
    return shown + (f" and {len(modules) - limit} more" if len(modules) > limit else "")


# ------------------------------------------------------------------------------- rewriting
def apply(stages: Iterable[nn.Module], dp: DPStats, *, always: bool = False) -> int:
    """Rewrite every batch-statistics BatchNorm inside ``stages`` into :func:`batch_norm` over
    ``dp``; returns how many. With ``dp.world_size == 1`` only when ``always`` (recompute: the
    running statistics must not be updated twice). In place."""
    if dp.world_size == 1 and not always:
        return 0
    count = 0
    for stage in stages:
        for gm in [m for m in stage.modules() if isinstance(m, torch.fx.GraphModule)]:
            count += _rewrite(gm, dp)
    return count


def _rewrite(gm: torch.fx.GraphModule, dp: DPStats) -> int:
    found = [(n, a) for n in gm.graph.nodes if (a := _uses_batch_stats(n, gm)) is not None]
    if not found:
        return 0
    ctx = attach_context(gm, CTX_ATTR, dp)
    for node, args in found:
        with gm.graph.inserting_before(node):
            call_args, kwargs = _call_module(gm, node, args) if "module" in args else _call_function(gm, args)
            new = gm.graph.call_function(batch_norm, call_args, {**kwargs, "dp": ctx})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(found)


def attach_context(gm: torch.fx.GraphModule, attr: str, dp: DPStats) -> torch.fx.Node:
    """Set ``gm.<attr> = dp`` and return a ``get_attr`` node reading it (before the first op)."""
    setattr(gm, attr, dp)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not a tensor or module: a handle, read as is
        return gm.graph.get_attr(attr)


def _call_module(gm: torch.fx.GraphModule, node: torch.fx.Node, args: dict) -> tuple[tuple, dict]:
    mod, target = args["module"], str(node.target)

    def attr(name: str) -> torch.fx.Node | None:
        return gm.graph.get_attr(f"{target}.{name}") if getattr(mod, name, None) is not None else None

    # nn.BatchNorm's own rule: the buffers are updated in training only when it tracks them.
    track = not mod.training or mod.track_running_stats
    rm, rv = (attr("running_mean"), attr("running_var")) if track else (None, None)
    nbt = attr("num_batches_tracked") if mod.training and mod.track_running_stats else None
    kwargs = {"momentum": mod.momentum, "eps": mod.eps, "num_batches_tracked": nbt}
    return (args["x"], rm, rv, attr("weight"), attr("bias")), kwargs


def _call_function(gm: torch.fx.GraphModule, args: dict) -> tuple[tuple, dict]:
    nbt = args.get("num_batches_tracked")
    if nbt is None:
        nbt = _take_counter(gm, args["running_mean"])
    kwargs = {"momentum": args["momentum"], "eps": args["eps"], "num_batches_tracked": nbt}
    return (args["input"], args["running_mean"], args["running_var"], args["weight"], args["bias"]), kwargs


def _take_counter(gm: torch.fx.GraphModule, running_mean: object) -> torch.fx.Node | None:
    """The ``num_batches_tracked`` of an exported BatchNorm, its separate ``add_(1)`` removed: the
    counter is then advanced with the statistics, once per forward."""
    if not (isinstance(running_mean, torch.fx.Node) and running_mean.op == "get_attr"):
        return None
    target = str(running_mean.target).rsplit(".", 1)
    if len(target) != 2 or target[1] != "running_mean":
        return None
    counter = f"{target[0]}.num_batches_tracked"
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == counter:
            for user in list(node.users):
                if user.op == "call_function" and user.target in _ADDS and not user.users:
                    gm.graph.erase_node(user)
            return node
    return None


_ADDS = {torch.ops.aten.add_.Tensor, torch.ops.aten.add_.Scalar, operator.iadd}


# ------------------------------------------------------------------------------- state
def buffer_slots(program: RankProgram) -> list[ParamSlot]:
    """Where each buffer of this rank's stages lives (BatchNorm statistics change in training), by
    its name in the traced graph, with its tensor-parallel shard if the lowering split it."""
    by_id = {id(b): name for name, b in program.lowered.gm.named_buffers()}
    full_names = program.lowered.gm.meta.get("autopar_full_names", {})
    shards = {**getattr(program.lowered, "buffer_shards", {}), **program.lowered.shards}
    slots, seen = [], set()
    for stage in program.stages:
        for module in stage.modules():
            for attr, buf in module.named_buffers(recurse=False):
                local = by_id.get(id(buf))
                if local is None or local in seen:
                    continue
                seen.add(local)
                shard = shards.get(local, Shard())
                slots.append(ParamSlot(full_names.get(local, local), module, attr, shard))
    return slots

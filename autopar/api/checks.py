"""What ``autopar.compile`` checks before anything runs, and the planner's plan when none is given.

Arguments (:func:`check_replan`, :func:`check_optimizer`, :func:`num_devices`), example inputs
(:func:`check_sequence_length`, :func:`first_samples`), the traced loss (:func:`check_scalar_loss`)
and, at run time, index errors inside the model (:func:`explain_index_errors`): each raises a typed
error naming the value seen and the fix. :func:`non_finite_grads` finds the parameters with
non-finite gradients for ``nan_check="grads"``. :func:`plan_with_planner` asks the planner for
``compile(plan=None)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopar.cluster import Cluster
from autopar.core.errors import InputError, PlanError
from autopar.core.plan import Plan
from autopar.lower.program import ParamSlot
from autopar.runtime.failure import root_cause
from autopar.runtime.groups import DEFAULT_TIMEOUT_S, init_from_env
from autopar.tracing.wrap import split_inputs


def num_devices(cluster: Cluster | int) -> int:
    if isinstance(cluster, int):
        return cluster
    n = getattr(cluster, "num_devices", None)
    if callable(n):
        n = n()
    if not isinstance(n, int):
        raise PlanError(f"cluster {cluster!r} has no device count; pass an autopar.Cluster or an int")
    return n


def check_replan(after: int | None, threshold: float, cluster: Cluster | int, mode: str) -> None:
    if after is None:
        return
    if isinstance(after, bool) or not isinstance(after, int) or after < 1:
        raise InputError(
            f"replan_after={after!r}: the number of measured steps before re-planning (int >= 1)"
        )
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
        raise InputError(
            f"replan_threshold={threshold!r}: a relative error >= 0 (0.25: 25% off the prediction)"
        )
    if isinstance(cluster, int) or mode != "train":
        raise InputError(
            "replan_after re-plans a training run with the planner, which needs mode='train' and an "
            f"autopar.Cluster (got {'the device count ' + str(cluster) if isinstance(cluster, int) else mode!r}); "
            f"pass autopar.Cluster.local(ranks=...)"
        )


def check_optimizer(optimizer: Any) -> None:
    """An optimizer *instance* cannot be used: its parameters are the unsharded model's, while
    each rank must optimise its own shards, so the optimizer is built after lowering."""
    if optimizer is None or (callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer)):
        return
    raise InputError(
        f"optimizer: expected a factory callable(params) -> torch.optim.Optimizer, got an instance of "
        f"{type(optimizer).__name__}; each rank builds its optimizer over its own shards, so pass a "
        "factory, e.g. functools.partial(torch.optim.AdamW, lr=...) or lambda params: "
        "torch.optim.AdamW(params, lr=...)"
    )


_POSITION_LIMITS = ("seq", "n_positions", "block_size")
"""Config fields that size a learned position table (autopar's GPT, GPT-2, nanoGPT): a longer
input indexes past its end, an ``IndexError`` in the first step instead of a message here."""


def check_sequence_length(
    model: nn.Module, example_inputs: Any, loss_fn: Callable | None, num_targets: int | None
) -> None:
    config = getattr(model, "config", None)
    limits = [(k, getattr(config, k, None)) for k in _POSITION_LIMITS]
    limits = [(k, v) for k, v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    if not limits:
        return
    field, limit = limits[0]
    inputs, _ = split_inputs(example_inputs, loss_fn, num_targets)
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point() and t.shape[1] > limit:
            raise InputError(
                f"example_inputs[{i}] has shape {list(t.shape)}: sequence length {t.shape[1]} (dim 1) "
                f"exceeds the model's config.{field}={limit} (the length of its position table); "
                f"pass sequences of at most {limit} tokens or build the model with {field}>={t.shape[1]}"
            )


def plan_with_planner(
    model: nn.Module,
    cluster: Cluster | int,
    example_inputs: Sequence[Any],
    loss_fn: Callable | None,
    num_targets: int | None,
    global_batch: int,
    mode: str,
    profile: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Plan:
    """The planner's plan, the same on every rank (:func:`autopar.runtime.replan.plan_in_job`:
    under torchrun the running ranks measure the layout, nothing is spawned)."""
    if isinstance(cluster, int):
        raise PlanError(
            "autopar.compile without a plan asks the planner, which needs an autopar.Cluster (got the "
            f"device count {cluster}); pass autopar.Cluster.local(ranks={cluster}) or "
            f"plan=autopar.Plan.manual(dp=..., tp=..., pp=..., global_batch={global_batch})"
        )
    from autopar.estimator import local
    from autopar.runtime.replan import plan_in_job  # lazy: loads the estimator

    init_from_env(timeout_s)  # under torchrun: plan with the job's ranks, never spawn more
    if profile is None:
        profile = local.is_local(cluster)
    return plan_in_job(
        model,
        cluster,
        example_inputs=example_inputs,
        loss_fn=loss_fn,
        num_targets=num_targets,
        global_batch=global_batch,
        mode=mode,
        profile=bool(profile),
    )


def check_scalar_loss(gm: torch.fx.GraphModule, loss_fn: Callable | None) -> None:
    """Training needs one number to differentiate; a per-sample or per-token loss would fail in
    backward (``grad can be implicitly created only for scalar outputs``)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    meta = value.meta.get("tensor_meta") if isinstance(value, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None or math.prod(shape) == 1:
        return
    source = "loss_fn" if loss_fn is not None else "the model (train mode without loss_fn)"
    raise InputError(
        f"{source} returned a tensor of shape {list(shape)} (at the micro-batch size); the loss must "
        "be a scalar: reduce it, e.g. .mean() or reduction='mean'"
    )


@contextlib.contextmanager
def explain_index_errors(batch: tuple) -> Iterator[None]:
    """An ``IndexError`` from an embedding lookup (``index out of range in self``) says nothing of
    which input was out of range; name the inputs, their shapes and largest ids."""
    try:
        yield
    except Exception as exc:
        cause = root_cause(exc)
        if not isinstance(cause, IndexError):
            raise
        seen = [
            f"batch[{i}] shape {list(t.shape)} {t.dtype}"
            + (f" max {int(t.max())}" if not t.is_floating_point() and t.numel() else "")
            for i, t in enumerate(batch)
            if isinstance(t, torch.Tensor)
        ]
        raise InputError(
            f"an index lookup inside the model failed ({type(cause).__name__}: {cause}): an id at "
            "least the size of an embedding table (token id >= vocab) or a sequence longer than the "
            f"position table; the batch: {'; '.join(seen)}"
        ) from exc


def non_finite_grads(
    slots: list[ParamSlot], key_to_traced: dict[str, str], device: torch.device
) -> list[str]:
    """Original names of the parameters with a non-finite gradient, over all ranks (``slots``: this
    rank's parameter slots; ``key_to_traced``: original state-dict key -> traced name; collective
    when torch.distributed is initialised)."""
    original = {traced: key for key, traced in key_to_traced.items()}
    local = []
    for slot in slots:
        grad = slot.tensor().grad
        if grad is None:
            continue
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        if not bool(torch.isfinite(grad).all()):
            local.append(original.get(slot.full_name, slot.full_name))
    if not dist.is_initialized():
        return local
    flag = torch.tensor([float(bool(local))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return []
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return list(dict.fromkeys(name for part in parts for name in part))


def first_samples(batch: tuple, n: int) -> tuple:
    sizes = {t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim() > 0}
    if sizes and min(sizes) < n:
        raise PlanError(
            f"example_inputs hold {min(sizes)} samples but a micro-batch has {n}; pass at least "
            "micro_batch_size samples (the graph is traced at the micro-batch shape)"
        )
    # Clones: two example inputs that are one tensor (labels=input_ids) would trace as aliases.
    return tuple(t[:n].clone() if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in batch)

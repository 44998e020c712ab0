"""Autograd-aware tensor-parallel collectives, callable from fx graph nodes.

Each forward collective has a deliberately chosen backward (the Megatron pairs). The invariant
that makes the pairs right: on every rank, the gradient of a replicated tensor is the *complete*
gradient, of a sharded tensor the rank's slice of it, of a partial sum the complete gradient of
the sum.

=========================  ====================  =====================  ==========================
function                   forward               backward               used for
=========================  ====================  =====================  ==========================
``autopar_all_reduce``     all-reduce (sum)      identity               P -> R (row-parallel out)
``autopar_copy_to_tp``     identity              all-reduce (sum)       R feeding sharded work
``autopar_all_gather``     all-gather along d    reduce-scatter         S -> R feeding sharded work
                                                                        (sequence parallel)
``autopar_gather``         all-gather along d    slice (keep own part)  S -> R feeding replicated work
``autopar_reduce_scatter`` reduce-scatter on d   all-gather             P -> S (sequence parallel)
``autopar_split``          slice (keep own part) all-gather             R -> S
=========================  ====================  =====================  ==========================

``torch.distributed.nn.functional.all_reduce`` all-reduces the gradient too, which is right for
none of the uses above (it doubled row-parallel gradients on 2 ranks); it is not used.

The process group is never a module global: every call receives a :class:`TPContext`, which the
lowered graph module holds as its attribute ``autopar_tp`` and reads with a ``get_attr`` node.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from autopar.core.errors import RuntimeFailure
from autopar.sharding.reshard import BACKWARD_OF


def _all_gather_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # torch 2.13 renamed the tensor forms (the old names warn); torch < 2.13 has only the old ones.
    # Looked up per call, not bound at import: a wrapper put on torch.distributed sees every call.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


class TPContext:
    """This rank's tensor-parallel group: ``group`` (None for a dry lowering), ``rank``, ``world_size``."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.comm_s = 0.0
        """Wall seconds this rank has spent in the tensor-parallel collectives (forward and
        backward) since the module was lowered: the runtime's measured ``tp_comm``."""

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Adds the wall time of the block to :attr:`comm_s`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.comm_s += time.perf_counter() - t0

    def require_group(self, what: str) -> dist.ProcessGroup | None:
        if self.group is None and self.world_size > 1:
            raise RuntimeFailure(
                f"{what} needs a process group, but this module was lowered dry (tp_group=None, "
                "for rank_code); lower it again with the tensor-parallel group to run it"
            )
        return self.group

    # A process group cannot be copied or pickled; the context is a handle, shared by copies.
    def __deepcopy__(self, memo: dict) -> TPContext:
        return self

    def __reduce__(self) -> tuple[type[TPContext], tuple[None, int, int]]:
        return (TPContext, (None, self.rank, self.world_size))

    def __repr__(self) -> str:
        return f"TPContext(rank={self.rank}, world_size={self.world_size}, dry={self.group is None})"


def _all_reduce(x: torch.Tensor, tp: TPContext, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    out = x.contiguous().clone()
    if tp.world_size > 1:
        with tp.timed():
            dist.all_reduce(out, op=op, group=tp.require_group("all_reduce"))
    return out


def _all_gather(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((tp.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    with tp.timed():
        _all_gather_into(out, x, tp.require_group("all_gather"))
    return out if dim == 0 else torch.cat(out.chunk(tp.world_size, dim=0), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    # reduce_scatter_tensor scatters along dim 0: lay the chunks of ``dim`` out one after another.
    chunks = x.chunk(tp.world_size, dim=dim)
    stacked = torch.cat(chunks, dim=0).contiguous() if dim != 0 else x.contiguous()
    out = torch.empty(chunks[0].shape, dtype=x.dtype, device=x.device)
    with tp.timed():
        _reduce_scatter_into(out, stacked, tp.require_group("reduce_scatter"))
    return out


def _split(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    size = x.shape[dim] // tp.world_size
    return x.narrow(dim, tp.rank * size, size).contiguous()


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.tp), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TPContext, grad_reduce: bool) -> torch.Tensor:
        ctx.dim, ctx.tp, ctx.grad_reduce = dim, tp, grad_reduce
        return _all_gather(x, dim, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.grad_reduce:
            return _reduce_scatter(grad, ctx.dim, ctx.tp), None, None, None
        return _split(grad, ctx.dim, ctx.tp), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return _reduce_scatter(x, dim, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.tp), None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return _split(x, dim, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.tp), None, None


def autopar_all_reduce(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Sum a partial tensor over the tp group (forward); pass the gradient through (backward)."""
    return _AllReduce.apply(x, tp)


def autopar_copy_to_tp(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Identity (forward); sum the partial gradients of a replicated input (backward)."""
    return _CopyToTP.apply(x, tp)


def autopar_all_gather(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    """Gather shards along ``dim`` (forward); reduce-scatter the partial gradient (backward)."""
    return _AllGather.apply(x, dim, tp, True)


def autopar_gather(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    """Gather shards along ``dim`` (forward); keep this rank's slice of the full gradient (backward)."""
    return _AllGather.apply(x, dim, tp, False)


def autopar_reduce_scatter(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    """Sum a partial tensor and keep this rank's slice along ``dim`` (forward); all-gather (backward)."""
    return _ReduceScatter.apply(x, dim, tp)


def autopar_split(x: torch.Tensor, dim: int, tp: TPContext) -> torch.Tensor:
    """Keep this rank's slice of a replicated tensor along ``dim`` (forward); all-gather (backward)."""
    return _Split.apply(x, dim, tp)


def all_reduce_max(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Element-wise max over the tp group, no gradient (the stabilising max of a softmax)."""
    return _all_reduce(x.detach(), tp, dist.ReduceOp.MAX)


def all_reduce_sum_no_grad(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Sum over the tp group, no gradient (the softmax denominator of the vocabulary-parallel loss)."""
    return _all_reduce(x.detach(), tp)


COLLECTIVES = {
    "autopar_all_reduce": autopar_all_reduce,
    "autopar_copy_to_tp": autopar_copy_to_tp,
    "autopar_all_gather": autopar_all_gather,
    "autopar_gather": autopar_gather,
    "autopar_reduce_scatter": autopar_reduce_scatter,
    "autopar_split": autopar_split,
}
"""Name -> function of every collective the lowering inserts (as it appears in generated code)."""

LOWERED = {
    "all_reduce": autopar_all_reduce,
    "split": autopar_split,
    "all_gather": autopar_all_gather,
    "reduce_scatter": autopar_reduce_scatter,
}
"""Resharding kind (:func:`autopar.sharding.reshard_kind`) -> the function the lowering inserts for it
when the result feeds sharded work. Each one's backward is the collective
:data:`autopar.sharding.reshard.BACKWARD_OF` names (checked on real process groups in the tests)."""

ISSUES: dict[str, tuple[str | None, str | None]] = {
    **{fn.__name__: (None if kind == "split" else kind, BACKWARD_OF[kind]) for kind, fn in LOWERED.items()},
    autopar_copy_to_tp.__name__: (None, "all_reduce"),
    autopar_gather.__name__: ("all_gather", None),
}
"""Collective function -> (the collective its forward issues, the one its backward issues); None:
local work only. Read from :data:`LOWERED` and :data:`~autopar.sharding.reshard.BACKWARD_OF`, plus
the two calls that are not a resharding's own: ``copy_to_tp`` (identity forward, all-reduce of the
partial gradient backward) and ``gather`` (all-gather forward, keep the own slice backward)."""

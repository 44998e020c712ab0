"""Local ops the tensor-parallel rewrite emits in place of single-device ones.

* ``autopar_vocab_embedding``: lookup in this rank's rows of a vocabulary-sharded table; tokens
  outside ``[vocab_start, vocab_end)`` give zeros, so the sum over ranks is the full lookup
  (the rewrite follows it with an all-reduce or reduce-scatter).
* ``autopar_vocab_parallel_cross_entropy``: cross entropy of vocabulary-sharded logits with three
  all-reduces of one number per row (max, sum of exp, target logit) instead of gathering
  ``[N, V]`` logits; backward is local (``softmax - one_hot`` on this rank's columns).
* ``autopar_partial_bias``: the bias of a row-parallel linear, added on tp rank 0 only so the
  partial sums add up to ``x W^T + b``; its gradient is complete on every rank (identity).
* ``autopar_dropout``: torch's dropout drawn at the full (unsharded) shape from the default
  generator, of which this rank keeps its slice: with identically seeded ranks it multiplies by
  exactly the mask one device draws (``empty_like(x).bernoulli_(1 - p)`` then ``div_(1 - p)``,
  torch's CPU dropout).
* ``autopar_global_shape`` / ``autopar_global_size``: ``x.shape`` / ``x.size(d)`` of a sharded
  tensor as the single-device program saw it, so shape arithmetic keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from autopar.lower.collectives import TPContext, all_reduce_max, all_reduce_sum_no_grad


def autopar_vocab_embedding(
    idx: torch.Tensor, weight: torch.Tensor, vocab_start: int, vocab_end: int, padding_idx: int | None = None
) -> torch.Tensor:
    outside = (idx < vocab_start) | (idx >= vocab_end)
    local = (idx - vocab_start).masked_fill(outside, 0)
    pad = (
        padding_idx - vocab_start
        if padding_idx is not None and vocab_start <= padding_idx < vocab_end
        else None
    )
    out = F.embedding(local, weight, pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        vocab_start: int,
        ignore_index: int,
        reduction: str,
        tp: TPContext,
    ) -> torch.Tensor:
        n, v_local = logits.shape
        row_max = all_reduce_max(logits.max(dim=1).values, tp)
        shifted = logits - row_max.unsqueeze(1)
        outside = (target < vocab_start) | (target >= vocab_start + v_local)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        rows = torch.arange(n, device=logits.device)
        target_logit = shifted[rows, local_target].masked_fill(outside, 0.0)
        target_logit = all_reduce_sum_no_grad(target_logit, tp)
        exp = shifted.exp()
        sum_exp = all_reduce_sum_no_grad(exp.sum(dim=1), tp)
        loss = sum_exp.log() - target_logit
        valid = target != ignore_index
        loss = loss.masked_fill(~valid, 0.0)
        count = valid.sum()
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(1)), local_target, outside, valid, count)
        ctx.reduction = reduction
        if reduction == "mean":
            return loss.sum() / count
        if reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_target, outside, valid, count = ctx.saved_tensors
        if ctx.reduction == "mean":
            per_row = (grad / count).expand(valid.shape)
        elif ctx.reduction == "sum":
            per_row = grad.expand(valid.shape)
        else:
            per_row = grad
        per_row = per_row * valid
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local_target] -= (~outside).to(g.dtype)
        return g * per_row.unsqueeze(1), None, None, None, None, None


def autopar_vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    ignore_index: int,
    reduction: str,
    tp: TPContext,
) -> torch.Tensor:
    """Cross entropy of ``[N, V/tp]`` logits (this rank's vocabulary slice) against ``[N]`` targets."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, ignore_index, reduction, tp)


class _PartialBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, b: torch.Tensor, tp_rank: int) -> torch.Tensor:
        return b.clone() if tp_rank == 0 else torch.zeros_like(b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def autopar_partial_bias(b: torch.Tensor, tp_rank: int) -> torch.Tensor:
    return _PartialBias.apply(b, tp_rank)


def autopar_dropout(
    x: torch.Tensor,
    p: float,
    training: bool,
    dim: int | None,
    tp: TPContext,
    layout: tuple[Sequence[int], Sequence[int]] | None = None,
) -> torch.Tensor:
    """``F.dropout(x, p, training)`` of the full tensor, restricted to this rank's slice along ``dim``
    (``dim=None``: ``x`` is replicated or a partial sum, every rank uses the whole mask).

    ``layout``: ``(shape, stride)`` of the single-device input when it was not contiguous; torch
    draws the mask in that memory order (``empty_like``), so the full mask is allocated alike.
    """
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    full = list(x.shape)
    if dim is not None:
        full[dim] *= tp.world_size
    if layout is not None and list(layout[0]) == full:
        noise = torch.empty_strided(full, layout[1], dtype=x.dtype, device=x.device)
    else:
        noise = torch.empty(full, dtype=x.dtype, device=x.device)
    noise.bernoulli_(1 - p)
    noise.div_(1 - p)
    if dim is not None:
        noise = noise.narrow(dim, tp.rank * x.shape[dim], x.shape[dim])
    return x * noise


def autopar_global_shape(x: torch.Tensor, dim: int, num_shards: int) -> torch.Size:
    s = list(x.shape)
    s[dim] *= num_shards
    return torch.Size(s)


def autopar_global_size(
    x: torch.Tensor, dim: int, num_shards: int, query_dim: int | None = None
) -> torch.Size | int:
    if query_dim is None:
        return autopar_global_shape(x, dim, num_shards)
    return x.size(query_dim) * (num_shards if query_dim % x.dim() == dim else 1)


def autopar_local_shape(shape: Sequence[Any], dim: int, num_shards: int) -> list:
    """A (global) shape argument with entry ``dim`` divided by ``num_shards`` (``-1`` kept)."""
    s = list(shape)
    if s[dim] != -1:
        s[dim] = s[dim] // num_shards
    return s

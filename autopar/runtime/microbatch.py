"""Splitting a global batch into this rank's data-parallel share and its micro-batches, and back.

Batch tensors carry the sample dimension first. With global batch ``B``, ``dp`` pipelines and
micro-batches of ``mbs`` samples, data-parallel rank ``d`` owns samples ``[d*B/dp, (d+1)*B/dp)``
and cuts them into ``m = B / (dp * mbs)`` consecutive micro-batches.

Loss semantics: the global loss is the mean over the global batch. A loss that is a mean over its
micro-batch (cross entropy with ``reduction="mean"``, equal tokens per sample) therefore enters the
backward scaled by ``1/m``, and data parallelism averages over ``dp``; the gradients then equal the
single-device full-batch gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from autopar.core.errors import InputError, PlanError


def batch_size_of(batch: Sequence[torch.Tensor]) -> int:
    sizes = {t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise PlanError(
            f"batch tensors disagree on the sample dimension (dim 0 sizes {sorted(sizes)}); "
            "every input and target must have the samples first"
        )
    return sizes.pop()


def check_batch(
    batch: Sequence,
    names: Sequence[str],
    traced: Sequence[Any],
    sizes: Sequence[int],
    what: str = "step()",
) -> None:
    """Check a batch against the traced example before running: a wrong count, feature size or
    dtype would otherwise fail deep inside torch (``mat1 and mat2 shapes cannot be multiplied``)
    or, worse, on one rank only, hanging its peers in the next collective.

    ``names``: the traced inputs then targets; ``traced``: their example values (micro-batch
    shape); ``sizes``: the sample counts accepted in dim 0 (the global batch, a dp share)."""
    if len(batch) != len(names):
        raise InputError(
            f"{what} got {len(batch)} tensor(s) but the model was compiled for {len(names)}: "
            f"({', '.join(names)}), the inputs then the loss targets, in the order of example_inputs"
        )
    accepted = " or ".join(str(n) for n in sorted(set(sizes), reverse=True))
    for i, (name, given, example) in enumerate(zip(names, batch, traced)):
        if not isinstance(example, torch.Tensor) or example.dim() == 0:
            continue
        if not isinstance(given, torch.Tensor):
            raise InputError(
                f"{what} batch[{i}] ({name}): expected a tensor of shape "
                f"[{accepted}, {', '.join(map(str, example.shape[1:]))}], got {type(given).__name__}"
            )
        want = tuple(example.shape[1:])
        if given.dim() != example.dim() or tuple(given.shape[1:]) != want or given.shape[0] not in sizes:
            shape = ", ".join(["B", *map(str, want)])
            raise InputError(
                f"{what} batch[{i}] ({name}): expected shape [{shape}] with B = {accepted} "
                f"(as traced from example_inputs), got {list(given.shape)}; every dimension but the "
                "first (samples) must equal the example's: re-compile with an example of this shape"
            )
        if given.dtype.is_floating_point != example.dtype.is_floating_point:
            raise InputError(
                f"{what} batch[{i}] ({name}): expected dtype {example.dtype} as in example_inputs, "
                f"got {given.dtype}"
            )


def data_parallel_share(batch: Sequence, global_batch: int, dp: int, dp_index: int) -> tuple:
    """This dp rank's slice of ``batch``; a batch already of size ``global_batch/dp`` is kept."""
    n = batch_size_of(batch)
    share = global_batch // dp
    if n == share and dp > 1 and n != global_batch:
        return tuple(batch)
    if n != global_batch:
        raise PlanError(
            f"step() got a batch of {n} samples; the plan's global batch is {global_batch} "
            f"(or pass this data-parallel rank's {share} samples)"
        )
    lo = dp_index * share
    return tuple(t[lo : lo + share] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in batch)


def split_micro_batches(batch: Sequence, num_micro_batches: int) -> list[tuple]:
    """``num_micro_batches`` equal, consecutive chunks of every tensor of ``batch``."""
    n = batch_size_of(batch)
    if n % num_micro_batches:
        raise PlanError(f"{n} samples do not split into {num_micro_batches} equal micro-batches")
    size = n // num_micro_batches
    return [
        tuple(
            t[i * size : (i + 1) * size] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in batch
        )
        for i in range(num_micro_batches)
    ]


def merge_micro_batches(outputs: Sequence) -> Any:
    """Concatenate per-micro-batch outputs along the sample dim (tuples/dicts element-wise)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return first if len(outputs) == 1 and first.dim() == 0 else torch.cat(list(outputs), dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(merge_micro_batches([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        merged = {k: merge_micro_batches([o[k] for o in outputs]) for k in first}
        try:  # keep the output class (HuggingFace ModelOutput)
            return type(first)(**merged)
        except TypeError:
            return merged
    return first

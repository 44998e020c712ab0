"""Deterministic dropout: every rank draws exactly the mask one device draws over the whole batch.

torch's dropout draws from a per-process generator, so a mask depends on how the batch is split
(data parallel, micro-batches) and on what ran before on that rank (pipeline stages). Here a mask
element is a pure function of::

    (seed, site, sample id, index of the element within its sample's global shape)

* ``site``: CRC32 of the dropout module's path (``layers.0.attn.attn_dropout``), the same in the
  traced graph and in the eager model;
* ``sample id``: the sample's index in the global batch plus ``step * global_batch`` (an int64
  input of the compiled graph, split with the batch like any input);
* the element index is the *global* one: a tensor sharded along one dim (attention heads across
  tensor-parallel ranks, the sequence under sequence parallelism) gives its shard ``(dim, index,
  num_shards)`` and the index is offset accordingly.

The single-device reference uses the same function through :func:`make_deterministic`, so
"the same mask as on one device" is checked exactly, not statistically. The counter hash is a
32-bit integer mixer (lowbias32, Chris Wellons) in int64 arithmetic; 24 bits give the uniform.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF
_sample_ids: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("sample_ids", default=None)


def site_id(path: str) -> int:
    """Stable id of a dropout site from its module path (without the tracer's ``model.`` prefix)."""
    return zlib.crc32(path.encode())


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _element_index(
    local_rest: tuple[int, ...],
    sample_shape: tuple[int, ...],
    shard: tuple[int, int, int] | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Global flat index within a sample of every local element (shape ``local_rest``)."""
    offsets = [0] * len(sample_shape)
    if shard is not None:
        dim, index, num_shards = shard
        offsets[dim - 1] = index * (sample_shape[dim - 1] // num_shards)
    for d, (n_local, n_global) in enumerate(zip(local_rest, sample_shape)):
        if offsets[d] + n_local > n_global or (shard is None and n_local != n_global):
            raise ValueError(
                f"dropout: local sample shape {tuple(local_rest)} does not fit the global sample shape "
                f"{tuple(sample_shape)} with shard={shard}; a sharded dropout input needs "
                "shard=(dim, index, num_shards)"
            )
    idx = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for d in range(len(sample_shape) - 1, -1, -1):
        ar = torch.arange(local_rest[d], dtype=torch.int64, device=device) + offsets[d]
        view = [1] * len(sample_shape)
        view[d] = local_rest[d]
        idx = idx + ar.view(view) * stride
        stride *= sample_shape[d]
    return idx


def keep_mask(
    sample_ids: torch.Tensor,
    local_shape: Sequence[int],
    *,
    p: float,
    site: int,
    sample_shape: Sequence[int],
    shard: tuple[int, int, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Boolean keep-mask of shape ``local_shape`` (dim 0 = samples, ids in ``sample_ids``)."""
    local_shape, sample_shape = tuple(local_shape), tuple(sample_shape)
    if local_shape[0] != sample_ids.numel():
        raise ValueError(f"dropout: {sample_ids.numel()} sample ids for a batch of {local_shape[0]}")
    idx = _element_index(local_shape[1:], sample_shape, shard, sample_ids.device)
    key = _mix32(torch.tensor((seed * 0x9E3779B1) ^ site, dtype=torch.int64))
    per_sample = _mix32(_mix32(sample_ids.to(torch.int64) ^ key.to(sample_ids.device)) + 0x632BE5AB)
    per_sample = per_sample.view(-1, *([1] * len(sample_shape)))
    h = _mix32((per_sample * 0x2545F491) ^ _mix32(idx + 0x68E31DA4))
    uniform = (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return uniform >= p


def dropout(
    x: torch.Tensor,
    sample_ids: torch.Tensor,
    *,
    p: float,
    site: int,
    sample_shape: Sequence[int],
    shard: tuple[int, int, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``x * mask / (1 - p)`` with the deterministic mask (see the module docstring)."""
    if p <= 0.0:
        return x
    with torch.no_grad():
        mask = keep_mask(
            sample_ids, x.shape, p=p, site=site, sample_shape=sample_shape, shard=shard, seed=seed
        )
    return x * mask.to(x.dtype) * (1.0 / (1.0 - p))


# ------------------------------------------------------------------ the eager single-device reference
@contextlib.contextmanager
def sample_ids(ids: torch.Tensor) -> Iterator[None]:
    """Sample ids seen by :class:`DeterministicDropout` modules inside the block."""
    token = _sample_ids.set(ids)
    try:
        yield
    finally:
        _sample_ids.reset(token)


class DeterministicDropout(nn.Module):
    """Eager stand-in for ``nn.Dropout`` drawing the same mask as the compiled graph."""

    def __init__(self, p: float, site: int, seed: int = 0):
        super().__init__()
        self.p, self.site, self.seed = p, site, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        ids = _sample_ids.get()
        if ids is None:
            raise RuntimeError("DeterministicDropout needs sample ids: run inside rng.sample_ids(ids)")
        return dropout(x, ids, p=self.p, site=self.site, sample_shape=x.shape[1:], seed=self.seed)


def make_deterministic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every ``nn.Dropout`` of ``model`` (in place) by :class:`DeterministicDropout`."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                path = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, DeterministicDropout(child.p, site_id(path), seed))
    return model


def sample_ids_for_step(
    step: int, global_batch: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Ids of the samples of a global batch at optimizer step ``step``."""
    start = step * global_batch
    return torch.arange(start, start + global_batch, dtype=torch.int64, device=device)


def expected_keep_fraction_ok(mask: torch.Tensor, p: float, sigmas: float = 5.0) -> bool:
    """Whether the keep fraction of ``mask`` is within ``sigmas`` binomial std devs of ``1 - p``."""
    n = mask.numel()
    std = math.sqrt(p * (1 - p) / n)
    return abs(mask.float().mean().item() - (1 - p)) <= sigmas * std

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
import functools
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sample_ids: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    p: float,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    site: int,
    seed: int = 0,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` in training with ``dropout_p=p``, as explicit ops whose
    dropout is :func:`dropout`: the fused kernel draws its mask from the process generator, per
    local head and micro-batch. The compiler writes the same ops into the graph
    (:func:`autopar.lower.passes.replace_dropout`); this is the one-device reference's form."""
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
    scores = query @ key.transpose(-2, -1)
    scores = scores * attention_scale(query.size(-1), scale)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    probs = dropout(probs, sample_ids, p=p, site=site, sample_shape=probs.shape[1:], seed=seed)
    return probs @ value


def attention_scale(head_dim: int, scale: float | None) -> float:
    """SDPA's default scale ``1/sqrt(head_dim)``, one expression for the graph and the reference."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
"""``F.scaled_dot_product_attention``'s arguments in order."""


def site_path(path: str, kind: str, index: int, in_dropout_module: bool) -> str:
    """The site name of a dropout drawn at module ``path``: the path itself inside an
    ``nn.Dropout``, else ``<path>:<kind><index>`` (``kind`` ``dropout`` for a functional dropout,
    ``attention`` for SDPA's; ``index`` counts that kind's draws in the module, in call order)."""
    return path if in_dropout_module else f"{path}:{kind}{index}"


class _Sites:
    """Eager side of the site names: the innermost running module and the draws made in it."""

    def __init__(self, model: nn.Module, seed: int):
        self.model, self.seed = model, seed
        self.stack: list[tuple[str, nn.Module]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.mode: _DeterministicMode | None = None

    def enter(self, path: str, module: nn.Module, *_: Any) -> None:
        if not self.stack:
            self.counts.clear()
            if self.model.training:
                self.mode = _DeterministicMode(self)
                self.mode.__enter__()
        self.stack.append((path, module))

    def exit(self, path: str, *_: Any) -> None:
        if self.stack and self.stack[-1][0] == path:
            self.stack.pop()
        if not self.stack and self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(None, None, None)

    def next_site(self, kind: str) -> int:
        path, module = self.stack[-1] if self.stack else ("", None)
        n = self.counts.get((path, kind), 0)
        self.counts[(path, kind)] = n + 1
        return site_id(site_path(path, kind, n, isinstance(module, nn.Dropout)))


def _require_ids() -> torch.Tensor:
    ids = _sample_ids.get()
    if ids is None:
        raise RuntimeError("deterministic dropout needs sample ids: run inside rng.sample_ids(ids)")
    return ids


class _DeterministicMode(TorchFunctionMode):
    """Functional dropouts and SDPA's ``dropout_p`` of a deterministic model, drawn by
    :func:`dropout` (``nn.Dropout`` modules are replaced outright)."""

    def __init__(self, sites: _Sites):
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = {**dict(zip(SDPA_ARGS, args)), **kwargs}
            p = float(bound.pop("dropout_p", 0.0) or 0.0)
            if p > 0.0:
                q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
                site = self.sites.next_site("attention")
                return attention(q, k, v, _require_ids(), p=p, site=site, seed=self.sites.seed, **bound)
        elif func is F.dropout or func is torch.dropout:
            names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
            bound = {**dict(zip(names, args)), **kwargs}
            p = float(bound.get("p", 0.5))
            if bound.get("training", bound.get("train", True)) and p > 0.0 and not bound.get("inplace"):
                x = bound["input"]
                site = self.sites.next_site("dropout")
                return dropout(
                    x, _require_ids(), p=p, site=site, sample_shape=x.shape[1:], seed=self.sites.seed
                )
        return func(*args, **kwargs)


def make_deterministic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make ``model`` (in place) draw the compiled graph's dropout masks: every ``nn.Dropout``
    becomes :class:`DeterministicDropout`; functional dropouts and SDPA's ``dropout_p`` (as
    :func:`attention`) draw from :func:`dropout` too while the model runs in training, named by the
    innermost running module as the compiler names them (:func:`site_path`)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                path = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, DeterministicDropout(child.p, site_id(path), seed))
    sites = _Sites(model, seed)
    for name, module in model.named_modules():
        module.register_forward_pre_hook(functools.partial(sites.enter, name, module))
        module.register_forward_hook(functools.partial(sites.exit, name), always_call=True)
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

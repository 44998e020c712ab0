"""``build_model(spec)``: the built-in GPT family by shape, named presets, and user factories.

Spec forms::

    gpt:hidden=H,layers=L,heads=A,vocab=V,seq=S[,ffn=F,kv_heads=K,head_dim=D,qk_norm=0|1,
        norm=layernorm|rmsnorm,act=gelu|swiglu|gelu_tanh,dropout=P,fused_attention=0|1,tie_embeddings=0|1,bias=0|1,
        experts=E,top_k=K,shared_experts=S,capacity_factor=C,moe_ffn=F,aux_coef=A]
                                  experts=E > 0: a mixture-of-experts MLP in every layer
    gpt3-175b                     a preset (``list_models()``); ``gpt:175b`` means ``gpt3-175b``
    gpt3-175b:layers=2,dropout=0  a preset with fields overridden
    path/to/file.py:factory       your own model (see :func:`load_factory`)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from autopar.core.errors import ModelSpecError
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.models.presets import PRESETS

log = logging.getLogger(__name__)

_REQUIRED = ("hidden", "layers", "heads", "vocab", "seq")
_ALIASES = {"fused": "fused_attention", "tie": "tie_embeddings", "kv": "kv_heads"}
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass(kw_only=True)
class BuiltModel:
    """A model with what tracing needs. Unpacks as ``model, example_inputs, loss_fn = built``."""

    name: str
    model: nn.Module
    example_inputs: tuple | None
    """``(model inputs..., loss targets...)`` at ``batch`` samples, on the model's device."""
    loss_fn: Callable | None
    """``loss_fn(output, *targets)``; None when the model returns its own loss."""
    make_inputs: Callable[[int], tuple] | None = None
    """``batch -> example inputs`` at another batch size."""
    config: GPTConfig | None = None
    """The GPT shape for built-in specs; None for user factories."""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.example_inputs, self.loss_fn))


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """None -> bfloat16 on meta (a model at training scale), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "meta" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ModelSpecError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)} or a torch.dtype")


# -- gpt: strings --------------------------------------------------------------------------------


def _config_fields() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(GPTConfig)}


def _convert(key: str, raw: str, spec: str) -> bool | float | int | str:
    kind = _config_fields()[key]
    try:
        if "bool" in str(kind):
            low = raw.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return low in ("1", "true", "yes", "on")
        if "float" in str(kind):
            return float(raw)
        if "int" in str(kind):
            value = float(raw)
            if not value.is_integer():
                raise ValueError(raw)
            return int(value)
        return raw
    except ValueError:
        expected = "a boolean (0/1)" if "bool" in str(kind) else f"a number ({kind})"
        raise ModelSpecError(f"model spec {spec!r}: {key}={raw!r} is not {expected}") from None


def parse_fields(text: str, spec: str) -> dict[str, Any]:
    """``hidden=64,layers=2`` -> ``{"hidden": 64, "layers": 2}``, naming any bad key or value."""
    fields = _config_fields()
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, raw = item.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if not eq or not raw.strip():
            raise ModelSpecError(f"model spec {spec!r}: {item!r} is not key=value")
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ModelSpecError(f"model spec {spec!r}: unknown key {key!r}; known keys: {known}")
        out[key] = _convert(key, raw.strip(), spec)
    return out


def _gpt_config(spec: str) -> tuple[str, GPTConfig]:
    """(name, config) of a ``gpt:`` string or a preset (with optional ``:key=value`` overrides)."""
    head, _, tail = spec.partition(":")
    if head == "gpt" and "=" not in tail:
        alias = f"gpt3-{tail.lower()}"
        if alias in PRESETS:
            return alias, GPTConfig(**PRESETS[alias].config)
        raise ModelSpecError(
            f"model spec {spec!r}: unknown GPT size {tail!r}; known presets: {', '.join(PRESETS)}"
        )
    if head == "gpt":
        fields = parse_fields(tail, spec)
        missing = [k for k in _REQUIRED if k not in fields]
        if missing:
            raise ModelSpecError(
                f"model spec {spec!r}: missing {', '.join(missing)}; a gpt: spec needs "
                "hidden=H,layers=L,heads=A,vocab=V,seq=S"
            )
        return spec, GPTConfig(**fields)
    if head not in PRESETS:
        raise ModelSpecError(
            f"unknown model {head!r}; known presets: {', '.join(PRESETS)}; or use "
            "gpt:hidden=H,layers=L,heads=A,vocab=V,seq=S or path/to/file.py:factory"
        )
    fields = {**PRESETS[head].config, **parse_fields(tail, spec)}
    return spec, GPTConfig(**fields)


def _is_file_spec(spec: str) -> bool:
    path = spec.rsplit(":", 1)[0]
    return path.endswith(".py") or os.sep in path or "/" in path


# -- building ------------------------------------------------------------------------------------


def token_inputs(
    cfg: GPTConfig, seq: int, device: torch.device | str, seed: int = 0
) -> Callable[[int], tuple]:
    """``batch -> (tokens, targets)``: random ids on real devices, zeros on meta."""

    def make(batch: int) -> tuple:
        if torch.device(device).type == "meta":
            z = torch.zeros(batch, seq, dtype=torch.long, device="meta")
            return z, z.clone()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, cfg.vocab, (batch, seq + 1), generator=g)
        return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)

    return make


def build_gpt(
    cfg: GPTConfig, *, device: torch.device | str = "meta", dtype: torch.dtype | str | None = None
) -> GPT:
    """A :class:`GPT` on ``device``; on meta it is built under ``torch.device("meta")`` (no memory)."""
    dt = resolve_dtype(dtype, device)
    with torch.device(device):
        model = GPT(cfg, device=device)
    return model.to(dt) if dt != torch.float32 else model


def _check_batch_seq(batch: int, seq: int | None, cfg: GPTConfig | None, spec: str) -> None:
    if not isinstance(batch, int) or batch < 1:
        raise ModelSpecError(f"batch={batch!r}: must be a positive integer")
    if seq is not None and (not isinstance(seq, int) or seq < 1 or (cfg is not None and seq > cfg.seq)):
        limit = f" up to the model's {cfg.seq}" if cfg is not None else ""
        raise ModelSpecError(f"model {spec!r}: seq={seq!r} must be a positive integer{limit}")


def build_model(
    spec: str | GPTConfig,
    *,
    device: torch.device | str = "meta",
    batch: int = 1,
    seq: int | None = None,
    dtype: torch.dtype | str | None = None,
    **overrides: Any,
) -> BuiltModel:
    """Build a model from a spec string (module docstring) or a :class:`GPTConfig`.

    ``device``: ``"meta"`` (default; nothing is allocated, any size) or a real device (``"cpu"``).
    ``batch``/``seq``: size of ``example_inputs`` (``seq`` defaults to the model's).
    ``dtype``: parameter dtype; default bfloat16 on meta (training-scale analysis), float32 otherwise.
    ``overrides``: GPTConfig fields replacing the spec's (``dropout=0.1``, ``fused_attention=True``).
    Raises :class:`~autopar.core.errors.ModelSpecError` naming the bad part of the spec.
    """
    if isinstance(spec, str) and _is_file_spec(spec):
        if overrides:
            raise ModelSpecError(
                f"model {spec!r}: overrides {sorted(overrides)} only apply to built-in GPT specs"
            )
        _check_batch_seq(batch, seq, None, spec)
        return load_factory(spec, device=device, batch=batch)
    if isinstance(spec, GPTConfig):
        name, cfg = "gpt", spec
    elif isinstance(spec, str):
        name, cfg = _gpt_config(spec.strip())
    else:
        raise ModelSpecError(f"model spec {spec!r}: expected a string or a GPTConfig")
    if overrides:
        bad = sorted(set(overrides) - set(_config_fields()))
        if bad:
            raise ModelSpecError(
                f"model {name!r}: unknown override(s) {bad}; known: {sorted(_config_fields())}"
            )
        cfg = dataclasses.replace(cfg, **overrides)
    _check_batch_seq(batch, seq, cfg, name)
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelSpecError(f"device={device!r} is not a torch device ({e}); use 'meta' or 'cpu'") from None
    model = build_gpt(cfg, device=device, dtype=dtype)
    make = token_inputs(cfg, seq or cfg.seq, device)
    return BuiltModel(
        name=name, model=model, example_inputs=make(batch), loss_fn=gpt_loss, make_inputs=make, config=cfg
    )


# -- user factories ------------------------------------------------------------------------------


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ModelSpecError(
            f"model file {path!r} does not exist (cwd {os.getcwd()}); spec form path/to/file.py:factory"
        )
    mod_name = f"autopar_user_model_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"model file {path!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ModelSpecError(f"model file {path!r} failed to import: {type(e).__name__}: {e}") from e
    return module


def _resize_batch(t: Any, batch: int) -> Any:
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == batch:
        return t
    idx = torch.arange(batch, device=t.device) % t.shape[0]
    return t.index_select(0, idx)


def load_factory(spec: str, *, device: torch.device | str = "meta", batch: int = 1) -> BuiltModel:
    """Call ``factory`` in ``file.py``; it returns a model, ``(model, example_inputs[, loss_fn])``,
    a dict with those keys, or a :class:`BuiltModel`. It receives ``device=`` and ``batch=`` when its
    signature has them. Without ``loss_fn`` the model is expected to return its loss."""
    path, _, factory_name = spec.rpartition(":")
    if not path or not factory_name:
        raise ModelSpecError(f"model spec {spec!r}: expected path/to/file.py:factory")
    module = _import_file(path)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelSpecError(
            f"model file {path!r} has no callable {factory_name!r}; callables there: {names}"
        )
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("device", device), ("batch", batch)) if k in params}
    try:
        result = factory(**kwargs)
    except Exception as e:
        raise ModelSpecError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    return _as_built(spec, result, batch)


def _as_built(spec: str, result: Any, batch: int) -> BuiltModel:
    if isinstance(result, BuiltModel):
        return result
    loss_fn, example, make = None, None, None
    if isinstance(result, nn.Module):
        model = result
    elif isinstance(result, dict):
        model, example, loss_fn = result.get("model"), result.get("example_inputs"), result.get("loss_fn")
        make = result.get("make_inputs")
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], nn.Module):
        model, example = result[0], (result[1] if len(result) > 1 else None)
        loss_fn = result[2] if len(result) > 2 else None
    else:
        model = None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"factory {spec!r} returned {type(result).__name__}; return an nn.Module, "
            "(model, example_inputs, loss_fn) or a dict with those keys"
        )
    if example is not None and not isinstance(example, (tuple, list)):
        example = (example,)
    if make is None and example is not None:
        base = tuple(example)
        make = lambda b: tuple(_resize_batch(t, b) for t in base)  # noqa: E731
    if example is not None:
        example = tuple(_resize_batch(t, batch) for t in example)
    cfg = getattr(model, "config", None)
    return BuiltModel(
        name=spec,
        model=model,
        example_inputs=example,
        loss_fn=loss_fn,
        make_inputs=make,
        config=cfg if isinstance(cfg, GPTConfig) else None,
    )


# -- listing -------------------------------------------------------------------------------------


def count_params(cfg: GPTConfig) -> int:
    """Closed-form parameter count of :class:`GPT` (tied embeddings counted once)."""
    h, f, hd = cfg.hidden, cfg.ffn_resolved, cfg.head_dim_resolved
    q, kv = cfg.heads * hd, cfg.kv_heads_resolved * hd  # q == h unless head_dim is decoupled
    b = 1 if cfg.bias else 0
    attn = h * q + 2 * h * kv + q * h + b * (q + 2 * kv + h) + (2 * hd if cfg.qk_norm else 0)
    mlp = (3 if cfg.act == "swiglu" else 2) * h * f + b * ((2 if cfg.act == "swiglu" else 1) * f + h)
    if cfg.experts:  # router + E routed and S shared SwiGLU experts of width moe_ffn
        moe = cfg.moe_config()
        mlp = h * moe.experts + 3 * h * moe.ffn * (moe.experts + moe.shared_experts)
    norm = h if cfg.norm == "rmsnorm" else 2 * h
    layer = attn + mlp + 2 * norm
    emb = cfg.vocab * h + (0 if cfg.rotary else cfg.seq * h)
    head = 0 if cfg.tie_embeddings else cfg.vocab * h
    return cfg.layers * layer + emb + norm + head


def list_models() -> dict[str, dict[str, Any]]:
    """Preset name -> description, parameter count and shape (JSON-ready), for ``autopar models``.

    Each preset's source (paper, table) is ``PRESETS[name].source``."""
    out = {}
    for name, preset in PRESETS.items():
        cfg = GPTConfig(**preset.config)
        n = count_params(cfg)
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        out[name] = {
            "description": preset.description,
            "params": size,
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "heads": cfg.heads,
            "kv_heads": cfg.kv_heads,
            "ffn": cfg.ffn_resolved,
            "vocab": cfg.vocab,
            "seq": cfg.seq,
            "norm": cfg.norm,
            "act": cfg.act,
            **(
                {"experts": cfg.experts, "top_k": cfg.top_k, "shared_experts": cfg.shared_experts}
                if cfg.experts
                else {}
            ),
        }
    return out

"""Resolve a CLI ``MODEL`` argument into what the commands need: a model on ``meta``, example inputs
at any batch size, its loss, and its layer and head counts.

The model zoo (:func:`autopar.models.build_model`) does the building; this module adapts what it
returns for the CLI commands (``estimate`` now, ``plan`` later) so they share one path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autopar.core.errors import ModelSpecError
from autopar.core.ir import OpGraph
from autopar.tracing import trace


@dataclass(kw_only=True)
class LoadedModel:
    spec: str
    model: Any
    """The ``nn.Module``, on the ``meta`` device for built-in specs."""
    loss_fn: Callable | None
    make_inputs: Callable[[int], tuple]
    """``batch -> example inputs`` (model inputs, then loss targets)."""
    num_layers: int | None
    """Repeated blocks (transformer layers), the pipeline-stage granularity; None until traced
    for a model without a known config (:func:`graph_layers` counts them in the graph)."""
    heads: int | None
    """Attention heads (the tensor-parallel rule); None when unknown."""
    kv_heads: int | None = None
    """Key/value heads under grouped-query attention; None when equal to heads or unknown."""
    seq: int | None
    """Sequence length of the example inputs, when the model has one."""

    def trace(self, batch: int) -> OpGraph:
        """The analysed graph at ``batch`` samples per micro-batch."""
        return trace(self.model, self.make_inputs(batch), loss_fn=self.loss_fn)


def _gpt_config(model: Any) -> Any:
    """The built-in GPT's ``GPTConfig`` (``model.config``), or None for other models."""
    for attr in ("config", "cfg"):
        cfg = getattr(model, attr, None)
        if cfg is not None and all(hasattr(cfg, k) for k in ("layers", "heads", "vocab", "seq")):
            return cfg
    return None


def _config_dims(model: Any) -> tuple[int | None, int | None, int | None]:
    """(layers, heads, seq) from a built-in GPT's config or a HuggingFace ``config``."""
    cfg = _gpt_config(model)
    if cfg is not None:
        return cfg.layers, cfg.heads, cfg.seq
    hf = getattr(model, "config", None)
    if hf is not None:
        return (
            getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layer", None),
            getattr(hf, "num_attention_heads", None) or getattr(hf, "n_head", None),
            getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None),
        )
    return None, None, None


def _token_inputs(seq: int) -> Callable[[int], tuple]:
    """Token ids and next-token targets, both ``(batch, seq)`` int64 on meta."""

    def make(batch: int) -> tuple:
        import torch

        tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        return tokens, torch.zeros(batch, seq, dtype=torch.long, device="meta")

    return make


SIZE_LIMITS = {
    "hidden": 131_072,
    "layers": 1_024,
    "heads": 1_024,
    "kv_heads": 1_024,
    "head_dim": 4_096,
    "ffn": 1_048_576,
    "vocab": 4_194_304,
    "seq": 1_048_576,
    "experts": 65_536,
    "top_k": 65_536,
    "moe_ffn": 1_048_576,
}
"""Largest value of each GPT size field a spec may give (8-32x the largest published models: Llama 3
405B has hidden 16384, 126 layers, 128 heads of width 128, ffn 53248, vocab 128256). Beyond them
tracing would not end (a billion layers are built one by one) or tensor sizes overflow; the limits
are checked before anything is built."""


def check_spec_sizes(spec: str) -> None:
    """Raise :class:`ModelSpecError` naming a size field of a ``gpt:``/preset spec that is below 1 or
    above :data:`SIZE_LIMITS`; file specs and well-formed specs pass (other rules stay in GPTConfig)."""
    from autopar.models.zoo import parse_fields

    head, _, tail = str(spec).strip().partition(":")
    if "=" not in tail or head.endswith(".py") or "/" in head:
        return
    for key, value in parse_fields(tail, spec).items():
        limit = SIZE_LIMITS.get(key)
        if limit is None or not isinstance(value, int):
            continue
        if value < 1:
            raise ModelSpecError(f"model spec {spec!r}: {key}={value} must be a positive integer (>= 1)")
        if value > limit:
            raise ModelSpecError(
                f"model spec {spec!r}: {key}={value:,} exceeds autopar's limit of {limit:,} for {key}; "
                f"give {key} <= {limit:,} (the largest published models are 8-32x smaller)"
            )


def load_model(spec: str, *, seq: int | None = None) -> LoadedModel:
    """Build ``spec`` on ``meta`` and describe it; ``seq`` overrides a built-in GPT's sequence length."""
    try:
        from autopar.models import build_model
    except ImportError as e:
        raise ModelSpecError(f"the model zoo is not available in this build ({e})") from None
    check_spec_sizes(spec)
    built = build_model(spec, device="meta", seq=seq)
    if seq is not None and getattr(built, "config", None) is None:
        raise ModelSpecError(
            f"--seq {seq} applies to built-in GPT models; the factory {spec!r} fixes its own example "
            "inputs (return make_inputs/example_inputs at the sequence length you want)"
        )
    return adapt(spec, built, seq=seq)


def adapt(spec: str, built: Any, *, seq: int | None = None) -> LoadedModel:
    """Adapt a :class:`~autopar.models.BuiltModel` (or a bare built-in GPT) to LoadedModel."""
    model = getattr(built, "model", built)
    layers, heads, model_seq = _config_dims(model)
    loss_fn = getattr(built, "loss_fn", None)
    make_inputs = getattr(built, "make_inputs", None)
    cfg = _gpt_config(model)
    if not callable(make_inputs):
        if cfg is None:
            raise ModelSpecError(
                f"model {spec!r}: cannot build example inputs for it; a factory should return "
                "(model, example_inputs, loss_fn) or a dict with make_inputs (see docs/cli.md)"
            )
        if seq and seq > cfg.seq:
            raise ModelSpecError(f"--seq {seq} exceeds the model's maximum sequence length {cfg.seq}")
        make_inputs = _token_inputs(seq or cfg.seq)
    if loss_fn is None and cfg is not None:
        from autopar.models.gpt import gpt_loss

        loss_fn = gpt_loss
    return LoadedModel(
        spec=spec,
        model=model,
        loss_fn=loss_fn,
        make_inputs=make_inputs,
        num_layers=layers,
        heads=heads,
        kv_heads=_kv_heads(model),
        seq=_example_seq(getattr(built, "example_inputs", None)) or seq or model_seq,
    )


def _example_seq(example_inputs: Any) -> int | None:
    """Dim 1 of the first integer input of rank 2 (token ids ``[batch, seq]``), if any."""
    for t in example_inputs or ():
        dtype = getattr(t, "dtype", None)
        if len(getattr(t, "shape", ())) == 2 and dtype is not None and not dtype.is_floating_point:
            return int(t.shape[1])
    return None


def _kv_heads(model: Any) -> int | None:
    cfg = _gpt_config(model)
    if cfg is not None:
        return getattr(cfg, "kv_heads_resolved", None)
    return getattr(getattr(model, "config", None), "num_key_value_heads", None)


def graph_layers(graph: Any) -> int:
    """Repeated blocks of a traced graph: the largest block type's count (1 without blocks)."""
    counts = [bt.count for bt in getattr(graph, "block_types", {}).values()]
    return max(counts, default=1)

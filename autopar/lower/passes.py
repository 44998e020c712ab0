"""Graph passes the compiler runs on the traced model-with-loss graph before lowering.

``replace_dropout``: every dropout becomes :func:`autopar.lower.rng.dropout` (train mode, p > 0)
reading a new last placeholder ``sample_ids``, or disappears (p == 0, or inference mode). See
:mod:`autopar.lower.rng` for why: with it, every rank draws the mask one device would draw.
A ``scaled_dot_product_attention`` with ``dropout_p > 0`` in training becomes the explicit ops of
:func:`autopar.lower.rng.attention` (scores, softmax, ``rng.dropout``, ``@ v``): the fused kernel
draws its mask from the process generator. The site names are :func:`autopar.lower.rng.site_path`'s,
which :func:`autopar.lower.rng.make_deterministic` gives the one-device reference too.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from autopar.lower import rng
from autopar.lower.segments import module_paths
from autopar.tracing import MODEL_PREFIX

log = logging.getLogger(__name__)

SAMPLE_IDS = "sample_ids"
_FUNCTIONAL = {F.dropout, torch.dropout, torch.nn.functional.dropout}


def _aten_dropouts() -> set[torch._ops.OpOverload]:
    ops = set()
    for name in ("dropout", "native_dropout"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


def _dropout_args(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[float, bool] | None:
    """(p, training) if ``node`` is a dropout, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Dropout):
            return float(mod.p), bool(mod.training)
        return None
    if node.op != "call_function":
        return None
    if node.target in _FUNCTIONAL or node.target in _aten_dropouts():
        args = list(node.args) + [None] * 3
        p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
        training = node.kwargs.get(
            "training", node.kwargs.get("train", args[2] if args[2] is not None else True)
        )
        return float(p), bool(training)
    return None


def _model_path(path: str) -> str:
    """A traced module path as the user's model names it (the wrapper's ``model`` is the root)."""
    if path == MODEL_PREFIX.rstrip("."):
        return ""
    return path[len(MODEL_PREFIX) :] if path.startswith(MODEL_PREFIX) else path


def _in_dropout_module(node: torch.fx.Node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    last = list(stack.values())[-1]
    kind = last[1] if isinstance(last, tuple) else None
    if isinstance(kind, type):
        return issubclass(kind, nn.Dropout)
    return str(kind) in ("torch.nn.modules.dropout.Dropout", "<class 'torch.nn.modules.dropout.Dropout'>")


def _site_path(node: torch.fx.Node, counts: dict[tuple[str, str], int], kind: str = "dropout") -> str:
    """:func:`autopar.lower.rng.site_path` of ``node``: what the eager reference names the site."""
    if node.op == "call_module":
        return _model_path(str(node.target))
    paths = module_paths(node)
    path = _model_path(paths[-1] if paths else "")
    n = counts.get((path, kind), 0)
    counts[(path, kind)] = n + 1
    return rng.site_path(path, kind, n, _in_dropout_module(node))


def replace_dropout(gm: torch.fx.GraphModule, *, train: bool, seed: int = 0) -> bool:
    """Rewrite dropouts in place; True when a ``sample_ids`` placeholder was added."""
    sample_ids = None
    counts: dict[tuple[str, str], int] = {}
    fused: list[str] = []
    for node in list(gm.graph.nodes):
        sdpa = _sdpa_with_dropout(node) if train else None
        if sdpa is not None:
            if sample_ids is None:
                sample_ids = _add_placeholder(gm, SAMPLE_IDS)
            site = rng.site_id(_site_path(node, counts, "attention"))
            _decompose_attention(gm, node, sdpa, sample_ids, site, seed)
            fused.append(_model_path((module_paths(node) or [""])[-1]) or node.name)
            continue
        found = _dropout_args(node, gm)
        if found is None:
            continue
        p, training = found
        x = node.args[0] if node.args else node.kwargs["input"]
        if not (train and training and p > 0.0):
            _replace_with(node, x)
            continue
        if sample_ids is None:
            sample_ids = _add_placeholder(gm, SAMPLE_IDS)
        shape = _shape(x)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                rng.dropout,
                (x, sample_ids),
                {
                    "p": p,
                    "site": rng.site_id(_site_path(node, counts)),
                    "sample_shape": shape[1:],
                    "seed": seed,
                },
            )
        new.meta = dict(node.meta)
        new.meta["autopar_op"] = "dropout"
        _replace_with(node, new)
    if fused:
        log.warning(
            "scaled_dot_product_attention with dropout_p > 0 in %s runs as explicit ops (q @ k^T, "
            "softmax, deterministic dropout, @ v) instead of the fused kernel, so that every rank "
            "draws the mask one device draws: the attention scores are materialised (more memory "
            "and time than planned for the fused kernel)",
            ", ".join(dict.fromkeys(fused)),
        )
    gm.graph.lint()
    gm.recompile()
    return sample_ids is not None


_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


def _sdpa_with_dropout(node: torch.fx.Node) -> dict | None:
    """SDPA's bound arguments when ``node`` is one with a constant ``dropout_p > 0``."""
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    bound = {**dict(zip(rng.SDPA_ARGS, node.args)), **node.kwargs}
    p = bound.get("dropout_p", 0.0)
    if isinstance(p, torch.fx.Node) or not p or float(p) <= 0.0:
        return None
    return bound


class _Emitter:
    """Writes ops before ``anchor``, each with the anchor's module path and source, and shapes from
    running it on meta tensors (what later passes and the sharding rules read)."""

    def __init__(self, gm: torch.fx.GraphModule, anchor: torch.fx.Node):
        self.gm, self.anchor = gm, anchor

    def __call__(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
        kwargs = kwargs or {}
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.create_node(op, target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "autopar_block", "source_fn_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        value = self._run(op, target, args, kwargs)
        node.meta["val"] = value
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        return node

    @staticmethod
    def _run(op: str, target: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        if target is rng.dropout:  # the mask keeps the shape; the sample ids carry no metadata
            return torch.empty_like(_meta_value(args[0]))
        args, kwargs = torch.fx.node.map_arg((args, kwargs), _meta_value)
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)


def _meta_value(node: torch.fx.Node) -> torch.Tensor:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"{node.name} has no shape metadata; trace with autopar.tracing.fx_trace")
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")


def _decompose_attention(
    gm: torch.fx.GraphModule, node: torch.fx.Node, args: dict, sample_ids: torch.fx.Node, site: int, seed: int
) -> None:
    """:func:`autopar.lower.rng.attention`'s ops, op for op, in place of the SDPA ``node``."""
    emit: Callable[..., torch.fx.Node] = _Emitter(gm, node)
    q, k, v = args["query"], args["key"], args["value"]
    q_shape = _shape(q)
    if args.get("enable_gqa"):
        group = q_shape[-3] // _shape(k)[-3]
        k = emit("call_method", "repeat_interleave", (k, group), {"dim": -3})
        v = emit("call_method", "repeat_interleave", (v, group), {"dim": -3})
    scores = emit("call_function", operator.matmul, (q, emit("call_method", "transpose", (k, -2, -1))))
    scores = emit(
        "call_function", operator.mul, (scores, rng.attention_scale(q_shape[-1], args.get("scale")))
    )
    if args.get("is_causal"):
        corner = emit("call_function", operator.getitem, (scores, (0, 0)))
        ones = emit("call_function", torch.ones_like, (corner,), {"dtype": torch.bool})
        causal = emit("call_method", "triu", (ones, 1))
        scores = emit("call_method", "masked_fill", (scores, causal, float("-inf")))
    mask = args.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        if _meta_value(mask).dtype == torch.bool:
            hidden = emit("call_method", "logical_not", (mask,))
            scores = emit("call_method", "masked_fill", (scores, hidden, float("-inf")))
        else:
            scores = emit("call_function", operator.add, (scores, mask))
    probs = emit("call_function", torch.softmax, (scores,), {"dim": -1})
    kwargs = {"p": float(args["dropout_p"]), "site": site, "sample_shape": _shape(probs)[1:], "seed": seed}
    probs = emit("call_function", rng.dropout, (probs, sample_ids), kwargs)
    probs.meta["autopar_op"] = "dropout"
    out = emit("call_function", operator.matmul, (probs, v))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _replace_with(node: torch.fx.Node, value: torch.fx.Node) -> None:
    # aten.native_dropout returns (output, mask): route getitem(., 0) users to the value.
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
            user.replace_all_uses_with(value)
            user.graph.erase_node(user)
    node.replace_all_uses_with(value)
    node.graph.erase_node(node)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    raise ValueError(f"dropout input {node.name} has no shape metadata; trace with autopar.tracing.fx_trace")


def _add_placeholder(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    return node

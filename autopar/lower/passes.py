"""Graph passes the compiler runs on the traced model-with-loss graph before lowering.

``replace_dropout``: every dropout becomes :func:`autopar.lower.rng.dropout` (train mode, p > 0)
reading a new last placeholder ``sample_ids``, or disappears (p == 0, or inference mode). See
:mod:`autopar.lower.rng` for why: with it, every rank draws the mask one device would draw.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from autopar.lower import rng
from autopar.lower.segments import module_paths
from autopar.tracing import MODEL_PREFIX

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


def _site_path(node: torch.fx.Node, counts: dict[str, int]) -> str:
    paths = module_paths(node)
    path = paths[-1] if paths else ""
    path = path[len(MODEL_PREFIX) :] if path.startswith(MODEL_PREFIX) else path
    if node.op == "call_module":
        target = str(node.target)
        return target[len(MODEL_PREFIX) :] if target.startswith(MODEL_PREFIX) else target
    n = counts.get(path, 0)
    counts[path] = n + 1
    return f"{path}:dropout{n}"


def replace_dropout(gm: torch.fx.GraphModule, *, train: bool, seed: int = 0) -> bool:
    """Rewrite dropouts in place; True when a ``sample_ids`` placeholder was added."""
    sample_ids = None
    counts: dict[str, int] = {}
    for node in list(gm.graph.nodes):
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
    gm.graph.lint()
    gm.recompile()
    return sample_ids is not None


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

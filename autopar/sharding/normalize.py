"""Normalise a traced graph so that every parameter is a ``get_attr`` node the rules can place.

``symbolic_trace`` keeps ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.Dropout``... as
``call_module`` nodes whose parameters are invisible to the graph. :func:`functionalize` rewrites
them into their functional form with explicit parameter nodes::

    model_layers_0_attn_q_proj = self.model.layers[0].attn.q_proj(x)
        becomes
    w = self.model.layers.0.attn.q_proj.weight ; b = ...bias
    model_layers_0_attn_q_proj = torch.nn.functional.linear(x, w, b)

The rewritten node keeps the original node's name and ``meta`` (with the module added to its
``nn_module_stack``), so plan placements keyed by node name stay valid. Tied parameters (the same
``nn.Parameter`` under two names, e.g. ``lm_head.weight`` is ``tok_emb.weight``) are read through
one canonical name, the first in ``named_parameters(remove_duplicate=False)`` order; the other
names are returned as aliases. The normalisation is deterministic, so the planner, the default
Megatron placements and the lowering all see the same node names.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata


@dataclass
class Normalized:
    """A functionalised graph module and the facts about its parameters."""

    gm: torch.fx.GraphModule
    params: dict[str, nn.Parameter]
    """Canonical parameter name -> parameter (the original objects, not copies)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Non-canonical name of a tied parameter -> its canonical name."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def canonical_names(gm: nn.Module) -> tuple[dict[int, str], dict[str, str]]:
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return first, aliases


def _resolve(gm: nn.Module, target: str) -> Any:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _functional_call(
    mod: nn.Module, x: torch.fx.Node, p: Callable[[str], Any], training: Callable[[], bool]
) -> tuple[Callable, tuple, dict] | None:
    """(function, args, kwargs) of the functional form of a leaf module, or None to keep it."""
    if isinstance(mod, nn.Linear):
        return F.linear, (x, p("weight"), p("bias")), {}
    if isinstance(mod, nn.Embedding) and mod.max_norm is None and not mod.sparse:
        return F.embedding, (x, p("weight"), mod.padding_idx), {}
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm, (x, tuple(mod.normalized_shape), p("weight"), p("bias"), mod.eps), {}
    if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
        return F.rms_norm, (x, tuple(mod.normalized_shape), p("weight"), mod.eps), {}
    if type(mod) is nn.Dropout:
        return F.dropout, (x, mod.p, training()), {}
    conv = _conv_call(mod, x, p)
    if conv is not None:
        return conv
    pool = _pool_call(mod, x)
    if pool is not None:
        return pool
    if type(mod) in BATCH_NORMS:
        return _batch_norm_call(mod, x, p)
    if type(mod) is nn.GroupNorm:
        return F.group_norm, (x, mod.num_groups, p("weight"), p("bias"), mod.eps), {}
    simple = {nn.ReLU: F.relu, nn.SiLU: F.silu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid}
    if type(mod) in simple:
        return simple[type(mod)], (x,), {}
    if type(mod) is nn.GELU:
        return F.gelu, (x,), {"approximate": mod.approximate}
    if type(mod) is nn.Softmax:
        return torch.softmax, (x, mod.dim), {}
    if type(mod) is nn.LogSoftmax:
        return torch.log_softmax, (x, mod.dim), {}
    if type(mod) is nn.Flatten:
        return torch.flatten, (x, mod.start_dim, mod.end_dim), {}
    return None


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _conv_call(mod: nn.Module, x: torch.fx.Node, p: Callable[[str], Any]) -> tuple | None:
    if type(mod) not in _CONVS or mod.padding_mode != "zeros":
        return None  # reflect/replicate/circular padding pads first: kept as a module (replicated)
    args = (x, p("weight"), p("bias"), mod.stride, mod.padding, mod.dilation, mod.groups)
    return _CONVS[type(mod)], args, {}


def _pool_call(mod: nn.Module, x: torch.fx.Node) -> tuple | None:
    kind = type(mod).__name__  # MaxPool2d, AvgPool1d, AdaptiveAvgPool3d, ...
    if getattr(mod, "return_indices", False) or type(mod).__module__ != nn.MaxPool2d.__module__:
        return None
    dims = kind[-2:].lower()
    if kind.startswith("MaxPool"):
        fn = getattr(F, f"max_pool{dims}")
        args = (x, mod.kernel_size, mod.stride, mod.padding, mod.dilation)
        return fn, args, {"ceil_mode": mod.ceil_mode}
    if kind.startswith("AvgPool"):
        fn = getattr(F, f"avg_pool{dims}")
        extra = () if dims == "1d" else (mod.divisor_override,)
        return (
            fn,
            (x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad, *extra),
            {},
        )
    if kind.startswith("AdaptiveAvgPool"):
        return getattr(F, f"adaptive_avg_pool{dims}"), (x, mod.output_size), {}
    if kind.startswith("AdaptiveMaxPool"):
        return getattr(F, f"adaptive_max_pool{dims}"), (x, mod.output_size), {}
    return None


def _batch_norm_call(
    mod: nn.modules.batchnorm._BatchNorm, x: torch.fx.Node, p: Callable[[str], Any]
) -> tuple | None:
    """``F.batch_norm`` with the module's train/eval mode at trace time (what was traced); the
    ``num_batches_tracked`` count is a separate ``+= 1`` (:meth:`_Builder.functional`).
    ``momentum=None`` (a cumulative average read from the count) stays a module."""
    if not mod.track_running_stats:  # batch statistics in train and eval mode alike
        return F.batch_norm, (x, None, None, p("weight"), p("bias"), True, 0.0, mod.eps), {}
    if mod.momentum is None or mod.running_mean is None:
        return None
    args = (
        x,
        p("running_mean"),
        p("running_var"),
        p("weight"),
        p("bias"),
        mod.training,
        mod.momentum,
        mod.eps,
    )
    return F.batch_norm, args, {}


def _loss_call(mod: nn.Module, args: Sequence[Any]) -> tuple[Callable, tuple, dict] | None:
    if type(mod) is nn.CrossEntropyLoss and mod.weight is None:
        kwargs = {"ignore_index": mod.ignore_index, "reduction": mod.reduction}
        kwargs["label_smoothing"] = mod.label_smoothing
        return F.cross_entropy, tuple(args), kwargs
    if type(mod) is nn.MSELoss:
        return F.mse_loss, tuple(args), {"reduction": mod.reduction}
    return None


class _Builder:
    """Copies a graph node by node, replacing known leaf modules by functional calls."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = torch.fx.Graph()
        # export graphs flatten inputs and unflatten outputs through a pytree codegen: keep it.
        self.graph._codegen = gm.graph._codegen
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.first, self.aliases = canonical_names(gm)
        self.param_nodes: dict[str, torch.fx.Node] = {}

    def canonical(self, target: str) -> str:
        value = _resolve(self.gm, target)
        if isinstance(value, nn.Parameter):
            return self.first.get(id(value), target)
        return target

    def get_attr(self, target: str, meta_from: torch.fx.Node | None) -> torch.fx.Node:
        name = self.canonical(target)
        if name in self.param_nodes:
            return self.param_nodes[name]
        node = self.graph.get_attr(name)
        value = _resolve(self.gm, name)
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
            node.meta["val"] = torch.empty_like(value, device="meta")
        if meta_from is not None:
            for key in ("nn_module_stack", "stack_trace"):
                if key in meta_from.meta:
                    node.meta[key] = copy.copy(meta_from.meta[key])
        if isinstance(value, nn.Parameter):
            self.param_nodes[name] = node
        return node

    def training(self, target: str) -> torch.fx.Node:
        # A dropout follows its own module's train/eval flag at run time, as the call_module did:
        # the flag is copied with the graph module and ``.train()``/``.eval()`` on it reach it.
        return self.graph.get_attr(f"{target}.training")

    def copy(self, node: torch.fx.Node) -> None:
        if node.op == "get_attr":
            self.env[node] = self.get_attr(str(node.target), node)
            return
        if node.op == "call_module":
            replaced = self.functional(node)
            if replaced is not None:
                self.env[node] = replaced
                return
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])

    def functional(self, node: torch.fx.Node) -> torch.fx.Node | None:
        mod = self.gm.get_submodule(str(node.target))
        args = [torch.fx.node.map_arg(a, lambda n: self.env[n]) for a in node.args]
        if type(mod) is nn.Identity and len(args) == 1 and not node.kwargs:
            return args[0]

        def param(attr: str) -> torch.fx.Node | None:
            value = getattr(mod, attr, None)
            if value is None:
                return None
            return self.get_attr(f"{node.target}.{attr}", node)

        call = None
        if len(args) == 1 and not node.kwargs:
            call = _functional_call(mod, args[0], param, lambda: self.training(str(node.target)))
        elif len(args) == 2 and not node.kwargs:
            call = _loss_call(mod, args)
        if call is None:
            return None
        fn, fargs, fkwargs = call
        if type(mod) in BATCH_NORMS and mod.training and mod.track_running_stats:
            # nn.BatchNorm counts its training forwards; in place, as the module does.
            count = self.graph.call_function(operator.iadd, (param("num_batches_tracked"), 1))
            count.meta = {
                k: copy.copy(v) for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")
            }
        new = self.graph.create_node("call_function", fn, tuple(fargs), fkwargs, name=node.name)
        new.meta = copy.copy(node.meta)
        stack = dict(node.meta.get("nn_module_stack") or {})
        stack.setdefault(str(node.target), (str(node.target), type(mod)))
        new.meta["nn_module_stack"] = stack
        return new


def functionalize(gm: torch.fx.GraphModule) -> Normalized:
    """The normalised copy of ``gm`` (see the module docstring); ``gm`` is not modified."""
    b = _Builder(gm)
    for node in gm.graph.nodes:
        b.copy(node)
    renamed = [
        n.name for n, new in b.env.items() if new.name != n.name and n.op not in ("call_module", "get_attr")
    ]
    assert not renamed, f"functionalize renamed nodes {renamed}; plan keys would not match"
    new_gm = torch.fx.GraphModule(gm, b.graph, type(gm).__name__)
    new_gm.meta = dict(getattr(gm, "meta", {}) or {})
    params = {name: _resolve(gm, name) for name in b.param_nodes}
    # Every parameter the graph reads, also those reached only through kept call_module nodes.
    for name, p in gm.named_parameters():
        params.setdefault(name, p)
    buffers = {name: buf for name, buf in gm.named_buffers()}
    return Normalized(gm=new_gm, params=params, aliases=b.aliases, buffers=buffers)


def param_name(node: torch.fx.Node, params: dict[str, nn.Parameter]) -> str | None:
    """The canonical parameter name a ``get_attr`` node reads, or None (buffer, constant, ...)."""
    if node.op == "get_attr" and str(node.target) in params:
        return str(node.target)
    return None

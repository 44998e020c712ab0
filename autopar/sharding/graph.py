"""The normalised graph with everything the rules, the default placements and the lowering share.

sg = ShardingGraph(gm, tp=2)          # gm: fx_trace(...) output (or any shape-annotated gm)
sg.strategies(node)                   # legal strategies of a node (cached)
strategies(node, tp)                  # the same for a node of any graph module
"""

from __future__ import annotations

from functools import cached_property

import torch.fx
import torch.nn.functional as F

from autopar.core.errors import TraceError
from autopar.sharding.normalize import Normalized, canonical_names, functionalize
from autopar.sharding.ops import (
    OpCall,
    first_meta,
    is_multi,
    is_tensor,
    numel_bytes,
    parse,
    shape,
    tensor_meta,
)
from autopar.sharding.rules import Strategy, call_strategies

Node = torch.fx.Node

# Consumers that read only the metadata (shape, dtype, device) of an argument, by argument index.
_META_ARG = {"shape": 0, "like": 0, "new": 0}


def _reads_only_meta(user: Node, node: Node, call: OpCall) -> bool:
    if call.kind in _META_ARG:
        return call.args.get("x") is node
    if call.name == "type_as":
        return len(user.args) > 1 and user.args[1] is node and user.args[0] is not node
    return False


def _per_channel_buffers(
    gm: torch.fx.GraphModule, buffers: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Running statistics a ``batch_norm`` call reads and updates in place: sharded with its
    channels, so each rank's update lands in its own slice (gathered back for ``state_dict``)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.batch_norm:
            for a in node.args[1:3]:
                if isinstance(a, Node) and a.op == "get_attr" and str(a.target) in buffers:
                    out[str(a.target)] = buffers[str(a.target)]
    return out


class ShardingGraph:
    """A traced graph module, functionalised and parsed for tensor-parallel degree ``tp``."""

    def __init__(self, gm: torch.fx.GraphModule, tp: int, *, normalized: Normalized | None = None):
        self.source = gm
        self.tp = tp
        self.norm = normalized or functionalize(gm)
        self.gm = self.norm.gm
        self.params = self.norm.params
        self.state_buffers = _per_channel_buffers(self.gm, self.norm.buffers)
        """Buffers placed like parameters (BatchNorm running statistics): a rule may shard them."""
        self.placeable = {**self.params, **self.state_buffers}
        self.calls: dict[Node, OpCall] = {}
        for node in self.gm.graph.nodes:
            no_meta = "tensor_meta" not in node.meta and "val" not in node.meta
            if node.op not in ("placeholder", "output", "get_attr") and no_meta and node.users:
                raise TraceError(
                    f"node {node.name} has no shape metadata; trace the model with "
                    "autopar.tracing.fx_trace (or run torch.fx.passes.shape_prop.ShapeProp) first"
                )
            self.calls[node] = parse(node, self.placeable)
        self._strategies: dict[Node, list[Strategy]] = {}
        self._irrelevant: dict[Node, bool] = {}

    @property
    def nodes(self) -> list[Node]:
        return list(self.gm.graph.nodes)

    def node(self, name: str) -> Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def value_irrelevant(self, node: Node) -> bool:
        """Whether every use of ``node`` reads only its shape/dtype (``ones_like(x[0, 0])``)."""
        if node not in self._irrelevant:
            self._irrelevant[node] = False  # cycle guard (graphs are acyclic; cheap insurance)
            users = list(node.users)
            self._irrelevant[node] = bool(users) and all(
                _reads_only_meta(u, node, self.calls[u]) or (is_tensor(u) and self.value_irrelevant(u))
                for u in users
            )
        return self._irrelevant[node]

    def strategies(self, node: Node) -> list[Strategy]:
        if node not in self._strategies:
            call = self.calls[node]
            irrelevant = call.kind in ("getitem", "select") and self.value_irrelevant(node)
            self._strategies[node] = call_strategies(call, self.tp, self.placeable, irrelevant)
        return self._strategies[node]

    def requires_grad(self, node: Node) -> bool:
        if self.calls[node].kind == "param":
            p = self.params.get(str(node.target))
            return p is not None and p.requires_grad
        return bool(getattr(first_meta(tensor_meta(node)), "requires_grad", True))

    def tensor_bytes(self, node: Node) -> int:
        """Bytes of a tensor node's full (unsharded) value."""
        return numel_bytes(node)

    def is_param(self, node: Node) -> bool:
        """A parameter, or a buffer placed like one (:attr:`state_buffers`)."""
        return self.calls[node].kind == "param"

    @cached_property
    def token_shape(self) -> tuple[int, ...] | None:
        """Leading dims of per-token activations: the first input's shape (without its feature dim
        when it is a float tensor). ``tokens [b, t]`` -> ``(b, t)``; ``x [b, h]`` -> ``(b,)``."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and is_tensor(node):
                tm = tensor_meta(node)
                dims = tuple(int(s) for s in tm.shape)
                return dims if not tm.dtype.is_floating_point else dims[:-1]
        return None

    def sequence_dim(self, node: Node) -> int | None:
        """The dim sequence parallelism shards for a per-token activation, else None."""
        lead = self.token_shape
        if not lead or not is_tensor(node) or is_multi(tensor_meta(node)):
            return None
        s = shape(node)
        if len(s) <= len(lead) or s[: len(lead)] != lead:
            return None
        d = len(lead) - 1
        return d if s[d] % self.tp == 0 and s[d] >= self.tp else None


def strategies(node: Node, tp: int) -> list[Strategy]:
    """Legal tensor-parallel strategies of ``node`` (a node of a functionalised graph module).

    ``call_module`` nodes of a raw ``symbolic_trace`` graph have no visible parameters: run
    :func:`autopar.sharding.functionalize` (or use :class:`ShardingGraph`) first.
    """
    gm = node.graph.owning_module
    first, _ = canonical_names(gm) if gm is not None else ({}, {})
    params = {name: None for name in first.values()}
    return call_strategies(parse(node, params), tp, params)

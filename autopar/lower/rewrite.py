"""The graph rewrite: one rank's program from the chosen strategies.

For each node, in order: convert every input to the placement the node's strategy requires
(inserting the collective of :mod:`autopar.sharding.reshard`, or ``autopar_copy_to_tp`` when a
replicated input feeds sharded work and so receives partial gradients), emit the op itself with
shape arguments localised, then convert its result to the placement the plan gives consumers.
Conversions are cached per (producer, placement, gradient kind): three column-parallel
projections of one input share one ``autopar_copy_to_tp``.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

from autopar.core.errors import PlanError
from autopar.core.plan import Partial, Placement, Replicate, Shard
from autopar.lower import collectives as C
from autopar.lower import parallel_ops as O
from autopar.lower.choose import Choice, conversion_calls
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.ops import OpCall, describe, is_multi, is_tensor, shape, tensor_meta
from autopar.sharding.reshard import reshard_kind
from autopar.sharding.rules import NO_PLACEMENT

log = logging.getLogger(__name__)
Node = torch.fx.Node
R = Replicate()
CTX_ATTR = "autopar_tp"


class Rewriter:
    def __init__(
        self, sg: ShardingGraph, choices: dict[Node, Choice], params: dict[str, Placement], rank: int
    ):
        self.sg, self.choices, self.params, self.rank = sg, choices, params, rank
        self.tp = sg.tp
        self.graph = torch.fx.Graph()
        self.graph._codegen = sg.gm.graph._codegen  # pytree in/out specs (export)
        self.env: dict[Node, Node] = {}
        self.cache: dict[tuple, Node] = {}
        self.ctx_node: Node | None = None
        self.notes: list[str] = []

    # ---------------------------------------------------------------------- helpers
    def placement(self, node: Node) -> Placement:
        if self.sg.is_param(node):
            return self.params.get(str(node.target), R)
        return self.choices[node].final

    def ctx(self) -> Node:
        if self.ctx_node is None:
            self.ctx_node = self.graph.get_attr(CTX_ATTR)
        return self.ctx_node

    def call(self, fn: Callable, args: Iterable[Any], like: Node, name: str | None = None) -> Node:
        node = self.graph.call_function(fn, tuple(args))
        if name:
            node.name = self.graph._graph_namespace.create_name(name, node)
        for key in ("nn_module_stack", "stack_trace", "autopar_block"):
            if key in like.meta:
                node.meta[key] = copy.copy(like.meta[key])
        return node

    def convert(self, src_node: Node, base: Node, src: Placement, dst: Placement, partial_grad: bool) -> Node:
        """``base`` (placed ``src``) as ``dst``; ``partial_grad``: the result feeds sharded work."""
        key = (src_node, str(dst), partial_grad)
        if key not in self.cache:
            out = base
            for name, dim_of in conversion_calls(reshard_kind(src, dst), partial_grad):
                fn = C.COLLECTIVES[name]
                dims = () if dim_of is None else ((src if dim_of == "src" else dst).dim,)
                out = self.call(fn, (out, *dims, self.ctx()), src_node)
                self.annotate(out, src_node, R if name == "autopar_gather" else dst)
            self.cache[key] = out
        return self.cache[key]

    def annotate(self, new: Node, like: Node, placement: Placement) -> None:
        """``autopar_placement`` and ``autopar_local_shape`` of a rewritten node's value (its
        ``tensor_meta``/``val``, copied from the traced graph, describe the full tensor)."""
        new.meta["autopar_placement"] = str(placement)
        if is_tensor(like) and not is_multi(tensor_meta(like)):
            local = list(shape(like))
            if isinstance(placement, Shard):
                local[placement.dim] //= self.tp
            new.meta["autopar_local_shape"] = tuple(local)

    def inputs_for(self, node: Node, choice: Choice) -> dict[Node, Node]:
        call = self.sg.calls[node]
        s = choice.strategy
        mapped: dict[Node, Node] = {}
        for i, (inp, req) in enumerate(zip(call.inputs, s.inputs)):
            if req is None:
                mapped[inp] = self.env[inp]
                continue
            partial_grad = s.grad_needs_all_reduce(i) and self.sg.requires_grad(inp)
            mapped[inp] = self.convert(inp, self.env[inp], self.placement(inp), req, partial_grad)
        return mapped

    def copy_node(self, node: Node, mapped: dict[Node, Node]) -> Node:
        """``node`` in the new graph, its tensor inputs replaced by their converted values."""
        return self.graph.node_copy(node, lambda n: mapped[n] if n in mapped else self.env[n])

    # ---------------------------------------------------------------------- the pass
    def run(self) -> torch.fx.Graph:
        for node in self.sg.nodes:
            call = self.sg.calls[node]
            if node.op in ("placeholder", "get_attr"):
                self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
            elif call.kind == "output":
                self.output(node)
            elif call.kind in NO_PLACEMENT:
                self.env[node] = self.non_tensor(node, call)
            else:
                self.tensor_op(node, call)
        return self.graph

    def output(self, node: Node) -> None:
        choice = self.choices[node]
        mapped = self.inputs_for(node, choice)
        self.graph.output(torch.fx.node.map_arg(node.args[0], lambda n: mapped.get(n, self.env[n])))

    def tensor_op(self, node: Node, call: OpCall) -> None:
        choice = self.choices[node]
        mapped = self.inputs_for(node, choice)
        emit = _EMITTERS.get(call.kind, _emit_copy)
        out = emit(self, node, call, choice, mapped)
        raw = choice.strategy.output
        self.annotate(out, node, raw)
        if raw != choice.final:
            out = self.convert(node, out, raw, choice.final, False)
        self.env[node] = out

    def non_tensor(self, node: Node, call: OpCall) -> Node:
        x = call.args.get("x")
        placed = isinstance(x, Node) and (x in self.choices or self.sg.is_param(x))
        if (
            call.kind == "shape"
            and placed
            and call.name in ("shape", "size", "sym_size", "numel", "sym_numel")
        ):
            p = self.placement(x)
            if isinstance(p, Shard):
                return self.global_shape(node, call, p.dim)
        return self.graph.node_copy(node, lambda n: self.env[n])

    def global_shape(self, node: Node, call: OpCall, dim: int) -> Node:
        x = self.env[call.args["x"]]
        if call.name == "shape":
            return self.call(O.autopar_global_shape, (x, dim, self.tp), node, node.name)
        if call.name in ("numel", "sym_numel"):
            local = self.graph.node_copy(node, lambda n: self.env[n])
            return self.call(operator.mul, (local, self.tp), node)
        q = call.args.get("dim")
        return self.call(O.autopar_global_size, (x, dim, self.tp, q), node, node.name)


# -------------------------------------------------------------------------- emitters
def _emit_copy(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    return rw.copy_node(node, mapped)


def _local_dim(rw: Rewriter, item: Any, like: Node) -> Any:
    if isinstance(item, int):
        return item if item == -1 else item // rw.tp
    if isinstance(item, Node):
        return rw.call(operator.floordiv, (rw.env[item], rw.tp), like)
    raise PlanError(f"{describe(like)}: cannot localise the shape argument {item!r} of a sharded dim")


def _emit_reshape(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    out = choice.strategy.output
    items = call.args.get("shape")
    if not isinstance(out, Shard) or items is None:
        return rw.copy_node(node, mapped)
    o = out.dim
    if len(items) == len(call.out_shape):
        new_items = [rw.env[i] if isinstance(i, Node) else i for i in items]
        new_items[o] = _local_dim(rw, items[o], node)
    elif len(items) == 1 and isinstance(items[0], Node):
        new_items = [rw.call(O.autopar_local_shape, (rw.env[items[0]], o, rw.tp), node)]
    else:
        raise PlanError(f"{describe(node)}: shape arguments {items!r} do not match the output rank")
    x = mapped[call.args["x"]]
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.Size)):
        args = (
            x,
            type(node.args[1])(new_items) if not isinstance(node.args[1], torch.Size) else list(new_items),
        )
    elif len(node.args) >= 2:
        args = (x, *new_items)
    else:
        key = "size" if "size" in node.kwargs else "shape"
        new = rw.copy_node(node, mapped)
        new.kwargs = {**new.kwargs, key: list(new_items)}
        return new
    new = rw.copy_node(node, mapped)
    new.args = args
    return new


def _emit_biased_matmul(
    rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]
) -> Node:
    """linear / addmm: a partial-sum result gets its bias on tp rank 0 only."""
    b = call.args.get("b")
    if not isinstance(choice.strategy.output, Partial) or not isinstance(b, Node):
        return rw.copy_node(node, mapped)
    bias = rw.call(O.autopar_partial_bias, (mapped[b], rw.rank), node)
    return rw.copy_node(node, {**mapped, b: bias})


def _emit_embedding(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    if choice.strategy.name != "vocab_parallel":
        return rw.copy_node(node, mapped)
    vocab = shape(call.args["w"])[0] // rw.tp
    start = rw.rank * vocab
    args = (
        mapped[call.args["idx"]],
        mapped[call.args["w"]],
        start,
        start + vocab,
        call.args.get("padding_idx"),
    )
    return rw.call(O.autopar_vocab_embedding, args, node, node.name)


def _emit_cross_entropy(
    rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]
) -> Node:
    if choice.strategy.name != "vocab_parallel":
        return _emit_mean_fix(rw, node, call, choice, mapped)
    a = call.args
    vocab = shape(a["x"])[1] // rw.tp
    args = (mapped[a["x"]], mapped[a["target"]], rw.rank * vocab, a["ignore_index"], a["reduction"], rw.ctx())
    return rw.call(O.autopar_vocab_parallel_cross_entropy, args, node, node.name)


def _emit_mean_fix(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    """A mean over a sharded dim: local mean / tp is this rank's share of the global mean."""
    new = rw.copy_node(node, mapped)
    s = choice.strategy
    sharded_in = any(isinstance(p, Shard) for p in s.inputs)
    is_mean = call.name == "mean" or call.args.get("reduction") == "mean"
    if isinstance(s.output, Partial) and sharded_in and is_mean:
        return rw.call(operator.truediv, (new, rw.tp), node)
    return new


def _dropout_args(node: Node) -> tuple:
    args, kw = node.args, node.kwargs
    p = args[1] if len(args) > 1 else kw.get("p", 0.5)
    training = args[2] if len(args) > 2 else kw.get("training", kw.get("train", True))
    return p, training


def noncontiguous_layout(tm: Any) -> tuple[list[int], list[int]] | None:
    """``(shape, stride)`` of a tensor (``TensorMetadata`` or a fake tensor) laid out non-contiguously,
    None for a contiguous one (or one without strides): the runtime dropout draws its mask in this
    layout so that a transposed activation gets the single-device mask."""
    stride = getattr(tm, "stride", None)
    stride = stride() if callable(stride) else stride  # TensorMetadata field or FakeTensor method
    if stride is None:
        return None
    shape = [int(d) for d in tm.shape]
    contiguous = torch.empty(shape, device="meta").stride()
    return None if tuple(stride) == tuple(contiguous) else (shape, [int(s) for s in stride])


def _emit_dropout(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    out = choice.strategy.output
    p, training = _dropout_args(node)
    training = rw.env[training] if isinstance(training, Node) else training
    dim = out.dim if isinstance(out, Shard) else None
    tm = tensor_meta(node)
    args = (mapped[call.args["x"]], p, training, dim, rw.ctx(), noncontiguous_layout(tm))
    return rw.call(O.autopar_dropout, args, node, node.name)


def _emit_rng_dropout(
    rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]
) -> Node:
    new = rw.copy_node(node, mapped)
    out = choice.strategy.output
    if isinstance(out, Shard):
        new.kwargs = {**new.kwargs, "shard": (out.dim, rw.rank, rw.tp)}
    return new


def _emit_sdpa(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    dropout_p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    if isinstance(choice.strategy.output, Shard) and (isinstance(dropout_p, Node) or dropout_p):
        rw.notes.append(
            f"{describe(node)}: fused attention draws its dropout mask inside the kernel, per local "
            "head; masks follow the same distribution as on one device but not the same numbers"
        )
        log.warning(rw.notes[-1])
    return rw.copy_node(node, mapped)


def _set_arg(node: Node, at: int | str, value: Any) -> None:
    if isinstance(at, int):
        node.args = (*node.args[:at], value, *node.args[at + 1 :])
    else:
        node.kwargs = {**node.kwargs, at: value}


def _emit_conv(rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]) -> Node:
    """Row-parallel / partial: the bias on rank 0 only; whole groups split: ``groups / tp`` each."""
    new = _emit_biased_matmul(rw, node, call, choice, mapped)
    if choice.strategy.name == "grouped":
        _set_arg(new, call.args["groups_at"], call.args["groups"] // rw.tp)
    return new


def _emit_group_norm(
    rw: Rewriter, node: Node, call: OpCall, choice: Choice, mapped: dict[Node, Node]
) -> Node:
    new = rw.copy_node(node, mapped)
    if choice.strategy.name == "channel":
        _set_arg(new, 1 if len(node.args) > 1 else "num_groups", call.args["groups"] // rw.tp)
    return new


_EMITTERS = {
    "reshape": _emit_reshape,
    "expand": _emit_reshape,
    "linear": _emit_biased_matmul,
    "addmm": _emit_biased_matmul,
    "conv": _emit_conv,
    "group_norm": _emit_group_norm,
    "embedding": _emit_embedding,
    "cross_entropy": _emit_cross_entropy,
    "reduction": _emit_mean_fix,
    "pointwise_loss": _emit_mean_fix,
    "dropout": _emit_dropout,
    "rng_dropout": _emit_rng_dropout,
    "sdpa": _emit_sdpa,
}

"""The layout a plan runs: which strategy each node runs and which collectives that implies.

One derivation for both sides: the lowering (:mod:`autopar.lower`) emits exactly these strategies and
collectives, the estimator (:mod:`autopar.estimator`) costs exactly these collectives.

The plan gives, per node, the placement its consumers see (``NodePlacement.output``) and the
placement of each parameter it reads. A node runs the legal strategy (from the rules) whose
parameter placements match the plan's, whose own result converts to the planned output, and which
needs the fewest bytes of resharding of its inputs; ties go to the first strategy in rule order.
A node the plan does not list, with parameters it does not place, runs replicated when its
inputs are replicated; when an input arrives sharded it keeps the cheapest layout instead of
gathering it (a dropout a graph pass inserted after planning stays on the sequence shard).

After its op, a node may resolve a partial sum (all-reduce, reduce-scatter) or gather a shard
(the all-gather of logits a plan may ask for); it never slices or re-shards its own result: a
placement its rule cannot produce is a plan error naming the op, not a silent gather-and-slice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch.fx

from autopar.core.errors import PlanError
from autopar.core.plan import NodePlacement, Placement, Replicate, Shard
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.ops import OpCall, describe, numel_bytes, shape
from autopar.sharding.reshard import BACKWARD_OF, reshard_bytes, reshard_kind
from autopar.sharding.rules import NO_PLACEMENT, Strategy
from autopar.tracing.wrap import MODEL_PREFIX

Node = torch.fx.Node
R = Replicate()
_PRODUCER_CONVERSIONS = (None, "all_reduce", "reduce_scatter", "all_gather")


@dataclass
class Choice:
    strategy: Strategy
    final: Placement
    """What consumers see: the strategy's output, converted when the plan says so."""


def _normalize(p: Placement, node: Node) -> Placement:
    if isinstance(p, Shard) and p.dim < 0:
        return Shard(p.dim + len(shape(node)))
    return p


def _param_name(sg: ShardingGraph, name: str) -> str:
    """The traced graph's name of a parameter: tied aliases resolved, and the model's own name
    (``layers.0.fc1.weight``, as ``named_parameters()`` and the OpGraph say it) accepted for the
    traced wrapper's (``model.layers.0.fc1.weight``)."""
    known = sg.placeable.keys() | sg.norm.aliases.keys()
    if name not in known and MODEL_PREFIX + name in known:
        name = MODEL_PREFIX + name
    return sg.norm.aliases.get(name, name)


def param_placements(sg: ShardingGraph, placements: dict[str, NodePlacement]) -> dict[str, Placement]:
    """Canonical parameter name -> placement, checked for consistency across the nodes that list it."""
    out: dict[str, Placement] = {}
    where: dict[str, str] = {}
    for node_name, np in placements.items():
        for pname, p in np.params.items():
            name = _param_name(sg, pname)
            if name not in sg.placeable:
                raise PlanError(
                    f"placements[{node_name!r}] places parameter {pname!r}, which the model does not have; "
                    f"parameters look like {next(iter(sg.params), '?')!r}"
                )
            if name in out and out[name] != p:
                raise PlanError(
                    f"parameter {name!r} is placed {out[name]} by node {where[name]!r} and {p} by node "
                    f"{node_name!r}; a parameter (tied ones included) has one placement: make them equal"
                )
            out[name], where[name] = p, node_name
    return out


def _input_cost(
    sg: ShardingGraph,
    placed: dict[Node, Placement],
    params: dict[str, Placement],
    call: OpCall,
    s: Strategy,
) -> int | None:
    cost = 0
    for inp, req in zip(call.inputs, s.inputs):
        if req is None:
            continue
        if sg.is_param(inp):
            if params.get(str(inp.target), R) != req:
                return None
            continue
        kind = reshard_kind(placed[inp], req)
        if kind == "invalid":
            return None
        cost += reshard_bytes(placed[inp], req, numel_bytes(inp)) + (1 if kind else 0)
    return cost


def _no_strategy_error(sg: ShardingGraph, node: Node, final: Placement, params: dict) -> PlanError:
    legal = sorted({str(s.output) for s in sg.strategies(node)})
    mine = {n: p for n, p in params.items() if any(str(i.target) == n for i in sg.calls[node].inputs)}
    hint = (
        "replicate it (give it output R and its parameters R in the plan)"
        if sg.calls[node].kind in ("other", "factory", "placeholder", "buffer")
        else f"choose one of the outputs its rule allows ({', '.join(legal)}); R (replicate) always works"
    )
    return PlanError(
        f"{describe(node)} has no tensor-parallel strategy producing {final}"
        + (f" with parameters {', '.join(f'{k}={v}' for k, v in mine.items())}" if mine else "")
        + f" (op kind '{sg.calls[node].kind}'); {hint}"
    )


def choose(
    sg: ShardingGraph, placements: dict[str, NodePlacement]
) -> tuple[dict[Node, Choice], dict[str, Placement]]:
    """The strategy and visible placement of every tensor node, and every parameter's placement."""
    params = param_placements(sg, placements)
    placed: dict[Node, Placement] = {}
    choices: dict[Node, Choice] = {}
    for node in sg.nodes:
        call = sg.calls[node]
        if call.kind in NO_PLACEMENT or call.kind == "param":
            continue
        np = placements.get(node.name)
        # Unlisted nodes follow their inputs (final None: whatever the cheapest strategy gives).
        final = None if np is None else _normalize(np.output, node)
        if call.kind == "output":
            final = R
        best = None
        for s in sg.strategies(node):
            out_kind = reshard_kind(s.output, final) if final is not None and call.kind != "output" else None
            if out_kind not in _PRODUCER_CONVERSIONS:
                continue
            cost = _input_cost(sg, placed, params, call, s)
            if cost is None:
                continue
            if out_kind:
                cost += reshard_bytes(s.output, final, numel_bytes(node)) + 1
            if best is None or cost < best[0]:
                best = (cost, s)
        if best is None:
            raise _no_strategy_error(sg, node, final or R, params)
        final = best[1].output if final is None else final
        choices[node] = Choice(best[1], final)
        placed[node] = final
    return choices, params


# ------------------------------------------------------------------------------ collectives
@dataclass(frozen=True)
class PlannedCollective:
    """One collective of the layout, per micro-batch."""

    at: str
    """The node it is charged to: the consumer whose strategy needs the resharding of an input, or
    the node whose own result is converted (a partial sum resolved after a row-parallel matmul)."""
    kind: str
    """``all_reduce``, ``all_gather``, ``reduce_scatter`` or ``all_to_all``."""
    phase: str
    """``fwd`` or ``bwd``."""
    nbytes: int
    """Bytes of the full (unsharded) tensor, as the cost model counts them."""


def issued(kind: str | None, partial_grad: bool) -> tuple[tuple[str | None, str | None], ...]:
    """(forward collective, backward collective) of each call that performs one resharding.

    ``kind`` is :func:`~autopar.sharding.reshard.reshard_kind`'s; ``partial_grad``: the converted
    tensor feeds sharded work, so its gradient arrives as a partial sum that backward must sum
    (an all-reduce in backward, or the :data:`BACKWARD_OF` partner of the forward collective).
    Without it an all-gather's backward keeps the own slice (no collective). ``all_to_all`` is an
    all-gather then a local split. The lowering's functions follow this table
    (:func:`autopar.lower.choose.conversion_calls`; a test compares them).
    """
    sum_grad = ((None, "all_reduce"),)
    if kind is None:
        return sum_grad if partial_grad else ()
    if kind == "all_to_all":
        return (("all_gather", None), (None, BACKWARD_OF["split"]))
    if kind == "all_gather" and not partial_grad:
        return (("all_gather", None),)
    own = ((None if kind == "split" else kind, BACKWARD_OF[kind]),)
    return own + sum_grad if kind == "all_reduce" and partial_grad else own


def reshardings(
    sg: ShardingGraph, choices: dict[Node, Choice], params: dict[str, Placement]
) -> Iterator[tuple[Node, Node, str | None, bool, tuple]]:
    """Every distinct resharding of the layout, in graph order: (the node charged, the tensor
    converted, reshard kind, partial_grad, the fused op's ``Strategy.comm`` or ``()``). A fused op
    (vocabulary-parallel cross entropy) communicates inside its own call: kind None, its comms given."""
    seen: set = set()

    def convert(at: Node, src_node: Node, src: Placement, dst: Placement, partial: bool) -> Iterator:
        key = (src_node, str(dst), partial)
        kind = reshard_kind(src, dst)
        if key not in seen and (kind is not None or partial):
            seen.add(key)
            yield at, src_node, kind, partial, ()

    for node, ch in choices.items():
        call, s = sg.calls[node], ch.strategy
        for i, (inp, req) in enumerate(zip(call.inputs, s.inputs)):
            if req is None:
                continue
            src = params.get(str(inp.target), R) if sg.is_param(inp) else choices[inp].final
            yield from convert(node, inp, src, req, s.grad_needs_all_reduce(i) and sg.requires_grad(inp))
        if s.output != ch.final:
            yield from convert(node, node, s.output, ch.final, False)
        if s.comm:
            yield node, node, None, False, tuple(s.comm)


def planned_collectives(
    sg: ShardingGraph, choices: dict[Node, Choice], params: dict[str, Placement]
) -> list[PlannedCollective]:
    """The collectives the layout implies per micro-batch, forward and backward."""
    out: list[PlannedCollective] = []
    for at, tensor, kind, partial, fused in reshardings(sg, choices, params):
        for c in fused:
            base = "all_reduce" if c.kind.startswith("all_reduce") else c.kind
            out.append(PlannedCollective(at=at.name, kind=base, phase="fwd", nbytes=int(c.bytes)))
        nbytes = sg.tensor_bytes(tensor)
        for fwd, bwd in issued(kind, partial):
            if fwd:
                out.append(PlannedCollective(at=at.name, kind=fwd, phase="fwd", nbytes=nbytes))
            if bwd:
                out.append(PlannedCollective(at=at.name, kind=bwd, phase="bwd", nbytes=nbytes))
    return out


def collective_volume(collectives: list[PlannedCollective]) -> Counter:
    """Bytes per ``(kind, phase)``: what the estimator's and the lowering's accounts are compared by."""
    volume: Counter = Counter()
    for c in collectives:
        volume[(c.kind, c.phase)] += c.nbytes
    return volume

"""Which strategy each node runs, given a plan's placements (the lowering never decides layouts).

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
from dataclasses import dataclass

import torch.fx

from autopar.core.errors import PlanError
from autopar.core.plan import NodePlacement, Placement, Replicate, Shard
from autopar.lower.collectives import LOWERED, autopar_copy_to_tp, autopar_gather
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.ops import OpCall, describe, numel_bytes, shape
from autopar.sharding.reshard import reshard_bytes, reshard_kind
from autopar.sharding.rules import NO_PLACEMENT, Strategy

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


def param_placements(sg: ShardingGraph, placements: dict[str, NodePlacement]) -> dict[str, Placement]:
    """Canonical parameter name -> placement, checked for consistency across the nodes that list it."""
    out: dict[str, Placement] = {}
    where: dict[str, str] = {}
    for node_name, np in placements.items():
        for pname, p in np.params.items():
            name = sg.norm.aliases.get(pname, pname)
            if name not in sg.params:
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


_DIM_OF: dict[str, str | None] = {
    "split": "dst",
    "all_reduce": None,
    "reduce_scatter": "dst",
    "all_gather": "src",
}
"""Resharding kind -> whose placement's dim its collective takes (``src``, ``dst``, or no dim)."""


def conversion_calls(kind: str | None, partial_grad: bool) -> tuple[tuple[str, str | None], ...]:
    """The collective calls (name, which placement's dim they take) that perform one resharding.

    ``partial_grad``: the converted tensor feeds sharded work, so its gradient arrives as a
    partial sum and must be summed in backward. The function is then the resharding kind's
    :data:`~autopar.lower.collectives.LOWERED` one (whose backward is the one
    :data:`~autopar.sharding.reshard.BACKWARD_OF` names), plus ``copy_to_tp`` after an all-reduce
    (whose backward is the identity). Otherwise a gather keeps only its slice of the gradient
    (``gather``); ``all_to_all`` is a gather then a split.
    """
    copy_to_tp = ((autopar_copy_to_tp.__name__, None),)
    if kind is None:
        return copy_to_tp if partial_grad else ()
    if kind == "all_to_all":
        return ((autopar_gather.__name__, "src"), (LOWERED["split"].__name__, "dst"))
    if kind not in LOWERED:
        raise PlanError(f"no collective converts between these placements ({kind})")
    fn = autopar_gather if kind == "all_gather" and not partial_grad else LOWERED[kind]
    calls = ((fn.__name__, _DIM_OF[kind]),)
    return calls + copy_to_tp if kind == "all_reduce" and partial_grad else calls


FUSED_COLLECTIVE_OPS = {"cross_entropy": "autopar_vocab_parallel_cross_entropy"}
"""Ops whose sharded strategy communicates inside one emitted call (``Strategy.comm``)."""


def predict_collectives(
    sg: ShardingGraph, choices: dict[Node, Choice], params: dict[str, Placement]
) -> Counter:
    """Collective calls per name that the placements imply, one per distinct resharding."""
    counts: Counter = Counter()
    seen: set = set()

    def add(src_node: Node, src: Placement, dst: Placement, partial: bool) -> None:
        key = (src_node, str(dst), partial)
        if key not in seen:
            seen.add(key)
            counts.update(name for name, _ in conversion_calls(reshard_kind(src, dst), partial))

    for node, ch in choices.items():
        call, s = sg.calls[node], ch.strategy
        for i, (inp, req) in enumerate(zip(call.inputs, s.inputs)):
            if req is None:
                continue
            src = params.get(str(inp.target), R) if sg.is_param(inp) else choices[inp].final
            add(inp, src, req, s.grad_needs_all_reduce(i) and sg.requires_grad(inp))
        if s.output != ch.final:
            add(node, s.output, ch.final, False)
        if s.comm:
            counts[FUSED_COLLECTIVE_OPS[call.kind]] += 1
    return counts

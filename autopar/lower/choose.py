"""Which strategy each node runs, given a plan's placements (the lowering never decides layouts).

The plan gives, per node, the placement its consumers see (``NodePlacement.output``) and the
placement of each parameter it reads. A node runs the legal strategy (from the rules) whose
parameter placements match the plan's, whose own result converts to the planned output, and which
needs the fewest bytes of resharding of its inputs; ties go to the first strategy in rule order.
Nodes the plan does not list are replicated (``Plan.placements`` docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from autopar.errors import PlanError
from autopar.plan import NodePlacement, Placement, Replicate, Shard
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.ops import describe, numel_bytes, shape
from autopar.sharding.reshard import reshard_bytes, reshard_kind
from autopar.sharding.rules import NO_PLACEMENT, Strategy

Node = torch.fx.Node
R = Replicate()


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


def _input_cost(sg, placed, params, call, s: Strategy) -> int | None:
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
        else f"choose one of the outputs its rule allows: {', '.join(legal)}"
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
        final = _normalize(np.output, node) if np is not None and call.kind != "output" else R
        best = None
        for s in sg.strategies(node):
            out_kind = reshard_kind(s.output, final) if call.kind != "output" else None
            if out_kind == "invalid":
                continue
            cost = _input_cost(sg, placed, params, call, s)
            if cost is None:
                continue
            if out_kind:
                cost += reshard_bytes(s.output, final, numel_bytes(node)) + 1
            if best is None or cost < best[0]:
                best = (cost, s)
        if best is None:
            raise _no_strategy_error(sg, node, final, params)
        choices[node] = Choice(best[1], final)
        placed[node] = final
    return choices, params

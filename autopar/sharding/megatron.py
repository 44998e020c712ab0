"""The default tensor-parallel placements, derived from the per-op rules (no per-model code).

Objective, in this order: (1) no *conflict* — an all-gather of an activation whose sharding some
op introduced, or a sum/mean that reduces such a shard away (either way that sharding bought
nothing: only a row-parallel matmul may end it); (2) shard as many bytes of
weight matrices (parameters with two or more dims) as possible — vectors such as biases and norm
weights follow their op's strategy, they do not justify communication on their own; (3)
communicate as few bytes as possible; (4) reshard as few edges as possible.

Greedy in topological order: each node takes its best strategy given its producers' placements.
A partial sum (``P``) is resolved right after the op that makes it: all-reduce to ``R``, or with
sequence parallelism reduce-scatter to ``S(seq)`` when it is a per-token activation. Where the
greedy choice leads to a conflict downstream, the strategies that introduced the gathered
sharding (tracked as provenance) are disabled and the pass runs again, until none is left.

On a GPT block this finds Megatron-LM's layout by itself: ``q/k/v`` and ``fc1`` (``gate``) go
column-parallel because their input is replicated and sharding their output costs nothing; the
head split flows through ``view``/``transpose``/rotary/``softmax``/``@`` because those rules keep a
shard on the heads dim; ``o_proj`` and ``fc2`` go row-parallel because their input arrives
sharded on the contracted dim; the embedding goes vocab-parallel (its hidden-parallel
alternative conflicts at the first norm) and the tied ``lm_head`` follows it, column-parallel
into a vocabulary-parallel cross entropy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx

from autopar.core.plan import NodePlacement, Partial, Placement, Replicate, Shard
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.ops import numel_bytes, shape
from autopar.sharding.reshard import reshard_bytes, reshard_kind
from autopar.sharding.rules import NO_PLACEMENT, Strategy

log = logging.getLogger(__name__)

R = Replicate()
Node = torch.fx.Node
_MAX_ROUNDS = 64
_REDUCING = ("reduction", "pointwise_loss", "cross_entropy")


@dataclass
class _State:
    placement: dict[Node, Placement] = field(default_factory=dict)
    provenance: dict[Node, frozenset] = field(default_factory=dict)
    params: dict[str, tuple[Placement, tuple[str, str]]] = field(default_factory=dict)
    choice: dict[Node, Strategy] = field(default_factory=dict)
    collective: dict[Node, str] = field(default_factory=dict)
    blame: set = field(default_factory=set)


@dataclass(order=True)
class _Score:
    conflicts: int
    replicated_param_bytes: int
    comm_bytes: int
    reshards: int
    order: int
    blame: frozenset = field(compare=False, default=frozenset())
    own: bool = field(compare=False, default=False)


def _resolve_partial(sg: ShardingGraph, node: Node, sp: bool) -> Placement:
    d = sg.sequence_dim(node) if sp else None
    return Shard(d) if d is not None else R


def _score(sg: ShardingGraph, st: _State, node: Node, s: Strategy, order: int, sp: bool) -> _Score:
    call = sg.calls[node]
    conflicts = rep = comm = reshards = 0
    blame: set = set()
    own = split = arrived_sharded = False
    for inp, req in zip(call.inputs, s.inputs):
        if req is None:
            continue
        if sg.is_param(inp):
            name = str(inp.target)
            decided = st.params.get(name)
            if decided is not None and decided[0] != req:
                conflicts += 1
                blame.add(decided[1])
            if req == R and len(shape(inp)) >= 2 and len(sg.strategies(inp)) > 1:
                rep += numel_bytes(inp)  # weight matrices; vectors (bias, norm) follow them
            own = own or req != R
            continue
        kind = reshard_kind(st.placement[inp], req)
        if kind is None:
            arrived_sharded = arrived_sharded or req != R
            continue
        reshards += 1
        if kind == "invalid":
            conflicts += 1000
        elif kind == "split":
            split = True
        elif kind in ("all_gather", "all_to_all") and st.provenance[inp] and call.kind != "output":
            conflicts += 1
            blame |= st.provenance[inp]
        else:
            comm += reshard_bytes(st.placement[inp], req, numel_bytes(inp))
    if isinstance(s.output, Partial) and call.kind in _REDUCING:
        # Summing an introduced shard away (a norm's mean over a feature-sharded stream) ends
        # that sharding without a row-parallel matmul to pair with: a conflict like a gather.
        for inp, req in zip(call.inputs, s.inputs):
            if isinstance(req, Shard) and not sg.is_param(inp) and st.provenance[inp]:
                conflicts += 1
                blame |= st.provenance[inp]
    if isinstance(s.output, Partial) and call.kind != "output":
        comm += numel_bytes(node)
    comm += s.collective_bytes
    # Slicing a replicated operand to match one that arrived sharded introduces nothing new;
    # slicing when nothing arrived sharded does (an op choosing to shard on its own).
    own = own or (split and not arrived_sharded)
    return _Score(conflicts, rep, comm, reshards, order, frozenset(blame), own)


def _place(sg: ShardingGraph, st: _State, node: Node, s: Strategy, score: _Score, sp: bool) -> None:
    call = sg.calls[node]
    st.choice[node] = s
    st.blame |= score.blame
    for inp, req in zip(call.inputs, s.inputs):
        if req is not None and sg.is_param(inp):
            st.params.setdefault(str(inp.target), (req, (node.name, s.name)))
    out = s.output
    if isinstance(out, Partial):
        final = _resolve_partial(sg, node, sp)
        st.collective[node] = reshard_kind(out, final)
        st.placement[node] = final
        st.provenance[node] = frozenset()
        return
    st.placement[node] = out
    if out == R:
        st.provenance[node] = frozenset()
        return
    inherited = frozenset().union(
        *(
            st.provenance[i]
            for i, r in zip(call.inputs, s.inputs)
            if r not in (None, R) and not sg.is_param(i)
        )
    )
    st.provenance[node] = inherited | ({(node.name, s.name)} if score.own else frozenset())


def _propagate(sg: ShardingGraph, sp: bool, disabled: set) -> _State:
    st = _State()
    for node in sg.nodes:
        call = sg.calls[node]
        if call.kind in NO_PLACEMENT or call.kind == "param":
            continue
        cands = [s for s in sg.strategies(node) if (node.name, s.name) not in disabled]
        scored = [(_score(sg, st, node, s, i, sp), s) for i, s in enumerate(cands)]
        score, best = min(scored, key=lambda x: x[0])
        _place(sg, st, node, best, score, sp)
    return st


def solve_default(sg: ShardingGraph, sequence_parallel: bool) -> _State:
    disabled: set = set()
    for round_ in range(_MAX_ROUNDS):
        st = _propagate(sg, sequence_parallel, disabled)
        if not st.blame:
            log.debug("default placements settled after %d round(s)", round_ + 1)
            return st
        disabled |= st.blame
    raise AssertionError(f"default placements did not settle in {_MAX_ROUNDS} rounds")


def megatron_placements(
    gm: torch.fx.GraphModule, tp: int, sequence_parallel: bool = False
) -> dict[str, NodePlacement]:
    """Default placement of every tensor node of ``gm`` (see the module docstring).

    ``gm`` is a traced model-with-loss graph (``autopar.tracing.fx_trace``); the keys are its node
    names (parameters appear in their consumers' ``params``). ``tp == 1`` gives all-replicated.
    """
    sg = gm if isinstance(gm, ShardingGraph) else ShardingGraph(gm, tp)
    st = solve_default(sg, sequence_parallel and tp > 1)
    out: dict[str, NodePlacement] = {}
    for node, s in st.choice.items():
        if sg.calls[node].kind == "output":
            continue
        out[node.name] = NodePlacement(
            output=st.placement[node],
            params={name: p for name, p in s.params},
            collective=st.collective.get(node),
        )
    return out

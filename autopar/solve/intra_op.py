r"""Intra-op ILP: one tensor-parallel strategy per node of the graph, for one tp degree.

Strategies come from the placement rules (:mod:`autopar.sharding`): each says what placement its
inputs need, what its output is, how much of the op's work each rank does and which collectives it
performs inside. Repeated blocks are solved once: every node is mapped to its *canonical* node (the
same node in the first instance of its block type), node costs are weighted by the number of
instances and edge costs by the number of edges that map to the same canonical pair (the edge from
block i to block i+1 becomes a self-edge of block 0 with weight L-1).

Variables and constraints (``V`` canonical nodes with strategies, ``E`` canonical edges)::

    s[v,k] in {0,1}                       strategy k of node v
    sum_k s[v,k] = 1                      [one_strategy_v]
    e[u,v,i,k,j] in [0,1], only for (k,j) whose placements are compatible
    sum_j e[u,v,i,k,j] = s[u,k]           [edge_out_{u}_{v}_{i}_k]     (marginal form: tighter and
    sum_k e[u,v,i,k,j] = s[v,j]           [edge_in_{u}_{v}_{i}_j]       ~8x fewer rows than e >= s+s-1)
    sum_{v,k} w_v * param_bytes[v,k] * s[v,k] <= budget                [param_memory]   (optional)

    minimise  sum_{v,k} w_v * (compute[v,k] + comm[v,k]) * s[v,k]
            + sum_{edges} w_e * reshard[u,v,i,k,j] * e[u,v,i,k,j]

``compute`` is the node's forward+backward time scaled by the strategy's share of the work,
``comm`` its internal collectives (forward and their backward partners) plus the gradient
all-reduce ``g[u]`` of each replicated tensor read by sharded work (``g[u] >= s[v,k]`` for every
such consumer strategy [grad_reduce_u_v_i]: one all-reduce however many consumers), ``reshard`` the collective that moves the
producer's output placement to the placement the consumer needs (forward + backward partner).
Edges out of parameters must not reshard (a parameter is stored in the placement its consumers
read), which also keeps tied weights consistent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pulp
import torch.fx

from autopar.core.ir import OpGraph
from autopar.core.plan import NodePlacement, Replicate
from autopar.sharding import ShardingGraph, Strategy, reshard_kind
from autopar.sharding.reshard import BACKWARD_OF
from autopar.solve.ilp import SolveResult, solve

log = logging.getLogger(__name__)

GEMM_KINDS = ("linear", "matmul", "attention")

Node = torch.fx.Node
Choice = dict[Node, Strategy]
"""Canonical node -> its chosen strategy."""
Variables = dict[Node, list[pulp.LpVariable]]
"""Canonical node -> its strategy indicator variables ``s[v, k]``."""


@dataclass(kw_only=True)
class CostModel:
    """Seconds for compute and collectives on the tp group (filled from the cost models)."""

    peak_flops_per_s: float
    hbm_bytes_per_s: float
    collective_s: Callable[[str, float], float]
    """``(kind, nbytes) -> seconds`` on the tp group."""
    gemm_efficiency: float = 0.7

    def compute_s(
        self, op_kind: str, flops: float, nbytes: float, fraction: float, sharded_out: bool
    ) -> float:
        if op_kind in GEMM_KINDS:
            return fraction * flops / (self.peak_flops_per_s * self.gemm_efficiency)
        share = fraction if sharded_out else 1.0
        return share * max(flops / self.peak_flops_per_s, nbytes / self.hbm_bytes_per_s)

    def one_s(self, kind: str, nbytes: float) -> float:
        """One forward collective; ``all_reduce_max`` and friends cost as an all-reduce."""
        base = "all_reduce" if kind.startswith("all_reduce") else kind
        return 0.0 if base == "split" else self.collective_s(base, nbytes)

    def pair_s(self, kind: str | None, nbytes: float) -> float:
        """A resharding collective and its backward partner."""
        if kind is None:
            return 0.0
        back = BACKWARD_OF.get(kind)
        return self.one_s(kind, nbytes) + (self.one_s(back, nbytes) if back else 0.0)


@dataclass(kw_only=True)
class IntraOpSolution:
    choice: dict
    """Canonical node -> chosen Strategy."""
    placements: dict[str, NodePlacement]
    objective_s: float
    result: SolveResult
    num_nodes: int
    num_strategies: int


class Quotient:
    """The graph quotiented by block repetition: canonical nodes (first block instance), their weights and the weighted canonical edges.

    ``sg`` may be built on the whole graph or on the collapsed graph (stem, first instance of each
    block type, head: :func:`autopar.tracing.collapse.first_blocks_module`, 10x faster to parse on
    GPT-3). On the collapsed graph, block-0 nodes weigh as many instances as the type has, and the
    edges from one instance to the next (absent there) are read off the analysed graph.
    """

    def __init__(self, sg: ShardingGraph, graph: OpGraph) -> None:
        self.sg = sg
        self.canon: dict = {}
        inst0: dict[str, str] = {}
        count: dict[str, int] = {}
        for bt in graph.block_types.values():
            first = bt.node_names[0]
            for names in bt.node_names:
                inst0.update(zip(names, first))
            count.update({n: bt.count for n in first})
        by_name = {n.name: n for n in sg.nodes}
        collapsed = any(name not in by_name for name in inst0)
        copies: dict = {}
        for node in reversed(sg.nodes):
            self.canon[node] = self._canonical(node, inst0, by_name)
            copies[node] = self._copies(node, count, copies, graph) if collapsed else 1
        self.weight: dict = defaultdict(int)
        self.edges: dict = defaultdict(int)
        for node in sg.nodes:
            c = self.canon[node]
            self.weight[c] += copies[c]
            for i, u in enumerate(sg.calls[node].inputs):
                if u is not None:
                    both = copies[self.canon[u]] > 1 and copies[c] > 1
                    self.edges[(self.canon[u], c, i)] += copies[c] if both else 1
        if collapsed:
            self._add_chain_edges(graph, inst0, by_name)

    @staticmethod
    def _copies(node: Node, count: dict[str, int], copies: dict[Node, int], graph: OpGraph) -> int:
        """How many instances a node of the collapsed graph stands for: its block type's count
        (1 outside blocks); for nodes the analysed graph does not list (parameters, attribute
        reads), their users'."""
        if node.name in count:
            return count[node.name]
        if node.name in graph._by_name:
            return 1
        return max((copies.get(u, 1) for u in node.users), default=1)

    def _canonical(self, node: Node, inst0: dict[str, str], by_name: dict[str, Node]) -> Node:
        if node.name in inst0:
            return by_name[inst0[node.name]]
        for user in node.users:
            cu = self.canon.get(user)
            if cu is None or cu is user:
                continue
            inputs = self.sg.calls[user].inputs
            if node in inputs:
                return self.sg.calls[cu].inputs[inputs.index(node)]
        return node

    def _add_chain_edges(self, graph: OpGraph, inst0: dict[str, str], by_name: dict[str, Node]) -> None:
        """Edges from block instance i to i+1, weighted by the number of such steps (count - 1).
        Instance 1's input at OpGraph position j comes from instance 0; the canonical consumer's
        input at the same position (fed by the stem in the collapsed graph) says which argument."""
        for bt in graph.block_types.values():
            if bt.count < 2:
                continue
            first = set(bt.node_names[0])
            for name in bt.node_names[1]:
                v = by_name.get(inst0[name])
                if v is None:
                    continue
                twin_inputs = graph[v.name].inputs
                for j, src in enumerate(graph[name].inputs):
                    if src not in first or j >= len(twin_inputs) or twin_inputs[j] not in by_name:
                        continue
                    fed_by = by_name[twin_inputs[j]]
                    inputs = self.sg.calls[v].inputs
                    if fed_by in inputs:
                        self.edges[(by_name[src], v, inputs.index(fed_by))] += bt.count - 1


def solve_placements(
    sg: ShardingGraph,
    graph: OpGraph,
    costs: CostModel,
    *,
    param_budget_bytes: float | None = None,
    time_limit_s: float = 30.0,
) -> IntraOpSolution | None:
    """Placements of every node of ``sg`` (names as in ``graph``) minimising the objective above."""
    q = Quotient(sg, graph)
    canon = [n for n in sg.nodes if q.canon[n] is n and sg.strategies(n)]
    prob = pulp.LpProblem("intra_op_placements", pulp.LpMinimize)
    s = {
        v: [prob.add_variable(f"s_{v.name}_{k}", cat="Binary") for k in range(len(sg.strategies(v)))]
        for v in canon
    }
    objective = []
    for v in canon:
        prob += pulp.lpSum(s[v]) == 1, f"one_strategy_{v.name}"
        for k, strat in enumerate(sg.strategies(v)):
            cost = q.weight[v] * _node_s(sg, graph, costs, v, strat)
            if cost:
                objective.append(cost * s[v][k])
    for (u, v, i), w in q.edges.items():
        if u not in s or v not in s:
            continue
        objective += _edge(prob, sg, costs, s, u, v, i, w)
    objective += _grad_terms(prob, sg, q, costs, s)
    if param_budget_bytes is not None:
        prob += pulp.lpSum(_param_memory(sg, q, s)) <= param_budget_bytes, "param_memory"
    prob += pulp.lpSum(objective)
    result = solve(prob, time_limit_s)
    if result.status not in ("optimal", "time_limit"):
        return None
    choice = {v: sg.strategies(v)[max(range(len(s[v])), key=lambda k: s[v][k].value() or 0)] for v in canon}
    return IntraOpSolution(
        choice=choice,
        placements=_placements(sg, q, choice),
        objective_s=result.objective or 0.0,
        result=result,
        num_nodes=len(canon),
        num_strategies=sum(len(x) for x in s.values()),
    )


def _node_s(sg: ShardingGraph, graph: OpGraph, costs: CostModel, v: Node, strat: Strategy) -> float:
    try:
        op = graph[v.name]
    except KeyError:
        return 0.0
    nbytes = op.bytes_read + op.bytes_written
    sharded = not isinstance(strat.output, Replicate)
    t = 3.0 * costs.compute_s(op.op_kind, op.flops_fwd, nbytes, strat.compute_fraction, sharded)
    t += sum(costs.one_s(c.kind, c.bytes) for c in strat.comm)  # e.g. vocab-parallel loss reductions
    return t


def _grad_reduced(sg: ShardingGraph, q: Quotient, choice: Choice) -> set[Node]:
    """Canonical producers whose gradient is a partial sum: a replicated tensor read by sharded
    work. Its consumers' gradients add up locally first, so it costs one all-reduce, not one per
    consumer (q, k and v reading one LayerNorm output)."""
    out = set()
    for (u, v, i), _ in q.edges.items():
        if v in choice and choice[v].grad_needs_all_reduce(i) and sg.requires_grad(u):
            out.add(u)
    return out


def _grad_s(sg: ShardingGraph, costs: CostModel, u: Node) -> float:
    return costs.collective_s("all_reduce", sg.tensor_bytes(u))


def _edge_s(sg: ShardingGraph, costs: CostModel, u: Node, a: Strategy, b: Strategy, i: int) -> float | None:
    """Resharding seconds on edge ``u -> v`` (input ``i``) for strategies ``a`` of u and ``b`` of v;
    None when the pair is not allowed."""
    need = b.inputs[i]
    kind = reshard_kind(a.output, need) if need is not None else None
    if kind == "invalid" or (sg.is_param(u) and kind is not None):
        return None
    return costs.pair_s(kind, sg.tensor_bytes(u))


def assignment_s(sg: ShardingGraph, graph: OpGraph, costs: CostModel, choice: Choice) -> float | None:
    """The ILP objective of a full assignment ``{canonical node: Strategy}`` (None if illegal)."""
    q = Quotient(sg, graph)
    total = sum(q.weight[v] * _node_s(sg, graph, costs, v, strat) for v, strat in choice.items())
    for (u, v, i), w in q.edges.items():
        if u in choice and v in choice:
            t = _edge_s(sg, costs, u, choice[u], choice[v], i)
            if t is None:
                return None
            total += w * t
    total += sum(q.weight[u] * _grad_s(sg, costs, u) for u in _grad_reduced(sg, q, choice))
    return total


def _edge(
    prob: pulp.LpProblem,
    sg: ShardingGraph,
    costs: CostModel,
    s: Variables,
    u: Node,
    v: Node,
    i: int,
    weight: int,
) -> list:
    su, sv = sg.strategies(u), sg.strategies(v)
    e, terms = {}, []
    for k, a in enumerate(su):
        for j, b in enumerate(sv):
            t = _edge_s(sg, costs, u, a, b, i)
            if t is None:
                continue
            var = prob.add_variable(f"e_{u.name}_{v.name}_{i}_{k}_{j}", lowBound=0, upBound=1)
            e[k, j] = var
            if weight * t:
                terms.append(weight * t * var)
    tag = f"{u.name}_{v.name}_{i}"
    for k in range(len(su)):
        prob += pulp.lpSum(e[k, j] for j in range(len(sv)) if (k, j) in e) == s[u][k], f"edge_out_{tag}_{k}"
    for j in range(len(sv)):
        prob += pulp.lpSum(e[k, j] for k in range(len(su)) if (k, j) in e) == s[v][j], f"edge_in_{tag}_{j}"
    return terms


def _grad_terms(prob: pulp.LpProblem, sg: ShardingGraph, q: Quotient, costs: CostModel, s: Variables) -> list:
    """g[u] >= s[v,k] for every consumer strategy k of v that leaves u's gradient partial."""
    g, terms = {}, []
    for (u, v, i), _ in q.edges.items():
        if u not in s or v not in s or not sg.requires_grad(u):
            continue
        needs = [k for k, strat in enumerate(sg.strategies(v)) if strat.grad_needs_all_reduce(i)]
        if not needs:
            continue
        if u not in g:
            g[u] = prob.add_variable(f"g_{u.name}", lowBound=0, upBound=1)
            terms.append(q.weight[u] * _grad_s(sg, costs, u) * g[u])
        prob += g[u] >= pulp.lpSum(s[v][k] for k in needs), f"grad_reduce_{u.name}_{v.name}_{i}"
    return terms


def _param_memory(sg: ShardingGraph, q: Quotient, s: Variables) -> list:
    terms = []
    for v, vars_ in s.items():
        if not sg.is_param(v):
            continue
        full = sg.tensor_bytes(v)
        for k, strat in enumerate(sg.strategies(v)):
            div = 1 if isinstance(strat.output, Replicate) else sg.tp
            terms.append(q.weight[v] * full / div * vars_[k])
    return terms


def _placements(sg: ShardingGraph, q: Quotient, choice: Choice) -> dict[str, NodePlacement]:
    out = {}
    reduced = _grad_reduced(sg, q, choice)
    for node in sg.nodes:
        c = q.canon[node]
        strat = choice.get(c)
        if strat is None or sg.is_param(node) or sg.calls[node].kind in ("output",):
            continue
        params = {}
        for name, placement in strat.params:
            params[_instance_param(sg, node, c, name)] = placement
        comms = _node_comms(sg, q, choice, node, strat, reduced)
        out[node.name] = NodePlacement(output=strat.output, params=params, comms=comms)
    return out


def expand_placements(placements: dict[str, NodePlacement], graph: OpGraph) -> dict[str, NodePlacement]:
    """Copy the first instance's placements to every instance of its block type (solving on the
    collapsed graph yields only the first). Parameter names move to the instance's module path."""
    out = dict(placements)
    for bt in graph.block_types.values():
        first = bt.node_names[0]
        for names in bt.node_names[1:]:
            for name, twin in zip(names, first):
                if twin not in placements or name in out:
                    continue
                old, new = (
                    _instance_prefix(graph[twin].module_path),
                    _instance_prefix(graph[name].module_path),
                )
                p = placements[twin]
                params = {_rename(k, old, new): v for k, v in p.params.items()}
                out[name] = NodePlacement(
                    output=p.output, params=params, collective=p.collective, comms=p.comms
                )
    return out


def _instance_prefix(module_path: str) -> str:
    """``layers.3.attn.q_proj`` -> ``layers.3`` (the path up to the first integer segment)."""
    parts = module_path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module_path


def _rename(param: str, old: str, new: str) -> str:
    if not old or old == new:
        return param
    return param.replace(f"{old}.", f"{new}.", 1)


def _node_comms(
    sg: ShardingGraph, q: Quotient, choice: Choice, node: Node, strat: Strategy, reduced: set[Node]
) -> list[dict]:
    """The collectives the objective charged to ``node``: its inputs' resharding (forward and
    backward partner), its internal collectives, gradient all-reduces of replicated inputs."""
    comms = [{"kind": c.kind, "bytes": c.bytes, "phase": "fwd"} for c in strat.comm]
    for i, u in enumerate(sg.calls[node].inputs):
        if u is None:
            continue
        nbytes = sg.tensor_bytes(u)
        producer = choice.get(q.canon[u])
        need = strat.inputs[i]
        kind = reshard_kind(producer.output, need) if producer is not None and need is not None else None
        if kind not in (None, "invalid", "split"):
            comms.append({"kind": kind, "bytes": nbytes, "phase": "fwd"})
        back = BACKWARD_OF.get(kind) if kind else None
        if back:
            comms.append({"kind": back, "bytes": nbytes, "phase": "bwd"})
    if q.canon[node] in reduced:
        comms.append({"kind": "all_reduce", "bytes": sg.tensor_bytes(node), "phase": "bwd"})
    return comms


def _instance_param(sg: ShardingGraph, node: Node, canon_node: Node, name: str) -> str:
    """The parameter of ``node`` at the position where ``canon_node`` reads ``name``."""
    if node is canon_node:
        return name
    for cu, u in zip(sg.calls[canon_node].inputs, sg.calls[node].inputs):
        if cu is not None and sg.is_param(cu) and str(cu.target) == name and u is not None:
            return str(u.target)
    return name

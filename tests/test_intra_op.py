"""The intra-op ILP (per-node tensor-parallel strategies) against exhaustive search.

Oracle: on graphs small enough to enumerate every combination of strategies, the ILP's objective
equals the best legal assignment's objective under the same cost function (``assignment_s``).
On a GPT it is never worse than the default (Megatron) placements, which are one legal assignment.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.sharding import ShardingGraph, megatron_placements
from autopar.solve.intra_op import CostModel, Quotient, assignment_s, solve_placements
from cost_models import GroupSpec, LinkSpec, collective_time_s


def _costs(bandwidth_bytes_per_s: float) -> CostModel:
    group = GroupSpec(
        size=2, ranks_per_node=2, intra=LinkSpec(bandwidth_bytes_per_s=bandwidth_bytes_per_s, latency_s=5e-6)
    )
    return CostModel(
        peak_flops_per_s=100e12,
        hbm_bytes_per_s=2e12,
        collective_s=lambda kind, nbytes: collective_time_s(kind, nbytes, group),
    )


class TwoLinear(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width, bias=False)
        self.fc2 = nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _mse(out, target):
    return F.mse_loss(out, target)


def _brute_force(sg, graph, costs):
    q = Quotient(sg, graph)
    canon = [n for n in sg.nodes if q.canon[n] is n and sg.strategies(n)]
    best = None
    for combo in itertools.product(*(sg.strategies(v) for v in canon)):
        t = assignment_s(sg, graph, costs, dict(zip(canon, combo)))
        if t is not None and (best is None or t < best):
            best = t
    return best, len(canon)


@pytest.mark.parametrize("width,batch,bandwidth", [(64, 8, 1e9), (512, 4096, 300e9), (1024, 64, 50e9)])
def test_ilp_equals_exhaustive_search(width, batch, bandwidth):
    model = TwoLinear(width).to(device="meta")
    x = torch.zeros(batch, width, device="meta")
    graph = autopar.trace(model, (x, x), loss_fn=_mse)
    sg = ShardingGraph(graph.gm, 2)
    costs = _costs(bandwidth)
    solution = solve_placements(sg, graph, costs)
    best, n = _brute_force(sg, graph, costs)
    assert n >= 5  # the search is not trivial
    assert solution.result.status == "optimal"
    assert solution.objective_s == pytest.approx(best, rel=1e-6, abs=1e-12)
    assert assignment_s(sg, graph, costs, solution.choice) == pytest.approx(solution.objective_s, rel=1e-6)


def test_slow_link_keeps_everything_replicated():
    # With a link this slow any collective costs more than the compute it saves.
    model = TwoLinear(64).to(device="meta")
    x = torch.zeros(8, 64, device="meta")
    graph = autopar.trace(model, (x, x), loss_fn=_mse)
    solution = solve_placements(ShardingGraph(graph.gm, 2), graph, _costs(1e3))
    assert all(str(p.output) == "R" for p in solution.placements.values())


def _matching_strategy(sg, node, placements):
    """The strategy of ``node`` that the default placements describe."""
    cands = sg.strategies(node)
    if sg.is_param(node):
        want = [str(p.params[str(node.target)]) for p in placements.values() if str(node.target) in p.params]
        return next(s for s in cands if not want or str(s.output) == want[0])
    pl = placements.get(node.name)
    if pl is None:
        return cands[0]
    before = "P" if pl.collective in ("all_reduce", "reduce_scatter") else str(pl.output)
    for s in cands:
        ok_out = str(s.output) == before or (pl.collective == "all_gather" and str(s.output).startswith("S"))
        ok_params = all(str(pl.params.get(n, p)) == str(p) for n, p in s.params)
        if ok_out and ok_params:
            return s
    return None


def test_gpt_ilp_never_worse_than_default_placements():
    from autopar.models.gpt import GPT, GPTConfig, gpt_loss

    model = GPT(GPTConfig(hidden=256, layers=3, heads=4, vocab=1024, seq=64), device="meta")
    tokens = torch.zeros(2, 64, dtype=torch.long, device="meta")
    graph = autopar.trace(model, (tokens, tokens), loss_fn=gpt_loss)
    sg = ShardingGraph(graph.gm, 2)
    costs = _costs(100e9)
    solution = solve_placements(sg, graph, costs)
    q = Quotient(sg, graph)
    default = megatron_placements(graph.gm, 2)
    choice = {v: _matching_strategy(sg, v, default) for v in sg.nodes if q.canon[v] is v and sg.strategies(v)}
    assert all(s is not None for s in choice.values())
    default_s = assignment_s(sg, graph, costs, choice)
    assert default_s is not None
    assert solution.objective_s <= default_s * (1 + 1e-9)
    # Identical layers are solved once: every layer gets the same output placements.
    layers = [[solution.placements[n].output for n in names if n in solution.placements]
              for names in graph.block_types["layers.*"].node_names]  # fmt: skip
    assert layers[0] == layers[1] == layers[2]


def test_collapsed_graph_gives_the_same_objective_and_placements():
    from autopar.models.gpt import GPT, GPTConfig, gpt_loss
    from autopar.tracing.collapse import first_blocks_module

    model = GPT(GPTConfig(hidden=256, layers=4, heads=4, vocab=1024, seq=64), device="meta")
    tokens = torch.zeros(2, 64, dtype=torch.long, device="meta")
    graph = autopar.trace(model, (tokens, tokens), loss_fn=gpt_loss)
    costs = _costs(100e9)
    full = solve_placements(ShardingGraph(graph.gm, 2), graph, costs)
    small_sg = ShardingGraph(first_blocks_module(graph), 2)
    assert len(small_sg.nodes) < len(ShardingGraph(graph.gm, 2).nodes)
    small = solve_placements(small_sg, graph, costs)
    assert small.objective_s == pytest.approx(full.objective_s, rel=1e-9)
    for name, placement in small.placements.items():
        assert str(full.placements[name].output) == str(placement.output)


def test_expanded_placements_cost_like_the_full_graph_solution():
    from autopar.models.gpt import GPT, GPTConfig, gpt_loss
    from autopar.solve.intra_op import expand_placements
    from autopar.tracing.collapse import first_blocks_module

    model = GPT(GPTConfig(hidden=256, layers=4, heads=4, vocab=1024, seq=64), device="meta")
    tokens = torch.zeros(2, 64, dtype=torch.long, device="meta")
    graph = autopar.trace(model, (tokens, tokens), loss_fn=gpt_loss)
    costs = _costs(100e9)
    full = solve_placements(ShardingGraph(graph.gm, 2), graph, costs).placements
    small = solve_placements(ShardingGraph(first_blocks_module(graph), 2), graph, costs).placements
    expanded = expand_placements(small, graph)
    assert set(expanded) == set(full)
    assert {k: v.to_dict() for k, v in expanded.items()} == {k: v.to_dict() for k, v in full.items()}

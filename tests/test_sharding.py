"""Placement rules and default placements, without processes.

Oracles: the placement algebra itself (which dims a reshape can carry a shard through), and
Megatron-LM's published layout (Shoeybi et al. 2019, Korthikanti et al. 2022): column-parallel
q/k/v and fc1, row-parallel o_proj and fc2, vocabulary-parallel embedding, head, and loss; with
sequence parallelism the residual stream, norms and dropouts sharded along the sequence.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autopar.core.ir import OP_KINDS
from autopar.core.plan import Partial, Replicate, Shard
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.sharding import ShardingGraph, functionalize, megatron_placements, ops, reshard_kind, strategies
from autopar.sharding.view_rules import getitem_dim_map, reshape_dim_map
from autopar.tracing import fx_trace
from autopar.tracing.opkinds import FAMILY_KINDS, OPS

R, P = Replicate(), Partial()


def gpt_graph(tracer="auto", **cfg):
    base = dict(hidden=32, layers=2, heads=4, vocab=64, seq=16, fused_attention=False)  # explicit softmax
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**base, **cfg}))
    tokens = torch.randint(0, 64, (2, 8))
    return fx_trace(model, (tokens, tokens), loss_fn=gpt_loss, tracer=tracer)


def params_of(placements):
    out = {}
    for np in placements.values():
        out.update(np.params)
    return out


# ------------------------------------------------------------------------------ algebra
@pytest.mark.parametrize(
    "ins, outs, expected",
    [
        ((2, 8, 32), (2, 8, 4, 8), {0: 0, 1: 1, 2: 2}),  # split hidden into heads: heads keep it
        ((2, 8, 4, 8), (2, 8, 32), {0: 0, 1: 1, 2: 2}),  # merge heads back
        ((2, 8, 64), (16, 64), {0: 0, 2: 1}),  # flatten tokens: only batch (outer) keeps a shard
        ((2, 1, 8), (2, 8), {0: 0, 2: 1}),  # size-1 dims carry nothing
        ((6, 4), (4, 6), {0: 0}),  # regrouping: only the outermost dims line up
    ],
)
def test_reshape_dim_map(ins, outs, expected):
    assert reshape_dim_map(ins, outs) == expected


def test_getitem_dim_map_keeps_full_slices_and_drops_ints():
    assert getitem_dim_map((2, 4, 8, 8), (0, 0)) == ({2: 0, 3: 1}, {0, 1})
    assert getitem_dim_map((2, 4, 8), (Ellipsis, slice(None, 3))) == ({0: 0, 1: 1}, set())
    assert getitem_dim_map((2, 4), (None, slice(None))) == ({0: 1, 1: 2}, set())


def test_reshard_kinds():
    assert reshard_kind(R, Shard(1)) == "split"
    assert reshard_kind(P, R) == "all_reduce"
    assert reshard_kind(P, Shard(0)) == "reduce_scatter"
    assert reshard_kind(Shard(2), R) == "all_gather"
    assert reshard_kind(Shard(1), Shard(2)) == "all_to_all"
    assert reshard_kind(R, P) == "invalid"
    assert reshard_kind(Shard(1), Shard(1)) is None


# ------------------------------------------------------------------------------ rules
def _node(sg, name):
    return sg.node(name)


def test_linear_strategies_are_column_row_batch_partial():
    sg = ShardingGraph(gpt_graph(), tp=2)
    q = _node(sg, "model_layers_0_attn_q_proj")
    by_name = {s.name: s for s in sg.strategies(q)}
    w, b = "model.layers.0.attn.q_proj.weight", "model.layers.0.attn.q_proj.bias"
    assert by_name["column"].params == ((w, Shard(0)), (b, Shard(0)))
    assert by_name["column"].output == Shard(2) and by_name["column"].inputs[0] == R
    assert by_name["row"].output == P and by_name["row"].inputs[0] == Shard(2)
    assert by_name["row"].param_placements == {w: Shard(1), b: R}
    # the rank-0 bias of a row-parallel linear has a complete gradient: no backward all-reduce
    assert not by_name["row"].grad_needs_all_reduce(2) and by_name["column"].grad_needs_all_reduce(0)
    assert {"replicate", "batch(0)", "batch(1)", "partial"} <= set(by_name)
    assert all(s.compute_fraction == 0.5 for s in sg.strategies(q) if s.name != "replicate")


def test_softmax_never_shards_its_reduced_dim():
    sg = ShardingGraph(gpt_graph(), tp=2)
    outs = {s.output for s in sg.strategies(_node(sg, "softmax"))}
    assert outs == {R, Shard(0), Shard(1), Shard(2)}


def test_vocab_parallel_cross_entropy_reports_its_collectives():
    sg = ShardingGraph(gpt_graph(), tp=2)
    ce = {s.name: s for s in sg.strategies(_node(sg, "cross_entropy"))}["vocab_parallel"]
    rows = 2 * 8
    assert ce.inputs == (Shard(1), R) and ce.output == R
    assert [c.kind for c in ce.comm] == ["all_reduce_max", "all_reduce", "all_reduce"]
    assert ce.collective_bytes == 3 * rows * 4


def test_shape_only_index_of_a_sharded_dim_is_legal():
    """``ones_like(scores[0, 0])`` only reads a shape: indexing the head dim of sharded scores is fine."""
    sg = ShardingGraph(gpt_graph(), tp=2)
    idx = next(
        n
        for n in sg.nodes
        if n.name.startswith("getitem") and any(u.name.startswith("ones_like") for u in n.users)
    )
    assert sg.value_irrelevant(idx)
    assert any(s.inputs == (Shard(1),) and s.output == R for s in sg.strategies(idx))


def test_module_level_strategies_function_on_a_functionalised_graph():
    norm = functionalize(gpt_graph())
    fc1 = next(n for n in norm.gm.graph.nodes if n.name == "model_layers_0_mlp_fc1")
    names = {s.name for s in strategies(fc1, 2)}
    assert {"column", "row", "replicate"} <= names


def test_functionalize_keeps_names_and_canonicalises_tied_weights():
    gm = gpt_graph()
    norm = functionalize(gm)
    assert {n.name for n in gm.graph.nodes} <= {n.name for n in norm.gm.graph.nodes}
    assert norm.aliases == {"model.lm_head.weight": "model.tok_emb.weight"}
    head = next(n for n in norm.gm.graph.nodes if n.name == "model_lm_head")
    assert head.target is F.linear and head.args[1].target == "model.tok_emb.weight"
    assert "model.lm_head" in head.meta["nn_module_stack"]


# ------------------------------------------------------------------------------ defaults
def _check_megatron_block(params, layer=0, swiglu=False):
    pre = f"model.layers.{layer}"
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc1") + (("mlp.gate",) if swiglu else ()):
        assert params[f"{pre}.{name}.weight"] == Shard(0), name  # column parallel
    for name in ("attn.o_proj", "mlp.fc2"):
        assert params[f"{pre}.{name}.weight"] == Shard(1), name  # row parallel
        assert params[f"{pre}.{name}.bias"] == R


def test_default_placements_are_megatron_on_gpt():
    pl = megatron_placements(gpt_graph(), tp=2)
    params = params_of(pl)
    for layer in (0, 1):
        _check_megatron_block(params, layer)
    assert params["model.tok_emb.weight"] == Shard(0)  # vocab parallel, tied with lm_head
    assert params["model.layers.0.ln_1.weight"] == R
    assert (
        pl["model_layers_0_attn_o_proj"].output == R
        and pl["model_layers_0_attn_o_proj"].collective == "all_reduce"
    )
    assert pl["model_tok_emb"].collective == "all_reduce"
    assert pl["transpose"].output == Shard(1)  # heads, after view(b, t, heads, hd).transpose(1, 2)
    assert pl["model_lm_head"].output == Shard(2) and pl["cross_entropy"].output == R
    assert pl["add_1"].output == R  # the residual stream stays replicated


def test_default_placements_with_sequence_parallel():
    pl = megatron_placements(gpt_graph(), tp=2, sequence_parallel=True)
    _check_megatron_block(params_of(pl))
    for node in ("model_tok_emb", "model_layers_0_attn_o_proj", "model_layers_0_mlp_fc2"):
        assert pl[node].output == Shard(1) and pl[node].collective == "reduce_scatter", node
    for node in ("add_1", "model_layers_0_ln_2", "model_layers_1_drop_1", "model_ln_f"):
        assert pl[node].output == Shard(1), node


def test_default_placements_llama_style_gqa_rotary_swiglu():
    pl = megatron_placements(
        gpt_graph(norm="rmsnorm", act="swiglu", kv_heads=2), tp=2, sequence_parallel=True
    )
    params = params_of(pl)
    _check_megatron_block(params, swiglu=True)
    assert params["model.layers.0.ln_1.weight"] == R  # RMSNorm weight: a pointwise mul
    assert pl["repeat_interleave"].output == Shard(1)  # local kv heads repeat into local heads


def test_too_few_kv_heads_fall_back_without_sharding_heads():
    """kv_heads=1 cannot be split over 2 ranks: k/v must not end up sharded along heads."""
    pl = megatron_placements(gpt_graph(norm="rmsnorm", act="swiglu", kv_heads=1), tp=2)
    params = params_of(pl)
    assert params["model.layers.0.attn.q_proj.weight"] == Shard(0)
    assert params["model.layers.0.attn.k_proj.weight"] != Shard(0)
    assert params["model.layers.0.mlp.fc1.weight"] == Shard(0)


def test_indivisible_heads_keep_attention_replicated_but_shard_the_mlp():
    pl = megatron_placements(gpt_graph(hidden=24, heads=3), tp=2)
    params = params_of(pl)
    assert params["model.layers.0.attn.q_proj.weight"] != Shard(0)
    assert params["model.layers.0.mlp.fc1.weight"] == Shard(0)
    assert params["model.layers.0.mlp.fc2.weight"] == Shard(1)


def test_symbolic_and_export_graphs_get_the_same_parameter_placements():
    a = params_of(megatron_placements(gpt_graph(), tp=2))
    b = params_of(megatron_placements(gpt_graph(tracer="export"), tp=2))
    assert a == {k: v for k, v in b.items() if k in a} and set(b) <= set(a) | {"model.lm_head.weight"}


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_default_placements_of_an_mlp_pair_columns_with_rows():
    gm = fx_trace(_Classifier(), (torch.randn(4, 8), torch.randint(0, 6, (4,))), loss_fn=F.cross_entropy)
    params = params_of(megatron_placements(gm, tp=2))
    assert params["model.fc1.weight"] == Shard(0) and params["model.fc2.weight"] == Shard(1)
    assert params["model.head.weight"] == Shard(0)  # into the vocabulary-parallel cross entropy


def test_tp1_is_all_replicated():
    pl = megatron_placements(gpt_graph(), tp=1)
    assert all(np.output == R for np in pl.values())
    assert all(p == R for p in params_of(pl).values())


# ------------------------------------------------------------------------------ the op table
def test_every_op_the_sharding_rules_know_has_a_consistent_cost_kind():
    """One table (``autopar.tracing.opkinds.OPS``): every name a sharding rule parses has a cost
    kind other than "other", and the kind agrees with the rule family (pointwise -> elementwise or
    view, reduction -> reduction, ...)."""
    known = {name for name, info in OPS.items() if info.family is not None}
    derived = set().union(
        ops.POINTWISE, ops.LINEAR_UNARY, ops.RESHAPE, ops.PERMUTE, ops.SPLIT, ops.REDUCTION,
        ops.LIKE, ops.RANDOM_LIKE, ops.NEW, ops.SHAPE_METHODS,
    )  # fmt: skip
    assert derived <= known
    bad = []
    for name in sorted(known):
        info = OPS[name]
        if info.kind == "other" or info.kind not in OP_KINDS:
            bad.append(f"{name}: cost kind {info.kind!r}")
        elif info.kind not in FAMILY_KINDS[info.family]:
            bad.append(f"{name}: family {info.family!r} but cost kind {info.kind!r}")
        if info.transcendental and (info.kind, info.family) != ("elementwise", "pointwise"):
            bad.append(f"{name}: transcendental but not an elementwise pointwise op")
        if info.linear_unary and info.family != "pointwise":
            bad.append(f"{name}: linear_unary but family {info.family!r}")
    assert not bad, "\n".join(bad)
    # the former disagreements, decided once
    for name in ("sign", "square", "isub", "itruediv"):
        assert (OPS[name].kind, OPS[name].family) == ("elementwise", "pointwise"), name
    for name in ("max", "min", "norm"):
        assert (OPS[name].kind, OPS[name].family) == ("reduction", "reduction"), name


def test_a_name_without_a_family_gets_no_sharding_rule():
    class Net(nn.Module):
        def forward(self, x):
            return torch.baddbmm(x, x, x).sign().square()

    gm = fx_trace(Net(), (torch.randn(2, 3, 3),))
    sg = ShardingGraph(gm, tp=2)
    kinds = {call.name: call.kind for call in sg.calls.values()}
    assert OPS["baddbmm"].family is None and kinds["baddbmm"] == "other"
    assert kinds["sign"] == kinds["square"] == "pointwise"

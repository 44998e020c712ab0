"""Tracing: fx graphs of a model with its loss, and their analysis into an OpGraph.

Oracles: eager PyTorch (losses, what autograd saves in a real CPU run), Megatron's closed forms
(parameters, training FLOPs; Narayanan et al. SC'21) and Korthikanti et al. 2022 Eq. 1 (saved
activation bytes per transformer layer).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autopar
from autopar.core.errors import TraceError
from autopar.core.ir import OP_KINDS
from autopar.models import build_model
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.tracing import fx_trace
from autopar.tracing.analyse import analyse

TINY = GPTConfig(
    hidden=32, layers=2, heads=4, vocab=64, seq=8, dropout=0.0, fused_attention=False
)  # the explicit softmax form


def _tiny_inputs(batch: int = 2, cfg: GPTConfig = TINY):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
    targets = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
    return tokens, targets


def _korthikanti_bytes(s: int, b: int, h: int, a: int) -> float:
    return s * b * h * (34 + 5 * a * s / h)


# -- fx graph ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracer", ["symbolic_trace", "export"])
def test_fx_trace_graph_computes_the_eager_loss(tracer):
    """The traced GraphModule (model + loss) returns the eager loss; every node has shape meta."""
    torch.manual_seed(0)
    model = GPT(TINY)
    tokens, targets = _tiny_inputs()
    gm = fx_trace(model, (tokens, targets), loss_fn=gpt_loss, tracer=tracer)
    assert gm.meta["autopar"]["tracer"] == tracer
    assert gm.meta["autopar"]["input_names"] == ["tokens"]
    assert gm.meta["autopar"]["target_names"] == ["targets"]
    torch.testing.assert_close(gm(tokens, targets), gpt_loss(model(tokens), targets))
    assert "model.layers.0.attn.q_proj.weight" in {n for n, _ in gm.named_parameters()}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            assert "tensor_meta" in node.meta, node.format_node()
    q_proj = [
        n
        for n in gm.graph.nodes
        if n.op != "get_attr"
        and list(n.meta.get("nn_module_stack", {}).values())[-1:]
        and list(n.meta["nn_module_stack"].values())[-1][0] == "model.layers.0.attn.q_proj"
    ]
    assert q_proj and "gpt.py" in q_proj[0].meta["stack_trace"]


def test_model_returning_its_own_loss_needs_no_loss_fn():
    """loss_fn=None: the model's output is the loss; every example input goes to the model."""

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPT(TINY)

        def forward(self, tokens, targets):
            return gpt_loss(self.gpt(tokens), targets)

    torch.manual_seed(0)
    model = WithLoss()
    tokens, targets = _tiny_inputs()
    graph = autopar.trace(model, (tokens, targets))
    assert graph.inputs == ["tokens", "targets"]
    torch.testing.assert_close(graph.gm(tokens, targets), model(tokens, targets))
    assert graph.nodes[-2].op_kind == "loss"


# -- analysed graph: per-node facts ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_graph():
    torch.manual_seed(0)
    model = GPT(TINY)
    return model, autopar.trace(model, _tiny_inputs(), loss_fn=gpt_loss)


def test_nodes_carry_kinds_shapes_flops_and_locations(tiny_graph):
    _, g = tiny_graph
    q = next(n for n in g.nodes if n.module_path == "layers.0.attn.q_proj")
    assert q.op_kind == "linear" and q.output_shape == (2, 8, 32) and q.output_dtype == "float32"
    m, n, k = 2 * 8, 32, 32
    assert q.gemm == (1, m, n, k)
    assert q.flops_fwd == 2 * m * n * k + m * n  # GEMM + bias
    assert q.flops_bwd == 2 * q.flops_fwd
    assert q.param_names == ["layers.0.attn.q_proj.weight", "layers.0.attn.q_proj.bias"]
    assert q.param_bytes == (32 * 32 + 32) * 4
    assert q.bytes_written == m * n * 4
    assert q.source.endswith("gpt.py:" + str(_line_of("self.q_proj(x)")))
    assert q.block == 0 and q.block_type == "layers.*"
    scores = next(n for n in g.nodes if n.op_kind == "matmul" and n.block == 1)
    assert scores.gemm == (2 * 4, 8, 8, 8)  # (batch*heads, s, s, head_dim)
    kinds = {n.op_kind for n in g.nodes}
    assert {
        "placeholder",
        "embedding",
        "norm",
        "linear",
        "matmul",
        "softmax",
        "view",
        "elementwise",
        "loss",
    } <= kinds
    assert all(n.op_kind in OP_KINDS for n in g.nodes)


def _line_of(snippet: str) -> int:
    import autopar.models.gpt as gpt_module

    with open(gpt_module.__file__) as f:
        lines = f.read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if snippet in line)


def test_tied_parameters_count_once(tiny_graph):
    model, g = tiny_graph
    unique = {id(p): p for p in model.parameters()}
    assert g.num_params == sum(p.numel() for p in unique.values())
    assert g.params["tok_emb.weight"]["aliases"] == ["lm_head.weight"]
    head = next(n for n in g.nodes if n.module_path == "lm_head")
    assert head.param_names == ["tok_emb.weight"] and head.param_bytes == 0
    assert sum(n.param_bytes for n in g.nodes) == g.param_bytes


def test_networkx_view_has_every_node_and_data_edge(tiny_graph):
    _, g = tiny_graph
    nxg = g.to_networkx()
    assert nxg.number_of_nodes() == len(g)
    assert nxg.number_of_edges() == sum(len(n.inputs) for n in g.nodes)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(nxg)


def test_saved_bytes_equal_what_eager_autograd_saves():
    """Oracle: a real CPU forward under saved-tensor hooks, unique non-parameter storages."""
    torch.manual_seed(0)
    model = GPT(TINY)
    tokens, targets = _tiny_inputs()
    graph = autopar.trace(model, (tokens, targets), loss_fn=gpt_loss)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gpt_loss(model(tokens), targets)
    assert graph.saved_bytes == sum(seen.values())
    del loss


def test_meta_and_cpu_models_give_the_same_graph_numbers():
    """The fake-tensor path (real CPU parameters) and the meta path agree node by node."""
    torch.manual_seed(0)
    cpu = autopar.trace(GPT(TINY), _tiny_inputs(), loss_fn=gpt_loss)
    with torch.device("meta"):
        meta_model = GPT(TINY, device="meta")
    meta = autopar.trace(meta_model, tuple(t.to("meta") for t in _tiny_inputs()), loss_fn=gpt_loss)
    for a, b in zip(cpu.nodes, meta.nodes):
        assert (a.name, a.output_shape, a.saved_bytes, a.flops_fwd, a.param_bytes) == (
            b.name,
            b.output_shape,
            b.saved_bytes,
            b.flops_fwd,
            b.param_bytes,
        )


def test_symbolic_and_export_graphs_agree_on_totals():
    torch.manual_seed(0)
    model = GPT(TINY)
    inputs = _tiny_inputs()
    sym = autopar.trace(model, inputs, loss_fn=gpt_loss, tracer="symbolic_trace")
    exp = autopar.trace(model, inputs, loss_fn=gpt_loss, tracer="export")
    assert exp.tracer == "export" and sym.tracer == "symbolic_trace"
    assert exp.params == sym.params
    assert exp.saved_bytes == sym.saved_bytes
    assert exp.flops_fwd == pytest.approx(sym.flops_fwd, rel=1e-3)
    assert {k: v.count for k, v in exp.block_types.items()} == {"layers.*": 2}


# -- blocks ------------------------------------------------------------------------------------


def test_replicated_propagation_matches_running_every_block():
    cfg = GPTConfig(hidden=64, layers=6, heads=4, vocab=128, seq=16, dropout=0.1)
    built = build_model(cfg, device="meta", batch=2)
    full = analyse(
        fx_trace(built.model, built.example_inputs, loss_fn=gpt_loss, replicate_blocks=False), built.model
    )
    fast = analyse(fx_trace(built.model, built.example_inputs, loss_fn=gpt_loss), built.model)
    copied = [n for n in fast.nodes if "replicated_from" in n.meta]
    assert copied, "layers 3..5 should copy layer 1's propagation results"
    for a, b in zip(full.nodes, fast.nodes):
        assert (a.name, a.output_shape, a.saved_bytes, a.bytes_written, a.flops_bwd) == (
            b.name,
            b.output_shape,
            b.saved_bytes,
            b.bytes_written,
            b.flops_bwd,
        )


def test_different_layers_get_different_block_types():
    """Same module-path pattern, different structure (one wider MLP): two block types."""
    model = GPT(GPTConfig(hidden=32, layers=3, heads=4, vocab=64, seq=8))
    model.layers[2].mlp.fc1 = nn.Linear(32, 64)
    model.layers[2].mlp.fc2 = nn.Linear(64, 32)
    g = autopar.trace(model, _tiny_inputs(), loss_fn=gpt_loss)
    assert {k: v.count for k, v in g.block_types.items()} == {"layers.*": 2, "layers.*#1": 1}
    assert g.block_order == [("layers.*", 0), ("layers.*", 1), ("layers.*#1", 0)]


# -- errors ----------------------------------------------------------------------------------------


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent branch
            return y * 2
        return y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(x).mean()


def test_data_dependent_control_flow_names_module_line_and_fix():
    with pytest.raises(TraceError) as info:
        autopar.trace(_Net(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "data-dependent control flow" in msg
    assert "module 'gate'" in msg
    assert "test_tracing.py:" in msg and "if y.sum() > 0:" in msg
    assert "torch.where" in msg


def test_bad_target_split_is_a_trace_error():
    with pytest.raises(TraceError, match="num_targets=3"):
        autopar.trace(GPT(TINY), _tiny_inputs(), loss_fn=gpt_loss, num_targets=3)
    with pytest.raises(TraceError, match="tracer='jit'"):
        autopar.trace(GPT(TINY), _tiny_inputs(), loss_fn=gpt_loss, tracer="jit")


# -- GPT-3 175B on meta: Megatron and Korthikanti closed forms --------------------------------------


@pytest.fixture(scope="module")
def gpt3_175b():
    """Build on meta + trace + analyse. Its speed is a target of benchmarks/planning_speed.py
    (``torch+model+trace s``), not of a unit test: timings vary with the machine's load."""
    built = build_model("gpt3-175b", device="meta", batch=1, dtype=torch.float16)
    graph = autopar.trace(built.model, built.example_inputs, loss_fn=built.loss_fn)
    return built.config, graph


def test_gpt3_175b_parameters_match_megatron(gpt3_175b):
    cfg, g = gpt3_175b
    n_layers, h, V, s = cfg.layers, cfg.hidden, cfg.vocab, cfg.seq
    expected = 12 * n_layers * h**2 * (1 + 13 / (12 * h) + (V + s) / (12 * n_layers * h))
    assert g.num_params == pytest.approx(expected, rel=0.005)


def test_gpt3_175b_training_flops_match_megatron(gpt3_175b):
    cfg, g = gpt3_175b
    n_layers, h, V, s = cfg.layers, cfg.hidden, cfg.vocab, cfg.seq
    expected = 72 * s * n_layers * h**2 * (1 + s / (6 * h) + V / (12 * n_layers * h))
    assert g.batch_size == 1
    assert g.flops_fwd + g.flops_bwd == pytest.approx(expected, rel=0.01)


def test_gpt3_175b_has_96_identical_layers(gpt3_175b):
    _, g = gpt3_175b
    assert list(g.block_types) == ["layers.*"]
    assert g.block_types["layers.*"].count == 96
    assert len({len(names) for names in g.block_types["layers.*"].node_names}) == 1
    totals = g.totals_by_block()
    assert len({round(totals[i]["saved_bytes"]) for i in range(96)}) == 1
    assert len({round(totals[i]["flops_fwd"]) for i in range(96)}) == 1


def test_gpt3_175b_saved_activations_per_layer_match_korthikanti(gpt3_175b):
    cfg, g = gpt3_175b
    per_layer = g.totals_by_block()[10]["saved_bytes"]
    assert per_layer == pytest.approx(_korthikanti_bytes(cfg.seq, 1, cfg.hidden, cfg.heads), rel=0.02)


def test_saved_activations_scale_with_batch_and_match_korthikanti():
    s, h, a, b = 256, 512, 8, 3
    built = build_model(
        f"gpt:hidden={h},layers=2,heads={a},vocab=1024,seq={s},dropout=0.1", batch=b, dtype="fp16"
    )
    g = autopar.trace(built.model, built.example_inputs, loss_fn=built.loss_fn)
    assert g.totals_by_block()[1]["saved_bytes"] == pytest.approx(_korthikanti_bytes(s, b, h, a), rel=0.02)


def test_fused_attention_saves_less_and_says_why():
    s, h, a = 2048, 12288, 96
    built = build_model("gpt3-175b:layers=2", dtype=torch.float16, fused_attention=True)
    g = autopar.trace(built.model, built.example_inputs, loss_fn=built.loss_fn)
    per_layer = g.totals_by_block()[1]["saved_bytes"]
    assert per_layer < 0.5 * _korthikanti_bytes(s, 1, h, a)
    # q, k, v, the output and a fp32 logsumexp per (head, row) replace the s x s tensors.
    assert per_layer == pytest.approx(34 * s * h + 4 * a * s, rel=0.01)
    assert any(n.op_kind == "attention" for n in g.nodes)
    assert any("fused attention" in note and "5*a*s^2*b" in note for note in g.notes)


def test_ops_the_sharding_rules_know_are_costed_too():
    """The one op table: ``sign``/``square`` are 1-FLOP elementwise ops, ``max``/``norm``
    reductions (1 FLOP per input element), not 0-FLOP "other" nodes."""

    class Net(nn.Module):
        def forward(self, x):
            return x.square().sign().max() + torch.norm(x)

    g = autopar.trace(Net(), (torch.randn(4, 8),))
    by_name = {n.target.rsplit(".", 1)[-1]: n for n in g.nodes if n.op_kind not in ("placeholder", "output")}
    for name, kind in (
        ("square", "elementwise"),
        ("sign", "elementwise"),
        ("max", "reduction"),
        ("norm", "reduction"),
    ):
        node = by_name[name]
        assert (node.op_kind, node.flops_fwd) == (kind, 32.0), name


class _Pair(nn.Module):
    """A submodule returning a tuple, as an MoE layer returns ``(y, aux)``."""

    def forward(self, x):
        return x * 2, x.mean()


class _Traffic(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.pair = _Pair()
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        a, b = self.lin(x).chunk(2, dim=-1)  # views: getitem of chunk's tuple
        c = torch.cat((-b, a), dim=-1)  # a copy
        y, aux = self.pair(c)  # getitem of a module's tuple
        cos = torch.arange(16, device=x.device).double().cos().type_as(y)  # reads the table only
        z = self.drop(y * cos.type_as(y)) + torch.zeros_like(
            y
        )  # the second type_as: a no-op  # p = 0: no kernel; zeros_like reads nothing
        return z.sum() + aux


def test_traffic_counts_only_what_kernels_move():
    """Views of a tuple, a same-dtype dropout, ``type_as``'s dtype argument and ``zeros_like``'s
    input move no bytes; a real copy (``cat``) does."""
    x = torch.randn(4, 16)
    graph = autopar.trace(_Traffic(), (x,))
    nodes = {n.name: n for n in graph.nodes}
    act = 4 * 16 * 4  # bytes of one [4, 16] fp32 activation
    getitems = [n for n in graph.nodes if n.name.startswith("getitem")]
    assert len(getitems) >= 2  # chunk's two (the tuple-returning submodule may be traced through)
    assert all(n.bytes_read == 0 and n.bytes_written == 0 for n in getitems)
    assert nodes["cat"].bytes_read == act and nodes["cat"].bytes_written == act
    assert nodes["type_as"].bytes_read == 16 * 8 and nodes["type_as"].bytes_written == 16 * 4
    assert nodes["type_as_1"].bytes_read == 0 and nodes["type_as_1"].bytes_written == 0
    drop = next(n for n in graph.nodes if n.op_kind == "dropout")
    assert drop.bytes_read == 0 and drop.bytes_written == 0
    assert nodes["zeros_like"].bytes_read == 0 and nodes["zeros_like"].bytes_written == act


def test_dropout_that_runs_still_moves_its_tensor():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(x).sum()

    graph = autopar.trace(M(), (torch.randn(4, 16),))
    drop = next(n for n in graph.nodes if n.op_kind == "dropout")
    assert drop.bytes_read == 4 * 16 * 4 and drop.bytes_written == 4 * 16 * 4


def test_an_in_place_dropout_that_runs_is_costed_though_it_returns_its_input():
    import torch.nn.functional as F

    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            return F.dropout(y, 0.1, True, True).sum()  # in place, given positionally

    graph = autopar.trace(M(), (torch.randn(4, 16),))
    drop = next(n for n in graph.nodes if n.op_kind == "dropout")
    assert drop.bytes_read == 4 * 16 * 4 and drop.bytes_written == 4 * 16 * 4


def test_fused_attention_records_whether_it_is_causal():
    class M(nn.Module):
        def forward(self, q, k, v):
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            b = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return (a + b).sum()

    q = torch.randn(1, 2, 8, 4)
    graph = autopar.trace(M(), (q, q.clone(), q.clone()))
    flags = [n.meta.get("causal", False) for n in graph.nodes if n.op_kind == "attention"]
    assert flags == [True, False]

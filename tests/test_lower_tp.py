"""Tensor-parallel lowering: real gloo ranks against the single-device run, plus dry checks.

Oracle for the multi-process tests: the same model (same seed) on one device, same batch, same
dropout seed. After one forward and backward on 2 tp ranks, every rank's loss equals the
single-device loss and every local gradient equals the matching slice (``ShardSpec``) of the
single-device gradient (rtol 1e-5, atol 1e-6, fp32). Dropout is on (p=0.1) where the model has
it: the lowering draws torch's mask at the full shape and keeps the rank's slice, so the masks
are the single-device ones, not merely the same distribution.

One launch runs every case (process start dominates on this machine); each case is its own test.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autopar.core.errors import PlanError
from autopar.core.plan import NodePlacement, Partial, Plan, Replicate, Shard
from autopar.lower import ShardSpec, lower_tensor_parallel
from autopar.lower.collectives import COLLECTIVES, ISSUES, LOWERED, TPContext
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.sharding import ShardingGraph, reshard_kind
from autopar.sharding.reshard import BACKWARD_OF
from autopar.sharding.rules import NO_PLACEMENT
from autopar.testing.dist import run_ranks
from autopar.tracing import fx_trace

RTOL, ATOL = 1e-5, 1e-6
DROPOUT_SEED = 123


class MLP(nn.Module):
    """Residual MLP classifier: the smallest model with a column->row pair and a sharded loss."""

    def __init__(self, width=16, hidden=32, classes=8, dropout=0.1):
        super().__init__()
        self.inp = nn.Linear(12, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.drop(self.fc2(F.gelu(self.fc1(x))))
        return self.head(self.norm(x))


def mse_head_loss(out, target):
    return F.mse_loss(out, target)


# ------------------------------------------------------------------------------ cases
GPT_BASE = dict(hidden=32, layers=2, heads=4, vocab=64, seq=16)
CASES = {
    "gpt-layernorm-gelu": dict(model="gpt", cfg=dict(dropout=0.1)),
    "gpt-layernorm-gelu-sp": dict(model="gpt", cfg=dict(dropout=0.1), sp=True),
    "gpt-rmsnorm-swiglu-gqa": dict(
        model="gpt", cfg=dict(norm="rmsnorm", act="swiglu", kv_heads=2, dropout=0.1)
    ),
    "gpt-rmsnorm-swiglu-gqa-sp": dict(
        model="gpt", cfg=dict(norm="rmsnorm", act="swiglu", kv_heads=2, dropout=0.1), sp=True
    ),
    "gpt-kv1-fused-sp": dict(
        model="gpt", cfg=dict(norm="rmsnorm", act="swiglu", kv_heads=1, fused_attention=True), sp=True
    ),
    "gpt-export-tracer": dict(model="gpt", cfg=dict(dropout=0.1), tracer="export"),
    "mlp": dict(model="mlp"),
    "mlp-sp": dict(model="mlp", sp=True),
    "mlp-mse": dict(model="mlp-mse"),
    "gpt-inference-logits": dict(model="gpt", cfg=dict(dropout=0.1), inference=True),
    # Explicit plans unlike Megatron's, to exercise other rules: a hidden-sharded residual stream
    # (norm statistics as partial sums), and the batch split over the tp axis (data parallelism
    # through the same machinery: every weight replicated, its gradient all-reduced).
    "plan-feature-sharded-stream": dict(
        model="gpt",
        cfg=dict(norm="rmsnorm", act="swiglu", kv_heads=2, dropout=0.1),
        forced={"model_tok_emb": "hidden_parallel"},
    ),
    "plan-batch-sharded": dict(model="gpt", cfg=dict(dropout=0.1), forced={"model_tok_emb": "batch(0)"}),
    "plan-mlp-propagated": dict(model="mlp", forced={}),
    # HuggingFace models (export graphs, ATen ops): GPT-2's Conv1D (addmm) and fused QKV, Llama's
    # rotary, grouped-query attention and untied head.
    "hf-gpt2": dict(model="hf-gpt2"),
    "hf-llama-sp": dict(model="hf-llama", sp=True),
}


def propagated_plan(gm, tp: int, forced: dict) -> dict:
    """A valid plan unlike Megatron's: each node keeps whatever shard arrives (fewest reshardings,
    sharded output preferred), partial sums resolved at once; ``forced`` pins strategies by name."""
    sg = ShardingGraph(gm, tp)
    placed, params, out = {}, {}, {}
    for node in sg.nodes:
        call = sg.calls[node]
        if call.kind in NO_PLACEMENT or call.kind in ("param", "output"):
            continue

        def cost(s, call=call):
            n = 0
            for inp, req in zip(call.inputs, s.inputs):
                if req is not None and sg.is_param(inp):
                    n += 0 if params.get(str(inp.target), req) == req else 1000
                elif req is not None and reshard_kind(placed[inp], req) is not None:
                    n += 1
            return (n, 0 if isinstance(s.output, Shard) else 1)

        cands = [s for s in sg.strategies(node) if node.name not in forced or s.name == forced[node.name]]
        best = min(cands, key=cost)
        placed[node] = Replicate() if isinstance(best.output, Partial) else best.output
        params.update(best.param_placements)
        out[node.name] = NodePlacement(output=placed[node], params=best.param_placements)
    return out


def build(case: dict):
    """(model, inputs, targets, loss_fn), identical in every process."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case["model"] == "gpt":
        model = GPT(GPTConfig(**{**GPT_BASE, **case.get("cfg", {})}))
        tokens = torch.randint(0, 64, (2, 8), generator=g)
        return model, tokens, torch.randint(0, 64, (2, 8), generator=g), gpt_loss
    if case["model"].startswith("hf-"):
        from autopar.testing.equivalence import build_hf, lm_loss

        ids = torch.randint(0, 64, (2, 8), generator=g)
        return build_hf(case["model"][3:], 0), ids, ids, lm_loss
    model = MLP()
    x = torch.randn(4, 12, generator=g)
    if case["model"] == "mlp-mse":
        return model, x, torch.randn(4, 8, generator=g), mse_head_loss
    return model, x, torch.randint(0, 8, (4,), generator=g), F.cross_entropy


def reference(case: dict):
    model, x, y, loss_fn = build(case)
    if case.get("inference"):
        return model.eval()(x), {}
    torch.manual_seed(DROPOUT_SEED)
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.item(), {"model." + n: p.grad for n, p in model.named_parameters()}


def _rank_cases(names: list[str]) -> dict:
    rank = dist.get_rank()
    out = {}
    for name in names:
        case = CASES[name]
        model, x, y, loss_fn = build(case)
        plan = Plan.manual(tp=2, global_batch=x.shape[0], sequence_parallel=case.get("sp", False))
        if case.get("inference"):  # the model's own output (logits), gathered on every rank
            gm = fx_trace(model.eval(), (x,))
            low = lower_tensor_parallel(gm, plan, rank, dist.group.WORLD)
            with torch.no_grad():
                out[name] = dict(output=low.gm(x), counts=low.collectives())
            continue
        gm = fx_trace(model, (x, y), loss_fn=loss_fn, tracer=case.get("tracer", "auto"))
        if "forced" in case:
            plan.placements = propagated_plan(gm, 2, case["forced"])
        low = lower_tensor_parallel(gm, plan, rank, dist.group.WORLD)
        torch.manual_seed(DROPOUT_SEED)
        loss = low.gm(x, y)
        loss.backward()
        grads = {n: p.grad for n, p in low.gm.named_parameters()}
        out[name] = dict(loss=loss.item(), grads=grads, shards=low.shards, counts=low.collectives())
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_rank_cases, 2, args=(list(CASES),), timeout_s=60)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.get("inference")])
def test_tp2_loss_and_gradient_slices_match_one_device(tp_results, name):
    ref_loss, ref_grads = reference(CASES[name])
    for rank, results in enumerate(tp_results):
        r = results[name]
        assert r["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), f"rank {rank}"
        assert set(r["grads"]) == {s.full_name for s in r["shards"].values()}
        for local, grad in r["grads"].items():
            spec = r["shards"][local]
            expected = spec.slice(ref_grads[spec.full_name])
            assert grad is not None, f"rank {rank}: {local} got no gradient"
            torch.testing.assert_close(
                grad, expected, rtol=RTOL, atol=ATOL, msg=f"rank {rank} {local} {spec}"
            )
        assert sum(r["counts"].values()) > 0, "a tp=2 program without collectives shards nothing"


@pytest.mark.multiproc
def test_tp2_inference_returns_the_full_logits_on_every_rank(tp_results):
    expected, _ = reference(CASES["gpt-inference-logits"])
    for results in tp_results:
        r = results["gpt-inference-logits"]
        torch.testing.assert_close(r["output"], expected.detach(), rtol=RTOL, atol=ATOL)
        assert r["counts"]["autopar_gather"] == 1  # vocabulary-sharded logits gathered once


@pytest.mark.multiproc
def test_tp2_megatron_shards_every_weight_matrix_of_gpt(tp_results):
    shards = tp_results[1]["gpt-layernorm-gelu"]["shards"]
    matrices = [n for n in shards if n.endswith("weight") and "ln" not in n]
    assert matrices and all(shards[n].dim is not None and shards[n].index == 1 for n in matrices)


def _rank_runtime_dropout() -> tuple:
    """The runtime's counter-based dropout (autopar.lower.rng) under tp=2 + sequence parallel."""
    from autopar.lower.passes import replace_dropout

    case = CASES["gpt-rmsnorm-swiglu-gqa-sp"]
    model, x, y, loss_fn = build(case)
    gm = fx_trace(model, (x, y), loss_fn=loss_fn)
    replace_dropout(gm, train=True, seed=7)
    ids = torch.arange(x.shape[0])
    single = gm(x, y, ids).item()
    plan = Plan.manual(tp=2, global_batch=2, sequence_parallel=True)
    low = lower_tensor_parallel(gm, plan, dist.get_rank(), dist.group.WORLD)
    shards = [
        n.kwargs.get("shard") for n in low.gm.graph.nodes if getattr(n.target, "__name__", "") == "dropout"
    ]
    return single, low.gm(x, y, ids).item(), shards


@pytest.mark.multiproc
def test_runtime_counter_dropout_gets_its_shard_and_matches_unsharded(dropout_and_pairs):
    for rank, ((single, sharded, shards), _) in enumerate(dropout_and_pairs):
        assert sharded == pytest.approx(single, rel=RTOL, abs=ATOL)
        assert (1, rank, 2) in shards, "sequence-parallel dropouts must know their shard"


# ------------------------------------------------------------------------------ collective pairs
# torch.distributed functions -> the collective they run (the lowering calls whichever exists).
_DIST_COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "reduce": "reduce",
}


@contextlib.contextmanager
def _spy_on_collectives(log: list[str]):
    """Wrap the real torch.distributed collectives (still calling them): append what each issues.

    Only the outermost call counts (a renamed function that forwards to its old name is one call).
    """
    depth = [0]
    originals = {name: getattr(dist, name) for name in _DIST_COLLECTIVES if hasattr(dist, name)}

    def spy(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                log.append(_DIST_COLLECTIVES[name])
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, spy(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _rank_collective_pairs() -> dict:
    """Forward and backward of every collective function the lowering emits, on 2 ranks, with the
    collectives each issued."""
    rank = dist.get_rank()
    tp = TPContext(dist.group.WORLD, rank, 2)
    out = {}
    for name in ISSUES:
        fn = COLLECTIVES[name]
        torch.manual_seed(rank)
        x = torch.randn(4, 6, requires_grad=True)
        forward, backward = [], []
        with _spy_on_collectives(forward):
            y = fn(x, tp) if "dim" not in inspect.signature(fn).parameters else fn(x, 1, tp)
        with _spy_on_collectives(backward):
            y.backward(torch.ones_like(y))
        out[name] = dict(forward=forward, backward=backward, grad_shape=tuple(x.grad.shape))
    return out


def _rank_dropout_and_pairs() -> tuple:
    return _rank_runtime_dropout(), _rank_collective_pairs()


@pytest.fixture(scope="module")
def dropout_and_pairs():
    """One launch for both tests below (process start dominates on this machine)."""
    return run_ranks(_rank_dropout_and_pairs, 2)


@pytest.mark.multiproc
def test_lowered_collectives_run_the_backward_that_backward_of_names(dropout_and_pairs):
    """The one collective-pair table: each function the lowering emits issues, forward and
    backward, exactly the collectives :data:`autopar.lower.collectives.ISSUES` names (read from
    :data:`autopar.sharding.reshard.BACKWARD_OF`; None: no collective), on real gloo ranks, with the
    real torch.distributed functions spied on."""
    assert {ISSUES[fn.__name__] for fn in LOWERED.values()} == {
        (None if kind == "split" else kind, BACKWARD_OF[kind]) for kind in LOWERED
    }
    for rank, (_, results) in enumerate(dropout_and_pairs):
        assert set(results) == set(ISSUES)
        for name, r in results.items():
            fwd, bwd = ISSUES[name]
            assert r["forward"] == ([fwd] if fwd else []), (
                f"rank {rank} {name}: forward issued {r['forward']}"
            )
            assert r["backward"] == ([bwd] if bwd else []), (
                f"rank {rank} {name}: backward issued {r['backward']}"
            )
            assert r["grad_shape"] == (4, 6), f"rank {rank} {name}"


# ------------------------------------------------------------------------------ dry lowering
def _gpt_gm(**cfg):
    case = dict(model="gpt", cfg=cfg)
    model, x, y, loss_fn = build(case)
    return fx_trace(model, (x, y), loss_fn=loss_fn)


def _megatron_counts(layers: int, sp: bool, norm_params: int) -> dict:
    """Hand-derived forward collectives of Megatron-LM on the built-in GPT (learned positions)."""
    if not sp:
        # all-reduce: token + position embedding, and after o_proj and fc2 of every layer;
        # copy_to_tp (all-reduce in backward): before q/k/v, fc1, lm_head.
        return {"autopar_all_reduce": 2 + 2 * layers, "autopar_copy_to_tp": 2 * layers + 1}
    return {
        "autopar_reduce_scatter": 1 + 2 * layers,  # token embedding, o_proj, fc2
        "autopar_all_gather": 2 * layers + 1,  # before q/k/v, fc1, lm_head
        "autopar_all_reduce": 1,  # the [t, h] position embedding (not per token)
        "autopar_split": 1,  # ... sliced to this rank's positions
        "autopar_copy_to_tp": norm_params * (2 * layers + 1),  # norm weights see a sequence shard
    }


@pytest.mark.parametrize("sp", [False, True])
def test_collectives_in_code_match_placements_and_megatron(sp):
    gm = _gpt_gm(layers=3)
    low = lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=2, sequence_parallel=sp), 0, None)
    in_code = {name: len(re.findall(rf"= {name}\(", low.code)) for name in low.predicted_collectives}
    assert in_code == dict(low.predicted_collectives) == dict(low.collectives())
    expected = {**_megatron_counts(3, sp, norm_params=2), "autopar_vocab_parallel_cross_entropy": 1}
    assert dict(low.collectives()) == expected


def test_tp1_returns_the_graph_unchanged():
    gm = _gpt_gm()
    low = lower_tensor_parallel(gm, Plan.manual(tp=1, global_batch=2), 0, None)
    assert low.gm is gm and low.code == gm.code
    assert all(s.dim is None and s.num_shards == 1 for s in low.shards.values())


def test_dry_lowering_keeps_signature_meta_and_names_tied_aliases():
    gm = _gpt_gm()
    low = lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=2), 1, None)
    assert [n.name for n in low.gm.graph.nodes if n.op == "placeholder"] == ["tokens", "targets"]
    assert low.aliases == {"model.lm_head.weight": "model.tok_emb.weight"}
    paths = {
        str(list(n.meta["nn_module_stack"].values())[-1][0])
        for n in low.gm.graph.nodes
        if n.meta.get("nn_module_stack")
    }
    assert "model.layers.1.attn.q_proj" in paths
    view = next(n for n in low.gm.graph.nodes if n.name == "view")  # q as [b, t, heads, hd]
    assert view.meta["autopar_placement"] == "S(2)" and view.meta["autopar_local_shape"] == (2, 8, 2, 8)
    assert low.shards["model.tok_emb.weight"] == ShardSpec("model.tok_emb.weight", 0, 2, 1)
    with pytest.raises(Exception, match="lowered dry"):
        low.gm(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))


def test_shard_specs_are_invertible():
    gm = _gpt_gm()
    plan = Plan.manual(tp=2, global_batch=2)
    ranks = [lower_tensor_parallel(gm, plan, r, None) for r in range(2)]
    for name, p in gm.named_parameters():
        name = ranks[0].aliases.get(name, name)
        parts = [(low.shards[name], low.gm.get_parameter(name).detach()) for low in ranks]
        torch.testing.assert_close(ShardSpec.unshard(parts), p.detach(), rtol=0, atol=0)


def test_explicit_plan_round_trips_through_json():
    from autopar.sharding import megatron_placements

    gm = _gpt_gm()
    plan = Plan.manual(tp=2, global_batch=2, placements=megatron_placements(gm, 2))
    again = Plan.from_json(plan.to_json())
    a = lower_tensor_parallel(gm, plan, 0, None)
    b = lower_tensor_parallel(gm, again, 0, None)
    default = lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=2), 0, None)
    assert a.code == b.code == default.code


@pytest.mark.parametrize("sp", [False, True])
def test_unlisted_nodes_follow_their_inputs(sp):
    """A plan that places only the weight-bearing nodes lowers to the full default's program."""
    from autopar.sharding import megatron_placements

    gm = _gpt_gm()
    full = megatron_placements(gm, 2, sp)
    weights_only = {name: np for name, np in full.items() if np.params}
    a = lower_tensor_parallel(
        gm, Plan.manual(tp=2, global_batch=2, sequence_parallel=sp, placements=full), 0, None
    )
    b = lower_tensor_parallel(
        gm, Plan.manual(tp=2, global_batch=2, sequence_parallel=sp, placements=weights_only), 0, None
    )
    assert a.collectives() == b.collectives() and a.code == b.code


def test_unsupported_op_under_a_sharded_placement_names_op_module_and_line():
    gm = _gpt_gm()
    plan = Plan.manual(
        tp=2, global_batch=2, placements={"model_layers_0_ln_1": NodePlacement(output=Shard(2))}
    )
    with pytest.raises(PlanError) as err:
        lower_tensor_parallel(gm, plan, 0, None)
    msg = str(err.value)
    assert "model_layers_0_ln_1" in msg and "layers.0.ln_1" in msg and "gpt.py" in msg
    assert "S(1)" in msg and "R" in msg  # the placements its rule allows


def test_tied_parameter_placed_two_ways_is_rejected():
    gm = _gpt_gm()
    placements = {
        "model_tok_emb": NodePlacement(output=Replicate(), params={"model.tok_emb.weight": Shard(0)}),
        "model_lm_head": NodePlacement(output=Replicate(), params={"model.lm_head.weight": Shard(1)}),
    }
    with pytest.raises(PlanError, match="one placement"):
        lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=2, placements=placements), 0, None)


def test_plan_naming_an_unknown_parameter_is_rejected():
    placements = {"model_tok_emb": NodePlacement(params={"model.nope.weight": Shard(0)})}
    with pytest.raises(PlanError, match="does not have"):
        lower_tensor_parallel(_gpt_gm(), Plan.manual(tp=2, global_batch=2, placements=placements), 0, None)


# ------------------------------------------------------------------------------ local ops
@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_slices_are_the_single_device_mask(transposed):
    """Oracle: torch's own F.dropout on the full tensor with the same generator state."""
    from autopar.lower.collectives import TPContext
    from autopar.lower.parallel_ops import autopar_dropout
    from autopar.lower.rewrite import noncontiguous_layout

    full = torch.randn(4, 6, 8)
    if transposed:
        full = full.transpose(0, 2)  # [8, 6, 4], not contiguous: torch draws in memory order
    torch.manual_seed(5)
    expected = F.dropout(full, 0.3, True)
    layout = noncontiguous_layout(full)
    assert (layout is None) is not transposed
    parts = []
    for rank in range(2):
        torch.manual_seed(5)
        local = full.chunk(2, dim=1)[rank]
        parts.append(autopar_dropout(local, 0.3, True, 1, TPContext(None, rank, 2), layout))
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=0, atol=0)


def test_vocab_embedding_shards_sum_to_the_full_lookup():
    from autopar.lower.parallel_ops import autopar_vocab_embedding

    w = torch.randn(10, 4)
    idx = torch.tensor([[0, 4, 5, 9], [3, 3, 7, 1]])
    parts = [autopar_vocab_embedding(idx, w[5 * r : 5 * r + 5], 5 * r, 5 * r + 5) for r in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], F.embedding(idx, w), rtol=0, atol=0)


def test_partial_bias_is_added_once_and_its_gradient_is_complete_everywhere():
    from autopar.lower.parallel_ops import autopar_partial_bias

    b = torch.randn(3, requires_grad=True)
    outs = [autopar_partial_bias(b, r) for r in range(2)]
    torch.testing.assert_close(outs[0] + outs[1], b.detach())
    grad = torch.randn(3)
    for out in outs:
        (g,) = torch.autograd.grad(out, b, grad)
        torch.testing.assert_close(g, grad)

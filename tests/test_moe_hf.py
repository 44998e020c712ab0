"""HuggingFace Mixtral and Qwen2-MoE under expert parallelism.

Their sparse MoE blocks are kept as one ``moe`` region each under ``torch.export``
(``autopar/tracing/hf_moe.py``) and split over ``ep`` ranks by the expert lowering
(``autopar/lower/expert.py: HFExpertParallelMoE``). Oracles: the eager HuggingFace block (the
region's function and its custom op's gradient) and the single-device run of the unmodified
HuggingFace model (``autopar/testing/equivalence.py``: losses, full gradients and updated parameters
after each of 3 AdamW steps, rtol 1e-5 / atol 1e-6 in fp32).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import autopar  # noqa: E402
from autopar import Plan  # noqa: E402
from autopar.core.errors import PlanError  # noqa: E402
from autopar.testing.dist import run_ranks  # noqa: E402
from autopar.testing.equivalence import (  # noqa: E402
    build_hf_moe,
    check_jobs,
    hf_moe_case,
    lm_aux_loss,
    lm_loss,
    reference_output,
    run_inference_jobs,
    run_jobs,
)

pytest.importorskip("transformers")

B = 8
KINDS = ["mixtral", "qwen2_moe"]


def P(**kw) -> Plan:
    kw.setdefault("micro_batch_size", 2)
    return Plan.manual(global_batch=B, **kw)


def _tokens(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ the region
@pytest.mark.parametrize("kind", KINDS)
def test_region_and_its_custom_op_equal_the_hf_block(kind):
    """The region's forward and the custom op (forward and its autograd formula) equal the eager
    HuggingFace block, output and every gradient."""
    from autopar.tracing.hf_moe import HFMoERegion, hf_moe_region, spec_of

    model = build_hf_moe(kind, 0)
    block = model.model.layers[0].mlp
    region = HFMoERegion(spec_of(block), block)
    x = torch.randn(3, 8, 16, requires_grad=True)
    inputs = [x, *region.region_params()]
    ref = block(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for out in (region(x), hf_moe_region(x, region.region_params(), region.config.to_json())):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out.square().sum(), inputs)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_blocks_trace_as_one_moe_region(kind):
    model = build_hf_moe(kind, 0)
    tokens = _tokens()
    graph = autopar.trace(model, (tokens, tokens.clone()), loss_fn=lm_loss)
    assert graph.tracer == "export"
    moe = [n for n in graph.nodes if n.op_kind == "moe"]
    assert [n.block for n in moe] == [0, 1]
    shared = 2 if kind == "qwen2_moe" else 0  # Qwen2-MoE's shared width 12 over ffn 8, rounded up
    assert moe[0].meta["moe"] == {
        "experts": 4, "top_k": 2, "hidden": 16, "ffn": 8, "shared": shared, "capacity_factor": None,
        "tokens": 16, "gated": True,
    }  # fmt: skip
    # The region's parameters are the block's, under their HuggingFace names, counted once.
    names = set(moe[0].param_names)
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj"} <= names
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert any("kept as one 'moe' region" in note for note in graph.notes)
    assert not any("individual ops" in note for note in graph.notes)
    torch.testing.assert_close(graph.gm(tokens, tokens), lm_loss(model(tokens), tokens))
    assert type(model.model.layers[0].mlp).__name__.endswith("SparseMoeBlock")  # the model is unchanged


def test_tp_reports_the_block_whole_on_every_tp_rank():
    """Under tp > 1 the HF block is split over ep only: the tensor-parallel report names it."""
    from autopar.sharding import layout
    from autopar.sharding.fallback import HF_MOE_REASON, replicated_ops
    from autopar.sharding.graph import ShardingGraph
    from autopar.sharding.megatron import megatron_placements

    tokens = _tokens()
    graph = autopar.trace(build_hf_moe("qwen2_moe", 0), (tokens, tokens.clone()), loss_fn=lm_loss)
    sg = ShardingGraph(graph.gm, 2)
    _, params = layout.choose(sg, megatron_placements(sg, 2))
    named = [o for o in replicated_ops(sg, params) if o.reason == HF_MOE_REASON]
    assert [(o.op, o.module) for o in named] == [
        ("Qwen2MoeSparseMoeBlock", f"model.layers.{i}.mlp") for i in (0, 1)
    ]


def test_unsupported_blocks_are_named_and_ep_refused():
    """A training Mixtral block with router jitter (random input noise) stays inlined ops; the note
    names it and why, and ep > 1 is refused."""
    model = build_hf_moe("mixtral", 0)
    for layer in model.model.layers:
        layer.mlp.jitter_noise = 0.1
    tokens = _tokens()
    graph = autopar.trace(model, (tokens, tokens.clone()), loss_fn=lm_loss)
    assert not any(n.op_kind == "moe" for n in graph.nodes)
    assert any("router_jitter_noise" in note and "model.layers.0.mlp" in note for note in graph.notes)
    compiled = autopar.compile(
        model, 2, example_inputs=(tokens, tokens), loss_fn=lm_loss, plan=Plan.manual(dp=2, ep=2, global_batch=2),
        global_batch=2,
    )  # fmt: skip
    with pytest.raises(PlanError, match="no mixture-of-experts region"):
        compiled.rank_code(0)


@pytest.mark.parametrize("kind", KINDS)
def test_load_balancing_loss_traces_as_one_batch_statistic(kind):
    """output_router_logits=True: the blocks stay regions (returning their router logits), HF's
    load-balancing loss becomes one op marked as a batch statistic, and the traced loss equals the
    eager model's (cross entropy plus the weighted aux loss)."""
    model = build_hf_moe(kind, 0, aux=True)
    tokens = _tokens()
    graph = autopar.trace(model, (tokens, tokens.clone()), loss_fn=lm_aux_loss)
    assert [n.block for n in graph.nodes if n.op_kind == "moe"] == [0, 1]
    balance = [n for n in graph.nodes if "hf_balance_loss" in n.name]
    assert len(balance) == 1 and balance[0].meta.get("batch_statistics")
    expected = lm_aux_loss(model(tokens), tokens)
    assert expected.item() > lm_loss(model(tokens), tokens).item()  # the aux term is in the loss
    torch.testing.assert_close(graph.gm(tokens, tokens), expected)


def test_load_balancing_loss_refuses_micro_batches():
    """No micro-batch sees the whole batch: more than one per replica is refused, with the fix."""
    case = hf_moe_case("mixtral", aux=True)
    with pytest.raises(PlanError, match=r"load-balancing loss.*micro_batch_size=4"):
        autopar.compile(
            case.build(), 2, example_inputs=case.make_batches(1)[0], loss_fn=case.loss_fn,
            plan=P(dp=2, ep=2), global_batch=B,
        )  # fmt: skip


def test_rank_code_shows_the_hf_exchanges():
    case = hf_moe_case("qwen2_moe")
    compiled = autopar.compile(
        case.build(), 2, example_inputs=case.make_batches(1)[0], loss_fn=case.loss_fn, plan=P(dp=2, ep=2),
        global_batch=B,
    )  # fmt: skip
    code = compiled.rank_code(1)
    assert code.count("dist.all_to_all_single(") == 2 * 3  # two layers: counts, dispatch, combine
    assert "Qwen2MoeSparseMoeBlock" in code and "experts 2..3 of 4" in code
    assert "sigmoid(shared_expert_gate(x))" in code


# ------------------------------------------------------------------------------ expert parallelism
@pytest.mark.multiproc
def test_two_ranks_hf_moe_expert_parallel_matches_one_device():
    """ep=2, with and without HF's load-balancing loss (its statistics summed over the replicas;
    for Mixtral with padded sequences, whose mask weights the statistics)."""
    jobs = [(hf_moe_case(kind), [P(dp=2, ep=2)]) for kind in KINDS]
    jobs += [
        (hf_moe_case(kind, aux=True, padded=kind == "mixtral"), [P(dp=2, ep=2, micro_batch_size=4)])
        for kind in KINDS
    ]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)


@pytest.mark.multiproc
def test_four_ranks_hf_moe_ep_composes_with_dp_tp_pp():
    """ep=2 x dp=2 (experts reduced over edp), x tp=2 (the block whole on each tp rank), x pp=2,
    for both models with the load-balancing loss (one micro-batch per replica), and without it
    under micro-batches."""
    whole = dict(micro_batch_size=4)  # global batch 8 over dp=2: one micro-batch per replica
    aux_plans = [P(dp=4, ep=2), P(dp=2, tp=2, ep=2, **whole), P(dp=2, pp=2, ep=2, **whole)]
    jobs = [(hf_moe_case(kind, aux=True), aux_plans) for kind in KINDS]
    jobs += [
        (hf_moe_case("mixtral"), [P(dp=2, tp=2, ep=2), P(dp=2, pp=2, ep=2)]),
        (hf_moe_case("qwen2_moe"), [P(dp=4, ep=2), P(dp=2, pp=2, ep=2)]),
    ]
    check_jobs(run_ranks(run_jobs, 4, args=(jobs,)), jobs)


@pytest.mark.multiproc
def test_hf_moe_inference_under_ep_equals_one_device():
    jobs = [(hf_moe_case(kind), [P(dp=2, ep=2, mode="inference")]) for kind in KINDS]
    per_rank = run_ranks(run_inference_jobs, 2, args=(jobs,))
    for j, (case, _) in enumerate(jobs):
        expected = reference_output(case).logits
        for rank, outputs in enumerate(per_rank):
            torch.testing.assert_close(
                outputs[j][0].logits, expected, rtol=1e-5, atol=1e-6, msg=f"{case.name} rank {rank}"
            )

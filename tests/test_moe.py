"""Mixture of experts: the layer's semantics, its graph region, the ``ep`` plan field, and expert
parallelism on real gloo ranks.

Oracles: a plain Python loop over tokens for the layer (gating, capacity, aux loss); the
single-device run for every plan (``autopar/testing/equivalence.py``: losses, full gradients and
updated parameters after each of 3 AdamW steps, rtol 1e-5 / atol 1e-6 in fp32, aux loss included);
the all-to-all calls the runtime really issues for :func:`autopar.lower.expert.all_to_all_volume`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import autopar
from autopar import Plan
from autopar.core.errors import ModelSpecError, PlanError
from autopar.lower.expert import all_to_all_volume
from autopar.models import build_model, count_params, list_models
from autopar.models.gpt import GPTConfig, gpt_loss
from autopar.models.moe import MoE, MoEConfig
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import (
    check_jobs,
    gpt_case,
    reference_output,
    run_inference_plans,
    run_jobs,
)

B = 8  # global batch of every case
MOE = dict(experts=4, top_k=2, moe_ffn=8, act="swiglu", norm="rmsnorm", bias=False)


def moe_case(**kw):
    return gpt_case(**{**MOE, **kw})


def P(**kw) -> Plan:
    kw.setdefault("micro_batch_size", 2)
    return Plan.manual(global_batch=B, **kw)


# ------------------------------------------------------------------------------ the layer
def _loop_reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer token by token: top-k renormalised gates, capacity per sequence in slot order."""
    cfg = moe.config
    b, t, h = x.shape
    y = torch.zeros_like(x)
    aux = torch.zeros(b)
    cap = (
        math.inf
        if cfg.capacity_factor is None
        else math.ceil(cfg.capacity_factor * t * cfg.top_k / cfg.experts)
    )
    for s in range(b):
        used = [0] * cfg.experts
        probs = torch.softmax(x[s] @ moe.router.weight.T, -1)
        counts = torch.zeros(cfg.experts)
        for i in range(t):
            p, idx = probs[i].topk(cfg.top_k)
            p = p / p.sum()
            for j in range(cfg.top_k):
                e = int(idx[j])
                counts[e] += 1
                used[e] += 1
                if used[e] <= cap:
                    out = (F.silu(x[s, i] @ moe.w1[e]) * (x[s, i] @ moe.w3[e])) @ moe.w2[e]
                    y[s, i] += p[j] * out
            if cfg.shared_experts:
                y[s, i] += (F.silu(x[s, i] @ moe.shared_w1) * (x[s, i] @ moe.shared_w3)) @ moe.shared_w2
        aux[s] = cfg.experts * (counts / (t * cfg.top_k) * probs.mean(0)).sum()
    return y, aux


@pytest.mark.parametrize("capacity", [None, 1.0, 0.5])
def test_layer_equals_token_loop_and_is_split_invariant(capacity):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden=8, ffn=6, experts=4, top_k=2, shared_experts=1, capacity_factor=capacity))
    x = torch.randn(3, 10, 8)
    y, aux = moe(x)
    ref_y, ref_aux = _loop_reference(moe, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
    # Per-sequence routing, capacity and aux: any split of the batch gives the same rows.
    parts = [moe(x[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), y, rtol=1e-5, atol=1e-6)


def test_capacity_drops_tokens_in_this_case():
    """The capacity plans below really drop slots (else they would test nothing more)."""
    torch.manual_seed(0)
    cfg = MoEConfig(hidden=8, ffn=6, experts=4, top_k=2, capacity_factor=0.5)
    moe = MoE(cfg)
    _, choices, keep, _ = moe.route(torch.randn(2, 8, 8))
    assert keep is not None and not bool(keep.all())
    assert int(keep.sum(1).max()) <= cfg.experts * cfg.capacity(8)


def test_bad_moe_shapes_raise_typed_errors():
    with pytest.raises(ModelSpecError, match="top_k=5 exceeds experts=4"):
        MoEConfig(hidden=8, ffn=8, experts=4, top_k=5)
    with pytest.raises(ModelSpecError, match="capacity_factor"):
        MoEConfig(hidden=8, ffn=8, experts=4, capacity_factor=0)
    with pytest.raises(ModelSpecError, match="experts=-1"):
        GPTConfig(hidden=16, layers=1, heads=2, vocab=8, seq=4, experts=-1)


def test_aux_loss_reaches_the_training_loss():
    case = moe_case(aux_coef=1.0)
    model = case.build()
    tokens, targets = case.make_batches(1)[0]
    logits, aux = model(tokens)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert aux.shape == (B,) and float(aux.detach().mean()) > 0
    torch.testing.assert_close(gpt_loss((logits, aux), targets), ce + aux.mean())
    assert isinstance(model.eval()(tokens), torch.Tensor)  # eval: logits only


# ------------------------------------------------------------------------------ zoo and graph
def test_spec_presets_and_parameter_count():
    built = build_model("gpt:hidden=16,layers=2,heads=4,vocab=64,seq=8,experts=4,top_k=2,shared_experts=1,capacity_factor=1.25,moe_ffn=8", device="meta")  # fmt: skip
    assert built.config.experts == 4 and built.config.capacity_factor == 1.25
    assert sum(p.numel() for p in built.model.parameters()) == count_params(built.config)
    models = list_models()
    assert models["mixtral-8x7b"]["params"] == "46.7B"  # Jiang et al. 2024: 46.7B total parameters
    assert models["qwen-moe-a2.7b"]["shared_experts"] == 4


def test_moe_layer_is_one_region_with_the_estimator_interface():
    built = build_model("mixtral-8x7b:layers=2,seq=128", device="meta")
    graph = autopar.trace(built.model, built.make_inputs(2), loss_fn=built.loss_fn)
    moe = [n for n in graph.nodes if n.op_kind == "moe"]
    assert len(moe) == 2
    meta = moe[0].meta["moe"]
    assert meta == {
        "experts": 8, "top_k": 2, "hidden": 4096, "ffn": 14336, "shared": 0,
        "capacity_factor": None, "tokens": 256, "gated": True,
    }  # fmt: skip
    t, h, f = 256, 4096, 14336
    assert moe[0].flops_fwd == pytest.approx(2 * t * h * 8 + 2 * 3 * 2 * t * h * f, rel=1e-3)
    assert moe[0].param_bytes == 2 * (8 * h + 8 * 3 * h * f)  # bf16 on meta
    assert not any(n.op_kind == "other" and "mlp" in n.module_path for n in graph.nodes)


# ------------------------------------------------------------------------------ the plan field
def test_plan_ep_round_trip_groups_and_rules():
    plan = P(dp=4, tp=2, ep=2)
    assert Plan.from_json(plan.to_json()).ep == 2
    assert "ep" not in P(dp=2).to_dict()  # plans without experts are unchanged
    assert plan.groups("ep") == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert plan.groups("edp") == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert "ep=2" in plan.summary() and "expert parallelism" in plan.explain()
    with pytest.raises(PlanError, match="ep=4 does not divide dp=2"):
        P(dp=2, ep=4)
    from autopar.core.plan_rules import check_ep, parse_plan_arg

    assert parse_plan_arg("dp=4,ep=2")["ep"] == 2
    with pytest.raises(PlanError, match="does not divide the 6 experts"):
        check_ep(4, 8, [6])


# ------------------------------------------------------------------------------ expert parallelism


@pytest.mark.multiproc
def test_two_ranks_expert_parallel_matches_one_device():
    jobs = [
        (moe_case(), [P(dp=2, ep=2), P(tp=2), P(dp=2, ep=2, recompute="full")]),
        (moe_case(dropout=0.1), [P(dp=2, ep=2)]),
        (moe_case(capacity_factor=0.5, shared_experts=1), [P(dp=2, ep=2, micro_batch_size=1)]),
    ]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)


@pytest.mark.multiproc
def test_four_ranks_ep_composes_with_dp_tp_pp():
    plans = [P(dp=4, ep=2), P(dp=2, tp=2, ep=2), P(dp=2, pp=2, ep=2)]
    jobs = [(moe_case(shared_experts=1), plans), (moe_case(capacity_factor=1.0), [P(dp=4, ep=4)])]
    check_jobs(run_ranks(run_jobs, 4, args=(jobs,)), jobs)


@pytest.mark.multiproc
def test_inference_under_ep_equals_one_device():
    case = moe_case(shared_experts=1, capacity_factor=1.0)
    expected = reference_output(case)
    for rank, outputs in enumerate(
        run_ranks(run_inference_plans, 2, args=(case, [P(dp=2, ep=2, mode="inference")]))
    ):
        torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank}")


def _count_all_to_alls(case, plan):
    """Rank function: the all-to-all calls (and input bytes) of one training step, and the
    prediction of :func:`all_to_all_volume` for this rank. The second step is counted: the first
    also runs the pipeline's shape-inference forward (one more exchange per layer)."""
    import torch.distributed as dist

    batch = case.make_batches(1)[0]
    model = case.build()
    compiled = autopar.compile(
        model, plan.world_size, example_inputs=batch, loss_fn=case.loss_fn, plan=plan, global_batch=B
    )
    seen = {"count": 0, "bytes": 0}
    real = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        seen["count"] += 1
        seen["bytes"] += input.numel() * input.element_size()
        return real(output, input, *args, **kwargs)

    compiled.step(batch)
    dist.all_to_all_single = counting
    try:
        compiled.step(batch)
    finally:
        dist.all_to_all_single = real
    mb = tuple(t[: plan.micro_batch_size] for t in batch)
    graph = autopar.trace(case.build(), mb, loss_fn=case.loss_fn)
    return seen, all_to_all_volume(graph, plan, rank=dist.get_rank())


@pytest.mark.multiproc
def test_rank_code_and_all_to_all_count_match_the_runtime():
    case = moe_case()
    plan = P(dp=2, pp=2, ep=2)
    per_rank = run_ranks(_count_all_to_alls, 4, args=(case, plan))
    for rank, (seen, predicted) in enumerate(per_rank):
        # one MoE layer per pipeline stage, 2 micro-batches, 3 calls forward + 2 backward
        assert seen["count"] == predicted["count"] == 1 * 2 * 5, (rank, seen, predicted)
    # Bytes depend on the routing rank by rank; over an ep group the rows sent equal the rows
    # routed, as the balanced prediction counts them.
    for group in plan.groups("ep"):
        assert sum(per_rank[r][0]["bytes"] for r in group) == sum(per_rank[r][1]["bytes"] for r in group)
    compiled = autopar.compile(
        case.build(),
        4,
        example_inputs=case.make_batches(1)[0],
        loss_fn=case.loss_fn,
        plan=plan,
        global_batch=B,
    )
    code = compiled.rank_code(1)
    assert code.count("dist.all_to_all_single(") == 3  # counts, dispatch, combine of its one layer
    assert "dispatch" in code and "combine" in code and "group=edp" not in code  # dp/ep = 1


def test_huggingface_moe_blocks_are_reported_not_silently_split():
    """HuggingFace Mixtral blocks that cannot be kept as one region (here router jitter in training,
    see autopar/tracing/hf_moe.py; supported blocks: tests/test_moe_hf.py) trace (torch.export) as
    their ops: the graph says so, and a plan with ep > 1 is refused instead of running the experts
    replicated."""
    import transformers

    from autopar.testing.equivalence import lm_loss

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=0, eos_token_id=0, router_jitter_noise=0.1,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    tokens = torch.randint(0, 64, (2, 8))
    graph = autopar.trace(model, (tokens, tokens.clone()), loss_fn=lm_loss)
    assert any("MixtralSparseMoeBlock" in note and "ep > 1" in note for note in graph.notes)
    dense = gpt_case()  # the same refusal for any graph without a MoE region (symbolic: fast)
    compiled = autopar.compile(
        dense.build(), 2, example_inputs=dense.make_batches(1)[0], loss_fn=dense.loss_fn,
        plan=P(dp=2, ep=2), global_batch=B,
    )  # fmt: skip
    with pytest.raises(PlanError, match="no mixture-of-experts region"):
        compiled.rank_code(0)

"""Attention heads whose width is not ``hidden // heads`` (``GPTConfig.head_dim``) and per-head
RMSNorm on q and k (``GPTConfig.qk_norm``), as Qwen3 / Qwen3-MoE have them.

Oracles: the model with ``head_dim`` left at None against the same model with the width given
explicitly (identical parameters, bit-identical loss and gradients: the default changes nothing);
the single-device run for every plan (``autopar/testing/equivalence.py``: losses, full gradients and
updated parameters after each of 3 AdamW steps, rtol 1e-5 / atol 1e-6 in fp32); the module's own
parameters for :func:`count_params`; the graph's FLOPs against the attention width ``heads * head_dim``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

import autopar
from autopar import Plan
from autopar.core.errors import ModelSpecError
from autopar.models import PRESETS, build_model, count_params
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.models.spec import check_spec_sizes, load_model
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import check_jobs, gpt_case, run_jobs, token_batches

B = 8  # global batch of every case
# Qwen3-MoE in miniature: q projects 64 -> 4 heads * 32 = 128 (not 64), GQA, QK-norm, 4 experts top-2.
QWEN3_TINY = dict(
    hidden=64, heads=4, head_dim=32, kv_heads=2, qk_norm=True, norm="rmsnorm", act="swiglu", bias=False,
    experts=4, top_k=2, moe_ffn=16, vocab=64, seq=8, layers=2,
)  # fmt: skip


ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-4)
"""AdamW with eps=1e-4 rather than the helper's 1e-6. Adam moves a parameter by about
``lr * g / (|g| + eps)``, so two gradients that agree to fp32 reduction order (1e-8 apart at
magnitudes of 1e-2, as tensor parallelism's partial sums give) but happen to be ~1e-7 themselves
move it ``lr * 1e-8 / eps`` apart: 1e-5 with eps=1e-6, over the tolerance (this case has such an
entry in q_proj: -1.593e-7 on one device, -1.637e-7 under tp=2, 3.3e-6 apart after the step; the
largest gradient difference is 1.35e-8 at magnitudes up to 2.3e-2). With eps=1e-4 that is
1e-7, while a real error (a gradient off by a factor, e.g. an unsummed norm weight) still moves
parameters by ~lr = 1e-3. Gradients themselves are compared at rtol 1e-5 / atol 1e-6 as always."""


def _case(name: str, **cfg):
    return dataclasses.replace(gpt_case(batch=B, **cfg), name=name, optimizer=ADAMW)


def P(**kw) -> Plan:
    kw.setdefault("micro_batch_size", 2)
    return Plan.manual(global_batch=B, **kw)


def _loss_and_grads(cfg: GPTConfig) -> tuple[dict, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens, targets = token_batches(cfg.vocab, 4, cfg.seq, 1)[0]
    loss = gpt_loss(model(tokens), targets)
    loss.backward()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return shapes, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ the default
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_default_head_dim_changes_nothing(style):
    """head_dim=None is hidden // heads: the same parameters (names and shapes, no q/k norms) and a
    bit-identical loss and gradients as the width given explicitly."""
    kw = dict(hidden=32, layers=2, heads=4, vocab=50, seq=8)
    if style == "llama":
        kw.update(norm="rmsnorm", act="swiglu", kv_heads=2, bias=False)
    default, explicit = GPTConfig(**kw), GPTConfig(**kw, head_dim=8)
    assert default.head_dim is None and default.head_dim_resolved == 8 and not default.qk_norm
    shapes, loss, grads = _loss_and_grads(default)
    shapes_x, loss_x, grads_x = _loss_and_grads(explicit)
    assert shapes == shapes_x
    assert shapes["layers.0.attn.q_proj.weight"] == (32, 32)
    assert shapes["layers.0.attn.o_proj.weight"] == (32, 32)
    assert not any("q_norm" in n or "k_norm" in n for n in shapes)
    assert torch.equal(loss, loss_x)
    assert all(torch.equal(grads[n], grads_x[n]) for n in grads)
    graphs = []
    for cfg in (default, explicit):  # the same traced graph, node for node (plans key on node names)
        tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
        graph = autopar.trace(GPT(cfg, device="meta"), (tokens, tokens), loss_fn=gpt_loss)
        graphs.append([(n.name, n.op_kind, n.inputs, n.output_shape, n.flops_fwd) for n in graph.nodes])
    assert graphs[0] == graphs[1]
    assert sum(math.prod(s) for s in shapes.values()) == count_params(default)


def test_decoupled_head_dim_shapes_and_count():
    cfg = GPTConfig(**QWEN3_TINY)
    model = GPT(cfg, device="meta")
    attn = dict(model.layers[0].attn.named_parameters())
    assert attn["q_proj.weight"].shape == (128, 64) and attn["o_proj.weight"].shape == (64, 128)
    assert attn["k_proj.weight"].shape == (64, 64) and attn["v_proj.weight"].shape == (64, 64)
    assert attn["q_norm.weight"].shape == (32,) and attn["k_norm.weight"].shape == (32,)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)


def test_qk_norm_normalises_each_head_before_rotary():
    """With unit norm weights, every q head entering the rotary embedding has RMS 1 over its width;
    scaling the q projection leaves the loss unchanged (the norm removes the scale)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**QWEN3_TINY, "experts": 0})).eval()
    attn = model.layers[0].attn
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    tokens, targets = token_batches(64, 2, 8, 1)[0]
    loss = gpt_loss(model(tokens), targets)
    q = seen["q"]
    assert q.shape == (2, 8, 4, 32)  # [b, t, heads, head_dim]: normalised per head, before transpose
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 8, 4), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        attn.q_proj.weight.mul_(7.0)
    torch.testing.assert_close(gpt_loss(model(tokens), targets), loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        (dict(head_dim=0), "head_dim=0"),
        (dict(head_dim=-8), "head_dim=-8"),
        (dict(head_dim=True), "head_dim=True"),
        (dict(head_dim=8.0), "head_dim=8.0"),
        (dict(hidden=30), "not divisible by heads=4"),
        (dict(head_dim=7, norm="rmsnorm"), "odd"),
        (dict(qk_norm="yes"), "qk_norm='yes'"),
    ],
)
def test_bad_head_dim_and_qk_norm_raise_typed_errors(kw, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        GPTConfig(**{**dict(hidden=32, layers=1, heads=4, vocab=16, seq=4), **kw})


def test_given_head_dim_lifts_the_divisibility_rule():
    cfg = GPTConfig(hidden=30, layers=1, heads=4, head_dim=8, vocab=16, seq=4)
    assert GPT(cfg, device="meta").layers[0].attn.q_proj.weight.shape == (32, 30)


# ------------------------------------------------------------------------------ the spec string
def _spec(cfg: GPTConfig) -> str:
    """``gpt:key=value,...`` of every field that is set (booleans as 0/1)."""
    items = [
        f"{k}={int(v) if isinstance(v, bool) else v}"
        for k, v in dataclasses.asdict(cfg).items()
        if v is not None
    ]
    return "gpt:" + ",".join(items)


@pytest.mark.parametrize("cfg", [QWEN3_TINY, PRESETS["qwen3-moe-30b-a3b"].config])
def test_spec_string_round_trips(cfg):
    config = GPTConfig(**cfg)
    spec = _spec(config)
    assert "head_dim=" in spec and "qk_norm=1" in spec
    assert build_model(spec, device="meta").config == config


def test_preset_fields_override():
    cfg = build_model("qwen3-moe-30b-a3b:layers=1,head_dim=64,qk_norm=0").config
    assert (cfg.head_dim, cfg.qk_norm, cfg.heads) == (64, False, 32)


def test_spec_rejects_bad_head_dim_and_qk_norm():
    base = "gpt:hidden=64,layers=1,heads=4,vocab=16,seq=4"
    with pytest.raises(ModelSpecError, match="head_dim=1,000,000 exceeds"):
        check_spec_sizes(base + ",head_dim=1000000")
    with pytest.raises(ModelSpecError, match="head_dim=0 must be a positive integer"):
        check_spec_sizes(base + ",head_dim=0")
    with pytest.raises(ModelSpecError, match="qk_norm='maybe' is not a boolean"):
        build_model(base + ",qk_norm=maybe")
    with pytest.raises(ModelSpecError, match="head_dim='wide' is not a number"):
        build_model(base + ",head_dim=wide")


# ------------------------------------------------------------------------------ the preset
def test_qwen3_preset_counts_traces_and_estimates():
    """30.5B parameters and ~3.3B active (Qwen's model card); the attention GEMMs are heads *
    head_dim = 4096 wide, not hidden = 2048; the estimator costs it on 8 H100s with ep=8."""
    from autopar.cluster import Cluster
    from autopar.estimator import attention_heads, estimate, kv_heads

    cfg = GPTConfig(**PRESETS["qwen3-moe-30b-a3b"].config)
    total = count_params(cfg)
    active = total - cfg.layers * 3 * cfg.hidden * cfg.moe_config().ffn * (cfg.experts - cfg.top_k)
    assert round(total / 1e9, 1) == 30.5
    assert 3.3e9 <= active < 3.4e9
    loaded = load_model("qwen3-moe-30b-a3b")
    assert sum(p.numel() for p in loaded.model.parameters()) == total
    graph = loaded.trace(1)
    assert (loaded.num_layers, loaded.heads, loaded.kv_heads) == (48, 32, 4)
    assert attention_heads(graph) == [4, 32] and kv_heads(graph) == 4
    q = next(n for n in graph.nodes if n.module_path.endswith("layers.0.attn.q_proj"))
    assert q.gemm[2:] == (32 * 128, 2048)  # (n, k): 2048 -> 4096
    sdpa = next(n for n in graph.nodes if n.op_kind == "attention")
    assert sdpa.flops_fwd == 4 * 32 * 4096 * 4096 * 128  # both GEMMs, head width 128
    plan = Plan.manual(dp=8, ep=8, global_batch=64, micro_batch_size=1, zero_stage=0)
    cost = estimate(graph, Cluster.parse("dgx-h100:8"), plan, dtype="bf16")
    assert math.isfinite(cost.step_time_s) and cost.step_time_s > 0
    assert math.isfinite(cost.mfu) and 0 < cost.mfu < 1


# ------------------------------------------------------------------------------ tensor parallelism
@pytest.mark.parametrize("sp", [False, True])
def test_tp_places_attention_by_heads(sp):
    """The default tensor-parallel layout (no per-model code) finds Megatron's attention with
    decoupled heads: q/k/v column-parallel (their heads * head_dim rows split), o_proj row-parallel,
    the per-head norms computed on the local heads (shard on the heads dim) with whole weights."""
    from autopar.core.plan import Replicate, Shard
    from autopar.sharding import megatron_placements
    from autopar.tracing import fx_trace

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**QWEN3_TINY, "experts": 0}))
    tokens = torch.randint(0, 64, (2, 8))
    pl = megatron_placements(fx_trace(model, (tokens, tokens), loss_fn=gpt_loss), tp=2, sequence_parallel=sp)
    params = {}
    for np in pl.values():
        params.update(np.params)
    attn = "model.layers.0.attn."
    for name in ("q_proj", "k_proj", "v_proj"):
        assert params[attn + name + ".weight"] == Shard(0), name
    assert params[attn + "o_proj.weight"] == Shard(1)
    assert params[attn + "q_norm.weight"] == Replicate() and params[attn + "k_norm.weight"] == Replicate()
    for norm in ("q_norm", "k_norm"):  # the weight's multiply: [b, t, heads, head_dim], heads split
        (node,) = [n for n, np in pl.items() if attn + norm + ".weight" in np.params]
        assert pl[node].output == Shard(2), norm


@pytest.mark.multiproc
def test_two_ranks_decoupled_heads_match_one_device():
    """tp=2 splits q/k/v/o by heads (heads * head_dim wide shards, the q/k norm weights replicated
    with their gradients summed over the tp ranks), dp=2 and ep=2, each equal to one device."""
    moe = _case("qwen3-tiny-moe", **QWEN3_TINY)
    dense = _case("qwen3-tiny-dense-bias", **{**QWEN3_TINY, "experts": 0, "bias": True})
    jobs = [
        (moe, [P(tp=2), P(dp=2), P(dp=2, ep=2)]),
        (dense, [P(tp=2, sequence_parallel=True)]),
    ]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)

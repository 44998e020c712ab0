"""autopar.estimate: traced graph + cluster + plan -> predicted time and memory.

Oracles: Korthikanti et al.'s closed forms for activation memory, Narayanan et al.'s FLOPs formula and
one published Megatron run, the Megatron collective pattern, and the plan rules.
"""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.core.plan import Plan
from autopar.estimator import estimate, workload
from autopar.models import GPTConfig
from cost_models.transformer import korthikanti_activation_bytes, megatron_flops_per_iteration

S, B, H, A = 256, 2, 512, 8
_CACHE: dict = {}


def gpt_graph(*, hidden=H, heads=A, layers=4, seq=S, batch=B, dtype=torch.float16, vocab=1024, **cfg):
    key = (hidden, heads, layers, seq, batch, dtype, vocab, tuple(sorted(cfg.items())))
    if key not in _CACHE:
        config = GPTConfig(
            hidden=hidden,
            layers=layers,
            heads=heads,
            vocab=vocab,
            seq=seq,
            **{"dropout": 0.1, "fused_attention": False, **cfg},
        )
        model, inputs, loss_fn = autopar.build_model(config, device="meta", batch=batch, dtype=dtype)
        _CACHE[key] = autopar.trace(model, inputs, loss_fn=loss_fn)
    return _CACHE[key]


def dgx(nodes=1):
    return Cluster.preset("dgx-a100-80g", nodes=nodes)


def layer_block(w):
    blocks = [b for stage in w.stages for b, _ in stage.blocks if b.recomputable]
    assert len({b.name for b in blocks}) == 1
    return blocks[0]


@pytest.mark.parametrize(
    ("tp", "sp", "recompute"),
    [
        (1, False, "none"),
        (4, False, "none"),
        (4, True, "none"),
        (4, False, "selective"),
        (4, True, "selective"),
        (4, False, "full"),
        (4, True, "full"),
        (8, True, "none"),
    ],
)
def test_layer_activation_memory_equals_korthikanti(tp, sp, recompute):
    """Measured saved bytes of one traced layer, sharded by the derived Megatron placement, equal
    Korthikanti et al. 2022 Eq. 1-6 within 2%."""
    plan = Plan.manual(dp=8 // tp, tp=tp, global_batch=B * 8 // tp, micro_batch_size=B, sequence_parallel=sp)
    block = layer_block(workload(gpt_graph(), dgx(), plan))
    want = korthikanti_activation_bytes(seq=S, batch=B, hidden=H, heads=A, tp=tp, sp=sp, recompute=recompute)
    assert block.saved(recompute) == pytest.approx(want, rel=0.02)


def test_first_stage_holds_all_layers_worth_of_activations_in_1f1b_and_more_when_interleaved():
    graph = gpt_graph(layers=8)
    per_layer = korthikanti_activation_bytes(seq=S, batch=B, hidden=H, heads=A, tp=2)
    base = {"dp": 1, "tp": 2, "pp": 4, "global_batch": 16 * B, "micro_batch_size": B}
    one = workload(graph, dgx(), Plan.manual(**base)).memory_per_stage[0]["activations"]
    stem = one - 8 * per_layer  # the embedding's activations, p micro-batches of them
    assert 0 <= stem < 0.1 * one
    v = 2
    inter = workload(graph, dgx(), Plan.manual(**base, schedule="interleaved", virtual_stages=v))
    acts = inter.memory_per_stage[0]["activations"] - stem * (1 + 3 / (4 * v))
    assert acts == pytest.approx(8 * per_layer * (1 + (4 - 1) / (4 * v)), rel=0.02)


def test_identical_layers_are_costed_once_per_stage():
    w = workload(gpt_graph(layers=8), dgx(), Plan.manual(dp=4, pp=2, global_batch=8 * B, micro_batch_size=B))
    for stage in w.stages:
        layers = [(b, c) for b, c in stage.blocks if b.recomputable]
        assert len(layers) == 1 and layers[0][1] == 4
    assert [b.name for b, _ in w.stages[0].blocks][-1] == "stem"
    assert [b.name for b, _ in w.stages[1].blocks][-1] == "head"


def test_megatron_collectives_per_layer():
    sbh = S * B * H * 2
    tp_plan = Plan.manual(dp=2, tp=4, global_batch=2 * B, micro_batch_size=B)
    comms = layer_block(workload(gpt_graph(), dgx(), tp_plan)).comms
    assert (
        sorted((c.phase, c.collective) for c in comms)
        == [("bwd", "all_reduce")] * 2 + [("fwd", "all_reduce")] * 2
    )
    assert all(c.nbytes == sbh for c in comms)
    sp_plan = Plan.manual(dp=2, tp=4, global_batch=2 * B, micro_batch_size=B, sequence_parallel=True)
    comms = layer_block(workload(gpt_graph(), dgx(), sp_plan)).comms
    activations = [c for c in comms if c.nbytes == sbh]
    kinds = sorted((c.phase, c.collective) for c in activations)
    assert kinds == sorted(
        [("fwd", "all_gather"), ("fwd", "reduce_scatter")] * 2
        + [("bwd", "reduce_scatter"), ("bwd", "all_gather")] * 2
    )
    # Under SP each rank's norm sees its sequence shard only: the two LayerNorms' weight and bias
    # gradients are partial sums, all-reduced over tp in backward (as the lowering runs them).
    norms = [c for c in comms if c.nbytes != sbh]
    assert sorted((c.phase, c.collective, c.nbytes) for c in norms) == [("bwd", "all_reduce", H * 2)] * 4


def test_qkv_projections_run_as_one_gemm_split_by_tp():
    plan = Plan.manual(dp=2, tp=4, global_batch=2 * B, micro_batch_size=B)
    gemms = [op.gemm for op in layer_block(workload(gpt_graph(), dgx(), plan)).ops if op.op_class == "gemm"]
    assert (1, S * B, 3 * H / 4, H) in gemms  # fused QKV, column-parallel
    assert (1, S * B, H, H / 4) in gemms  # output projection, row-parallel
    assert (B * A / 4, S, S, H / A) in gemms  # scores, heads split


def test_flops_match_the_megatron_formula():
    graph = gpt_graph(layers=4, hidden=1024, heads=16, seq=512, vocab=4096)
    plan = Plan.manual(dp=8, global_batch=8 * B, micro_batch_size=B, recompute="full")
    cost = estimate(graph, dgx(), plan)
    f = megatron_flops_per_iteration(batch=8 * B, seq=512, layers=4, hidden=1024, vocab=4096)
    assert cost.hardware_flops_per_step == pytest.approx(f, rel=0.02)  # + norms, softmax, gelu
    assert cost.model_flops_per_step < cost.hardware_flops_per_step
    no_rec = estimate(graph, dgx(), Plan.manual(dp=8, global_batch=8 * B, micro_batch_size=B))
    assert no_rec.hardware_flops_per_step == pytest.approx(cost.model_flops_per_step)


def test_prediction_is_self_consistent():
    plan = Plan.manual(dp=2, tp=2, pp=2, global_batch=16 * B, micro_batch_size=B, recompute="selective")
    cost = estimate(gpt_graph(), dgx(), plan)
    assert sum(cost.breakdown_s.values()) == pytest.approx(cost.step_time_s)
    for key in ("compute", "tp_comm", "pp_bubble", "pp_p2p", "dp_comm_exposed", "optimizer"):
        assert key in cost.breakdown_s
    assert cost.breakdown_s["pp_bubble"] > 0 and cost.breakdown_s["tp_comm"] > 0
    assert cost.tokens_per_s == pytest.approx(16 * B * S / cost.step_time_s)
    assert 0 < cost.mfu < 0.7
    assert cost.fits and cost.memory_capacity_bytes == 80e9
    assert sum(cost.memory_breakdown_bytes.values()) == pytest.approx(cost.memory_bytes_per_device)


def test_published_megatron_run_within_ten_percent():
    """Narayanan et al. SC'21 Table 1, 18.4B: tp=8, dp=32, mbs=8, B=1024, 256 A100s: 135 TFLOP/s."""
    graph = gpt_graph(hidden=6144, heads=48, layers=40, seq=2048, batch=8, vocab=51200)
    plan = Plan.manual(dp=32, tp=8, global_batch=1024, micro_batch_size=8, recompute="full")
    cost = estimate(graph, dgx(nodes=32), plan)
    f = megatron_flops_per_iteration(batch=1024, seq=2048, layers=40, hidden=6144, vocab=51200)
    published_s = f / (256 * 135e12)
    assert cost.step_time_s == pytest.approx(published_s, rel=0.10)


def test_a_model_too_large_for_one_device_does_not_fit_and_says_by_how_much():
    graph = gpt_graph(hidden=3072, heads=32, layers=30, seq=2048, batch=16, vocab=51200)
    alone = estimate(graph, dgx(), Plan.manual(dp=8, global_batch=128, micro_batch_size=16, recompute="full"))
    assert not alone.fits
    assert alone.extra["overflow_bytes"] == pytest.approx(alone.memory_bytes_per_device - 80e9)
    split = estimate(
        graph, dgx(nodes=8), Plan.manual(dp=32, tp=2, global_batch=512, micro_batch_size=16, recompute="full")
    )
    assert split.fits


def test_zero_stages_shrink_model_state():
    graph = gpt_graph()
    state = {}
    for zero in (0, 1, 2, 3):
        cost = estimate(
            graph, dgx(), Plan.manual(dp=8, global_batch=8 * B, micro_batch_size=B, zero_stage=zero)
        )
        m = cost.memory_breakdown_bytes
        state[zero] = m["params"] + m["grads"] + m["optimizer"]
    assert state[0] > state[1] > state[2] > state[3]
    assert state[3] == pytest.approx(state[0] / 8)


def test_inference_with_kv_cache():
    graph = gpt_graph(layers=4)
    plan = Plan.manual(dp=4, tp=2, global_batch=4 * B, micro_batch_size=B, mode="inference")
    cost = estimate(graph, dgx(), plan, kv_cache=True)
    assert cost.memory_breakdown_bytes["kv_cache"] == pytest.approx(2 * 4 * B * S * H * 2 / 2)
    assert cost.memory_breakdown_bytes["grads"] == 0 and cost.memory_breakdown_bytes["optimizer"] == 0
    assert "optimizer" not in cost.breakdown_s


def test_fp32_graph_is_costed_in_mixed_precision_and_cpu_stays_fp32():
    graph = gpt_graph(dtype=torch.float32)
    plan = Plan.manual(dp=8, global_batch=8 * B, micro_batch_size=B)
    assert estimate(graph, dgx(), plan).extra["dtype"] == "bf16"
    local = estimate(graph, Cluster.local(ranks=2), Plan.manual(dp=2, global_batch=2 * B, micro_batch_size=B))
    assert local.extra["dtype"] == "fp32" and local.step_time_s > 0


def test_fused_attention_and_llama_style_models():
    sdpa = gpt_graph(fused_attention=True)
    plan = Plan.manual(dp=4, tp=2, global_batch=4 * B, micro_batch_size=B, recompute="selective")
    block = layer_block(workload(sdpa, dgx(), plan))
    assert block.saved("selective") == block.saved("none")  # no score tensors to drop
    assert estimate(sdpa, dgx(), plan).step_time_s > 0
    llama = gpt_graph(
        norm="rmsnorm",
        act="swiglu",
        kv_heads=2,
        bias=False,
        tie_embeddings=False,
        dropout=0.0,
        dtype=torch.float32,
    )
    ok = Plan.manual(dp=4, tp=2, global_batch=4 * B, micro_batch_size=B)
    assert estimate(llama, dgx(), ok).step_time_s > 0
    with pytest.raises(PlanError, match="tp=4 does not divide the 2 attention heads"):
        estimate(llama, dgx(), Plan.manual(dp=2, tp=4, global_batch=2 * B, micro_batch_size=B))


def test_bad_plans_name_the_value_and_the_rule():
    graph = gpt_graph()
    with pytest.raises(PlanError, match=r"= 4 devices, but cluster .* has 8"):
        estimate(graph, dgx(), Plan.manual(dp=4, global_batch=4 * B, micro_batch_size=B))
    odd = gpt_graph(hidden=384, heads=6)
    with pytest.raises(PlanError, match=r"tp=4 does not divide the 6 attention heads.*\[1, 2, 3, 6\]"):
        estimate(odd, dgx(), Plan.manual(dp=2, tp=4, global_batch=2 * B, micro_batch_size=B))
    with pytest.raises(PlanError, match="cannot fill"):
        estimate(graph, dgx(), Plan.manual(dp=1, pp=8, global_batch=8 * B, micro_batch_size=B))


def test_explicit_placements_are_costed_as_written():
    """A plan that shards only the MLP (fc1 by rows of W, fc2 by columns) has the MLP GEMMs split,
    attention replicated, and exactly the collectives the lowering runs for it: the all-reduce of
    fc2's partial sums forward, and the all-reduce of fc1's input gradient (a partial sum, since
    each rank's fc1 sees only its rows of W) backward."""
    from autopar.core.plan import NodePlacement, Replicate, Shard

    graph = gpt_graph(layers=1)
    fc1 = next(n for n in graph.nodes if n.module_path.endswith("mlp.fc1"))
    fc2 = next(n for n in graph.nodes if n.module_path.endswith("mlp.fc2"))
    w1, b1 = (next(p for p in fc1.param_names if p.endswith(end)) for end in ("weight", "bias"))
    w2, b2 = (next(p for p in fc2.param_names if p.endswith(end)) for end in ("weight", "bias"))
    placements = {
        fc1.name: NodePlacement(output=Shard(2), params={w1: Shard(0), b1: Shard(0)}),
        fc2.name: NodePlacement(
            output=Replicate(), params={w2: Shard(1), b2: Replicate()}, collective="all_reduce"
        ),
    }
    plan = Plan.manual(dp=4, tp=2, global_batch=4 * B, micro_batch_size=B)
    plan.placements = placements
    block = layer_block(workload(graph, dgx(), plan))
    gemms = {op.name: op.gemm for op in block.ops if op.op_class == "gemm"}
    assert gemms[fc1.name] == (1, S * B, 4 * H / 2, H)
    assert gemms[fc2.name] == (1, S * B, H, 4 * H / 2)
    assert any(g == (1, S * B, 3 * H, H) for g in gemms.values())  # q, k, v replicated
    assert sorted((c.collective, c.phase) for c in block.comms) == [
        ("all_reduce", "bwd"),
        ("all_reduce", "fwd"),
    ]


def test_profiled_op_times_replace_the_roofline():
    """With a measured (forward, backward) time for every node, the predicted compute is their sum
    (scaled to the micro-batch: the graph was measured at batch 2, the plan runs micro-batches of 4)."""
    graph = gpt_graph(layers=2, dtype=torch.float32)
    nodes = [n for n in graph.nodes if n.op_kind not in ("placeholder", "output", "param")]
    times = {n.name: (1e-3, 2e-3) for n in nodes}
    plan = Plan.manual(dp=1, global_batch=4, micro_batch_size=4)
    cost = estimate(graph, Cluster.local(ranks=1), plan, op_times=times)
    assert cost.breakdown_s["compute"] == pytest.approx(len(nodes) * 3e-3 * 2)
    roofline = estimate(graph, Cluster.local(ranks=1), plan)
    assert roofline.breakdown_s["compute"] != pytest.approx(cost.breakdown_s["compute"])


def test_fused_norms_read_the_input_once_and_write_the_output_once():
    """An RMSNorm traced as pow, mean, add, rsqrt and two products is one kernel under
    ``fused_norms`` (Apex / Transformer Engine): it reads x and the weight and writes y."""
    graph = gpt_graph(norm="rmsnorm", dropout=0.0)
    plan = Plan.manual(dp=1, global_batch=B, micro_batch_size=B)
    one = Cluster.preset("dgx-a100-80g", devices=1)
    calib = autopar.estimator.default_calibration(one).with_(fuse_elementwise=False)

    def memory_ops(c):
        block = layer_block(workload(graph, one, plan, calib=c))
        return [op for op in block.ops if op.op_class == "memory"]

    x = B * S * H * 2  # one fp16 activation
    fused, eager = memory_ops(calib), memory_ops(calib.with_(fused_norms=False))
    norms = [op.bytes_fwd for op in fused if op.name.startswith("pow")]  # a group is named by its first op
    assert norms == pytest.approx([2 * x + 2 * H] * 2)  # ln_1 and ln_2: read x and the weight, write y
    # eager, per norm: pow (2x), mean (x), x * rsqrt (2x), * weight (2x): 5 x more than fused
    saved = sum(op.bytes_fwd for op in eager) - sum(op.bytes_fwd for op in fused)
    assert saved == pytest.approx(2 * 5 * x, rel=0.01)
    assert len(eager) - len(fused) == 2 * 5  # and five kernels fewer per norm


def test_a_framework_reducing_gradients_in_fp32_moves_twice_their_bytes():
    """Composer's FSDP reduces 16-bit gradients in float32: ZeRO-3's reduce-scatter doubles, the
    two parameter gathers stay 16-bit."""
    from cost_models import collective_time_s, step_time
    from cost_models.hardware import calibration_for

    graph = gpt_graph()  # fp16
    plan = Plan.manual(dp=8, global_batch=8 * B, micro_batch_size=B, zero_stage=3)
    base = autopar.estimator.default_calibration(dgx())
    assert calibration_for("a100-80g", framework="composer").grad_reduce_bytes == 4.0
    assert calibration_for("a100-80g", framework="fsdp").grad_reduce_bytes == 4.0
    assert calibration_for("a100-80g").grad_reduce_bytes == 0.0  # Megatron reduces in the compute dtype

    def zero_comm(calib):
        w = workload(graph, dgx(), plan, calib=calib)
        return w.spec.grad_bytes, step_time(w.spec, w.rates, calib).stage_times[0].zero_comm_s

    (g16, z16), (g32, z32) = zero_comm(base), zero_comm(base.with_(grad_reduce_bytes=4.0))
    assert (g16, g32) == (2.0, 4.0)
    w = workload(graph, dgx(), plan, calib=base)
    dp = w.spec.groups["dp"]
    extra = sum(  # each block's reduce-scatter moves 4 bytes a parameter instead of 2
        count
        * (
            collective_time_s("reduce_scatter", b.param_count * 4.0, dp, calib=base)
            - collective_time_s("reduce_scatter", b.param_count * 2.0, dp, calib=base)
        )
        for b, count in w.spec.stages[0].blocks
        if b.param_count
    )
    assert extra > 0 and z32 - z16 == pytest.approx(extra, rel=1e-9)


def test_a_dropout_that_runs_no_kernel_does_not_hide_the_write_before_it():
    """With p = 0 the embedding dropout returns its input, so the fused chain before it still writes
    the embedding sum that the first layer reads (lookups of the token and position rows, the
    sum written once)."""
    graph = gpt_graph(dropout=0.0)
    one = Cluster.preset("dgx-a100-80g", devices=1)
    plan = Plan.manual(dp=1, global_batch=B, micro_batch_size=B)
    w = workload(graph, one, plan)
    stem = next(b for stage in w.stages for b, _ in stage.blocks if b.name == "stem")
    x = B * S * H * 2  # the fp16 embedding sum
    pos = S * H * 2  # the position rows read
    memory = sum(op.bytes_fwd for op in stem.ops if op.op_class == "memory")
    assert memory == pytest.approx(x + x + pos, rel=0.01)  # token rows read, the sum written, positions

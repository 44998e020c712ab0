"""The cost half of mixture of experts: equations, estimator, planner (no processes).

* the cost model's equations against hand calculations (``cost_models.moe``: tokens per expert
  under imbalance, GEMM shapes, all-to-all bytes and time on the topology, expert memory);
* the estimator: ``ep`` divides the expert parameters, adds the all-to-alls as ``ep_comm`` (taken
  out of the step model's tensor-parallel share, so the total is the step model's), and rejects an
  ``ep`` that does not divide the experts;
* the estimator's all-to-all count and bytes per step equal the lowering's
  (``autopar.lower.expert.all_to_all_volume``) for a small MoE GPT under several plans;
* the planner discovers ``ep`` when the experts do not fit replicated, and explains it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.core.plan import Plan
from autopar.estimator import default_calibration, estimate, workload
from autopar.estimator.moe import all_to_all_volume, ep_group, expert_placement, moe_nodes
from autopar.models.spec import load_model
from autopar.solve import plan as autoplan
from cost_models import GroupSpec, LinkSpec, collective_time_s
from cost_models import moe as m
from cost_models.constants import DEFAULT

SPEC = "gpt:hidden=64,layers=4,heads=4,vocab=128,seq=16,experts=4,top_k=2,act=swiglu,norm=rmsnorm"
BIG = "gpt:hidden=256,layers=2,heads=4,vocab=256,seq=32,experts=8,top_k=2,ffn=2048,act=swiglu,norm=rmsnorm"


@pytest.fixture(scope="module")
def small():
    """A 4-layer MoE GPT traced at batch 2 (the micro-batch of the plans below)."""
    return load_model(SPEC).trace(2)


@pytest.fixture(scope="module")
def big():
    return load_model(BIG).trace(2)


def _shape(**kw) -> m.MoEShape:
    base = dict(experts=8, top_k=2, hidden=1024, ffn=4096, tokens=4096.0)
    return m.MoEShape(**{**base, **kw})


# ------------------------------------------------------------------------------ equations
def test_tokens_per_expert_and_rank_factor_by_hand():
    """Balanced: each expert gets ep T k / E tokens, a rank T k. One hot expert at iota times the
    mean puts (L - 1 + iota) / L of the balanced load on its rank (L = E / ep local experts)."""
    s = _shape()
    assert m.expert_tokens(s, ep=4) == (4 * 4096 * 2 / 8, 4 * 4096 * 2 / 8)
    assert m.received_tokens(s, ep=4) == 4096 * 2
    assert m.rank_factor(s, ep=4, imbalance=1.5) == pytest.approx((2 - 1 + 1.5) / 2)  # L = 2
    assert m.rank_factor(s, ep=8, imbalance=1.5) == pytest.approx(1.5)  # one expert per rank
    assert m.rank_factor(s, ep=1, imbalance=1.5) == pytest.approx((8 - 1 + 1.5) / 8)
    capped = _shape(capacity_factor=1.25)
    assert m.rank_factor(capped, ep=8, imbalance=2.0) == pytest.approx(1.25)  # dropped beyond C


def test_expert_gemms_by_hand():
    """ep=2, tp=2, iota=1.5: the hot expert's GEMMs at 1.5 n tokens, the other 3 local experts at n,
    gate+up fused (2f/tp wide), down (f/tp deep); the router (T, E, h)."""
    s = _shape()
    ops = {o.name: o for o in m.moe_ops(s, ep=2, tp=2, imbalance=1.5, elem_bytes=2)}
    n = 2 * 4096 * 2 / 8
    assert ops["moe.router"].gemm == (1.0, 4096, 8, 1024)
    assert ops["moe.expert_in.hot"].gemm == (1.0, 1.5 * n, 2 * 4096 / 2, 1024)
    assert ops["moe.expert_out.hot"].gemm == (1.0, 1.5 * n, 1024, 4096 / 2)
    assert ops["moe.expert_in"].gemm == (1.0, n, 4096, 1024) and ops["moe.expert_in"].count == 3
    # FLOPs of the routed experts on the rank: (L - 1 + iota) n tokens x 3 GEMMs of 2 h f / tp
    flops = sum(o.flops_fwd * o.count for k, o in ops.items() if k.startswith("moe.expert"))
    assert flops == pytest.approx((3 + 1.5) * n * 3 * 2 * 1024 * 4096 / 2)


def test_shared_experts_are_always_on():
    s = _shape(shared=2)
    ops = {o.name: o for o in m.moe_ops(s, ep=1, tp=1)}
    assert ops["moe.shared_in"].gemm == (1.0, 4096, 2 * 2 * 4096, 1024)
    assert ops["moe.shared_out"].gemm == (1.0, 4096, 1024, 2 * 4096)


def test_all_to_all_volume_and_time_on_the_topology():
    """Per layer: counts (E int64), dispatch and combine of T k h e bytes, and their backward; the
    share leaving a rank is (ep-1)/ep. Inside a node the flat all-to-all is latency + the off-rank
    share over NVLink; across nodes the off-node share over the NIC; hierarchical adds the passes."""
    s = _shape()
    calls = dict(m.all_to_all_calls(s, mode="train", elem_bytes=2))
    data = 4096 * 2 * 1024 * 2
    assert calls == {
        "counts": 64,
        "dispatch": data,
        "combine": data,
        "combine_backward": data,
        "dispatch_backward": data,
    }
    assert len(m.all_to_all_calls(s, mode="inference")) == 3
    assert m.all_to_all_sent_bytes(data, 4) == data * 3 / 4

    nv = LinkSpec(bandwidth_bytes_per_s=450e9, latency_s=1e-6)
    ib = LinkSpec(bandwidth_bytes_per_s=50e9, latency_s=5e-6)
    a0, e_in, e_out = (
        DEFAULT.collective_base_latency_s,
        DEFAULT.intra_node_efficiency,
        DEFAULT.inter_node_efficiency,
    )
    inside = GroupSpec(size=8, ranks_per_node=8, intra=nv)
    assert m.all_to_all_time_s(data, inside) == pytest.approx(a0 + 7 * 1e-6 + 7 / 8 * data / (450e9 * e_in))
    across = GroupSpec(size=16, ranks_per_node=8, intra=nv, inter=ib)
    flat = a0 + 15 * 5e-6 + max(7 / 16 * data / (450e9 * e_in), 8 / 16 * data / (50e9 * e_out))
    assert m.all_to_all_time_s(data, across) == pytest.approx(flat)
    hier = (a0 + 7 * 1e-6 + 7 / 8 * data / (450e9 * e_in)) + (a0 + 1 * 5e-6 + 1 / 2 * data / (50e9 * e_out))
    assert m.all_to_all_time_s(data, across, algorithm="hierarchical") == pytest.approx(hier)
    assert collective_time_s("all_to_all", data, across) > m.all_to_all_time_s(data, inside)


def test_expert_memory_by_hand():
    """Expert parameters / (ep tp); with ep > 1 their state is whole (the runtime builds no ZeRO
    there: refused), with ep = 1 ZeRO-1 shards their optimizer state over dp like any parameter;
    the dispatch buffers are 2 x capacity x T k h e."""
    s = _shape()
    per = m.params_per_rank(s, ep=4, tp=2)
    assert per["experts"] == 8 * 3 * 1024 * 4096 / 8 and per["router"] == 8 * 1024
    state = m.expert_state_bytes(1000.0, dp=16, ep=4, zero_stage=0)
    assert state == {"params": 2000.0, "grads": 2000.0, "optimizer": 12000.0}
    assert m.expert_state_bytes(1000.0, dp=16, ep=1, zero_stage=1)["optimizer"] == 12000.0 / 16
    with pytest.raises(ValueError, match="not built"):
        m.expert_state_bytes(1000.0, dp=16, ep=4, zero_stage=1)
    assert m.dispatch_buffer_bytes(s, ep=1) == 0.0
    assert m.dispatch_buffer_bytes(_shape(capacity_factor=1.25), ep=4) == 2 * 1.25 * 4096 * 2 * 1024 * 2


# ------------------------------------------------------------------------------ estimator
def test_estimator_shards_experts_and_reports_all_to_all(small):
    """ep=2 halves the expert parameters a rank holds, adds ep_comm, and keeps the breakdown summing
    to the step time; ep=1 has no all-to-all; an ep that does not divide the experts is refused."""
    cluster = Cluster.parse("dgx-h100:8")
    one = estimate(small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2))
    two = estimate(small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2, ep=2))
    assert "ep_comm" not in one.breakdown_s and two.breakdown_s["ep_comm"] > 0
    assert sum(two.breakdown_s.values()) == pytest.approx(two.step_time_s)
    experts = sum(math.prod(v["shape"]) for v in small.params.values() if len(v["shape"]) == 3)  # [E, ., .]
    w1 = workload(small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2))
    w2 = workload(small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2, ep=2))
    held = [st.param_count for st in w1.stages][0] - [st.param_count for st in w2.stages][0]
    assert held == pytest.approx(experts / 2)
    assert two.memory_breakdown_bytes["moe_dispatch"] > 0
    with pytest.raises(PlanError, match="does not divide the 4 experts"):
        estimate(small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2, ep=8))


def test_ep_comm_is_the_all_to_all_time_of_each_layer(small):
    """One stage, 4 MoE layers, 2 micro-batches: ep_comm = m x layers x (3 forward + 2 backward
    all-to-alls timed on the ep group), the data ones of T k h bytes (bf16)."""
    cluster = Cluster.parse("dgx-h100:8")
    plan = Plan.manual(dp=8, global_batch=32, micro_batch_size=2, ep=4)
    cost = estimate(small, cluster, plan)
    meta = moe_nodes(small)[0].meta["moe"]
    group = ep_group(plan, cluster)
    data = meta["tokens"] * meta["top_k"] * meta["hidden"] * 2
    calib = default_calibration(cluster)  # H100's constants: what estimate() uses for this cluster
    one = collective_time_s("all_to_all", meta["experts"] * 8, group, calib=calib) + 4 * collective_time_s(
        "all_to_all", data, group, calib=calib
    )
    assert cost.breakdown_s["ep_comm"] == pytest.approx(plan.num_micro_batches * 4 * one)


@pytest.mark.parametrize(
    "keys",
    [dict(dp=2, ep=2), dict(dp=4, ep=2), dict(dp=2, pp=2, ep=2), dict(dp=2, tp=2, ep=2), dict(dp=4, ep=4)],
    ids=["ep2", "ep2xdp2", "ep2xpp2", "ep2xtp2", "ep4"],
)
def test_all_to_all_count_and_bytes_equal_the_lowering(small, keys):
    """The estimator's all-to-alls per step (count, input bytes, bytes leaving the rank) equal
    what ``autopar.lower.expert`` runs, on every pipeline stage (graph traced at the micro-batch)."""
    expert = pytest.importorskip("autopar.lower.expert")
    plan = Plan.manual(global_batch=8, micro_batch_size=2, **keys)
    for rank in range(plan.world_size):
        stage = plan.coords(rank).get("pp", 0)
        mine = all_to_all_volume(small, plan, stage=stage)
        theirs = expert.all_to_all_volume(small, plan, train=True, rank=rank)
        assert (mine.count, mine.bytes, mine.sent_bytes) == (
            theirs["count"],
            theirs["bytes"],
            theirs["sent_bytes"],
        )
        assert mine.count > 0


def test_expert_placement_follows_the_ep_groups():
    plan = Plan.manual(dp=4, tp=2, global_batch=8, ep=2)
    placed = expert_placement(plan, 8)
    for group in plan.groups("ep"):
        assert [placed[r] for r in group] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# ------------------------------------------------------------------------------ planner
def _with_memory(cluster: Cluster, memory_bytes: float) -> Cluster:
    device = dataclasses.replace(cluster.device, memory_bytes=memory_bytes)
    return dataclasses.replace(cluster, device=device, node_groups=())


def test_planner_picks_ep_when_replicated_experts_do_not_fit(big):
    """Memory between what ep=8 needs and what ep=1 needs (tp and pp fixed at 1, so only ep can
    shard the experts): the planner must discover ep > 1, and say why in its explanation."""
    cluster = Cluster.parse("dgx-h100:8")
    fixed = {"tp": 1, "pp": 1, "zero": 0}
    mem = {}
    for ep in (1, 8):
        plan = Plan.manual(dp=8, global_batch=16, micro_batch_size=2, ep=ep)
        mem[ep] = estimate(big, cluster, plan).memory_bytes_per_device
    assert mem[8] < mem[1]
    small_gpu = _with_memory(cluster, (mem[1] + mem[8]) / 2)
    chosen = autoplan(big, small_gpu, global_batch=16, fixed=fixed, progress=False, time_limit_s=30)
    assert chosen.ep > 1 and chosen.predicted.fits
    notes = chosen.search["expert_parallel"]
    assert notes["chosen"] == chosen.ep and not next(r for r in notes["options"] if r["ep"] == 1)["fits"]
    assert f"why ep={chosen.ep}" in chosen.explain() and "ep=1 does not fit" in chosen.explain()


def test_inference_plans_consider_ep(big):
    cluster = Cluster.parse("dgx-h100:8")
    chosen = autoplan(big, cluster, global_batch=16, mode="inference", progress=False, time_limit_s=30)
    assert chosen.mode == "inference"
    assert {r["ep"] for r in chosen.search["expert_parallel"]["options"]} >= {1, 2}


def test_mixtral_8x22b_preset_sizes_and_megatron_flops():
    """The preset behind the Megatron-MoE-ModelZoo rows (benchmarks/data/moe_published.json):
    141B parameters, 39B active (Mistral AI's Mixtral 8x22B announcement, as quoted by the NeMo
    Mixtral docs), and autopar's model FLOPs per step equal Megatron-LM's
    ``num_floating_point_operations`` (training.py; non-causal attention term s/h, SwiGLU 3/2,
    top-k, logits V/(2 l h)), which the published TFLOP/s figures are computed with."""
    from autopar.models import PRESETS, GPTConfig, count_params

    cfg = PRESETS["mixtral-8x22b"].config
    total = count_params(GPTConfig(**cfg))
    idle_experts = cfg["layers"] * (cfg["experts"] - cfg["top_k"]) * 3 * cfg["hidden"] * cfg["ffn"]
    assert total / 1e9 == pytest.approx(141, rel=0.005)
    assert (total - idle_experts) / 1e9 == pytest.approx(39, rel=0.01)

    graph = load_model("mixtral-8x22b:layers=4,seq=4096").trace(1)
    plan = Plan.manual(dp=8, ep=8, global_batch=8, micro_batch_size=1, zero_stage=0)
    cost = estimate(graph, Cluster.parse("dgx-h100:8"), plan, dtype="bf16")
    layers, h, f, s, v, batch = 4, cfg["hidden"], cfg["ffn"], 4096, cfg["vocab"], 8
    megatron = (
        12 * batch * s * layers * h * h
        * (1 + f / h * cfg["top_k"] * 1.5 + cfg["kv_heads"] / cfg["heads"] + s / h + v / (2 * layers * h))
    )  # fmt: skip
    assert cost.model_flops_per_step == pytest.approx(megatron, rel=0.002)


def test_deepep_dispatch_sends_a_token_once_per_rank():
    """``ranks_per_token``: the expected distinct ranks of a token's k experts (closed form checked
    against counting every choice of k of 8 experts on 4 ranks); under ``per_rank`` (DeepEP) the
    data all-to-alls carry that over k of the rows, the counts exchange is unchanged."""
    from itertools import combinations

    from cost_models.moe import MoEShape, moe_comms, ranks_per_token

    small = MoEShape(experts=8, top_k=2, hidden=16, ffn=32, tokens=64)
    choices = list(combinations(range(8), 2))
    counted = sum(len({e // 2 for e in c}) for c in choices) / len(choices)  # experts 2r, 2r+1 on rank r
    assert ranks_per_token(small, 4) == pytest.approx(counted)
    assert ranks_per_token(small, 1) == 1.0
    qwen3 = MoEShape(experts=128, top_k=8, hidden=2048, ffn=768, tokens=16384)
    assert ranks_per_token(qwen3, 8) == pytest.approx(5.34, abs=0.005)
    per_expert = {c.name: c.nbytes for c in moe_comms(qwen3, ep=8)}
    per_rank = {c.name: c.nbytes for c in moe_comms(qwen3, ep=8, per_rank=True)}
    for name, nbytes in per_expert.items():
        factor = 1.0 if name.endswith("counts") else ranks_per_token(qwen3, 8) / 8
        assert per_rank[name] == pytest.approx(nbytes * factor), name


@pytest.mark.parametrize(
    ("experts", "top_k", "ep"), [(128, 8, 8), (8, 2, 4), (12, 5, 4), (6, 4, 3), (64, 6, 16)]
)
def test_round_robin_routing_ranks_per_token_counts_the_gate(experts, top_k, ep):
    """``routing="round_robin"``: the distinct ranks per token equal those of the indices a fixed
    balanced gate produces (``arange(T k).view(T, k) % E``, experts in contiguous blocks of ``E / ep``
    per rank), counted over many tokens; NeMo AutoModel's benchmark gate on Qwen3-30B-A3B (E=128,
    k=8, ep=8) puts every token's experts on one rank, so DeepEP's dispatch carries 1/k of the rows."""
    from dataclasses import replace

    import torch

    from cost_models.moe import MoEShape, moe_comms, ranks_per_token

    shape = MoEShape(experts=experts, top_k=top_k, hidden=16, ffn=32, tokens=64, routing="round_robin")
    tokens = 10 * experts  # whole periods of the gate's pattern
    indices = torch.arange(tokens * top_k).view(tokens, top_k) % experts
    counted = sum(len(set((row // (experts // ep)).tolist())) for row in indices) / tokens
    assert ranks_per_token(shape, ep) == pytest.approx(counted)
    if (experts, top_k, ep) == (128, 8, 8):
        assert counted == 1.0
        uniform = {c.name: c.nbytes for c in moe_comms(replace(shape, routing="uniform"), ep=ep)}
        fixed = {c.name: c.nbytes for c in moe_comms(shape, ep=ep, per_rank=True)}
        assert fixed["moe.all_to_all.dispatch"] == pytest.approx(uniform["moe.all_to_all.dispatch"] / top_k)


def test_moe_routing_is_checked():
    from cost_models.moe import MoEShape

    with pytest.raises(ValueError, match="routing='random'.*uniform, round_robin"):
        MoEShape(experts=8, top_k=2, hidden=16, ffn=32, tokens=64, routing="random")


def test_benchmark_gate_routing_reaches_the_estimate(benchmark_module):
    """A published row's ``gate_routing`` (``benchmarks/data/moe_published.json``) is one the cost
    model knows and reaches the traced MoE nodes the estimator reads: the AutoModel Qwen3 row's
    DeepEP dispatch under its round-robin gate carries 1 / ``ranks_per_token`` (uniform) of the
    bytes it carries under a learned router."""
    from autopar.estimator.moe import elem_bytes, moe_nodes, node_comms, shape_of
    from cost_models.moe import ROUTINGS, ranks_per_token

    fidelity_moe = benchmark_module("fidelity_moe")
    rows = [r for r in fidelity_moe.load_rows() if "gate_routing" in r]
    assert rows and all(r["gate_routing"] in ROUTINGS for r in rows)
    row = next(r for r in rows if r["model"] == "qwen3-moe-30b-a3b")
    nodes = moe_nodes(fidelity_moe.row_graph(row))
    assert len(nodes) == 48 and {n.meta["moe"]["routing"] for n in nodes} == {"round_robin"}

    def dispatch_bytes(node):
        comms = node_comms(node, batch=1.0, ep=8, tp=1, act=1.0, per_rank=True)
        return next(c.nbytes for c in comms if c.name.endswith("all_to_all.dispatch"))

    fixed = dispatch_bytes(nodes[0])
    nodes[0].meta["moe"].pop("routing")
    learned = dispatch_bytes(nodes[0])
    assert fixed / learned == pytest.approx(1.0 / ranks_per_token(shape_of(nodes[0]), 8))
    assert fixed == pytest.approx(4 * 4096 * 2048 * elem_bytes(nodes[0], 1.0))  # one copy of each token

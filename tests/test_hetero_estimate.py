"""Estimates on a heterogeneous cluster: 1 node of a100-80g + 1 node of v100-32g (8 GPUs each).

Oracles: the datasheet peak and bandwidth ratios (A100 312 / V100 125 TFLOP/s fp16, 2039 / 900 GB/s),
the same plan estimated on a homogeneous cluster of each kind (a stage must cost what it costs on a
cluster made only of its kind), the capacities (80 / 32 GB), and the rank layout of the mesh.
"""

from __future__ import annotations

import functools

import pytest
import torch

import autopar
from autopar.cluster import Cluster
from autopar.cluster.hardware import DEVICES
from autopar.core.errors import PlanError
from autopar.core.plan import MeshAxis, Plan
from autopar.estimator import estimate, workload
from autopar.models import GPTConfig
from cost_models import DEFAULT, step_time
from cost_models.step import block_time, op_time_s

LAYERS = 16
A100, V100 = DEVICES["a100-80g"], DEVICES["v100-32g"]
PEAK_RATIO = A100.peak_flops("fp16") / V100.peak_flops("fp16")  # 2.496
HBM_RATIO = A100.hbm_bytes_per_s / V100.hbm_bytes_per_s  # 2.266


@functools.cache
def gpt(dtype=torch.float16):
    """GPT 3.4B (h=4096, 16 layers, s=2048, explicit attention: its scores set the memory), traced on
    meta at micro-batch 1."""
    config = GPTConfig(hidden=4096, layers=LAYERS, heads=32, vocab=51200, seq=2048, fused_attention=False)
    model, inputs, loss_fn = autopar.build_model(config, device="meta", batch=1, dtype=dtype)
    return autopar.trace(model, inputs, loss_fn=loss_fn)


def cluster(*kinds: str) -> Cluster:
    """One 8-GPU node per kind, DGX A100 links."""
    links = Cluster.preset("dgx-a100-80g").to_dict()
    return Cluster.from_dict(
        {
            "devices_per_node": 8,
            "node_groups": [{"nodes": 1, "device": k} for k in kinds],
            "intra_node": links["intra_node"],
            "inter_node": links["inter_node"],
        }
    )


HETERO = cluster("a100-80g", "v100-32g")


def pipeline(*, dp=2, tp=4, a100_blocks=LAYERS // 2, **kw) -> Plan:
    """pp=2 outermost (mesh pp, dp, tp): stage 0 = ranks 0-7 (A100), stage 1 = ranks 8-15 (V100)."""
    return Plan(
        mesh=[MeshAxis("pp", 2), MeshAxis("dp", dp), MeshAxis("tp", tp)],
        global_batch=64,
        micro_batch_size=1,
        layer_stages=[0] * a100_blocks + [1] * (LAYERS - a100_blocks),
        **kw,
    )


def layer_block(w, stage):
    (block,) = [b for b, _ in w.stages[stage].blocks if b.recomputable]
    return block


def test_stages_sit_on_their_node_groups_kind():
    w = workload(gpt(), HETERO, pipeline())
    assert [s.names for s in w.stage_devices] == [["a100-80g"], ["v100-32g"]]
    assert [r.peak_flops_per_s for r in w.stage_rates] == [312e12, 125e12]
    assert [r.hbm_bytes_per_s for r in w.stage_rates] == [2039e9, 900e9]
    assert w.stage_capacity_bytes == [80e9, 32e9]
    assert w.rates == tuple(w.stage_rates)  # what step_time takes on a heterogeneous cluster
    # each stage's dp (2) and tp (4) groups stay inside its node; stages talk over the network
    assert [(g["dp"].size, g["dp"].inter, g["tp"].size, g["tp"].inter) for g in w.spec.stage_groups] == [
        (2, None, 4, None)
    ] * 2
    assert w.spec.pp_link_inter_node
    cost = estimate(gpt(), HETERO, pipeline())
    assert cost.extra["stage_devices"] == [["a100-80g"], ["v100-32g"]]
    assert cost.extra["memory_capacity_bytes_per_stage"] == [80e9, 32e9]
    assert "mixed_device_stages" not in cost.extra


def test_v100_block_is_slower_by_the_peak_ratio():
    """The same transformer layer: compute-bound GEMMs scale with the peak ratio, memory-bound ops
    with the bandwidth ratio, so the layer's ratio lies between them (kernel overheads pull it a
    little toward 1)."""
    w = workload(gpt(), HETERO, pipeline())
    block = layer_block(w, 0)
    assert block is layer_block(w, 1)  # one block type, costed once
    a100, v100 = (block_time(block, r, {}, calib=DEFAULT) for r in w.stage_rates)
    ratio = v100.compute_s / a100.compute_s
    assert 0.98 * HBM_RATIO <= ratio <= PEAK_RATIO, ratio
    a100_gemm, v100_gemm = (
        sum(sum(op_time_s(op, r, DEFAULT)) for op in block.ops if op.op_class == "gemm")
        for r in w.stage_rates
    )
    assert 0.95 * PEAK_RATIO <= v100_gemm / a100_gemm <= PEAK_RATIO, v100_gemm / a100_gemm


def test_each_stage_costs_what_it_costs_on_a_cluster_of_its_kind():
    """Stage 0 of the mixed cluster = stage 0 on 2 A100 nodes; stage 1 = stage 1 on 2 V100 nodes
    (same plan, same links, and each stage its own kind's constants, as a one-kind cluster of that
    kind gets them): time per micro-batch and memory."""
    plan = pipeline(a100_blocks=10)
    mixed = estimate(gpt(), HETERO, plan)
    for stage, kind in ((0, "a100-80g"), (1, "v100-32g")):
        same = estimate(gpt(), cluster(kind, kind), plan)
        t = same.extra["stage_time_per_micro_batch_s"][stage]
        assert mixed.extra["stage_time_per_micro_batch_s"][stage] == pytest.approx(t, rel=1e-12)
        m = same.extra["memory_bytes_per_stage"][stage]
        assert mixed.extra["memory_bytes_per_stage"][stage] == pytest.approx(m, rel=1e-12)
    # the pipeline runs at the V100 stage's pace: m * t_max + t_other (1F1B, v = 1)
    t0, t1 = mixed.extra["stage_time_per_micro_batch_s"]
    assert t1 > t0
    m = plan.num_micro_batches
    pipe = mixed.step_time_s - mixed.breakdown_s["dp_comm_exposed"] - mixed.breakdown_s["optimizer"]
    assert pipe == pytest.approx(m * t1 + t0, rel=1e-9)


def test_uneven_split_toward_the_a100_stage_is_faster():
    """What the planner exploits: more blocks on the faster stage. The best split sits near the
    speed ratio (about 2.2 : 1 -> 11 of 16 blocks on the A100s; the LM head is on the V100 stage)."""
    times = {k: estimate(gpt(), HETERO, pipeline(a100_blocks=k)).step_time_s for k in range(1, LAYERS)}
    even = times[LAYERS // 2]
    best = min(times, key=times.__getitem__)
    assert best > LAYERS // 2 and times[best] < 0.75 * even
    assert 10 <= best <= 13, (best, times)
    # on one device kind the even split is best (within a block of it: the stem / head sit at the ends)
    a100 = cluster("a100-80g", "a100-80g")
    homo = {k: estimate(gpt(), a100, pipeline(a100_blocks=k)).step_time_s for k in range(1, LAYERS)}
    assert abs(min(homo, key=homo.__getitem__) - LAYERS // 2) <= 1


def test_memory_capacity_is_per_stage():
    """dp=8, tp=1: the even split's V100 stage needs ~34 GB > 32 GB (it would fit an A100); moving
    blocks to the A100 stage makes it fit."""
    even = estimate(gpt(), HETERO, pipeline(dp=8, tp=1))
    used = even.extra["memory_bytes_per_stage"]
    assert used[1] > 32e9 and used[0] < 80e9 and used[0] > used[1]  # the larger stage fits, the other not
    assert not even.fits
    assert even.memory_capacity_bytes == 32e9 and even.extra["largest_memory_stage"] == 1
    assert even.memory_bytes_per_device == used[1]
    assert even.extra["overflow_bytes"] == pytest.approx(used[1] - 32e9)
    assert even.extra["overflow_bytes_per_stage"] == [0.0, pytest.approx(used[1] - 32e9)]
    assert estimate(gpt(), cluster("a100-80g", "a100-80g"), pipeline(dp=8, tp=1)).fits
    uneven = estimate(gpt(), HETERO, pipeline(dp=8, tp=1, a100_blocks=10))
    assert uneven.fits and uneven.step_time_s < even.step_time_s
    # all fit: the stage with the least headroom is reported
    headroom = [c - u for c, u in zip((80e9, 32e9), uneven.extra["memory_bytes_per_stage"])]
    assert uneven.extra["largest_memory_stage"] == headroom.index(min(headroom))


def test_mixed_stage_is_costed_at_the_slowest_kind():
    """Mesh order dp, pp, tp puts ranks 0-3 and 8-11 in stage 0: both stages mix A100 and V100."""
    plan = Plan.manual(dp=2, pp=2, tp=4, global_batch=64, micro_batch_size=1)
    w = workload(gpt(), HETERO, plan)
    assert all(s.mixed for s in w.stage_devices)
    assert [r.peak_flops_per_s for r in w.stage_rates] == [125e12, 125e12]
    assert w.stage_capacity_bytes == [32e9, 32e9]
    cost = estimate(gpt(), HETERO, plan)
    assert cost.extra["mixed_device_stages"] == [0, 1] and "slowest" in cost.extra["mixed_device_note"]
    v100 = estimate(gpt(), cluster("v100-32g", "v100-32g"), plan, calib=DEFAULT)  # the mixed one's constants
    assert cost.step_time_s == pytest.approx(v100.step_time_s, rel=1e-12)


def test_mfu_is_against_the_sum_of_peaks():
    cost = estimate(gpt(), HETERO, pipeline(a100_blocks=11))
    total_peak = 8 * 312e12 + 8 * 125e12
    assert cost.mfu == pytest.approx(cost.model_flops_per_step / (cost.step_time_s * total_peak))


def test_step_time_takes_one_rates_or_one_per_stage():
    w = workload(gpt(), cluster("a100-80g", "a100-80g"), pipeline())
    one = step_time(w.spec, w.rates)
    per_stage = step_time(w.spec, [w.rates] * 2)
    assert per_stage.step_time_s == one.step_time_s and per_stage.breakdown_s == one.breakdown_s
    assert w.stage_rates == [w.rates] * 2 and w.stage_capacity_bytes == [80e9, 80e9]
    with pytest.raises(ValueError, match="one DeviceRates per pipeline stage"):
        step_time(w.spec, [w.rates] * 3)


def test_fp32_graph_is_costed_in_a_dtype_every_kind_has():
    """A100 prefers bf16, V100 has no bf16 units: mixed precision in fp16."""
    assert workload(gpt(torch.float32), HETERO, pipeline()).dtype == "fp16"
    assert workload(gpt(torch.float32), cluster("a100-80g", "a100-80g"), pipeline()).dtype == "bf16"


def test_profiled_times_are_refused_on_heterogeneous_clusters():
    with pytest.raises(PlanError, match="one device kind"):
        estimate(gpt(), HETERO, pipeline(), op_times={"x": (1.0, 1.0)})

"""cost_models on its own: numbers in, seconds and bytes out (no autopar import anywhere).

Oracles are closed forms: the alpha-beta ring formulas, the ZeRO paper's bytes per parameter,
Narayanan et al.'s FLOPs formula and pipeline bubble, Korthikanti et al.'s activation memory.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from cost_models import (
    DEFAULT,
    BlockWork,
    CommWork,
    DeviceRates,
    GroupSpec,
    LinkSpec,
    OpWork,
    StageWork,
    StepSpec,
    block_time,
    collective_time_s,
    gemm_efficiency,
    gemm_time_s,
    in_flight_micro_batches,
    interleaved_factor,
    kv_cache_bytes,
    model_state_bytes,
    step_time,
)
from cost_models.step import op_time_s, overlapped_s
from cost_models.transformer import (
    korthikanti_activation_bytes,
    megatron_flops_per_iteration,
    megatron_layer_work,
    model_flops_per_iteration,
)

A100 = DeviceRates(peak_flops_per_s=312e12, hbm_bytes_per_s=2039e9)
NVLINK = LinkSpec(bandwidth_bytes_per_s=300e9, latency_s=3.4e-6)
IB = LinkSpec(bandwidth_bytes_per_s=25e9, latency_s=14e-6)
NO_LATENCY = DEFAULT.with_(collective_base_latency_s=0.0, kernel_overhead_s=0.0)


def test_package_imports_nothing_from_autopar():
    for path in Path(__file__).resolve().parents[1].joinpath("cost_models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "autopar" for n in names), f"{path.name} imports {names}"


# ------------------------------------------------------------------------------------ compute
def test_gemm_efficiency_falls_for_small_gemms_and_saturates_for_large():
    big = gemm_efficiency(1, 16384, 16384, 16384)
    assert 0.99 * DEFAULT.gemm_max_efficiency < big <= DEFAULT.gemm_max_efficiency
    sizes = [256, 512, 1024, 2048, 4096, 8192]
    effs = [gemm_efficiency(1, s, s, s) for s in sizes]
    assert effs == sorted(effs) and effs[0] < 0.2 * effs[-1]

    # achieved FLOP/s (epilogue and wave quantisation included) also falls with a short k
    def achieved(m, n, k):
        return 2 * m * n * k / gemm_time_s(1, m, n, k, A100, calib=NO_LATENCY)

    assert achieved(8192, 8192, 512) < 0.85 * achieved(8192, 8192, 8192)
    assert achieved(128, 128, 2048) < 0.3 * achieved(8192, 8192, 8192)


def test_gemm_time_is_a_roofline_main_loop_plus_epilogue():
    bw = 2039e9 * NO_LATENCY.hbm_efficiency
    # large square GEMM: compute-bound main loop, then C is stored
    t = gemm_time_s(1, 8192, 8192, 8192, A100, calib=NO_LATENCY)
    flops = 2 * 8192**3
    eff = gemm_efficiency(1, 8192, 8192, 8192, NO_LATENCY)
    assert t == pytest.approx(flops / (312e12 * eff) + 8192 * 8192 * 2 / bw)
    # a GEMV streams its matrix: memory-bound
    t = gemm_time_s(1, 1, 8192, 8192, A100, calib=NO_LATENCY)
    assert t == pytest.approx((8192 + 8192 * 8192 + 8192) * 2 / bw, rel=1e-3)
    # attention scores with head dim 64: writing the s x s scores dominates
    t = gemm_time_s(96, 2048, 2048, 64, A100, calib=NO_LATENCY)
    assert t > 96 * 2048 * 2048 * 2 / bw


# --------------------------------------------------------------------------------------- comm
def test_ring_all_reduce_inside_a_node_matches_the_alpha_beta_formula():
    g = GroupSpec(size=8, ranks_per_node=8, intra=NVLINK)
    nbytes = 1e9
    bw = 300e9 * DEFAULT.intra_node_efficiency
    want = DEFAULT.collective_base_latency_s + 2 * 7 * 3.4e-6 + 2 * 7 / 8 * nbytes / bw
    assert collective_time_s("all_reduce", nbytes, g, algorithm="ring") == pytest.approx(want)
    ag = collective_time_s("all_gather", nbytes, g)
    rs = collective_time_s("reduce_scatter", nbytes, g)
    assert ag == pytest.approx(rs)
    # all-reduce = reduce-scatter + all-gather (bandwidth terms)
    assert ag + rs == pytest.approx(want + DEFAULT.collective_base_latency_s, rel=1e-6)


def test_groups_spanning_nodes_run_at_the_inter_node_link():
    inside = GroupSpec(size=8, ranks_per_node=8, intra=NVLINK)
    across = GroupSpec(size=8, ranks_per_node=1, intra=NVLINK, inter=IB)
    nbytes = 4e9
    ratio = collective_time_s("all_gather", nbytes, across) / collective_time_s("all_gather", nbytes, inside)
    expected = (300e9 * DEFAULT.intra_node_efficiency) / (25e9 * DEFAULT.inter_node_efficiency)
    assert ratio == pytest.approx(expected, rel=0.01)


def test_hierarchical_all_reduce_beats_a_per_gpu_nic_ring_not_an_nccl_ring():
    g = GroupSpec(size=32, ranks_per_node=8, intra=NVLINK, inter=IB)
    per_gpu = DEFAULT.with_(ring_node_nics=False)
    flat_slow = collective_time_s("all_reduce", 2e9, g, algorithm="ring", calib=per_gpu)
    hier = collective_time_s("all_reduce", 2e9, g, algorithm="hierarchical")
    assert hier < flat_slow / 4  # inter-node traffic per GPU is 1/8 of a ring crossing a NIC per step
    # An NCCL ring crosses each node boundary once: the node's 8 NICs carry one rank's traffic, so the
    # flat ring moves over the network what the hierarchical one does, with the NVLink legs pipelined
    # instead of in series.
    flat = collective_time_s("all_reduce", 2e9, g, algorithm="ring")
    assert flat < hier < 2 * flat


def test_a_ring_across_nodes_uses_the_nics_of_its_ranks_on_each_node():
    """nccl-tests issue 119: 3 nodes x 8 A100 with 4 HDR NICs (100 GB/s per node, 12.5 GB/s per GPU)
    reach an all-reduce bus bandwidth of 84.8-96 GB/s: the node's NICs, not one GPU's share."""
    nic_per_gpu = LinkSpec(bandwidth_bytes_per_s=12.5e9, latency_s=0.0)
    g = GroupSpec(size=24, ranks_per_node=8, intra=NVLINK, inter=nic_per_gpu)
    t = collective_time_s("all_reduce", 8e9, g, algorithm="ring", calib=NO_LATENCY)
    busbw = 2 * 23 / 24 * 8e9 / t
    assert 84e9 <= busbw <= 100e9
    # one rank per node (a data-parallel group beside tp = 8): one NIC each
    g1 = GroupSpec(size=3, ranks_per_node=1, intra=NVLINK, inter=nic_per_gpu)
    t1 = collective_time_s("all_reduce", 8e9, g1, algorithm="ring", calib=NO_LATENCY)
    assert 2 * 2 / 3 * 8e9 / t1 == pytest.approx(12.5e9 * DEFAULT.inter_node_efficiency)
    # never faster than the NVLink ring the bytes also cross
    fat = LinkSpec(bandwidth_bytes_per_s=100e9, latency_s=0.0)
    g2 = GroupSpec(size=16, ranks_per_node=8, intra=NVLINK, inter=fat)
    t2 = collective_time_s("all_gather", 8e9, g2, calib=NO_LATENCY)
    assert 15 / 16 * 8e9 / t2 == pytest.approx(300e9 * DEFAULT.intra_node_efficiency)


def test_tree_wins_for_small_messages_on_large_groups():
    g = GroupSpec(size=1024, ranks_per_node=1, intra=NVLINK, inter=IB)
    ring = collective_time_s("all_reduce", 1e4, g, algorithm="ring")
    tree = collective_time_s("all_reduce", 1e4, g, algorithm="tree")
    assert tree < ring
    assert collective_time_s("all_reduce", 1e4, g) == pytest.approx(tree)


def test_all_to_all_broadcast_p2p_and_degenerate_groups():
    fast = LinkSpec(bandwidth_bytes_per_s=25e9, latency_s=0.0)
    g = GroupSpec(size=16, ranks_per_node=8, intra=NVLINK, inter=fast)
    a2a = collective_time_s("all_to_all", 1.6e9, g, calib=NO_LATENCY)
    # half the peers are off-node: 8/16 of the bytes over the inter-node link
    assert a2a == pytest.approx(0.8e9 / (25e9 * DEFAULT.inter_node_efficiency), rel=1e-3)
    assert collective_time_s("broadcast", 1e9, g) > collective_time_s("broadcast", 1e8, g)
    assert collective_time_s("p2p", 1e9, g, calib=NO_LATENCY) == pytest.approx(
        1e9 / (25e9 * DEFAULT.inter_node_efficiency), rel=1e-3
    )
    one = GroupSpec(size=1, ranks_per_node=1, intra=NVLINK)
    assert collective_time_s("all_reduce", 1e9, one) == 0.0
    with pytest.raises(ValueError, match="unknown"):
        collective_time_s("allreduce", 1e9, g)
    with pytest.raises(ValueError, match="inter link"):
        GroupSpec(size=16, ranks_per_node=8, intra=NVLINK)


# ------------------------------------------------------------------------------------- memory
def test_model_state_bytes_follow_the_zero_paper():
    n, dp = 1e9, 8
    assert sum(model_state_bytes(n).values()) == 16e9  # 2 + 2 + 12 bytes per parameter
    z1 = model_state_bytes(n, dp=dp, zero_stage=1)
    z2 = model_state_bytes(n, dp=dp, zero_stage=2)
    z3 = model_state_bytes(n, dp=dp, zero_stage=3)
    assert sum(z1.values()) == pytest.approx((4 + 12 / dp) * n)
    assert sum(z2.values()) == pytest.approx((2 + 14 / dp) * n)
    assert sum(z3.values()) == pytest.approx(16 / dp * n)
    assert model_state_bytes(n, mode="inference") == {"params": 2e9, "grads": 0.0, "optimizer": 0.0}


def test_in_flight_micro_batches_per_schedule():
    p, m = 8, 64
    assert in_flight_micro_batches("gpipe", p, 0, m) == m
    assert [in_flight_micro_batches("1f1b", p, s, m) for s in range(p)] == list(range(p, 0, -1))
    assert in_flight_micro_batches("1f1b", p, 0, 3) == 3  # fewer micro-batches than stages
    for v in (2, 3, 4):
        # Korthikanti et al.: stage 0 holds p * (1 + (p - 1) / (p v)) stage-micro-batches
        assert in_flight_micro_batches("interleaved", p, 0, m, v) == pytest.approx(
            p * interleaved_factor(p, v)
        )


def test_kv_cache_bytes():
    assert kv_cache_bytes(layers=32, batch=4, seq=2048, kv_heads=8, head_dim=128, tp=2) == (
        2 * 32 * 4 * 2048 * 4 * 128 * 2
    )


# --------------------------------------------------------------------------------- transformer
def test_megatron_layer_work_reproduces_the_flops_formula():
    s, b, h, a, ell, v = 2048, 4, 4096, 32, 1, 51200
    layer = megatron_layer_work(seq=s, batch=b, hidden=h, heads=a)
    fwd = sum(op.flops_fwd for op in layer.ops)
    # forward + backward (2x) + recompute forward (1x) of one layer = 96 b s h^2 (1 + s / (6h))
    f = megatron_flops_per_iteration(batch=b, seq=s, layers=ell, hidden=h, vocab=v)
    head = 6 * b * s * h * v
    assert 4 * fwd == pytest.approx(f - head, rel=1e-9)
    assert model_flops_per_iteration(batch=b, seq=s, layers=ell, hidden=h, vocab=v) == pytest.approx(
        3 * fwd + head
    )


def test_korthikanti_forms_are_consistent():
    kw = {"seq": 2048, "batch": 1, "hidden": 12288, "heads": 96}
    sbh = 2048 * 12288
    assert korthikanti_activation_bytes(**kw) == pytest.approx(sbh * (34 + 5 * 96 * 2048 / 12288))
    # tp = 1: sequence parallelism changes nothing
    assert korthikanti_activation_bytes(**kw, sp=True) == pytest.approx(korthikanti_activation_bytes(**kw))
    assert korthikanti_activation_bytes(**kw, tp=8, sp=True, recompute="selective") == pytest.approx(
        34 * sbh / 8
    )
    assert korthikanti_activation_bytes(**kw, tp=8, recompute="full") == 2 * sbh


# --------------------------------------------------------------------------------------- step
def _uniform_step(p: int, m: int, v: int, **kw) -> StepSpec:
    op = OpWork(name="gemm", op_class="gemm", gemm=(1, 8192, 8192, 8192))
    block = BlockWork(name="layer", ops=(op,), saved_bytes={"none": 1.0, "full": 0.5})
    stages = tuple(StageWork(blocks=((block, 4),)) for _ in range(p))
    schedule = "interleaved" if v > 1 else "1f1b"
    return StepSpec(stages=stages, num_micro_batches=m, schedule=schedule, virtual_stages=v, **kw)


@pytest.mark.parametrize(("p", "m", "v"), [(1, 8, 1), (4, 8, 1), (8, 64, 2), (4, 12, 3)])
def test_pipeline_bubble_is_p_minus_1_over_v_m(p, m, v):
    t = step_time(_uniform_step(p, m, v), A100, NO_LATENCY)
    parts = t.breakdown_s
    assert sum(parts.values()) == pytest.approx(t.step_time_s)
    assert parts["pp_bubble"] / parts["compute"] == pytest.approx((p - 1) / (v * m))


def test_full_recompute_adds_one_forward():
    none = step_time(_uniform_step(2, 8, 1), A100, NO_LATENCY).breakdown_s
    full = step_time(_uniform_step(2, 8, 1, recompute="full"), A100, NO_LATENCY).breakdown_s
    fwd_share = none["compute"] / 3  # backward of a GEMM with weight: 2 GEMMs of the same size
    assert full["recompute"] == pytest.approx(fwd_share, rel=0.01)


def test_tp_collectives_are_exposed_and_rerun_by_full_recompute():
    g = GroupSpec(size=8, ranks_per_node=8, intra=NVLINK)
    comm = CommWork(name="ar", collective="all_reduce", nbytes=1e8, count=2)
    bwd = CommWork(name="ar_b", collective="all_reduce", nbytes=1e8, phase="bwd", count=2)
    block = BlockWork(name="layer", comms=(comm, bwd), saved_bytes={"none": 0, "full": 0})
    one = collective_time_s("all_reduce", 1e8, g)
    t = block_time(block, A100, {"tp": g}, recompute="full")
    assert t.tp_s == pytest.approx(6 * one)
    assert block_time(block, A100, {"tp": g}).tp_s == pytest.approx(4 * one)


def test_overlap_is_between_max_and_sum():
    assert overlapped_s(1.0, 0.0) == 1.0
    both = overlapped_s(1.0, 1.0)
    assert both > 1.0 and both < 2.0
    assert both == pytest.approx(2 ** (1 / DEFAULT.overlap_sharpness))
    perfect = DEFAULT.with_(overlap_sharpness=200.0)
    assert overlapped_s(1.0, 0.5, perfect) == pytest.approx(1.0, rel=1e-3)


def test_data_parallel_sync_hides_behind_backward_except_the_last_bucket():
    dp = GroupSpec(size=4, ranks_per_node=4, intra=NVLINK)
    op = OpWork(name="gemm", op_class="gemm", gemm=(1, 8192, 8192, 8192))
    block = BlockWork(name="layer", ops=(op,), param_count=1e8, saved_bytes={"none": 0})
    stage = StageWork(blocks=((block, 10),))
    spec = StepSpec(stages=(stage,), num_micro_batches=1, groups={"dp": dp})
    exposed = step_time(spec, A100).breakdown_s["dp_comm_exposed"]
    raw = collective_time_s("all_reduce", 1e9 * 2, dp)
    assert 0 < exposed < raw
    no_overlap = step_time(spec, A100, DEFAULT.with_(dp_overlap=False)).breakdown_s["dp_comm_exposed"]
    assert no_overlap == pytest.approx(raw)


def test_zero1_and_zero2_charge_the_collectives_their_engines_run():
    """ZeRO-1 runs DDP (the all-reduce, overlapped like ZeRO-0) and then ShardedOptimizer's
    all-gather of the updated rows; ZeRO-2 (FSDP2) a reduce-scatter and an all-gather."""
    dp = GroupSpec(size=4, ranks_per_node=4, intra=NVLINK)
    block = BlockWork(name="layer", param_count=1e8, saved_bytes={"none": 0})
    stage = StageWork(blocks=((block, 10),))
    off = DEFAULT.with_(dp_overlap=False)

    def exposed(zero: int) -> float:
        spec = StepSpec(stages=(stage,), num_micro_batches=1, groups={"dp": dp}, zero_stage=zero)
        return step_time(spec, A100, off).breakdown_s["dp_comm_exposed"]

    reduce = collective_time_s("all_reduce", 2e9, dp)
    gather = collective_time_s("all_gather", 2e9, dp)
    scatter = collective_time_s("reduce_scatter", 2e9, dp)
    assert exposed(0) == pytest.approx(reduce)
    assert exposed(1) == pytest.approx(reduce + gather)
    assert exposed(2) == pytest.approx(scatter + gather)
    assert exposed(1) > exposed(2)


def test_zero3_gathers_parameters_three_times_with_full_recompute():
    dp = GroupSpec(size=64, ranks_per_node=1, intra=NVLINK, inter=IB)
    block = BlockWork(name="layer", param_count=1e9, saved_bytes={"none": 0, "full": 0})
    t = block_time(block, A100, {"dp": dp}, recompute="full", zero_stage=3)
    gather = collective_time_s("all_gather", 2e9, dp)
    scatter = collective_time_s("reduce_scatter", 2e9, dp)
    assert t.zero_comm_s == pytest.approx(3 * gather + scatter)
    assert t.zero_exposed_s == pytest.approx(t.zero_comm_s)  # nothing to overlap with


def test_inference_is_forward_only():
    spec = _uniform_step(4, 8, 1, mode="inference")
    t = step_time(spec, A100, NO_LATENCY)
    fwd = gemm_time_s(1, 8192, 8192, 8192, A100, calib=NO_LATENCY) * 4
    assert t.step_time_s == pytest.approx((8 + 4 - 1) * fwd)
    assert "optimizer" not in t.breakdown_s


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="gemm"):
        OpWork(name="x", op_class="gemm")
    with pytest.raises(ValueError, match="schedule"):
        StepSpec(stages=(StageWork(blocks=()),), num_micro_batches=1, schedule="zigzag")
    with pytest.raises(ValueError):
        gemm_efficiency(1, 0, 8, 8)
    with pytest.raises(KeyError, match="unknown calibration"):
        DEFAULT.with_(gemm_peak=1.0)
    assert math.isclose(DEFAULT.with_(gemm_max_efficiency=0.5).gemm_max_efficiency, 0.5)


def test_fsdp_reuses_the_backward_gather_for_the_recomputed_forward():
    """PyTorch FSDP runs a checkpointed block's recompute inside its backward gather: 2 gathers."""
    from cost_models.hardware import calibration_for

    dp = GroupSpec(size=64, ranks_per_node=1, intra=NVLINK, inter=IB)
    block = BlockWork(name="layer", param_count=1e9, saved_bytes={"none": 0, "full": 0})
    calib = calibration_for("a100-80g", framework="fsdp")
    t = block_time(block, A100, {"dp": dp}, recompute="full", zero_stage=3, calib=calib)
    gather = collective_time_s("all_gather", 2e9, dp, calib=calib)
    scatter = collective_time_s("reduce_scatter", 2e9, dp, calib=calib)
    assert t.zero_comm_s == pytest.approx(2 * gather + scatter)
    assert not calib.fuse_elementwise  # eager PyTorch: one kernel per elementwise op


def test_device_kind_constants_are_the_measured_ratios_and_keep_the_reference_kind():
    """The A100 (reference) calibration is DEFAULT bit for bit, so SC'21 numbers cannot move; other
    kinds scale the fitted GEMM ceiling by their measured matmul ratio and take their own HBM,
    fused-attention and NVLink efficiencies (cost_models/hardware.py sources)."""
    from cost_models.hardware import KINDS, calibration_for

    assert calibration_for("a100-80g") == DEFAULT
    assert calibration_for("a100-40g") == DEFAULT
    assert calibration_for("tpu-v9") == DEFAULT  # unknown kind: datasheet peaks only
    h100 = calibration_for("h100-sxm")
    ratio = KINDS["h100-sxm"].gemm_isolated / KINDS["a100-80g"].gemm_isolated
    assert h100.gemm_max_efficiency == pytest.approx(DEFAULT.gemm_max_efficiency * ratio)
    assert 0.5 < h100.gemm_max_efficiency < DEFAULT.gemm_max_efficiency
    assert h100.fused_attention_efficiency == pytest.approx(327.9 / 989.4)
    assert h100.hbm_efficiency == pytest.approx(2.90 / 3.35)  # never above the measured copy rate
    assert h100.intra_node_efficiency == pytest.approx(370 / 450)
    assert h100.gemm_wave_elements == 132 * 128 * 128
    for k in KINDS.values():
        for x in (k.gemm_isolated, k.hbm_efficiency, k.fused_attention_efficiency, k.intra_node_efficiency):
            assert x is None or 0.2 < x < 1.0
    with pytest.raises(KeyError, match="unknown framework"):
        calibration_for("h100-sxm", framework="jax")


def test_v100_kind_scales_only_what_was_measured_and_the_2019_software_is_unfused_and_unoverlapped():
    """V100: the GEMM ceiling scales by its measured cuBLAS ratio (83 of 125 TFLOPS) and the wave is 80
    SMs; what no source measured on V100 (HBM copy, NCCL bus bandwidth, flash attention) stays the
    base's, said by None in KINDS. Megatron-LM 2019 (``megatron-2019``): separate elementwise kernels,
    gradient all-reduce after the backward."""
    from cost_models.hardware import KINDS, calibration_for

    for name in ("v100-16g", "v100-32g", "v100-sxm3-32g"):
        v = calibration_for(name)
        ratio = (83.0 / 125.0) / KINDS["a100-80g"].gemm_isolated
        assert v.gemm_max_efficiency == pytest.approx(DEFAULT.gemm_max_efficiency * ratio)
        assert v.gemm_wave_elements == 80 * 128 * 128
        assert KINDS[name].hbm_efficiency is None and v.hbm_efficiency == DEFAULT.hbm_efficiency
        assert v.intra_node_efficiency == DEFAULT.intra_node_efficiency
        assert v.fused_attention_efficiency == DEFAULT.fused_attention_efficiency
    m19 = calibration_for("v100-sxm3-32g", framework="megatron-2019")
    assert not m19.fuse_elementwise and not m19.dp_overlap
    assert m19 == calibration_for("v100-sxm3-32g").with_(fuse_elementwise=False, dp_overlap=False)


def test_dgx2h_preset_is_the_megatron_2019_machine():
    """DGX-2H (Shoeybi et al. 2019 sec. 5): 16 V100 SXM3 32GB at 130 TFLOPS FP16 (39 TFLOPS = 30% of
    peak), NVSwitch 300 GB/s bidirectional = 150 GB/s per direction, 8 x 100 Gb/s IB per node =
    6.25 GB/s per GPU; a part of a node (1-8 GPUs) is one node of that many devices."""
    from autopar.cluster import Cluster
    from autopar.cluster.hardware import PRESETS

    p = PRESETS["dgx-2h"]
    assert p.devices_per_node == 16 and p.device.name == "v100-sxm3-32g"
    assert p.device.peak_flops("fp16") == 130e12 and p.device.memory_bytes == 32e9
    assert p.intra_node.bandwidth_bytes_per_s == 150e9
    assert p.inter_node.bandwidth_bytes_per_s * 16 == pytest.approx(8 * 100e9 / 8)
    assert Cluster.preset("dgx-2h", nodes=32).num_devices == 512
    with pytest.raises(Exception, match="bf16"):
        p.device.peak_flops("bf16")


def test_megatron_2019_rows_are_derived_from_the_papers_numbers(benchmark_module):
    """The V100 set's published steps come from the paper's own numbers only: the epoch rows from
    Table 2 (days x 86400 / 68507 iterations), the weak-scaling rows from 39 TFLOPS x efficiency under
    the 96 B s l h^2 count, the strong-scaling rows from the 1-GPU time / Table 8's speedup."""
    from cost_models.transformer import megatron_flops_per_iteration

    load_megatron2019 = benchmark_module("fidelity_sets").load_megatron2019

    runs = {r.label: r for r in load_megatron2019()}
    assert len(runs) == 11
    assert runs["8.3B-24h/512"].published_s == pytest.approx(2.10 * 86400 / 68507)
    assert runs["355M/64"].published_s == pytest.approx(0.86 * 86400 / 68507)
    one = megatron_flops_per_iteration(batch=8, seq=1024, layers=40, hidden=1536, vocab=51200) / 39e12
    assert runs["1.2B/1"].published_s == pytest.approx(one)
    assert runs["1.2B/8 strong"].published_s == pytest.approx(one / 2.98)
    big = megatron_flops_per_iteration(batch=512, seq=1024, layers=72, hidden=3072, vocab=51200)
    assert runs["8.3B-32h/512"].published_s == pytest.approx(big / (512 * 39e12 * 0.74))
    for r in runs.values():
        assert r.gpus % r.tp == 0 and r.mbs * (r.gpus // r.tp) in (8, 512)
        assert r.kind == "v100-sxm3-32g" and r.framework == "megatron-2019" and r.citation


def test_sc21_software_moves_zero3_gathers_at_the_per_gpu_nic_rate():
    """Current NCCL rings use the node's NICs (DEFAULT); the SC'21 framework (DeepSpeed ZeRO-3, 2021)
    does not, and only that changes: a full-node ZeRO-3 gather is 8x slower on the network under it,
    a group with one rank per node (data parallelism beside tp = 8) is not affected."""
    from cost_models.hardware import calibration_for

    assert DEFAULT.ring_node_nics
    sc21 = calibration_for("a100-80g", framework="megatron-deepspeed-2021")
    assert sc21 == DEFAULT.with_(ring_node_nics=False)
    nvlink, ib = (
        LinkSpec(bandwidth_bytes_per_s=300e9, latency_s=0.0),
        LinkSpec(bandwidth_bytes_per_s=25e9, latency_s=0.0),
    )
    full = GroupSpec(size=64, ranks_per_node=8, intra=nvlink, inter=ib)
    rail = GroupSpec(size=8, ranks_per_node=1, intra=nvlink, inter=ib)
    z = NO_LATENCY
    slow = collective_time_s("all_gather", 8e9, full, calib=z.with_(ring_node_nics=False))
    fast = collective_time_s("all_gather", 8e9, full, calib=z)
    assert slow / fast == pytest.approx(8.0)
    assert collective_time_s("all_gather", 8e9, rail, calib=z.with_(ring_node_nics=False)) == pytest.approx(
        collective_time_s("all_gather", 8e9, rail, calib=z)
    )


def test_fused_attention_is_costed_not_dropped():
    """A model with scaled_dot_product_attention used to get no attention time at all (the traced
    node had no GEMM dims); its forward now costs at least its FLOPs at the fused-kernel efficiency."""
    import torch

    import autopar
    from autopar.cluster import Cluster
    from autopar.core.plan import Plan
    from autopar.estimator import workload
    from autopar.models import GPTConfig

    cfg = GPTConfig(hidden=512, layers=2, heads=8, vocab=1024, seq=2048, bias=False, fused_attention=True)
    model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=4, dtype=torch.bfloat16)
    graph = autopar.trace(model, inputs, loss_fn=loss_fn)
    w = workload(
        graph, Cluster.preset("dgx-a100-80g"), Plan.manual(dp=8, global_batch=32, micro_batch_size=4)
    )
    ops = [op for block, _ in w.spec.stages[0].blocks for op in block.ops if "attention" in op.name]
    assert ops, "the SDPA node is missing from the workload"
    flops = 4 * 4 * 8 * 2048 * 2048 * 64  # 2 products of b*heads x s x s x d, non-causal
    fwd, _ = op_time_s(ops[0], w.rates if not isinstance(w.rates, tuple) else w.rates[0])
    assert ops[0].flops_fwd == pytest.approx(flops)
    assert fwd >= flops / (312e12 * DEFAULT.fused_attention_efficiency)


def test_composer_train_metrics_reread_the_logits_once_per_pass():
    """Composer's two train metrics (cross-entropy over the logits under autocast, after every
    micro-batch) add ``passes * 7 * logits bytes`` of forward HBM traffic to the loss op only; the
    other frameworks add nothing (oracle: bytes over achievable bandwidth plus one kernel each)."""
    from cost_models.hardware import calibration_for

    logits = 6.6e9  # bf16 logits of 65536 tokens x 50368 vocabulary
    loss = OpWork(name="cross_entropy", op_class="memory", bytes_fwd=logits)
    norm = OpWork(name="ln_f", op_class="memory", bytes_fwd=logits)
    composer = calibration_for("a100-80g", framework="composer")
    fsdp = composer.with_(train_metric_passes=0.0)  # the same loss kernel, without the metrics
    assert calibration_for("a100-80g", framework="fsdp").train_metric_passes == 0
    assert composer.train_metric_passes == 2
    extra = op_time_s(loss, A100, composer)[0] - op_time_s(loss, A100, fsdp)[0]
    bandwidth = A100.hbm_bytes_per_s * composer.hbm_efficiency
    assert extra == pytest.approx(2 * (7 * logits / bandwidth + composer.kernel_overhead_s))
    assert op_time_s(norm, A100, composer) == op_time_s(norm, A100, fsdp)
    assert op_time_s(loss, A100, composer)[1] == op_time_s(loss, A100, fsdp)[1]  # no_grad: no backward


def test_pipelined_tp_collectives_expose_one_chunk_of_tp():
    """TE userbuffers (``tp_comm_pipelined``): a sequence-parallel all-gather or reduce-scatter split
    into tp chunks under its GEMM leaves one chunk exposed; an all-reduce is not pipelined."""
    g = GroupSpec(size=4, ranks_per_node=4, intra=NVLINK)
    ag = CommWork(name="ag", collective="all_gather", nbytes=1e8)
    rs = CommWork(name="rs", collective="reduce_scatter", nbytes=1e8, phase="bwd")
    ar = CommWork(name="ar", collective="all_reduce", nbytes=1e8)
    block = BlockWork(name="layer", comms=(ag, rs, ar), saved_bytes={"none": 0})
    t_ag = collective_time_s("all_gather", 1e8, g)
    t_rs = collective_time_s("reduce_scatter", 1e8, g)
    t_ar = collective_time_s("all_reduce", 1e8, g)
    plain = block_time(block, A100, {"tp": g})
    assert plain.tp_s == pytest.approx(t_ag + t_rs + t_ar)
    piped = block_time(block, A100, {"tp": g}, calib=DEFAULT.with_(tp_comm_pipelined=True))
    assert piped.tp_fwd_s == pytest.approx(t_ag / 4 + t_ar)
    assert piped.tp_bwd_s == pytest.approx(t_rs / 4)


def test_megatron_distributed_optimizer_reduce_scatters_and_gathers_under_the_next_forward():
    """ZeRO-1 as Megatron-Core runs it under NeMo (reduce-scatter in the backward, all-gather under
    the next forward) leaves less exposed than autopar's ZeRO-1 (all-reduce, then an exposed gather),
    and with no forward to hide under the gather is exposed whole."""
    dp = GroupSpec(size=4, ranks_per_node=4, intra=NVLINK)
    op = OpWork(name="gemm", op_class="gemm", gemm=(1, 8192, 8192, 8192))
    block = BlockWork(name="layer", ops=(op,), param_count=1e8, saved_bytes={"none": 0})
    spec = StepSpec(
        stages=(StageWork(blocks=((block, 10),)),), num_micro_batches=1, groups={"dp": dp}, zero_stage=1
    )
    mcore = DEFAULT.with_(megatron_distributed_optimizer=True)
    ours = step_time(spec, A100).breakdown_s["dp_comm_exposed"]
    theirs = step_time(spec, A100, mcore).breakdown_s["dp_comm_exposed"]
    assert 0 < theirs < ours
    idle = BlockWork(name="layer", param_count=1e8, saved_bytes={"none": 0})
    bare = StepSpec(
        stages=(StageWork(blocks=((idle, 10),)),), num_micro_batches=1, groups={"dp": dp}, zero_stage=1
    )
    off = mcore.with_(dp_overlap=False)
    expected = collective_time_s("reduce_scatter", 2e9, dp) + collective_time_s("all_gather", 2e9, dp)
    assert step_time(bare, A100, off).breakdown_s["dp_comm_exposed"] == pytest.approx(expected)


def test_nemo_2025_software_runs_hopper_attention_and_its_overlaps():
    """``nemo-mcore``: the kind's own fused attention where one exists (FlashAttention-3 class on
    Hopper, 1.5x the measured FlashAttention-2; none on Ampere), TE's pipelined TP collectives,
    Megatron's distributed optimizer and interleaved p2p overlap; the GEMM ceiling is the kind's."""
    from cost_models.hardware import KINDS, calibration_for

    nemo = calibration_for("h100-sxm", framework="nemo-mcore")
    h100 = calibration_for("h100-sxm")
    assert nemo.fused_attention_efficiency == pytest.approx(
        1.5 * KINDS["h100-sxm"].fused_attention_efficiency
    )
    assert nemo.gemm_max_efficiency == h100.gemm_max_efficiency
    assert nemo.tp_comm_pipelined and nemo.megatron_distributed_optimizer and nemo.pp_p2p_overlap_interleaved
    assert nemo.dp_last_bucket_bytes == 128 * 2**20 * 2  # 128 Mi bf16 gradients per bucket
    a100 = calibration_for("a100-80g", framework="nemo-mcore")
    assert KINDS["a100-80g"].native_attention_efficiency is None
    assert a100.fused_attention_efficiency == DEFAULT.fused_attention_efficiency


def test_dgxc_rows_keep_the_published_layouts(benchmark_module):
    """The dgxc-benchmarking H100 rows: every GPU is in the layout (tp x pp x dp), the global batch is
    the README's (Nemotron-4 15B: 4 per GPU, 340B: 1 per 4 GPUs; GPT-3: 2 per GPU), the 340B rows run
    the launch script's VP 12 and all run NeMo's Megatron-Core software."""
    fs = benchmark_module("fidelity_sets")
    nemotron = {r.label: r for r in fs.load_nemotron4()}
    gpt3 = {r.label: r for r in fs.load_gpt3_h100()}
    assert len(nemotron) == 12 and len(gpt3) == 5
    for r in [*nemotron.values(), *gpt3.values()]:
        dp = r.gpus // (r.tp * r.pp)
        assert dp * r.tp * r.pp == r.gpus
        gbs = dp * r.mbs * r.grad_accum
        per_gpu = {"15b": 4, "340b": 0.25, "175b": 2}[r.label.split("/")[0]]
        assert gbs == per_gpu * r.gpus
        assert r.framework == "nemo-mcore" and r.kind == "h100-sxm" and r.sequence_parallel and r.zero == 1
    assert nemotron["340b/256g"].vp == 12 and nemotron["15b/16g"].vp == 1
    assert nemotron["15b/16g"].published_s == 2.66 and gpt3["175b/128g"].published_s == 8.91


def test_each_stage_can_be_timed_with_its_own_constants():
    """``step_time(spec, rates, calibs)`` with one Calibration per stage times stage s exactly as a
    one-calibration call with ``calibs[s]`` does (fused attention included: its efficiency is the
    calibration's at timing); a count that is not the stage count is refused."""
    from cost_models.step import stage_time

    attn = OpWork(
        name="sdpa", op_class="roofline", flops_fwd=4e12, flops_bwd=8e12, attention_gemm=(32, 4096, 128)
    )
    gemm = OpWork(name="fc", op_class="gemm", gemm=(1, 8192, 8192, 8192))
    block = BlockWork(name="layer", ops=(attn, gemm), param_count=1e8, saved_bytes={"none": 0})
    stages = (StageWork(blocks=((block, 4),), p2p_bytes=1e7), StageWork(blocks=((block, 4),), p2p_bytes=1e7))
    spec = StepSpec(stages=stages, num_micro_batches=4, pp_link=NVLINK)
    slow = DEFAULT.with_(fused_attention_efficiency=0.3, gemm_max_efficiency=0.5)
    both = step_time(spec, A100, (DEFAULT, slow))
    for index, calib in enumerate((DEFAULT, slow)):
        alone = stage_time(stages[index], spec, A100, calib, index=index)
        assert both.stage_times[index] == alone
    assert both.stage_times[1].compute_s > both.stage_times[0].compute_s
    assert step_time(spec, A100, slow).step_time_s > both.step_time_s > step_time(spec, A100).step_time_s
    with pytest.raises(ValueError, match="3 calibrations for 2 stages"):
        step_time(spec, A100, (DEFAULT, slow, slow))


def test_the_loss_moves_what_its_framework_kernels_move():
    """Megatron's unfused fp32 cross-entropy makes 19 + 7 passes of the 16-bit logits' bytes, a
    fused kernel 1 + 2; an empty factor keeps the traced op's own traffic (1 + 1.5)."""
    from cost_models.compute import memory_op_time_s
    from cost_models.hardware import calibration_for

    dev = DeviceRates(peak_flops_per_s=1e15, hbm_bytes_per_s=2e12)
    loss = OpWork(name="cross_entropy", op_class="memory", bytes_fwd=1e9)
    for calib, (f, b) in [
        (DEFAULT, (19.0, 7.0)),
        (calibration_for("h100-sxm", framework="nemo-mcore"), (1.0, 2.0)),
        (calibration_for("a100-80g", framework="composer"), (1.0, 2.0)),
        (DEFAULT.with_(loss_bytes_factor=()), (1.0, DEFAULT.bwd_bytes_factor)),
    ]:
        fwd, bwd = op_time_s(loss, dev, calib)
        if calib.train_metric_passes:  # Composer's metrics are their own passes, added to the forward
            fwd -= calib.train_metric_passes * memory_op_time_s(
                calib.train_metric_bytes_factor * 1e9, dev, calib=calib
            )
        assert fwd == pytest.approx(memory_op_time_s(f * 1e9, dev, calib=calib))
        assert bwd == pytest.approx(memory_op_time_s(b * 1e9, dev, calib=calib))
    other = OpWork(name="gelu", op_class="memory", bytes_fwd=1e9)  # other memory ops keep theirs
    assert op_time_s(other, dev, DEFAULT)[0] == pytest.approx(memory_op_time_s(1e9, dev, calib=DEFAULT))


def test_a_causal_flash_kernel_executes_the_tiles_on_and_below_the_diagonal():
    """``1/2 + t/(2s)`` of the whole-square work under ``causal_attention_skip``; the whole square
    for a non-causal kernel, for a framework whose kernel rate is known only per whole-square FLOP
    (composer), and for an op that is not fused attention."""
    from cost_models.hardware import calibration_for
    from cost_models.step import CAUSAL_TILE, causal_fraction

    dev = DeviceRates(peak_flops_per_s=1e15, hbm_bytes_per_s=2e12)
    s, full = 4096, 4.0 * 32 * 4096 * 4096 * 128
    kw = dict(op_class="roofline", flops_fwd=full, flops_bwd=2 * full, bytes_fwd=1e6)
    causal = OpWork(name="sdpa", attention_gemm=(32, s, 128), causal=True, **kw)
    whole = OpWork(name="sdpa", attention_gemm=(32, s, 128), **kw)
    assert causal_fraction(causal, DEFAULT) == pytest.approx(0.5 + CAUSAL_TILE / (2 * s))
    assert causal_fraction(whole, DEFAULT) == 1.0
    f_c, b_c = op_time_s(causal, dev, DEFAULT)
    f_w, b_w = op_time_s(whole, dev, DEFAULT)
    k = DEFAULT.kernel_overhead_s
    assert (f_c - k) == pytest.approx((f_w - k) * (0.5 + CAUSAL_TILE / (2 * s)))
    assert (b_c - k) == pytest.approx((b_w - k) * (0.5 + CAUSAL_TILE / (2 * s)))
    composer = calibration_for("a100-80g", framework="composer")
    assert not composer.causal_attention_skip and causal_fraction(causal, composer) == 1.0
    assert causal_fraction(OpWork(name="x", causal=True, **kw), DEFAULT) == 1.0  # not fused attention
    short = OpWork(name="sdpa", attention_gemm=(1, 64, 64), causal=True, **kw)
    assert causal_fraction(short, DEFAULT) == 1.0  # one tile: nothing to skip

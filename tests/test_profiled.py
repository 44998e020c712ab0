"""Profiled planning on this machine (:mod:`autopar.estimator.local`): what the measured numbers
change in the estimate, where they apply, and the whole loop on real gloo ranks: ``compile`` with no
plan measures its own layout, plans with it, and ``measured()`` / the report put the prediction
next to the run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autopar
from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.core.plan import Plan
from autopar.estimator import estimate
from autopar.estimator.local import LayoutCalibration, LocalProfile, apply
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.testing.dist import run_ranks
from autopar.tracing import trace

B = 4


def _graph():
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden=32, layers=2, heads=4, vocab=64, seq=8))
    x = torch.randint(0, 64, (B, 8))
    return trace(model, (x, x), loss_fn=gpt_loss)


def _layout(ranks: int, slowdown: float = 2.0) -> LayoutCalibration:
    return LayoutCalibration(
        ranks=ranks, threads=1, machine="test", slowdown=slowdown, latency_s=1e-4,
        bandwidth_bytes_per_s=1e9, optimizer_s_per_element=1e-8, optimizer_s_per_tensor=1e-5,
        step_overhead_s=3e-4, fsdp_unit_s=(2e-3, 5e-3),
    )  # fmt: skip


def _profiled(graph, ranks: int, fixed_share: float, **layout) -> Cluster:
    """Every op 1 ms forward, 2 ms backward at the graph's batch, ``fixed_share`` of it fixed;
    ``layout``: fields of the layout other than ``_layout``'s."""
    names = [n.name for n in graph.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    times = {n: (1e-3, 2e-3, fixed_share * 1e-3, fixed_share * 2e-3) for n in names}
    prof = LocalProfile(layout=dataclasses.replace(_layout(ranks), **layout), op_times=times, graph_batch=B)
    return apply(Cluster.local(ranks), graph, prof)


def _compute(graph, cluster, mbs: int) -> float:
    cost = estimate(graph, cluster, Plan.manual(global_batch=B, micro_batch_size=mbs))
    return cost.breakdown_s["compute"]


def test_fixed_parts_make_micro_batching_cost_what_the_profile_measured():
    graph = _graph()
    proportional = _profiled(graph, 1, fixed_share=0.0)
    whole, quarters = _compute(graph, proportional, B), _compute(graph, proportional, 1)
    assert quarters == pytest.approx(whole, rel=1e-9)  # no fixed part: splitting the batch is free
    fixed = _profiled(graph, 1, fixed_share=1.0)
    assert _compute(graph, fixed, 1) == pytest.approx(4 * _compute(graph, fixed, B), rel=1e-9)
    # the layout's slowdown multiplies every op: the same ops at slowdown 2 against the sum at 1
    ops = sum(1 for n in graph.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
    assert whole <= 2.0 * ops * 3e-3 * (1 + 1e-9)
    assert whole > 0.5 * 2.0 * ops * 3e-3  # most ops are in a block, the stem or the head


def test_profiled_optimizer_and_step_overhead_are_the_measured_ones():
    graph = _graph()
    cost = estimate(graph, _profiled(graph, 1, 0.5), Plan.manual(global_batch=B))
    params = sum(torch.Size(p["shape"]).numel() for p in graph.params.values())
    expected = 1e-8 * params + 1e-5 * len(graph.params)
    assert cost.breakdown_s["optimizer"] == pytest.approx(expected, rel=1e-6)
    assert cost.breakdown_s["step_overhead"] == pytest.approx(3e-4)
    assert cost.step_time_s == pytest.approx(sum(cost.breakdown_s.values()), rel=1e-9)


def test_fsdp_costs_its_measured_overhead_per_unit_and_micro_batch():
    """ZeRO-2/3 run FSDP2: each wrapped unit (the 2 blocks and the stage) costs the layout's
    measured per-unit time per micro-batch on top of the step overhead; ZeRO-0/1 do not."""
    graph = _graph()
    cluster = _profiled(graph, 2, 0.5)
    for zero, per_unit in ((0, 0.0), (1, 0.0), (2, 2e-3), (3, 5e-3)):
        for mbs, m in ((B // 2, 1), (1, B // 2)):
            plan = Plan.manual(dp=2, global_batch=B, micro_batch_size=mbs, zero_stage=zero)
            cost = estimate(graph, cluster, plan)
            assert cost.breakdown_s["step_overhead"] == pytest.approx(3e-4 + per_unit * 3 * m), (zero, mbs)


def test_a_profile_applies_only_to_its_own_layout():
    graph = _graph()
    plain = estimate(graph, Cluster.local(2), Plan.manual(dp=2, global_batch=B))
    _profiled(graph, 1, 0.5)  # attaches a 1-rank profile to the graph
    assert (
        estimate(graph, Cluster.local(2), Plan.manual(dp=2, global_batch=B)).step_time_s == plain.step_time_s
    )
    gpu = Cluster.preset("dgx-a100-80g", nodes=1)
    with pytest.raises(PlanError, match="not a local CPU cluster"):
        autopar.plan(graph, gpu, global_batch=8, profile=True, progress=False)


def _train_unplanned() -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden=32, layers=2, heads=4, vocab=64, seq=8))
    x = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    compiled = autopar.compile(
        model, autopar.Cluster.local(2), example_inputs=(x, x), loss_fn=gpt_loss, global_batch=8
    )
    for _ in range(3):
        compiled.step((x, x))
    measured = compiled.measured()
    path = Path(os.environ["AUTOPAR_CACHE"]) / f"report-{torch.distributed.get_rank()}.html"
    compiled.report(path, measured=measured)
    return {"plan": compiled.plan.to_json(), "measured": measured, "html": path.read_text()}


def test_compile_without_a_plan_profiles_this_machine_and_reports_predicted_vs_measured():
    out = run_ranks(_train_unplanned, 2, timeout_s=120)[0]
    plan = Plan.from_json(out["plan"])
    prof = plan.search["profiled"]
    assert prof["ranks"] == 2 and prof["profiled_ops"] > 20 and prof["compute_slowdown"] >= 1.0
    assert "profiled on this machine (2 ranks" in plan.explain()
    m = out["measured"]
    assert m["predicted"]["step_time_s"] == pytest.approx(plan.predicted.step_time_s)
    assert len(m["components_per_rank"]) == 2 and len(m["memory_bytes_per_rank"]) == 2
    for c in m["components_per_rank"]:
        assert c["step_s"] > 0 and c["compute_s"] > 0 and c["optimizer_s"] > 0
        parts = c["compute_s"] + c["tp_comm_s"] + c["optimizer_s"] + c["other_s"]
        assert parts == pytest.approx(c["step_s"], rel=1e-6)
    assert "Predicted vs measured step per rank" in out["html"]
    layouts = list((Path(os.environ["AUTOPAR_CACHE"]) / "layouts").glob("*ranks2.json"))
    assert len(layouts) == 1 and json.loads(layouts[0].read_text())["ranks"] == 2


def _train_tp2() -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden=32, layers=2, heads=4, vocab=64, seq=8))
    x = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    plan = Plan.manual(tp=2, global_batch=8)
    compiled = autopar.compile(
        model, autopar.Cluster.local(2), plan=plan, example_inputs=(x, x), loss_fn=gpt_loss, global_batch=8
    )
    for _ in range(3):
        compiled.step((x, x))
    return compiled.measured()


def test_tensor_parallel_collectives_are_measured_apart_from_compute():
    """Under tp the lowered program's collectives are timed on their own (``tp_comm_s``), and the
    parts still add up to the step."""
    m = run_ranks(_train_tp2, 2, timeout_s=120)[0]
    for c in m["components_per_rank"]:
        assert c["tp_comm_s"] > 0 and c["compute_s"] > 0
        parts = c["compute_s"] + c["tp_comm_s"] + c["optimizer_s"] + c["other_s"]
        assert parts == pytest.approx(c["step_s"], rel=1e-6)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autopar", *args], capture_output=True, text=True, timeout=300, env=os.environ
    )


def test_cli_plan_profile_uses_the_measured_layout_and_refuses_other_clusters():
    model = "gpt:hidden=32,layers=2,heads=4,vocab=64,seq=8"
    ok = _cli("plan", model, "--cluster", "local:2", "--global-batch", "8", "--profile", "--verbose")
    assert ok.returncode == 0, ok.stderr
    assert "profiled on this machine (2 ranks" in ok.stdout
    bad = _cli("plan", model, "--cluster", "dgx-a100-80g", "--global-batch", "8", "--profile")
    assert bad.returncode == 2 and "--profile measures this machine" in bad.stderr


def test_oversubscribed_slowdown_follows_how_many_ranks_compute_at_once():
    """4 ranks on 2 cores: a plan whose ranks never wait sees the busy slowdown; a pipeline rank
    idles in the bubble, so fewer ranks share the cores (A = N m / (m + p - 1)); with no more ranks
    than cores the measured slowdown stands."""
    lay = dataclasses.replace(_layout(4, slowdown=1.3), slowdown_busy=2.4, cores=2)
    prof = LocalProfile(layout=lay, op_times={}, graph_batch=B)
    assert prof.slowdown_for(Plan.manual(dp=4, global_batch=16)) == pytest.approx(2.4)
    pp4 = Plan.manual(pp=4, global_batch=16, micro_batch_size=2)  # m = 8
    assert prof.slowdown_for(pp4) == pytest.approx(1.2 * 4 * (8 / 11) / 2)
    deep = Plan.manual(pp=4, global_batch=16, micro_batch_size=16)  # m = 1: one rank busy at a time
    assert prof.slowdown_for(deep) == pytest.approx(1.2)
    # measured with as many ranks computing as cores (the rest waiting): that end is no longer guessed
    measured = LocalProfile(layout=dataclasses.replace(lay, slowdown_cores=1.1), op_times={}, graph_batch=B)
    assert measured.slowdown_for(Plan.manual(dp=4, global_batch=16)) == pytest.approx(2.4)
    assert measured.slowdown_for(pp4) == pytest.approx(1.1 + (2.4 - 1.1) * (4 * 8 / 11 - 2) / 2)
    assert measured.slowdown_for(deep) == pytest.approx(1.1)
    two = LocalProfile(
        layout=dataclasses.replace(_layout(2, 1.3), slowdown_busy=2.0, cores=2), op_times={}, graph_batch=B
    )
    assert two.slowdown_for(Plan.manual(dp=2, global_batch=16)) == pytest.approx(1.3)


def _raw_layout(ranks: int, bandwidth: float, latency: float, gather: float, scatter: float) -> dict:
    """Raw layout measurements of a machine whose collectives follow the ring model exactly: all-
    reduce at ``bandwidth``/``latency``, all-gather and reduce-scatter ``gather``/``scatter`` times
    slower per byte; FSDP-3's probe costs 1 ms per unit plus the collectives the model charges."""
    sizes = (1 << 10, 16 << 10, 2 << 20, 8 << 20, 32 << 20)
    hops = 2 * (ranks - 1)

    def ring(size: float, scale: float) -> float:
        return (ranks - 1) * latency + scale * (ranks - 1) / ranks * size / bandwidth

    unit = 6 * (32 * 32 + 32) * 4
    return {
        "kernel_alone_s": 1e-3, "kernel_together_s": 2e-3, "slowdown_rounds": [2.0], "slowdown_busy_rounds": [2.2],
        "slowdown_cores_rounds": [1.3, 1.1],
        "all_reduce": {s: hops * latency + hops / ranks * s / bandwidth for s in sizes},
        "all_gather": {s: ring(s, gather) for s in sizes[-2:]},
        "reduce_scatter": {s: ring(s, scatter) for s in sizes[-2:]},
        "scalar_all_reduce_s": 1e-4, "adamw_big_s": 1e-2, "adamw_small_s": 3e-3,
        "fsdp2_unit_s": 4e-3 + ring(unit, gather) + ring(unit, scatter),
        "fsdp3_unit_s": 1e-3 + 2 * ring(unit, gather) + ring(unit, scatter),
    }  # fmt: skip


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_layout_fit_recovers_the_machine_it_was_measured_on(ranks):
    """The link from the all-reduce, each collective kind's own scale, the partial-activity
    slowdown (least contended round), and FSDP's framework cost per unit with the collectives the
    cost model charges per unit taken out (they would be counted twice)."""
    from autopar.estimator.local import fit_layout

    lay = fit_layout(ranks, 1, _raw_layout(ranks, 1e9, 1e-3, gather=4.0, scatter=2.5))
    assert lay.bandwidth_bytes_per_s == pytest.approx(1e9, rel=1e-6)
    assert lay.latency_s == pytest.approx(1e-3, rel=1e-6)
    assert lay.all_gather_scale == pytest.approx(4.0, rel=1e-6)
    assert lay.reduce_scatter_scale == pytest.approx(2.5, rel=1e-6)
    assert lay.slowdown_cores == pytest.approx(1.1)
    assert lay.fsdp_unit_s == pytest.approx((4e-3, 1e-3), rel=1e-6)


def test_profiled_collectives_cost_their_measured_scale():
    """A layout whose all-gather measured 3x the ring model's time per byte makes ZeRO-1's
    exposed parameter all-gather cost 3x the bandwidth term; the all-reduce is untouched."""
    graph = _graph()
    plan = Plan.manual(dp=2, global_batch=B, zero_stage=1)
    costs = {}
    for scale in (1.0, 3.0):
        cluster = _profiled(graph, 2, 0.5, all_gather_scale=scale)
        costs[scale] = estimate(graph, cluster, plan).breakdown_s["dp_comm_exposed"]
    param_bytes = 4 * graph.num_params
    assert costs[3.0] - costs[1.0] == pytest.approx(2 * 0.5 * param_bytes / 1e9, rel=1e-6)

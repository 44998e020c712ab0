"""autopar.plan: the planner against exhaustive search, what it discovers at realistic sizes, its plan
files, its explanations and its infeasibility errors. No processes (except the two CLI tests).

Oracles: exhaustive enumeration of every valid key combination (and every split of the blocks over
the stages) costed by the same estimator; hand-checkable facts about clusters (a slow network keeps
tensor parallelism inside nodes, a slow intra-node link avoids it); the estimator itself for plan
files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
import torch

import autopar
from autopar import Cluster
from autopar.core.errors import InfeasibleError, PlanError
from autopar.core.plan import Plan
from autopar.core.plan_rules import plan_keys
from autopar.core.progress import Progress
from autopar.estimator import estimate, workload
from autopar.models import GPTConfig
from autopar.solve.inter_op import latency_s
from autopar.solve.planner import Search, make_plan, space_spec
from autopar.solve.refine import split_lower_bound, stage_problem, stage_totals

_GRAPHS: dict = {}
_ORACLE: dict = {}

SHAPES = {
    "h64-l4": dict(hidden=64, heads=4, layers=4, seq=64, vocab=256),
    "h128-l3": dict(hidden=128, heads=8, layers=3, seq=128, vocab=512),
    "h256-l2": dict(hidden=256, heads=8, layers=2, seq=256, vocab=1024),
    "h1024-l4": dict(hidden=1024, heads=16, layers=4, seq=1024, vocab=8192),
    "llama-l4": dict(
        hidden=128, heads=4, kv_heads=2, layers=4, seq=64, vocab=512, norm="rmsnorm", act="swiglu"
    ),
}
CLUSTERS = {
    "1x8": lambda: Cluster.preset("dgx-a100-80g"),
    "2x4": lambda: Cluster.preset("dgx-a100-80g", nodes=2, devices_per_node=4),
    "2x4-slow": lambda: Cluster.preset("dgx-a100-80g", nodes=2, devices_per_node=4, inter_node_gbps=10),
}


def gpt_graph(name: str):
    if name not in _GRAPHS:
        cfg = GPTConfig(**SHAPES[name], dropout=0.0)
        model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=1, dtype=torch.bfloat16)
        _GRAPHS[name] = autopar.trace(model, inputs, loss_fn=loss_fn)
    return _GRAPHS[name]


def preset_graph(name: str):
    if name not in _GRAPHS:
        model, inputs, loss_fn = autopar.build_model(name)
        _GRAPHS[name] = autopar.trace(model, inputs, loss_fn=loss_fn)
    return _GRAPHS[name]


def with_memory(cluster: Cluster, memory_bytes: float) -> Cluster:
    device = dataclasses.replace(cluster.device, memory_bytes=memory_bytes)
    return dataclasses.replace(cluster, device=device, node_groups=())


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def compositions(total: int, parts: int):
    """Stage of each block, for every way to cut ``total`` blocks into ``parts`` non-empty stages."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [s for s in range(parts) for _ in range(bounds[s + 1] - bounds[s])]


def exhaustive(graph, cluster, global_batch: int, mode: str = "train") -> list[tuple]:
    """(step time, memory per device, plan, fits) of every valid plan: every mesh with tensor parallelism
    inside a node, every micro-batch size, GPipe / 1F1B / interleaved (Megatron's rules: v divides
    each stage's blocks, the micro-batch count is a multiple of pp), every split of the blocks for
    pipelines without virtual stages, sequence parallelism, recompute and ZeRO. Written without
    the planner's space module, so it shares none of its code."""
    L, N = len(graph.block_order), cluster.num_devices
    out = []
    for tp, pp in itertools.product(divisors(N), divisors(N)):
        if N % (tp * pp) or tp > cluster.devices_per_node or pp > L:
            continue
        dp = N // (tp * pp)
        if global_batch % dp:
            continue
        for mbs in divisors(global_batch // dp):
            m = global_batch // (dp * mbs)
            schedules = [("1f1b", 1)] + ([("gpipe", 1)] if pp > 1 else [])
            if pp > 1 and m % pp == 0:
                schedules += [("interleaved", v) for v in range(2, L + 1) if L % (pp * v) == 0]
            knobs = [("none", 0)]
            if mode == "train":
                knobs = list(itertools.product(("none", "selective", "full"), (0, 1, 2, 3)))
            # With two device kinds the mesh order matters (which ranks form a stage): try both.
            orders = [("dp", "pp", "tp")] + ([("pp", "dp", "tp")] if cluster.is_heterogeneous else [])
            for (schedule, v), sp, (rc, zero), order in itertools.product(schedules, (0, 1), knobs, orders):
                splits = list(compositions(L, pp)) if pp > 1 and v == 1 else [None]
                for split in splits:
                    try:
                        plan = Plan.manual(
                            axis_order=order,
                            dp=dp,
                            tp=tp,
                            pp=pp,
                            global_batch=global_batch,
                            micro_batch_size=mbs,
                            schedule=schedule,
                            virtual_stages=v,
                            recompute=rc,
                            sequence_parallel=bool(sp),
                            zero_stage=zero,
                            layer_stages=split,
                            mode=mode,
                        )
                        cost = estimate(graph, cluster, plan)
                    except PlanError:
                        continue
                    out.append((cost.step_time_s, cost.memory_bytes_per_device, plan, cost.fits))
    return out


def oracle(shape: str, cluster_name: str, global_batch: int, mode: str = "train"):
    key = (shape, cluster_name, global_batch, mode)
    if key not in _ORACLE:
        _ORACLE[key] = exhaustive(gpt_graph(shape), CLUSTERS[cluster_name](), global_batch, mode)
    return _ORACLE[key]


def capacities(cands) -> list[float]:
    """Device memory sizes at which the best plan changes: below every plan (infeasible), at a few
    quantiles of the plans' memory (memory binds), and above all of them."""
    mems = sorted(c[1] for c in cands)
    picks = [mems[0] * 0.999] + [mems[int(q * (len(mems) - 1))] for q in (0.03, 0.15, 0.4, 0.7)]
    return picks + [mems[-1] * 1.01]


def check_against_oracle(shape, cluster_name, global_batch, mode="train", fixed=None):
    graph = gpt_graph(shape)
    cands = oracle(shape, cluster_name, global_batch, mode)
    if fixed:
        cands = [c for c in cands if all(_key(c[2], k) == v for k, v in fixed.items())]
    for capacity in capacities(cands):
        cluster = with_memory(CLUSTERS[cluster_name](), capacity)
        fitting = [(t, p) for t, m, p, _ in cands if m <= capacity]
        where = f"{shape} {cluster_name} B={global_batch} {mode} fixed={fixed} memory={capacity:.6g}"
        if not fitting:
            with pytest.raises(InfeasibleError):
                autopar.plan(
                    graph, cluster, global_batch=global_batch, mode=mode, fixed=fixed, progress=False
                )
            continue
        best_s, best = min(fitting, key=lambda x: x[0])
        # The oracle enumerates plans with the rules' default placements: compare the planner over
        # the same space (intra_op=False). With the intra-op ILP on, it may only do better.
        kwargs = dict(global_batch=global_batch, mode=mode, fixed=fixed, progress=False)
        got = autopar.plan(graph, cluster, intra_op=False, **kwargs)
        assert got.predicted.fits, where
        assert got.predicted.step_time_s == pytest.approx(best_s, rel=1e-9), (
            f"{where}: planner {got.summary()} {got.layer_stages} {got.predicted.step_time_s:.9g} s, "
            f"exhaustive {best.summary()} {best.layer_stages} {best_s:.9g} s"
        )
        with_ilp = autopar.plan(graph, cluster, **kwargs)
        assert with_ilp.predicted.fits, where
        assert with_ilp.predicted.step_time_s <= best_s * (1 + 1e-9), where


def _key(plan: Plan, key: str) -> object:
    return plan_keys(plan)[key]


# ------------------------------------------------------------------------------ optimality
@pytest.mark.parametrize("cluster_name", sorted(CLUSTERS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_plan_equals_exhaustive_search(shape, cluster_name):
    """The planner's plan has the predicted step time of the best of all valid plans (every mesh,
    micro-batch, schedule incl. interleaved, sp, recompute, ZeRO and split of the blocks) at six
    device-memory sizes from 'nothing fits' to 'everything fits'; InfeasibleError when none fits."""
    for global_batch in (8, 32):
        check_against_oracle(shape, cluster_name, global_batch)


def heterogeneous(memory_a100_bytes: float, memory_h100_bytes: float) -> Cluster:
    """Node 0: four A100s, node 1: four H100s, with the given device memories."""
    base = Cluster.preset("dgx-a100-80g", nodes=2, devices_per_node=4).to_dict()
    groups = []
    for preset, memory in (("dgx-a100-80g", memory_a100_bytes), ("dgx-h100", memory_h100_bytes)):
        device = Cluster.preset(preset).device.to_dict()
        groups.append({"nodes": 1, "device": dict(device, memory_bytes=memory)})
    d = {k: v for k, v in base.items() if k not in ("name", "nodes", "device")}
    return Cluster.from_dict(dict(d, node_groups=groups))


def test_heterogeneous_cluster_equals_exhaustive_search():
    """Two device kinds (the estimator costs each stage on its own kind): the planner's bounds that
    assume one kind switch off, and the plan still equals exhaustive search at several memory sizes
    per kind (with less memory on the A100s the best plans give the H100 stage more blocks)."""
    graph = gpt_graph("h1024-l4")
    loose = exhaustive(graph, heterogeneous(80e9, 80e9), 32)
    mems = sorted(c[1] for c in loose)
    quantile = [mems[len(mems) * k // 8] for k in range(8)]
    sizes = [(80e9, 80e9), (quantile[2], quantile[4]), (quantile[1], quantile[4]), (quantile[3], quantile[3])]
    for memory_a, memory_h in sizes:
        cluster = heterogeneous(memory_a, memory_h)
        cands = loose if memory_a == memory_h == 80e9 else exhaustive(graph, cluster, 32)
        best_s, best = min(((t, p) for t, _, p, fits in cands if fits), key=lambda x: x[0])
        got = autopar.plan(graph, cluster, global_batch=32, progress=False, intra_op=False)
        assert got.predicted.step_time_s == pytest.approx(best_s, rel=1e-9), (
            f"{memory_a:.4g}/{memory_h:.4g}: planner {got.summary()} {got.layer_stages}, "
            f"exhaustive {best.summary()} {best.layer_stages}"
        )


@pytest.mark.parametrize(
    ("shape", "cluster_name"), [("h1024-l4", "2x4-slow"), ("h64-l4", "1x8"), ("llama-l4", "2x4")]
)
def test_every_bound_is_below_what_it_bounds(shape, cluster_name):
    """The pruning rules hold for every plan they could skip, checked directly against the
    estimator (not only where they happen to decide): per pipeline, the knob bound of its first
    knob, the pipeline bound from one block's time and the interleaved bound from the 1F1B twin are
    at most the step time of every knob and every split; at several memory sizes, the memory screen
    passes every plan that fits (under its own split)."""
    graph, cluster = gpt_graph(shape), CLUSTERS[cluster_name]()
    spec = space_spec(graph, cluster, 32, "train", None, False)
    search = Search(graph, cluster, spec, time_limit_s=60, progress=Progress(enabled=False))
    firsts: dict = {}
    cands = []
    for t, memory, plan, _ in oracle(shape, cluster_name, 32):
        base = {k: _key(plan, k) for k in ("dp", "tp", "pp", "mbs", "schedule", "vpp", "sp")}
        if base["schedule"] == "gpipe":
            continue  # outside the planner's space (the time of 1F1B with more memory)
        pipe = tuple(base.values())
        if pipe not in firsts:
            firsts[pipe] = search.evaluate(dict(base, recompute="none", zero=0))
            search.learn_block_time(firsts[pipe])
        first, knob = firsts[pipe], (plan.recompute, plan.zero_stage)
        cands.append((t, memory, base, first, knob))
        ceiling = t * (1 + 1e-9)
        assert search.knob_bound(first, knob) <= ceiling, (plan.summary(), plan.layer_stages)
        assert search.pipeline_bound(base) <= ceiling, (plan.summary(), plan.layer_stages)
        if base["schedule"] == "interleaved":
            search.best_s = ceiling
            twin = firsts.get((base["dp"], base["tp"], base["pp"], base["mbs"], "1f1b", 1, base["sp"]))
            assert not search.skip(base, twin), plan.summary()
            search.best_s = float("inf")
    assert len(cands) > 500
    for capacity in capacities(cands)[1:-1]:
        search.cluster = with_memory(cluster, capacity)
        for _, memory, base, first, knob in cands:
            if memory <= capacity:
                assert search.may_fit(first, dict(base, recompute=knob[0], zero=knob[1])), (base, knob)


@pytest.mark.parametrize(
    "fixed",
    [
        {"schedule": "interleaved"},
        {"zero": 3},
        {"tp": 2},
        {"recompute": "full", "sp": 1},
        {"pp": 2, "mbs": 2},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_fixed_keys_equal_exhaustive_search_over_the_rest(fixed):
    """Keys the user fixes are kept and the rest is still optimal."""
    check_against_oracle("h64-l4", "2x4", 32, fixed=fixed)


def test_a_fixed_vpp_above_the_planners_cap_is_searched():
    """The planner tries up to 8 virtual stages itself; a user's larger vpp (here 12 on 24 layers and
    2 stages, as Megatron's GPT-3 recipe runs 96 layers on 8) is searched, not an empty space."""
    cfg = GPTConfig(hidden=64, layers=24, heads=4, vocab=128, seq=16, dropout=0.0)
    model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=1, dtype=torch.bfloat16)
    graph = autopar.trace(model, inputs, loss_fn=loss_fn)
    fixed = {"pp": 2, "vpp": 12, "schedule": "interleaved"}
    plan = autopar.plan(graph, CLUSTERS["1x8"](), global_batch=32, fixed=fixed, progress=False)
    assert (plan.pp, plan.virtual_stages, plan.schedule) == (2, 12, "interleaved")


def test_inference_equals_exhaustive_search():
    check_against_oracle("h128-l3", "1x8", 16, mode="inference")
    check_against_oracle("h64-l4", "2x4", 8, mode="inference")


def test_memory_screen_equals_the_estimator():
    """The planner screens memory knobs with one workload per pipeline: per-stage bytes for every
    recompute/ZeRO setting equal the estimator's."""
    graph, cluster = gpt_graph("h64-l4"), CLUSTERS["2x4"]()
    for dp, tp, pp, schedule, vpp in [
        (2, 2, 2, "1f1b", 1),
        (1, 4, 2, "interleaved", 2),
        (8, 1, 1, "1f1b", 1),
    ]:
        base = dict(dp=dp, tp=tp, pp=pp, mbs=2, schedule=schedule, vpp=vpp, sp=int(tp > 1))
        work = workload(graph, cluster, make_plan(dict(base, recompute="none", zero=0), 32, "train"))
        for rc, zero in itertools.product(("none", "selective", "full"), (0, 1, 2, 3)):
            plan = make_plan(dict(base, recompute=rc, zero=zero), 32, "train")
            expected = estimate(graph, cluster, plan).extra["memory_bytes_per_stage"]
            assert stage_totals(work, plan) == pytest.approx(expected, rel=1e-12), (base, rc, zero)


def test_stage_ilp_objective_is_the_estimators_step_time():
    """The inter-op ILP's objective for any split equals the estimator's step time of the plan with
    that split, and the split-free lower bound is below all of them."""
    graph, cluster = gpt_graph("h64-l4"), CLUSTERS["2x4"]()
    for keys in [
        dict(dp=2, tp=1, pp=4, mbs=2, recompute="none", zero=0, sp=0),
        dict(dp=4, tp=1, pp=2, mbs=1, recompute="selective", zero=1, sp=0),
        dict(dp=1, tp=2, pp=4, mbs=4, recompute="full", zero=0, sp=1),
        dict(dp=2, tp=2, pp=2, mbs=2, recompute="none", zero=3, sp=1),
    ]:
        plan = make_plan(dict(keys, schedule="1f1b", vpp=1), 32, "train")
        problem = stage_problem(graph, cluster, plan)
        bound = split_lower_bound(estimate(graph, cluster, plan), plan, cluster)
        for split in compositions(4, plan.pp):
            counts = [split.count(s) for s in range(plan.pp)]
            cost = estimate(graph, cluster, dataclasses.replace(plan, layer_stages=split))
            assert latency_s(problem, counts) == pytest.approx(cost.step_time_s, rel=1e-9), (keys, counts)
            assert bound <= cost.step_time_s * (1 + 1e-9)


# ------------------------------------------------------------------------------ discovery
def test_small_model_large_batch_gets_pure_data_parallelism():
    plan = autopar.plan(
        preset_graph("gpt3-1.3b"), Cluster.preset("dgx-a100-80g"), global_batch=512, progress=False
    )
    assert (plan.dp, plan.tp, plan.pp) == (8, 1, 1), plan.summary()


def test_big_model_on_a_slow_network_gets_tp_inside_nodes_and_pp_across():
    """13B does not fit one 80 GB device; with a 10 Gb/s network per GPU and NVLink inside the
    node, tensor parallelism stays in the node and the pipeline crosses the nodes."""
    cluster = Cluster.preset("dgx-a100-80g", nodes=4, inter_node_gbps=10)
    graph = preset_graph("gpt3-13b")
    one = Plan.manual(dp=32, global_batch=64, micro_batch_size=1, recompute="full")
    assert not estimate(graph, cluster, one).fits  # replicated, it does not fit a device
    plan = autopar.plan(graph, cluster, global_batch=64, progress=False)
    nodes = [{r // cluster.devices_per_node for r in plan.groups(axis)[0]} for axis in ("tp", "pp")]
    assert plan.tp > 1 and plan.tp <= cluster.devices_per_node and len(nodes[0]) == 1, plan.summary()
    assert plan.pp > 1 and len(nodes[1]) > 1, plan.summary()


def test_slow_intra_node_link_avoids_tensor_parallelism():
    """Same model and batch on DGX nodes behind a 25 Gb/s-per-GPU network (where sharding the whole
    model over the network costs more than TP): with NVLink the planner uses TP; with a PCIe-class
    intra-node link (256 Gb/s per GPU) it avoids it. (On the full 200 Gb/s-per-GPU network a 13B
    model at this batch runs as ZeRO-3 over all 32 GPUs, the node's NICs carrying its rings.)"""
    graph = preset_graph("gpt3-13b")
    fast_link = Cluster.preset("dgx-a100-80g", nodes=4, inter_node_gbps=25)
    fast = autopar.plan(graph, fast_link, global_batch=64, progress=False)
    slow_link = Cluster.preset("dgx-a100-80g", nodes=4, intra_node_gbps=256, inter_node_gbps=25)
    slow = autopar.plan(graph, slow_link, global_batch=64, progress=False)
    assert fast.tp > 1, fast.summary()
    assert slow.tp == 1, slow.summary()


# ------------------------------------------------------------------------------ plan files
def test_plan_json_round_trips_and_reproduces_its_cost():
    graph = gpt_graph("h128-l3")
    cands = oracle("h128-l3", "1x8", 8)
    for capacity in capacities(cands)[1:]:
        cluster = with_memory(CLUSTERS["1x8"](), capacity)
        plan = autopar.plan(graph, cluster, global_batch=8, progress=False)
        again = Plan.from_json(plan.to_json())
        assert again == plan
        assert again.predicted == plan.predicted and again.search == plan.search
        assert again.layer_stages == plan.layer_stages
        cost = autopar.estimate(graph, cluster, Plan.from_json(plan.to_json()))
        assert cost.step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
        assert cost.memory_bytes_per_device == pytest.approx(plan.predicted.memory_bytes_per_device, rel=1e-9)


def autopar_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autopar", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_estimate_of_a_plan_file_prints_the_planned_step_time(tmp_path):
    """`autopar plan --out plan.json --json` and `autopar estimate --plan plan.json --json` agree."""
    out = tmp_path / "plan.json"
    model = "gpt:hidden=256,layers=4,heads=8,vocab=1024,seq=256"
    common = ("--cluster", "dgx-a100-80g:nodes=2", "--global-batch", "64")
    planned = autopar_cli("plan", model, *common, "--out", str(out), "--json")
    assert planned.returncode == 0, planned.stderr
    planned_json = json.loads(planned.stdout)
    assert {"solve_time_s", "alternatives", "plan", "step_time_s"} <= set(planned_json)
    estimated = autopar_cli("estimate", model, *common, "--plan", str(out), "--json")
    assert estimated.returncode == 0, estimated.stderr
    step_s = json.loads(estimated.stdout)["step_time_s"]
    assert step_s == pytest.approx(planned_json["step_time_s"], rel=1e-9)
    assert Plan.from_json(out.read_text()).predicted.step_time_s == pytest.approx(step_s, rel=1e-9)


# ------------------------------------------------------------------------------ errors, explain
def test_infeasible_model_raises_with_the_overflow_and_a_knob():
    graph = preset_graph("gpt3-13b")
    cluster = Cluster.preset("dgx-a100-80g", devices=2)
    with pytest.raises(InfeasibleError) as info:
        autopar.plan(graph, cluster, global_batch=8, progress=False)
    err = info.value
    assert err.details["overflow_bytes"] > 0
    assert err.details["memory_bytes_per_device"] > err.details["memory_capacity_bytes"] == 80e9
    assert "GB over" in str(err)
    assert any(knob in str(err) for knob in ("more devices", "recompute=full", "ZeRO", "micro-batch"))


def test_cli_infeasible_exits_2_without_traceback():
    r = autopar_cli("plan", "gpt3-13b", "--cluster", "dgx-a100-80g:devices=2", "--global-batch", "8")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "no plan fits in memory" in r.stderr and "more devices" in r.stderr


def test_explain_names_runner_ups_and_rejected_meshes():
    graph = gpt_graph("h128-l3")
    cluster = with_memory(CLUSTERS["1x8"](), capacities(oracle("h128-l3", "1x8", 8))[2])
    plan = autopar.plan(graph, cluster, global_batch=8, progress=False)
    text = plan.explain()
    assert text.startswith(f"plan: {plan.summary()}")
    assert "runner-ups:" in text and "other meshes:" in text
    runner = plan.search["alternatives"][0]
    assert runner["summary"] in text and runner["step_time_s"] >= plan.predicted.step_time_s
    rejected = plan.search["rejected"]
    assert rejected and any(r["config"] in text for r in rejected)
    assert any(not r["fits"] for r in rejected) or any("step time" in r["why"] for r in rejected)
    stats = plan.search["stats"]
    assert stats["evaluated"] + stats["pruned"] + stats["screened"] >= stats["space_size"] > 0
    assert stats["status"] == "optimal"


def test_time_limit_returns_the_incumbent():
    graph = gpt_graph("h64-l4")
    plan = autopar.plan(graph, CLUSTERS["2x4"](), global_batch=32, time_limit_s=0.0, progress=False)
    stats = plan.search["stats"]
    assert plan.predicted.fits and stats["status"] == "time_limit"
    assert 0 < stats["gap"] == pytest.approx(1 - plan.predicted.mfu) and "optimality gap" in plan.explain()

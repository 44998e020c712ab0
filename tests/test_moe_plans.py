"""The seam between the MoE cost model and the MoE runtime: what the planner offers runs, and runs
as costed (issue 15).

* the rules: the search space and the estimator offer only the knobs the expert-parallel runtime
  builds (no sequence parallelism with MoE layers, no ZeRO with ``ep > 1``), and say so when a user
  fixes one;
* the costs, by hand: the layer's tensor-parallel all-reduces (output forward, input and gate
  gradients backward) and the expert gradients' all-reduce over the expert-data-parallel ranks,
  exposed after the backward;
* the mesh order: with ``pp > 1`` the planner also costs expert-parallel candidates under
  ``("pp", "dp", "tp")``, which keeps an ep group inside a node; runtime and estimator read the
  groups from one function (``Plan.groups``);
* on real gloo ranks (2 and 4): every plan ``autopar.plan`` emits under several settings, and a
  deterministic sample of the candidate space, compiles and runs one step whose loss equals one
  device's; for a few of them the collectives the MoE layers really issue (all-to-alls and
  tensor-parallel all-reduces: count per rank, bytes per rank or per ep group) equal the
  estimator's (:func:`autopar.estimator.moe.moe_collectives`, what the step model times).
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

import autopar
from autopar import Plan
from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.estimator import estimate, workload
from autopar.estimator.moe import (
    edp_group,
    expert_grad_sync,
    expert_tp,
    moe_collectives,
    moe_nodes,
    node_comms,
    node_ops,
)
from autopar.solve import space
from autopar.solve.candidate import DEFAULT_ORDER, make_plan
from autopar.solve.planner import EP_ORDER, ep_orders, space_spec
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import gpt_case
from cost_models import DEFAULT, collective_time_s, step_time
from cost_models import moe as m

B = 8  # global batch
MOE = dict(experts=4, top_k=2, moe_ffn=8, act="swiglu", norm="rmsnorm", bias=False, layers=4)
SPEC = "gpt:hidden=64,layers=4,heads=4,vocab=128,seq=16,experts=4,top_k=2,act=swiglu,norm=rmsnorm"


def case():
    return gpt_case(**MOE)


@pytest.fixture(scope="module")
def small():
    from autopar.models.spec import load_model

    return load_model(SPEC).trace(2)


def _graph(batch_size: int):
    c = case()
    batch = tuple(t[:batch_size] for t in c.make_batches(1)[0])
    return autopar.trace(c.build(), batch, loss_fn=c.loss_fn)


# ------------------------------------------------------------------------------ the rules
def test_space_offers_only_the_knobs_the_runtime_builds(small):
    cluster = Cluster.parse("dgx-h100:8")
    spec = space_spec(small, cluster, 16, "train", None, False)
    assert spec.experts == 4
    seen = set()
    for dp, tp, _ in space.meshes(spec):
        for ep in space.expert_degrees(spec, dp):
            for sp, _, zero in space.knobs(spec, tp, dp, ep):
                assert sp == 0 and (ep == 1 or zero == 0), (dp, tp, ep, sp, zero)
                seen.add((ep > 1, zero > 0))
    assert seen == {(False, False), (False, True), (True, False)}  # ZeRO stays for ep = 1
    dense = space.SpaceSpec(
        num_devices=8, devices_per_node=8, num_layers=4, heads=4, kv_heads=None, global_batch=16
    )
    assert any(sp for sp, _, _ in space.knobs(dense, 2, 4))  # the rule is for MoE models only


def test_estimator_and_planner_refuse_what_is_not_built(small):
    cluster = Cluster.parse("dgx-h100:8")
    with pytest.raises(PlanError, match="zero=1 with ep=2"):
        estimate(small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2, ep=2, zero_stage=1))
    with pytest.raises(PlanError, match="sequence parallelism with MoE layers"):
        estimate(
            small,
            cluster,
            Plan.manual(dp=4, tp=2, global_batch=16, micro_batch_size=2, sequence_parallel=True),
        )
    estimate(
        small, cluster, Plan.manual(dp=8, global_batch=16, micro_batch_size=2, zero_stage=2)
    )  # ep=1: built
    with pytest.raises(PlanError, match="zero=2 with ep=4"):
        autopar.plan(small, cluster, global_batch=16, progress=False, fixed={"ep": 4, "zero": 2})
    chosen = autopar.plan(small, cluster, global_batch=16, progress=False, fixed={"zero": 1}, time_limit_s=30)
    assert chosen.ep == 1 and chosen.zero_stage == 1  # ZeRO fixed: only ep = 1 is offered


# ------------------------------------------------------------------------------ the costs
def test_tp_all_reduces_of_a_moe_layer_by_hand():
    """Forward: the output, T h; backward: the input gradient, T h, and the gates', T k. They do
    not depend on ep or on the routing (the rank's own tokens)."""
    s = m.MoEShape(experts=8, top_k=2, hidden=1024, ffn=4096, tokens=4096.0, shared=1)
    calls = m.tp_all_reduce_calls(s, elem_bytes=2)
    assert calls == [
        ("output", 4096 * 1024 * 2, "fwd"),
        ("input_grad", 4096 * 1024 * 2, "bwd"),
        ("gate_grad", 4096 * 2 * 2, "bwd"),
    ]
    assert len(m.tp_all_reduce_calls(s, mode="inference")) == 1
    for ep in (1, 4):
        comms = [c for c in m.moe_comms(s, ep=ep, tp=2, imbalance=1.5) if c.axis == "tp"]
        assert [(c.collective, c.nbytes, c.phase) for c in comms] == [
            ("all_reduce", b, p) for _, b, p in calls
        ]


def test_expert_gradients_are_reduced_over_edp_after_the_backward(small):
    """dp=8, ep=2: the experts' gradients (E/ep of them per rank) are all-reduced over the 4 ranks
    holding the same experts, exposed; the rest over dp, overlapped. The breakdown still sums to the
    step time; with dp = ep there is no expert reduction at all."""
    cluster = Cluster.parse("dgx-h100:8")
    experts = sum(math.prod(v["shape"]) for v in small.params.values() if len(v["shape"]) == 3)
    plan = Plan.manual(dp=8, global_batch=16, micro_batch_size=2, ep=2)
    cost = estimate(small, cluster, plan)
    assert sum(cost.breakdown_s.values()) == pytest.approx(cost.step_time_s)
    group = edp_group(plan, cluster)
    assert group is not None and group.size == 4
    w = workload(small, cluster, plan)
    t = step_time(w.spec, w.rates, DEFAULT)
    expert_s = expert_grad_sync(t, w, plan, cluster, DEFAULT)
    assert expert_s == pytest.approx(collective_time_s("all_reduce", experts / 2 * 2, group))  # bf16 grads
    assert expert_s <= t.breakdown_s["dp_comm_exposed"]
    assert edp_group(Plan.manual(dp=4, pp=2, global_batch=16, ep=4), cluster) is None  # dp = ep


def test_a_region_run_whole_on_every_tp_rank_is_costed_whole(small):
    """The lowering splits autopar's MoE layer (w1, w3, w2) over tp but runs a HuggingFace block
    (fused gate_up_proj) whole on every tp rank: no tp all-reduce, full-width GEMMs."""
    node = moe_nodes(small)[0]
    assert expert_tp(node, 2) == 2
    hf = dataclasses.replace(
        node, param_names=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    assert expert_tp(hf, 2) == 1
    assert [c.axis for c in node_comms(hf, batch=1.0, ep=2, tp=2, act=1.0)] == ["ep"] * 5
    assert {o.name: o.gemm for o in node_ops(hf, batch=1.0, ep=1, tp=2, act=1.0)} == {
        o.name: o.gemm for o in node_ops(node, batch=1.0, ep=1, tp=1, act=1.0)
    }


# ------------------------------------------------------------------------------ the mesh order
def test_ep_order_keeps_an_ep_group_inside_a_node(small):
    cluster = Cluster.parse("dgx-h100:64")
    default = Plan.manual(dp=16, pp=4, global_batch=64, micro_batch_size=1, ep=4)
    inner = Plan.manual(dp=16, pp=4, global_batch=64, micro_batch_size=1, ep=4, axis_order=EP_ORDER)
    assert default.groups("ep")[0] == [0, 4, 8, 12]  # 2 nodes of 8
    assert inner.groups("ep")[0] == [0, 1, 2, 3]  # one node
    assert ep_orders(cluster, DEFAULT_ORDER, 4, 8) == [DEFAULT_ORDER, EP_ORDER]
    assert (
        ep_orders(cluster, DEFAULT_ORDER, 1, 8) == [DEFAULT_ORDER] == ep_orders(cluster, DEFAULT_ORDER, 4, 1)
    )
    a, b = (estimate(small, cluster, p).breakdown_s["ep_comm"] for p in (default, inner))
    assert b < a  # NVLink instead of InfiniBand


# ------------------------------------------------------------------------------ on real ranks
def _offered(graph, cluster: Cluster) -> list[Plan]:
    """Every candidate of the planner's space (both mesh orders) that the estimator accepts."""
    spec = space_spec(graph, cluster, B, "train", None, False)
    out = []
    for dp, tp, pp in space.meshes(spec):
        for ep in space.expert_degrees(spec, dp):
            for order in ep_orders(cluster, DEFAULT_ORDER, pp, ep):
                for mbs, schedule, vpp in space.pipelines(spec, dp, pp):
                    for sp, rc, zero in space.knobs(spec, tp, dp, ep):
                        keys = dict(dp=dp, tp=tp, pp=pp, ep=ep, mbs=mbs, schedule=schedule, vpp=vpp, sp=sp)
                        keys.update(
                            recompute=rc, zero=zero, **({"order": order} if order != DEFAULT_ORDER else {})
                        )
                        try:
                            plan = make_plan(keys, B, "train")
                            estimate(graph, cluster, plan)
                        except PlanError:
                            continue
                        out.append(plan)
    return out


def _emitted(graph, n: int) -> list[Plan]:
    """What ``autopar.plan`` emits on ``n`` ranks under several settings (memory squeezed so that
    ep, tp or pp are needed; some keys fixed)."""
    out = []
    for cluster_name, fixed in (
        (f"dgx-h100:{n}", {}),
        (f"dgx-h100:{n}", {"ep": 2}),
        (f"dgx-h100:{n}", {"tp": 2}),
        (f"dgx-h100:{n}", {"pp": 2, "ep": 2} if n == 4 else {"pp": 2}),
    ):
        cluster = Cluster.parse(cluster_name)
        out.append(autopar.plan(graph, cluster, global_batch=B, progress=False, fixed=fixed, time_limit_s=20))
    return out


def _counted_step(compiled, batch) -> dict:
    """One more step with the MoE collectives counted: all-to-alls, and the tp all-reduces issued
    by the lowered MoE layers (told apart from the dense layers' by the MoE layers' own TPContext,
    whose ``timed`` block wraps each of their collectives)."""
    import contextlib

    import torch.distributed as dist

    from autopar.lower.expert import ExpertParallelMoE

    seen = {"ep:all_to_all": {"count": 0, "bytes": 0}, "tp:all_reduce": {"count": 0, "bytes": 0}}
    inside = [False]
    real_a2a, real_ar = dist.all_to_all_single, dist.all_reduce

    def a2a(output, input, *args, **kwargs):
        seen["ep:all_to_all"]["count"] += 1
        seen["ep:all_to_all"]["bytes"] += input.numel() * input.element_size()
        return real_a2a(output, input, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        if inside[0]:
            seen["tp:all_reduce"]["count"] += 1
            seen["tp:all_reduce"]["bytes"] += tensor.numel() * tensor.element_size()
        return real_ar(tensor, *args, **kwargs)

    def marked(original):
        @contextlib.contextmanager
        def timed():
            inside[0] = True
            try:
                with original():
                    yield
            finally:
                inside[0] = False

        return timed

    modules = [mod for stage in compiled.program.stages for mod in stage.modules()]
    contexts = {id(mod.tp): mod.tp for mod in modules if isinstance(mod, ExpertParallelMoE)}
    for ctx in contexts.values():
        ctx.timed = marked(ctx.timed)
    dist.all_to_all_single, dist.all_reduce = a2a, all_reduce
    try:
        compiled.step(batch)
    finally:
        dist.all_to_all_single, dist.all_reduce = real_a2a, real_ar
    return seen


def _run_plans(c, plans: list[Plan], counted: list[int]) -> list:
    """Rank function: one step of each plan (its loss); for the plans listed in ``counted`` a
    second step with the MoE collectives counted (:func:`_counted_step`; the first step of a
    pipeline also runs a shape-inference forward)."""
    batch = c.make_batches(1)[0]
    out = []
    for i, plan in enumerate(plans):
        compiled = autopar.compile(
            c.build(), plan.world_size, example_inputs=batch, loss_fn=c.loss_fn, plan=plan, global_batch=B
        )
        loss = compiled.step(batch)
        out.append((loss, _counted_step(compiled, batch) if i in counted else None))
    return out


def _one_device_loss(c) -> float:
    tokens, targets = c.make_batches(1)[0]
    with torch.no_grad():
        return float(c.loss_fn(c.build()(tokens), targets))


def _unique(plans: list[Plan]) -> list[Plan]:
    out, seen = [], set()
    for p in plans:
        key = (p.summary(), tuple(a.name for a in p.mesh))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _sample(plans: list[Plan], k: int, must: list) -> tuple[list[Plan], list[Plan]]:
    """(the first plan matching each of ``must``, ``k`` others drawn with a fixed seed)."""
    picked = [next(p for p in plans if f(p)) for f in must]
    rest = [p for p in plans if p not in picked]
    return picked, random.Random(0).sample(rest, min(k, len(rest)))


def _check_counts(per_rank, plans, counted):
    for i in counted:
        plan = plans[i]
        graph = _graph(plan.micro_batch_size)
        predicted = [
            moe_collectives(graph, plan, stage=plan.coords(r).get("pp", 0)) for r in range(plan.world_size)
        ]
        for r in range(plan.world_size):
            seen = per_rank[r][i][1]
            for key in ("ep:all_to_all", "tp:all_reduce"):
                want = predicted[r].get(key, {"count": 0, "bytes": 0.0})
                assert seen[key]["count"] == want["count"], (plan.summary(), r, key, seen, predicted[r])
            # tp all-reduces are over the rank's own tokens: bytes equal rank by rank
            assert seen["tp:all_reduce"]["bytes"] == predicted[r].get("tp:all_reduce", {"bytes": 0})["bytes"]
        assert any(p for p in predicted), plan.summary()  # the plan has MoE collectives to compare
        # all-to-all rows depend on the routing rank by rank; over an ep group (nothing dropped)
        # the rows sent are the rows routed, the balanced prediction's total
        for group in plan.groups("ep") if plan.ep > 1 else []:
            got = sum(per_rank[r][i][1]["ep:all_to_all"]["bytes"] for r in group)
            assert got == sum(predicted[r]["ep:all_to_all"]["bytes"] for r in group), (plan.summary(), group)


def _run_and_check(n: int, plans: list[Plan], counted: list[int]) -> None:
    c = case()
    expected = _one_device_loss(c)
    per_rank = run_ranks(_run_plans, n, args=(c, plans, counted))
    for r, results in enumerate(per_rank):
        for plan, (loss, _) in zip(plans, results):
            assert loss == pytest.approx(expected, rel=1e-5), (plan.summary(), r)
    _check_counts(per_rank, plans, counted)


@pytest.mark.multiproc
def test_two_ranks_every_offered_plan_runs_as_costed():
    graph = _graph(B)
    cluster = Cluster.parse("dgx-h100:2")
    offered = _offered(graph, cluster)
    assert any(p.ep > 1 for p in offered) and any(p.tp > 1 for p in offered)
    assert not any(p.sequence_parallel or (p.ep > 1 and p.zero_stage) for p in offered)
    musts = [lambda p: p.tp == 2, lambda p: p.ep == 2 and p.recompute == "full", lambda p: p.zero_stage == 2]
    picked, drawn = _sample(offered, 2, musts)
    plans = _unique(_emitted(graph, 2) + picked + drawn)
    counted = [plans.index(p) for p in picked[:2]]  # tp=2 (ep=1); ep=2 with recompute=full
    _run_and_check(2, plans, counted)


@pytest.mark.multiproc
def test_four_ranks_every_offered_plan_runs_as_costed():
    graph = _graph(B)
    cluster = Cluster.parse("dgx-h100:4")
    offered = _offered(graph, cluster)
    assert any(p.mesh[0].name == "pp" and p.ep > 1 for p in offered)  # the EP_ORDER candidates
    musts = [
        lambda p: p.tp == 2 and p.ep == 2 and p.recompute != "none",
        lambda p: p.pp == 2 and p.ep == 2 and p.mesh[0].name == "pp",
        lambda p: p.ep == 4 and p.micro_batch_size == 1,
    ]
    picked, drawn = _sample(offered, 2, musts)
    plans = _unique(_emitted(graph, 4) + picked + drawn)
    counted = [plans.index(p) for p in picked[:2]]  # ep x tp with recompute; ep x pp under EP_ORDER
    _run_and_check(4, plans, counted)

"""``autopar.plan``: the fastest plan that fits, found by enumeration, bounds and an ILP.

1. **Outer search** (:mod:`autopar.solve.space`): meshes ``dp·tp·pp = N``, micro-batch size,
   schedule and virtual stages, sequence parallelism, recompute and ZeRO. Every candidate is costed
   by the estimator ``autopar estimate`` uses, so a plan's predicted cost is reproducible with
   ``autopar estimate --plan``.
2. **Bounds** (all valid under the cost model, so pruning never loses the optimum; the arguments
   are in ``docs/planner.md`` §3, and ``tests/test_planner.py`` checks each against the estimator):

   * B1, per pipeline (mesh, micro-batch, schedule, sp), before costing any of it: with ``t`` one
     block's time at this (tp, sp, micro-batch), every knob and split costs at least
     ``(m - 1/v) L t / pp + L t / v`` (:func:`~autopar.solve.bounds.pipeline_bound`).
   * B2, an interleaved pipeline from its 1F1B twin: the same blocks per device, at least the same
     stage times, at best ``1/v`` of the bubble: ``T_1f1b - sync - optimizer - bubble (1 - 1/v)``
     (:func:`~autopar.solve.bounds.interleaved_bound`).
   * B3, the memory knobs from ``first`` (the least recompute and ZeRO allowed, costed first):
     recompute and ZeRO-3 only lengthen stages and a longer backward hides at most as much gradient
     all-reduce as it adds, so at ``first``'s ZeRO stage nothing beats ``first``; another ZeRO stage
     saves at most ``first``'s data-parallel sync and optimizer step (:func:`~autopar.solve.bounds.knob_bound`).
   * B4, any split of a 1F1B pipeline: ``(m - 1) Σ/S + Σ`` with ``Σ`` the split-invariant sum of
     the stage times (:func:`~autopar.solve.bounds.split_lower_bound`); replaces B3 there.
   * M1, memory: a knob's per-stage memory comes from ``first``'s workload without timing it; it is
     costed only if it fits under the even split or, for 1F1B, under some split.
3. **Inter-op ILP** (:mod:`autopar.solve.inter_op`, :mod:`autopar.solve.refine`): every candidate
   with ``pp > 1`` and no virtual stages whose split-free lower bound beats the incumbent has its
   blocks re-split by an ILP whose objective is the estimator's step time (balancing the stem and
   the head against the repeated blocks, and stage 0's in-flight activations against memory); the
   split is re-costed by the estimator.

The returned plan carries its runner-ups and why notable configurations lost or did not fit
(``Plan.explain()``; reports draw them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from autopar.cluster import Cluster
from autopar.core.errors import InfeasibleError, PlanError
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan
from autopar.core.plan_rules import check_keys, check_moe_knobs, divisors
from autopar.core.progress import Progress
from autopar.estimator import attention_heads, kv_heads, predicted_cost, workload
from autopar.estimator.local import LayoutCalibration
from autopar.estimator.moe import expert_count
from autopar.estimator.tensor_parallel import tp_coverage
from autopar.solve import bounds, space
from autopar.solve.bounds import splittable
from autopar.solve.candidate import DEFAULT_ORDER, Candidate, SearchStats, label, make_plan
from autopar.solve.explain import attach_search, infeasible_message
from autopar.solve.placements import choose
from autopar.solve.refine import (
    block_time_s,
    refine_splits,
    split_can_fit,
    stage_capacities,
    stage_totals,
)
from autopar.tracing import trace
from cost_models import DEFAULT

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "EP_ORDER",
    "Candidate",
    "Search",
    "SearchStats",
    "axis_orders",
    "ep_orders",
    "make_plan",
    "plan",
    "space_spec",
]


def axis_orders(cluster: Cluster) -> list[tuple[str, ...]]:
    """Mesh axis orders to search, outermost first (tp innermost: inside a node). With several
    device kinds, ``pp`` outermost gives each pipeline stage its own nodes (one kind) so stages can
    be sized to their devices; ``dp`` outermost mixes kinds inside a stage. Both are searched there
    (the key ``order`` of a candidate); one kind needs only the default."""
    return [("pp", "dp", "tp"), DEFAULT_ORDER] if cluster.is_heterogeneous else [DEFAULT_ORDER]


EP_ORDER = ("pp", "dp", "tp")
"""The extra mesh order searched for expert-parallel candidates with ``pp > 1`` on one device
kind: with dp inside pp, an ep group (``ep`` consecutive dp ranks, ``Plan.groups("ep")``) is ``ep``
ranks ``tp`` apart instead of ``pp tp`` apart, so it stays inside a node where the default order
spreads it over ``pp`` nodes (Megatron-Core orders tp-cp-ep-dp-pp, pp outermost, for the same
reason); the pipeline's sends then cross nodes instead. The estimator prices both."""


def ep_orders(cluster: Cluster, order: tuple[str, ...], pp: int, ep: int) -> list[tuple[str, ...]]:
    """The mesh orders to cost for one candidate found under ``order``: ``order``, and
    :data:`EP_ORDER` too for an expert-parallel pipeline (``ep > 1``, ``pp > 1``) on one device kind."""
    if ep > 1 and pp > 1 and not cluster.is_heterogeneous and order == DEFAULT_ORDER:
        return [order, EP_ORDER]
    return [order]


class Search:
    """One run of the outer search; :func:`plan` drives it."""

    def __init__(
        self,
        graph: OpGraph,
        cluster: Cluster,
        spec: space.SpaceSpec,
        *,
        time_limit_s: float,
        progress: Progress,
        intra_op: bool = True,
    ) -> None:
        self.graph, self.cluster, self.spec = graph, cluster, spec
        self.num_blocks = len(graph.block_order)
        self.deadline = time.perf_counter() + time_limit_s
        self.fitting: list[Candidate] = []
        self.overflowing: list[Candidate] = []
        self.stats = SearchStats()
        self.progress = progress
        self.best_s = float("inf")
        self.intra_op = intra_op
        self.tp_choices: dict = {}
        """tp -> TpChoice: the placements the search uses at that tp (None: the rules default)."""
        self.block_s: dict[tuple, float] = {}
        """(tp, sp, micro-batch, ep, ep group's placement) -> one block's time per micro-batch (no
        recompute, no ZeRO). The ep group's all-to-alls sit in the block, and where the group lies
        (inside a node or over several) depends on the mesh order and pp: it is part of the key."""
        self.misses: dict[str, tuple[float, dict]] = {}
        """Per mesh, the smallest overflow among screened knobs: (bytes over, keys)."""

    def time_left_s(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.perf_counter()

    # -- evaluation
    def evaluate(self, keys: dict) -> Candidate | None:
        """Cost ``keys`` with the estimator (``estimate`` is exactly ``workload`` then
        ``predicted_cost``; the workload is kept to screen the pipeline's other memory knobs)."""
        self.stats.evaluated += 1
        try:
            plan = make_plan(keys, self.spec.global_batch, self.spec.mode)
            work = workload(self.graph, self.cluster, plan)
            cost = predicted_cost(work, plan, self.cluster, DEFAULT)
        except PlanError as e:
            self.stats.invalid += 1
            self.stats.invalid_reasons.setdefault(label(keys), str(e))
            return None
        cand = Candidate(keys=keys, plan=plan, cost=cost, work=work)
        if cost.fits:
            self.fitting.append(cand)
            self.best_s = min(self.best_s, cand.time_s)
        else:
            self.overflowing.append(cand)
        return cand

    # -- the intra-op level (autopar.solve.placements)
    def try_intra_op(self, top: int) -> None:
        """After the exact search over the rules' default placements: for the best ``top`` plans
        with tensor parallelism (and no sequence parallelism, a variant of the default), cost them
        again under the intra-op ILP's placements for their tp and keep the faster ones that fit.
        The result is never worse than the exact optimum over the default placements."""
        ranked = sorted(self.fitting, key=lambda c: c.time_s)[:top]
        for cand in ranked:
            if not self.intra_op or cand.plan.tp == 1 or cand.plan.sequence_parallel:
                continue
            choice = self.tp_choices.get(cand.plan.tp)
            if choice is None:
                choice = self.tp_choices[cand.plan.tp] = choose(
                    self.graph, self.cluster, cand.plan, cand.cost
                )
                self.stats.intra_op[cand.plan.tp] = choice.to_dict()
            better = choice.better_than(self.graph, self.cluster, cand)
            if better is not None:
                self.stats.evaluated += 1
                self.fitting.append(better)
                self.best_s = min(self.best_s, better.time_s)

    def add_split(self, even: Candidate, better: Candidate) -> None:
        """A re-split candidate replaces its even-split twin among the fitting ones."""
        if even in self.fitting:
            self.fitting.remove(even)
        self.fitting.append(better)
        self.best_s = min(self.best_s, better.time_s)
        self.stats.refined += 1

    # -- the search
    def run(self) -> None:
        meshes = sorted(space.meshes(self.spec), key=lambda m: (-m[1], m[2]))  # likely winners first
        orders = axis_orders(self.cluster)
        self.stats.space_size = space.size(self.spec) * len(orders)
        if not self.cluster.is_heterogeneous:  # the EP_ORDER twins of expert-parallel pipelines
            self.stats.space_size += space.size(self.spec, expert_pipelines_only=True)
        self.progress.start("planning", total=len(meshes) * len(orders))
        for order, (dp, tp, pp) in ((o, m) for o in orders for m in meshes):
            twins: dict[tuple, Candidate] = {}  # (mbs, sp) -> the 1F1B pipeline's first candidate
            sps = sorted({sp for sp, _, _ in space.knobs(self.spec, tp, dp)})
            eps = space.expert_degrees(self.spec, dp)
            combos = [(sp, ep, o) for sp in sps for ep in eps for o in ep_orders(self.cluster, order, pp, ep)]
            for mbs, schedule, vpp in space.pipelines(self.spec, dp, pp):  # 1F1B before its twins
                for sp, ep, mesh_order in combos:
                    if self.out_of_time():
                        self.progress.finish("time limit reached: returning the best plan so far")
                        return
                    base = dict(dp=dp, tp=tp, pp=pp, mbs=mbs, schedule=schedule, vpp=vpp, sp=sp)
                    if ep > 1:
                        base["ep"] = ep
                    if mesh_order != DEFAULT_ORDER:
                        base["order"] = mesh_order
                    if self.skip(base, twins.get((mbs, sp, ep, mesh_order))):
                        self.stats.pruned += self._num_knobs(base)
                        continue
                    first = self._knobs(base)
                    if first is not None and schedule == "1f1b":
                        twins[mbs, sp, ep, mesh_order] = first
            self.progress.advance(f"dp={dp} tp={tp} pp={pp}  best {self.best_s:.3g}s")
        self.progress.finish(f"{self.stats.evaluated} plans costed")

    def out_of_time(self) -> bool:
        """Past the deadline with an incumbent (without one the search goes on: a plan is needed)."""
        if self.fitting and time.perf_counter() > self.deadline:
            self.stats.status = "time_limit"
        return self.stats.status == "time_limit"

    def _num_knobs(self, base: dict) -> int:
        knobs = space.knobs(self.spec, base["tp"], base["dp"], base.get("ep", 1))
        return sum(1 for k in knobs if k[0] == base["sp"])

    def skip(self, base: dict, twin: Candidate | None) -> bool:
        """Whether no knob of this pipeline (``base``: its keys but recompute and ZeRO) can beat the
        incumbent, before costing any of it: B1, and B2 from its 1F1B ``twin``."""
        if self.pipeline_bound(base) >= self.best_s:
            return True
        if base["schedule"] != "interleaved" or twin is None:
            return False
        return bounds.interleaved_bound(twin.cost, base["vpp"]) >= self.best_s

    def pipeline_bound(self, base: dict) -> float:
        """B1 (:func:`~autopar.solve.bounds.pipeline_bound`) for the pipeline ``base`` from the
        block time learnt at its (tp, sp, micro-batch); 0 before one is known."""
        return bounds.pipeline_bound(
            self.block_s.get(self._block_key(base)),
            num_micro_batches=self.spec.global_batch // (base["dp"] * base["mbs"]),
            pp=base["pp"],
            vpp=base["vpp"],
            num_blocks=self.num_blocks,
            heterogeneous=self.cluster.is_heterogeneous,
        )

    def learn_block_time(self, first: Candidate) -> None:
        """Remember one block's time at ``first``'s (tp, sp, micro-batch), for :meth:`pipeline_bound`."""
        key = self._block_key(first.keys)
        if key not in self.block_s and first.work is not None:
            t = block_time_s(first.work, first.plan.mode)
            if t is not None:
                self.block_s[key] = t

    def _block_key(self, keys: dict) -> tuple:
        """The key of :attr:`block_s`: what one block's time depends on."""
        ep = keys.get("ep", 1)
        where = None
        if ep > 1:  # the nodes the first ep group spans and its ranks per node
            sizes = {"dp": keys["dp"], "pp": keys["pp"], "tp": keys["tp"]}
            order = keys.get("order", DEFAULT_ORDER)
            stride = math.prod(sizes[a] for a in order[order.index("dp") + 1 :])
            nodes = {(i * stride) // self.cluster.devices_per_node for i in range(ep)}
            where = (len(nodes), math.ceil(ep / len(nodes)))
        return (keys["tp"], keys["sp"], keys["mbs"], ep, where)

    def _knobs(self, base: dict) -> Candidate | None:
        """Memory knobs for one (mesh, pipeline, sp), cheapest first; returns the first candidate.

        ``first`` (the least recompute and ZeRO allowed) is costed and bounds the others
        (:meth:`knob_bound`); a knob that passes the bound is screened for memory with ``first``'s
        workload (its stages do not depend on recompute or ZeRO) and costed only if it fits under
        some split of the blocks."""
        allowed = space.knobs(self.spec, base["tp"], base["dp"], base.get("ep", 1))
        knobs = [(rc, z) for sp, rc, z in allowed if sp == base["sp"]]
        if not knobs:
            return None
        first = self.evaluate(dict(base, recompute=knobs[0][0], zero=knobs[0][1]))
        if first is None:  # the mesh breaks a rule (e.g. tp does not divide a width): all knobs do
            self.stats.invalid += len(knobs) - 1
            return None
        self.learn_block_time(first)
        for rc, z in knobs[1:]:
            if self.knob_bound(first, (rc, z)) >= self.best_s:
                self.stats.pruned += 1
                continue
            keys = dict(base, recompute=rc, zero=z)
            if not self.may_fit(first, keys):
                self.stats.screened += 1
                continue
            cand = self.evaluate(keys)
            if cand is not None:
                cand.work = None
        first.work = None  # done with it: keep the candidate lists light
        return first

    def may_fit(self, first: Candidate, keys: dict) -> bool:
        """Whether ``keys`` (same pipeline as ``first``) fits memory under the even split or, when
        the blocks may be split unevenly, under some split. Overflows are remembered per mesh so
        the closest miss can still be explained (:meth:`cost_closest_misses`)."""
        plan = make_plan(keys, self.spec.global_batch, self.spec.mode)
        capacity = stage_capacities(first.work, self.cluster)
        overflow = max(used - cap for used, cap in zip(stage_totals(first.work, plan), capacity))
        if overflow <= 0:
            return True
        mesh = label(keys)
        if mesh not in self.misses or overflow < self.misses[mesh][0]:
            self.misses[mesh] = (overflow, keys)
        return splittable(plan, self.num_blocks) and split_can_fit(first.work, plan, capacity)

    def cost_closest_misses(self) -> None:
        """Cost the screened knob that came closest to fitting, for every mesh where nothing fits
        and nothing costed came closer (explanations and the infeasibility message use them)."""
        fitting = {label(c.keys) for c in self.fitting}
        closest: dict[str, float] = {}
        for c in self.overflowing:
            mesh = label(c.keys)
            closest[mesh] = min(closest.get(mesh, float("inf")), c.overflow_bytes)
        for mesh, (overflow, keys) in self.misses.items():
            if mesh not in fitting and overflow < closest.get(mesh, float("inf")):
                self.evaluate(keys)

    def knob_bound(self, first: Candidate, knob: tuple[str, int]) -> float:
        """B3 / B4 (:func:`~autopar.solve.bounds.knob_bound`): a lower bound on the step time of the
        memory knob ``(recompute, zero)`` at ``first``'s mesh and pipeline."""
        return bounds.knob_bound(first, knob[1], self.num_blocks, self.cluster)


def plan(
    model_or_graph: OpGraph | torch.nn.Module,
    cluster: Cluster,
    *,
    global_batch: int,
    mode: str = "train",
    example_inputs: tuple | None = None,
    loss_fn: Callable | None = None,
    num_targets: int | None = None,
    time_limit_s: float = 60.0,
    top_k: int = 5,
    fixed: dict | None = None,
    allow_cross_node_tp: bool = False,
    progress: bool = True,
    intra_op: bool = True,
    profile: bool | LayoutCalibration = False,
) -> Plan:
    """The fastest plan that fits ``cluster``, with runner-ups and explanations attached.

    ``model_or_graph``: an :class:`~autopar.core.ir.OpGraph`, or an ``nn.Module`` with
    ``example_inputs`` (and ``loss_fn``); as in :func:`autopar.compile`, the last ``num_targets``
    example inputs (default 1 with a ``loss_fn``) are the loss's targets. ``fixed``: plan keys the user chose (``{"tp": 8}``); the
    planner searches the rest. Raises :class:`~autopar.core.errors.InfeasibleError` when nothing fits.

    ``profile=True`` (profiled mode, for a cluster that is this machine: ``Cluster.local(N)``):
    plan with measured numbers instead of nominal ones: this model's per-op times with the
    per-rank thread count, and the N-process layout's compute contention, gloo collectives,
    optimizer and per-step costs (:mod:`autopar.estimator.local`; cached on disk). A
    :class:`~autopar.estimator.local.LayoutCalibration` instead of True: that layout's numbers
    (``autopar.compile`` measures them with its own ranks).
    """
    t0 = time.perf_counter()
    graph = _as_graph(model_or_graph, example_inputs, loss_fn, num_targets)
    if profile:
        layout = profile if isinstance(profile, LayoutCalibration) else None
        cluster = profiled_cluster(
            graph, cluster, model_or_graph, example_inputs, loss_fn, num_targets, progress, layout
        )
    spec = space_spec(graph, cluster, global_batch, mode, fixed, allow_cross_node_tp)
    search = Search(
        graph,
        cluster,
        spec,
        time_limit_s=time_limit_s,
        progress=Progress(enabled=progress),
        intra_op=intra_op,
    )
    search.run()
    refine_splits(search)
    search.try_intra_op(top=max(top_k, 3))
    search.cost_closest_misses()
    if not search.fitting:
        search.stats.solve_time_s = time.perf_counter() - t0
        raise _infeasible(search)
    ranked = sorted(search.fitting, key=lambda c: c.time_s)
    search.stats.solve_time_s = time.perf_counter() - t0
    best = ranked[0]
    best.plan.predicted = best.cost
    if search.stats.status != "optimal":
        search.stats.gap = max(0.0, 1.0 - best.cost.mfu)
    attach_search(best.plan, ranked, search, top_k=top_k, cluster=cluster)
    _report_replicated(graph, best.plan)
    if profile and graph.local_profile is not None:
        best.plan.search["profiled"] = graph.local_profile.summary()
    return best.plan


def profiled_cluster(
    graph: OpGraph,
    cluster: Cluster,
    model_or_graph: OpGraph | torch.nn.Module,
    example_inputs: tuple | None,
    loss_fn: Callable | None,
    num_targets: int | None,
    progress: bool,
    layout: LayoutCalibration | None = None,
) -> Cluster:
    """Measure this machine for ``cluster``'s layout and ``graph``'s ops; the cluster with the
    measured link (the graph carries the profile). PlanError when the cluster is not this machine."""
    from autopar.estimator import local

    if not local.is_local(cluster):
        raise PlanError(
            f"profile=True measures this machine, but cluster {cluster.name!r} is not a local CPU cluster; "
            "use Cluster.local(N) (CLI: --cluster local:N), or plan without profiling"
        )
    if example_inputs is None:
        raise PlanError("profiled planning runs the model's ops: pass example_inputs")
    layout = layout or local.calibrate_layout(cluster.num_devices, progress=progress)
    retrace = None
    if not isinstance(model_or_graph, OpGraph):

        def retrace(inputs: tuple) -> OpGraph:
            return trace(model_or_graph, inputs, loss_fn=loss_fn, num_targets=num_targets)

    prof = local.profile_model(graph, example_inputs, retrace, layout, progress=progress)
    return local.apply(cluster, graph, prof)


def _report_replicated(graph: OpGraph, plan: Plan) -> None:
    """Never silent: what the chosen ``tp`` leaves replicated for lack of a rule goes on
    ``plan.search`` (``Plan.explain`` prints it) and to the log."""
    coverage = tp_coverage(graph, plan.tp) if plan.tp > 1 else None
    if coverage is None:
        return
    plan.search["tensor_parallel"] = {
        "param_share": coverage.param_share,
        "replicated": list(coverage.replicated),
    }
    if coverage.replicated:
        log.warning(
            "tp=%d shards %.1f %% of the parameter elements; run replicated for lack of a rule:\n  %s",
            plan.tp,
            100 * coverage.param_share,
            "\n  ".join(coverage.replicated),
        )


def _as_graph(
    model_or_graph: OpGraph | torch.nn.Module,
    example_inputs: tuple | None,
    loss_fn: Callable | None,
    num_targets: int | None,
) -> OpGraph:
    if isinstance(model_or_graph, OpGraph):
        return model_or_graph
    if example_inputs is None:
        raise PlanError("autopar.plan needs example_inputs when given a model (or pass autopar.trace(...))")
    return trace(model_or_graph, example_inputs, loss_fn=loss_fn, num_targets=num_targets)


def space_spec(
    graph: OpGraph,
    cluster: Cluster,
    global_batch: int,
    mode: str,
    fixed: dict | None,
    allow_cross_node_tp: bool,
) -> space.SpaceSpec:
    """The search space of ``graph`` on ``cluster``: its layers, the head counts read off the graph
    (the smallest, and the key/value heads, both must be divisible by tp) and the user's keys."""
    heads = attention_heads(graph)
    fixed = check_keys(fixed or {})
    unshardable = _unshardable_tp(graph, cluster, fixed)
    experts = expert_count(graph)
    if experts:  # a fixed knob the expert-parallel runtime does not build: say so, do not search
        check_moe_knobs(ep=fixed.get("ep", 1), zero=fixed.get("zero", 0), sp=bool(fixed.get("sp", 0)))
    return space.SpaceSpec(
        num_devices=cluster.num_devices,
        devices_per_node=cluster.devices_per_node,
        num_layers=max(len(graph.block_order), 1),
        heads=min(heads) if heads else None,
        kv_heads=kv_heads(graph),
        global_batch=global_batch,
        mode=mode,
        allow_cross_node_tp=allow_cross_node_tp,
        fixed=fixed,
        unshardable_tp=unshardable,
        one_micro_batch=any(n.meta.get("batch_statistics") for n in graph.nodes),
        experts=experts,
    )


def _unshardable_tp(graph: OpGraph, cluster: Cluster, fixed: dict) -> frozenset[int]:
    """The tensor-parallel degrees whose layout shards no parameter (the lowering would refuse
    them); a ``tp`` the user fixed among them is an error that says why."""
    out = set()
    for tp in divisors(cluster.num_devices):
        if tp == 1 or (fixed.get("tp", tp) != tp):
            continue
        coverage = tp_coverage(graph, tp)
        if coverage is not None and coverage.param_share == 0.0:
            out.add(tp)
    if fixed.get("tp") in out:
        coverage = tp_coverage(graph, fixed["tp"])
        why = "; ".join(coverage.replicated[:3]) or "no op's rule can split its weights"
        raise PlanError(
            f"tp={fixed['tp']}: this model cannot be tensor-parallelised: no parameter would be "
            f"sharded ({why}); use dp or pp instead"
        )
    return frozenset(out)


def _infeasible(search: Search) -> InfeasibleError:
    message, details = infeasible_message(search)
    return InfeasibleError(message, details)

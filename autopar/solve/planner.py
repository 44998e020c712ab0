"""``autopar.plan``: the fastest plan that fits, found by enumeration, bounds and an ILP.

1. **Outer search** (:mod:`autopar.solve.space`): meshes ``dp·tp·pp = N``, micro-batch size,
   schedule and virtual stages, sequence parallelism, recompute and ZeRO. Every candidate is costed
   by the estimator ``autopar estimate`` uses, so a plan's predicted cost is reproducible with
   ``autopar estimate --plan``.
2. **Bounds** (all valid under the cost model, so pruning never loses the optimum):

   * For one (mesh, micro-batch, schedule, sp) the cheapest memory knobs (no recompute, ZeRO-0) are
     costed first. Other knobs only add recompute FLOPs and collectives, so their time is at least
     that time; ZeRO >= 1 can save at most the optimizer-step share and the exposed gradient
     all-reduce, which the bound subtracts. A knob whose bound is not below the incumbent is skipped.
   * Memory falls monotonically along the knobs: if the most frugal setting (full recompute, ZeRO-3)
     does not fit, none does, and the pipeline is skipped after two evaluations.
   * An interleaved schedule with ``v`` virtual stages can at best divide the 1F1B bubble by ``v``
     (it adds p2p), so it is costed only when ``T_1f1b - bubble·(1 - 1/v)`` beats the incumbent.
3. **Inter-op ILP** (:mod:`autopar.solve.inter_op`): for the best candidates with ``pp > 1`` the
   blocks are re-split across stages to balance the stem (embedding) and head (LM head + loss)
   against the repeated blocks; the split is kept only when the estimator confirms it.

The returned plan carries its runner-ups and why notable configurations lost or did not fit
(``Plan.explain()``; reports draw them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from autopar.errors import InfeasibleError, PlanError
from autopar.plan import Plan, PredictedCost
from autopar.progress import Progress
from autopar.solve import space
from autopar.solve.refine import refine_stages

log = logging.getLogger(__name__)
FRUGAL = ("full", 3)


@dataclass(kw_only=True)
class Candidate:
    keys: dict
    plan: Plan
    cost: PredictedCost

    @property
    def time_s(self) -> float:
        return self.cost.step_time_s

    @property
    def overflow_bytes(self) -> float:
        return self.cost.memory_bytes_per_device - self.cost.memory_capacity_bytes


@dataclass(kw_only=True)
class SearchStats:
    space_size: int = 0
    evaluated: int = 0
    pruned: int = 0
    invalid: int = 0
    solve_time_s: float = 0.0
    status: str = "optimal"
    """``optimal``: the whole space was covered (pruning is exact); ``time_limit``: incumbent."""
    invalid_reasons: dict[str, str] = field(default_factory=dict)


def make_plan(keys: dict, global_batch: int, mode: str) -> Plan:
    return Plan.manual(
        dp=keys["dp"],
        tp=keys["tp"],
        pp=keys["pp"],
        global_batch=global_batch,
        micro_batch_size=keys["mbs"],
        schedule=keys["schedule"],
        virtual_stages=keys["vpp"],
        recompute=keys["recompute"],
        sequence_parallel=bool(keys["sp"]),
        zero_stage=keys["zero"],
        mode=mode,
    )


class Search:
    """One run of the outer search; :func:`plan` drives it."""

    def __init__(self, graph, cluster, spec: space.SpaceSpec, *, time_limit_s: float, progress: Progress):
        self.graph, self.cluster, self.spec = graph, cluster, spec
        self.deadline = time.perf_counter() + time_limit_s
        self.fitting: list[Candidate] = []
        self.overflowing: list[Candidate] = []
        self.stats = SearchStats()
        self.progress = progress
        self.best_s = float("inf")

    # -- evaluation
    def evaluate(self, keys: dict) -> Candidate | None:
        from autopar.estimator import estimate

        self.stats.evaluated += 1
        try:
            plan = make_plan(keys, self.spec.global_batch, self.spec.mode)
            cost = estimate(self.graph, self.cluster, plan)
        except PlanError as e:
            self.stats.invalid += 1
            self.stats.invalid_reasons.setdefault(mesh_label(keys), str(e))
            return None
        cand = Candidate(keys=keys, plan=plan, cost=cost)
        if cost.fits:
            self.fitting.append(cand)
            self.best_s = min(self.best_s, cand.time_s)
        else:
            self.overflowing.append(cand)
        return cand

    # -- the search
    def run(self) -> None:
        meshes = sorted(space.meshes(self.spec), key=lambda m: (-m[1], m[2]))  # likely winners first
        self.stats.space_size = space.size(self.spec)
        self.progress.start("planning", total=len(meshes))
        for dp, tp, pp in meshes:
            for mbs, schedule, vpp in space.pipelines(self.spec, dp, pp):
                if schedule == "interleaved":
                    continue  # costed from its 1F1B twin below
                if time.perf_counter() > self.deadline:
                    self.stats.status = "time_limit"
                    self.progress.finish("time limit reached: returning the best plan so far")
                    return
                self._pipeline(dict(dp=dp, tp=tp, pp=pp, mbs=mbs, schedule=schedule, vpp=vpp))
            self.progress.advance(f"dp={dp} tp={tp} pp={pp}  best {self.best_s:.3g}s")
        self.progress.finish(f"{self.stats.evaluated} plans costed")

    def _pipeline(self, base: dict) -> None:
        sps = [sp for sp, rc, z in space.knobs(self.spec, base["tp"]) if (rc, z) == ("none", 0)]
        sps = sps or sorted({sp for sp, _, _ in space.knobs(self.spec, base["tp"])})
        for sp in sps:
            first = self._knobs(dict(base, sp=sp))
            if first is not None and base["pp"] > 1 and base["schedule"] == "1f1b":
                self._interleaved(dict(base, sp=sp), first)

    def _knobs(self, base: dict) -> Candidate | None:
        """Memory knobs for one (mesh, pipeline, sp); returns the cheapest-knob candidate."""
        knobs = [(rc, z) for sp, rc, z in space.knobs(self.spec, base["tp"]) if sp == base["sp"]]
        if not knobs:
            return None
        first = self.evaluate(dict(base, recompute=knobs[0][0], zero=knobs[0][1]))
        if first is None:
            return None
        rest = knobs[1:]
        if not first.cost.fits and FRUGAL in rest:
            frugal = self.evaluate(dict(base, recompute=FRUGAL[0], zero=FRUGAL[1]))
            rest.remove(FRUGAL)
            if frugal is None or not frugal.cost.fits:
                self.stats.pruned += len(rest)
                return first
        for rc, z in rest:
            if self._knob_bound(first, z) >= self.best_s:
                self.stats.pruned += 1
                continue
            self.evaluate(dict(base, recompute=rc, zero=z))
        return first

    def _knob_bound(self, first: Candidate, zero: int) -> float:
        if zero == 0:
            return first.time_s
        b = first.cost.breakdown_s
        return first.time_s - b.get("optimizer", 0.0) - b.get("dp_comm_exposed", 0.0)

    def _interleaved(self, base: dict, one_f_one_b: Candidate) -> None:
        for mbs, schedule, vpp in space.pipelines(self.spec, base["dp"], base["pp"]):
            if schedule != "interleaved" or mbs != base["mbs"]:
                continue
            bubble = one_f_one_b.cost.breakdown_s.get("pp_bubble", 0.0)
            knob_bound = one_f_one_b.time_s - one_f_one_b.cost.breakdown_s.get("optimizer", 0.0)
            if one_f_one_b.cost.fits and knob_bound - bubble * (1 - 1 / vpp) >= self.best_s:
                self.stats.pruned += 1
                continue
            self._knobs(dict(base, schedule="interleaved", vpp=vpp))


def mesh_label(keys: dict) -> str:
    return f"dp={keys['dp']} tp={keys['tp']} pp={keys['pp']}"


def plan(
    model_or_graph,
    cluster,
    *,
    global_batch: int,
    mode: str = "train",
    example_inputs: tuple | None = None,
    loss_fn=None,
    time_limit_s: float = 60.0,
    top_k: int = 5,
    fixed: dict | None = None,
    allow_cross_node_tp: bool = False,
    progress: bool = True,
) -> Plan:
    """The fastest plan that fits ``cluster``, with runner-ups and explanations attached.

    ``model_or_graph``: an :class:`~autopar.ir.OpGraph`, or an ``nn.Module`` with
    ``example_inputs`` (and ``loss_fn``). ``fixed``: plan keys the user chose (``{"tp": 8}``); the
    planner searches the rest. Raises :class:`~autopar.errors.InfeasibleError` when nothing fits.
    """
    from autopar.solve.explain import attach_search

    t0 = time.perf_counter()
    graph = _as_graph(model_or_graph, example_inputs, loss_fn)
    spec = _space_spec(graph, cluster, global_batch, mode, fixed, allow_cross_node_tp)
    search = Search(graph, cluster, spec, time_limit_s=time_limit_s, progress=Progress(enabled=progress))
    search.run()
    if not search.fitting:
        search.stats.solve_time_s = time.perf_counter() - t0
        raise _infeasible(search)
    ranked = sorted(search.fitting, key=lambda c: c.time_s)
    ranked = refine_stages(graph, cluster, ranked[: max(top_k, 3)], search) + ranked[max(top_k, 3) :]
    ranked.sort(key=lambda c: c.time_s)
    search.stats.solve_time_s = time.perf_counter() - t0
    best = ranked[0]
    best.plan.predicted = best.cost
    attach_search(best.plan, ranked, search, top_k=top_k, cluster=cluster)
    return best.plan


def _as_graph(model_or_graph, example_inputs, loss_fn):
    from autopar.ir import OpGraph

    if isinstance(model_or_graph, OpGraph):
        return model_or_graph
    if example_inputs is None:
        raise PlanError("autopar.plan needs example_inputs when given a model (or pass autopar.trace(...))")
    from autopar.tracing import trace

    return trace(model_or_graph, example_inputs, loss_fn=loss_fn)


def _space_spec(graph, cluster, global_batch, mode, fixed, allow_cross_node_tp) -> space.SpaceSpec:
    from autopar.estimator import _heads
    from autopar.plan_keys import check_keys

    heads = _heads(graph)
    return space.SpaceSpec(
        num_devices=cluster.num_devices,
        devices_per_node=cluster.devices_per_node,
        num_layers=max(len(graph.block_order), 1),
        heads=min(heads) if heads else None,
        kv_heads=None,
        global_batch=global_batch,
        mode=mode,
        allow_cross_node_tp=allow_cross_node_tp,
        fixed=check_keys(fixed or {}),
    )


def _infeasible(search: Search) -> InfeasibleError:
    from autopar.solve.explain import infeasible_message

    message, details = infeasible_message(search)
    return InfeasibleError(message, details)

"""Profile-guided planning for the machine we run on: measured numbers replace the nominal ones.

On a cluster that is this machine (``Cluster.local(N)``: N gloo processes on C cores) nothing in
the datasheet world applies: a "device" is a share of a core, processes contend for cores and
memory bandwidth, gloo collectives cost hundreds of microseconds, and the fixed costs a GPU hides
(Python dispatch per op, the optimizer's per-tensor loop) dominate a small model. So the profiled
mode measures, once per *device and process layout* (cached on disk), and once per *model* (per-op
times, cached by op signature):

* **Layout** (:func:`calibrate_layout`, N real gloo processes with ``cores // N`` threads each, as
  the launcher runs them): the compute slowdown of N processes computing at once over one computing
  alone (contention, oversubscription and whatever else the machine runs); ``all_reduce`` over the
  N ranks at several sizes, fitted to the ring model (per-hop latency, link bandwidth); the AdamW
  step per parameter element and per parameter tensor while all ranks step at once; and the fixed
  per-step cost of the runtime's own collectives (barrier-free scalar all-reduce of the loss).
* **Model** (:func:`profile_model`): every op's forward and backward at two batch sizes (the
  example's and 1) with the per-rank thread count. Two points give each op a fixed part (dispatch,
  autograd bookkeeping: what makes micro-batching cost more than its FLOPs) and a part proportional
  to the batch (divided by tp where the layout splits the op), see
  :func:`autopar.estimator.blocks.scaled_measured`.

:class:`LocalProfile` holds both; :func:`apply` returns the cluster with the measured link and the
graph with the profile attached, and the estimator (hence the planner and ``autopar estimate``)
uses them for every plan it costs. Nothing here is fitted to plans or models: the layout numbers
come from synthetic kernels and collectives, the model numbers from the model's own ops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from autopar.cluster import Cluster, Link
from autopar.core.errors import AutoparError
from autopar.core.ir import OpGraph
from autopar.core.progress import Progress
from autopar.estimator.layout_probe import (
    BIG_ELEMS,
    FSDP_UNIT_BYTES,
    SMALL_TENSORS,
    measure_layout,
    single_layout,
    spawn_layout,
)
from autopar.estimator.profile import profile
from cost_models import Calibration, GroupSpec, LinkSpec, collective_time_s

log = logging.getLogger(__name__)

LAYOUT_VERSION = 9


def cache_dir() -> Path:
    """``$AUTOPAR_CACHE`` or ``~/.cache/autopar``: where measurements live between runs."""
    return Path(os.environ.get("AUTOPAR_CACHE") or Path.home() / ".cache" / "autopar")


def threads_per_rank(ranks: int) -> int:
    """The intra-op threads each of ``ranks`` local processes gets (what the launcher sets)."""
    return max(1, (os.cpu_count() or 1) // ranks)


# ------------------------------------------------------------------------------ the layout
@dataclass(kw_only=True)
class LayoutCalibration:
    """Measured numbers of N local processes of this machine (model-independent)."""

    ranks: int
    threads: int
    machine: str
    slowdown: float
    """Wall time per op with all N ranks computing at once / the op's time on an idle core (the
    profiler's clock): contention, oversubscription and other load on the machine."""
    latency_s: float
    """Per-hop latency of the ring fit of ``all_reduce`` over the N ranks."""
    bandwidth_bytes_per_s: float
    """Link bandwidth of the same fit."""
    optimizer_s_per_element: float
    """AdamW step, per parameter element, all ranks stepping at once."""
    optimizer_s_per_tensor: float
    """AdamW step, per parameter tensor (the foreach loop's fixed cost)."""
    step_overhead_s: float
    """A scalar all-reduce (the runtime's global loss) and its synchronisation, once per step."""
    optimizer_s_per_sharded_tensor: float = 0.0
    """AdamW step per DTensor-sharded parameter (ZeRO-2/3 run FSDP2, whose parameters are DTensors)."""
    slowdown_busy: float = 0.0
    """Like ``slowdown``, but every rank computing without pause (its wall time over a loop of
    kernels, not each kernel's median): what ranks that never wait see when there are more of them
    than cores. 0: not measured (use ``slowdown``)."""
    cores: int = 0
    """CPU cores of the machine (0: unknown)."""
    slowdown_cores: float = 0.0
    """With more ranks than cores: the slowdown with as many ranks computing as there are cores and
    the others waiting (what a pipeline's ranks see while some idle in the bubble). 0: not measured."""
    all_gather_scale: float = 1.0
    """All-gather's measured time per byte over the ring model's at ``bandwidth_bytes_per_s``."""
    reduce_scatter_scale: float = 1.0
    """The same for reduce-scatter."""
    fsdp_unit_s: tuple[float, float] = (0.0, 0.0)
    """FSDP2's own cost per wrapped unit and micro-batch, for ZeRO-2 and ZeRO-3: a model of
    ``FSDP_UNITS`` small blocks stepped with and without ``fully_shard``, less the collectives the
    cost model charges for a unit itself (:func:`_fsdp_framework_s`): hooks, DTensor bookkeeping."""
    measured_at: str = ""
    source: dict = field(default_factory=dict)
    """The raw measurements (sizes and times) the numbers were fitted on."""

    def to_json(self) -> dict:
        return {"version": LAYOUT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> LayoutCalibration:
        if d.get("version") != LAYOUT_VERSION:
            raise AutoparError(f"layout calibration version {d.get('version')!r}; expected {LAYOUT_VERSION}")
        fields = {k: v for k, v in d.items() if k != "version"}
        fields["fsdp_unit_s"] = tuple(fields.get("fsdp_unit_s", (0.0, 0.0)))
        return cls(**fields)


def machine_key() -> str:
    """Which machine the numbers belong to: CPU model, core count, torch version."""
    return f"{platform.processor() or platform.machine()}:{os.cpu_count()}cores:torch{torch.__version__}"


def local_calibration(layout: LayoutCalibration, calib: Calibration) -> Calibration:
    """Cost-model constants for this machine: gloo's measured link is used as is (no NCCL
    efficiency or base latency on top), all-gather and reduce-scatter at their measured scale; ops
    run eagerly (no fusion); FSDP's parameter gathers do not overlap compute (on CPU there are no
    side streams: FSDP2 issues and waits for each gather on the compute thread); ZeRO runs as
    autopar's runtime runs it (``Calibration.zero_fsdp2``)."""
    return calib.with_(
        all_gather_time_scale=layout.all_gather_scale,
        reduce_scatter_time_scale=layout.reduce_scatter_scale,
        intra_node_efficiency=1.0,
        inter_node_efficiency=1.0,
        collective_base_latency_s=0.0,
        fuse_elementwise=False,
        fused_norms=False,
        fuse_sibling_gemms=False,
        zero3_prefetch_overlap=False,
        zero_fsdp2=True,
    )


def _fsdp_framework_s(layout: LayoutCalibration, measured_s: float, gathers: int) -> float:
    """FSDP's cost per unit and micro-batch less the collectives the cost model charges for a unit
    by itself (``gathers`` all-gathers, 1 for ZeRO-2 and 2 for ZeRO-3, and a reduce-scatter of its
    parameters, :func:`cost_models.step.zero3_counts` and ``dp_exposed_s``), evaluated for the
    probe's unit on the probe's group: what is left is FSDP's framework work (hooks, DTensor
    bookkeeping, buffer copies)."""
    group = GroupSpec(
        size=layout.ranks,
        ranks_per_node=layout.ranks,
        intra=LinkSpec(bandwidth_bytes_per_s=layout.bandwidth_bytes_per_s, latency_s=layout.latency_s),
    )
    calib = local_calibration(layout, Calibration())
    charged = gathers * collective_time_s("all_gather", FSDP_UNIT_BYTES, group, calib=calib)
    charged += collective_time_s("reduce_scatter", FSDP_UNIT_BYTES, group, calib=calib)
    return max(measured_s - charged, 0.0)


def fit_layout(ranks: int, threads: int, raw: dict) -> LayoutCalibration:
    """The layout's numbers from its raw measurements (what ``measure_layout`` returns)."""
    sizes = sorted(raw["all_reduce"])
    ts = [raw["all_reduce"][s] for s in sizes]
    # time = c0 + c1 * size: the slope from the two largest messages (latency and skew cancel),
    # the intercept from the two smallest (where the bandwidth term is negligible)
    c1 = (ts[-1] - ts[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0.0
    hops = 2 * (ranks - 1)
    if c1 <= 0:  # no slope (noise at every size): the largest message's time bounds the bandwidth
        c1 = ts[-1] / sizes[-1]
    c0 = statistics.median(t - c1 * x for x, t in zip(sizes[:2], ts[:2]))
    bandwidth = (hops / ranks) / c1
    latency = max(c0, 0.0) / hops
    gather_scale, scatter_scale = (_collective_scale(raw.get(k), ranks, bandwidth) for k in _SCALED)
    # AdamW: big = T + E*N_big ; small = K*T + E*K*n_small
    k, n_small = SMALL_TENSORS
    e = (raw["adamw_big_s"] - raw["adamw_small_s"] / k) / (BIG_ELEMS - n_small)
    e = max(e, raw["adamw_big_s"] / BIG_ELEMS / 2)
    per_tensor = max((raw["adamw_small_s"] - e * k * n_small) / k, 0.0)
    layout = LayoutCalibration(
        ranks=ranks,
        threads=threads,
        machine=machine_key(),
        slowdown=max(
            min(raw.get("slowdown_rounds") or [raw["kernel_together_s"] / max(raw["kernel_alone_s"], 1e-9)]),
            1.0,
        ),
        latency_s=latency,
        bandwidth_bytes_per_s=bandwidth,
        optimizer_s_per_element=e,
        optimizer_s_per_tensor=per_tensor,
        step_overhead_s=raw["scalar_all_reduce_s"],
        optimizer_s_per_sharded_tensor=raw.get("adamw_dtensor_s_per_tensor", per_tensor),
        fsdp_unit_s=(raw.get("fsdp2_unit_s", 0.0), raw.get("fsdp3_unit_s", 0.0)),
        slowdown_busy=max(min(raw.get("slowdown_busy_rounds") or [0.0]), 0.0),
        slowdown_cores=max(min(raw.get("slowdown_cores_rounds") or [0.0]), 0.0),
        all_gather_scale=gather_scale,
        reduce_scatter_scale=scatter_scale,
        cores=os.cpu_count() or 0,
        measured_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        source={k: v for k, v in raw.items()},
    )
    if ranks > 1:
        two, three = layout.fsdp_unit_s
        layout.fsdp_unit_s = (_fsdp_framework_s(layout, two, 1), _fsdp_framework_s(layout, three, 2))
    return layout


_SCALED = ("all_gather", "reduce_scatter")
_SCALE_BAND = (0.25, 8.0)


def _collective_scale(times: dict | None, ranks: int, bandwidth: float) -> float:
    """A kind's measured time per byte (slope between its two sizes: latency and skew cancel) over
    the ring model's ``(n-1)/n / bandwidth`` at the all-reduce's bandwidth, clamped to
    ``_SCALE_BAND``; 1.0 when not measured or without a slope (noise)."""
    if not times or len(times) < 2:
        return 1.0
    sizes = sorted(times, key=int)
    slope = (times[sizes[-1]] - times[sizes[-2]]) / (int(sizes[-1]) - int(sizes[-2]))
    if slope <= 0:
        return 1.0
    return min(max(slope / ((ranks - 1) / ranks / bandwidth), _SCALE_BAND[0]), _SCALE_BAND[1])


def calibrate_layout(
    ranks: int, *, refresh: bool = False, timeout_s: float = 120.0, progress: bool = True
) -> LayoutCalibration:
    """The measured numbers of ``ranks`` local processes (cached per machine and rank count)."""
    if ranks < 1:
        raise AutoparError(f"calibrate_layout: ranks={ranks}; need >= 1")
    threads = threads_per_rank(ranks)
    path = _layout_path(ranks)
    if path.exists() and not refresh:
        try:
            return LayoutCalibration.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, AutoparError) as e:
            log.warning("layout calibration cache %s unreadable (%s); measuring again", path, e)
    bar = Progress(enabled=progress)
    bar.start(f"measuring {ranks} local process(es): compute contention, gloo all-reduce, AdamW", 1)
    raw = spawn_layout(ranks, threads, timeout_s) if ranks > 1 else single_layout(threads)
    cal = fit_layout(max(ranks, 2), threads, raw)
    cal.ranks = ranks
    bar.advance("done")
    bar.finish(
        f"slowdown x{cal.slowdown:.2f}, all-reduce {1e6 * cal.latency_s:.0f} us/hop "
        f"{cal.bandwidth_bytes_per_s / 1e9:.2f} GB/s, AdamW {1e9 * cal.optimizer_s_per_element:.2f} ns/elem"
    )
    _save_layout(path, cal)
    return cal


def calibrate_in_group(*, refresh: bool = False) -> LayoutCalibration:
    """:func:`calibrate_layout` measured by the ranks of the running default process group (every
    rank calls it): the real processes, with their real thread counts. Used by ``autopar.compile``,
    whose ranks may not spawn more processes."""
    import torch.distributed as dist

    ranks, rank = dist.get_world_size(), dist.get_rank()
    path = _layout_path(ranks)
    box: list = [None]
    if rank == 0 and path.exists() and not refresh:
        try:
            box[0] = LayoutCalibration.from_json(json.loads(path.read_text())).to_json()
        except (ValueError, TypeError, AutoparError):
            box[0] = None
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        if rank == 0:
            log.info("measuring %d local ranks: compute contention, gloo all-reduce, AdamW", ranks)
        raw = measure_layout(rank, ranks)
        cal = fit_layout(ranks, torch.get_num_threads(), raw)
        if rank == 0:
            _save_layout(path, cal)
        box = [cal.to_json()]
        dist.broadcast_object_list(box, src=0)
    return LayoutCalibration.from_json(box[0])


def _layout_path(ranks: int) -> Path:
    return cache_dir() / "layouts" / f"{machine_key()}-ranks{ranks}.json".replace("/", "_")


def _save_layout(path: Path, cal: LayoutCalibration) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cal.to_json(), indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------ the model
@dataclass(kw_only=True)
class LocalProfile:
    """A model's per-op times and the layout's numbers: what the estimator needs in profiled mode."""

    layout: LayoutCalibration
    op_times: dict[str, tuple[float, float, float, float]]
    """Per graph node: (forward, backward) seconds at the graph's batch on an idle core, and their
    fixed parts (the extrapolation to batch 0 of the two measured batch sizes)."""
    graph_batch: int
    profile_s: float = 0.0

    def summary(self) -> dict:
        """What the plan records about the measurements it was made with (``plan.search``)."""
        lay = self.layout
        return {
            "ranks": lay.ranks,
            "threads_per_rank": lay.threads,
            "machine": lay.machine,
            "measured_at": lay.measured_at,
            "compute_slowdown": lay.slowdown,
            "all_reduce_latency_s_per_hop": lay.latency_s,
            "all_reduce_bandwidth_bytes_per_s": lay.bandwidth_bytes_per_s,
            "adamw_s_per_element": lay.optimizer_s_per_element,
            "adamw_s_per_tensor": lay.optimizer_s_per_tensor,
            "step_overhead_s": lay.step_overhead_s,
            "profiled_ops": len(self.op_times),
            "profile_batch": self.graph_batch,
        }

    def slowdown_for(self, plan: Any) -> float:
        """The compute slowdown ``plan`` sees. With no more ranks than cores it is the measured
        ``slowdown``. With more (N ranks on C cores) it depends on how many ranks compute at once:
        A = N * u, where u is the share of the step a rank computes (1 without a pipeline; a
        pipeline rank idles in the bubble: u = m / (m + (p-1)/v)). Measured at A = C
        (``slowdown_cores``) and at A = N (the busy measurement: memory contention per core
        ``slowdown_busy / (N/C)`` times the time-slicing N/C), linear in between, and
        ``slowdown_cores`` below C. Without ``slowdown_cores``: contention times A/C."""
        lay = self.layout
        cores = lay.cores or os.cpu_count() or 1
        if not lay.slowdown_busy or lay.ranks <= cores:
            return lay.slowdown
        m, p, v = plan.num_micro_batches, plan.pp, plan.virtual_stages
        busy = 1.0 if p == 1 else m / (m + (p - 1) / v)
        per_core = max(lay.slowdown_busy / (lay.ranks / cores), 1.0)
        active = lay.ranks * busy
        if not lay.slowdown_cores:
            return per_core * max(active / cores, 1.0)
        # measured at both ends: ``cores`` ranks computing (slowdown_cores) and all of them; between
        # the two the time-slicing grows linearly with the ranks computing at once
        everyone = per_core * lay.ranks / cores
        return lay.slowdown_cores + (everyone - lay.slowdown_cores) * max(active - cores, 0.0) / (
            lay.ranks - cores
        )

    def times_for(
        self, graph_batch: int, slowdown: float | None = None
    ) -> dict[str, tuple[float, float, float, float]]:
        """The op times with the slowdown applied (the layout's, or ``slowdown``: the estimator's
        ``op_times``)."""
        k = self.layout.slowdown if slowdown is None else slowdown
        if graph_batch != self.graph_batch:
            raise AutoparError(
                f"the profile was measured at batch {self.graph_batch}, the graph has batch {graph_batch}"
            )
        return {n: tuple(k * v for v in t) for n, t in self.op_times.items()}  # type: ignore[misc]

    def fixed_step_s(self, plan: Any, units: int) -> float:
        """The runtime's fixed costs per step on this machine: the loss all-reduce, and under
        ZeRO-2/3 (FSDP2, dp > 1) FSDP's own cost per wrapped unit (``units`` on the busiest rank)
        and micro-batch (each micro-batch's forward gathers every unit again)."""
        lay = self.layout
        out = lay.step_overhead_s
        if plan.zero_stage >= 2 and plan.dp > 1:
            out += lay.fsdp_unit_s[plan.zero_stage - 2] * units * plan.num_micro_batches
        return out

    def calibration(self, calib: Calibration) -> Calibration:
        """Cost-model constants for this machine (:func:`local_calibration`)."""
        return local_calibration(self.layout, calib)

    def optimizer_bytes_per_param(
        self, graph: OpGraph, rates: Any, calib: Calibration, *, zero_stage: int = 0, dp: int = 1
    ) -> float:
        """The measured AdamW step as the cost model's bytes per (sharded) parameter: per element,
        plus the per-tensor cost spread over the model's mean tensor size (a DTensor's under
        ZeRO-2/3, whose tensors are 1/dp of the size: each rank still steps every tensor)."""
        tensors = max(len(graph.params), 1)
        elems = sum(math.prod(p["shape"]) for p in graph.params.values()) or 1
        lay = self.layout
        if zero_stage >= 2 and dp > 1:
            per_tensor, elems = lay.optimizer_s_per_sharded_tensor, elems / dp
        else:
            per_tensor, elems = lay.optimizer_s_per_tensor, elems / (dp if zero_stage == 1 else 1)
        per_elem = lay.optimizer_s_per_element + per_tensor * tensors / elems
        return per_elem * rates.hbm_bytes_per_s * calib.hbm_efficiency


def profile_model(
    graph: OpGraph,
    example_inputs: Sequence[Any],
    retrace: Callable[[tuple], OpGraph] | None,
    layout: LayoutCalibration,
    *,
    progress: bool = True,
) -> LocalProfile:
    """Per-op times of ``graph`` with the layout's threads per rank, at the graph's batch and at
    batch 1 (``retrace(inputs)`` traces the model at another batch; without it, or when the batch-1
    graph's nodes differ, the ops' times scale in proportion to the batch with no fixed part)."""
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(layout.threads)
    cache = cache_dir() / "ops.json"
    try:
        full = profile(graph, tuple(example_inputs), cache_path=cache, progress=progress).op_times
        small: dict[str, tuple[float, float]] = {}
        b = graph.batch_size
        if retrace is not None and b > 1:
            one = tuple(
                x[:1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == b else x
                for x in example_inputs
            )
            g1 = retrace(one)
            if [n.name for n in g1.nodes] == [n.name for n in graph.nodes]:
                small = profile(g1, one, cache_path=cache, progress=progress).op_times
            else:
                log.info(
                    "profiled mode: the batch-1 graph differs from the example's; ops scale with the batch"
                )
    finally:
        torch.set_num_threads(before)
    times: dict[str, tuple[float, float, float, float]] = {}
    for name, (f, bw) in full.items():
        f1, b1 = small.get(name, (None, None))
        times[name] = (f, bw, _intercept(f, f1, b), _intercept(bw, b1, b))
    return LocalProfile(
        layout=layout, op_times=times, graph_batch=graph.batch_size, profile_s=time.perf_counter() - t0
    )


def _intercept(t_b: float, t_1: float | None, b: int) -> float:
    """The fixed part of an op's time from its time at batch ``b`` and at batch 1 (a line through
    both points, at batch 0), clamped to ``[0, min(t_1, t_b)]``."""
    if t_1 is None or b <= 1:
        return 0.0
    slope = (t_b - t_1) / (b - 1)
    return min(max(t_1 - slope, 0.0), t_1, t_b)


def is_local(cluster: Cluster) -> bool:
    """The cluster is processes of this machine: one node of ``cpu`` devices (``Cluster.local``)."""
    return not cluster.is_heterogeneous and cluster.nodes == 1 and cluster.device.name == "cpu"


def apply(cluster: Cluster, graph: OpGraph, prof: LocalProfile) -> Cluster:
    """The cluster with the measured link; the graph carries the profile (``graph.local_profile``)."""
    if cluster.num_devices != prof.layout.ranks:
        raise AutoparError(
            f"the profile is for {prof.layout.ranks} local ranks, the cluster has {cluster.num_devices} devices"
        )
    link = Link(
        prof.layout.bandwidth_bytes_per_s,
        prof.layout.latency_s,
        f"measured: gloo all_reduce over {prof.layout.ranks} local ranks ({prof.layout.measured_at})",
    )
    graph.local_profile = prof
    return dataclasses.replace(cluster, intra_node=link, inter_node=link)


__all__ = [
    "LayoutCalibration",
    "LocalProfile",
    "apply",
    "cache_dir",
    "calibrate_in_group",
    "calibrate_layout",
    "is_local",
    "local_calibration",
    "machine_key",
    "profile_model",
    "threads_per_rank",
]

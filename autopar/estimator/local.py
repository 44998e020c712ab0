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
import queue as queue_module
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from autopar.cluster import Cluster, Link
from autopar.core.errors import AutoparError, RuntimeFailure
from autopar.core.ir import OpGraph
from autopar.core.progress import Progress
from autopar.estimator.profile import profile
from autopar.estimator.profile_comm import free_port
from cost_models import Calibration, GroupSpec, LinkSpec, collective_time_s

log = logging.getLogger(__name__)

LAYOUT_VERSION = 9
_AR_SIZES = (1 << 10, 16 << 10, 256 << 10, 2 << 20, 8 << 20, 32 << 20)
"""All-reduce sizes measured: the two largest set the bandwidth (their difference cancels the
latency and the arrival skew), the two smallest the latency. Up to 2 MiB only, a least-squares
slope through points dominated by latency and skew varied 5x between calibrations (2 ranks:
0.65 and 3.27 GB/s; now 1.31-1.47 GB/s over three)."""
_COLLECTIVE_ROUNDS = 3
_BIG_ELEMS = 1 << 21
_SMALL = (64, 1024)  # 64 tensors of 1024 elements


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
    ``_FSDP_UNITS`` small blocks stepped with and without ``fully_shard``, less the collectives the
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


def _layout_worker(rank: int, ranks: int, port: int, threads: int, timeout_s: float, queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=ranks,
            timeout=timedelta(seconds=timeout_s),
        )
        out = _measure_layout(rank, ranks)
        dist.barrier()
        if rank == 0:
            queue.put(("ok", out))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises a typed error
        queue.put(("error", f"rank {rank}: {e!r}"))


def reference_kernel() -> Callable[[], object]:
    """A small training-like workload (GEMMs, an activation, a norm, backward)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g, requires_grad=True)
    w1 = torch.randn(256, 1024, generator=g, requires_grad=True)
    w2 = torch.randn(1024, 256, generator=g, requires_grad=True)

    def run() -> object:
        y = torch.nn.functional.layer_norm(torch.nn.functional.gelu(x @ w1) @ w2, (256,))
        y.sum().backward()
        return y

    return run


def _median_time(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return statistics.median(samples)


def _measure_layout(rank: int, ranks: int) -> dict:
    import torch.distributed as dist

    def slowest(t: float) -> float:
        v = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v)

    kernel = reference_kernel()
    out: dict = {}
    # compute: rank 0 alone on the process CPU clock (what the profiler measures), then all ranks at
    # once on the wall clock; five rounds, the least contended one counts (fit_layout): a burst of
    # other load on the machine inflates a round, never deflates it, as runs keep their fastest time
    ratios, alones, togethers = [], [], []
    for _ in range(5):
        dist.barrier()
        alone = slowest(_median_time(kernel, 7, time.process_time) if rank == 0 else 0.0)
        dist.barrier()
        together = slowest(_median_time(kernel, 7))
        alones.append(alone)
        togethers.append(together)
        ratios.append(together / max(alone, 1e-9))
    out["kernel_alone_s"] = statistics.median(alones)
    out["kernel_together_s"] = statistics.median(togethers)
    out["slowdown_rounds"] = ratios
    # all ranks busy without pause: a loop's wall time per kernel (time slices included)
    busy = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(9):
            kernel()
        busy.append(slowest((time.perf_counter() - t0) / 9) / max(out["kernel_alone_s"], 1e-9))
    out["slowdown_busy_rounds"] = busy
    # more ranks than cores: as many computing as there are cores, the others waiting at the barrier
    cores = os.cpu_count() or 1
    if ranks > cores:
        partial = []
        for _ in range(5):
            dist.barrier()
            t = _median_time(kernel, 7) if rank < cores else 0.0
            partial.append(slowest(t) / max(out["kernel_alone_s"], 1e-9))
        out["slowdown_cores_rounds"] = partial

    # all_reduce at several sizes, issued as the runtime issues them: right after a compute kernel,
    # so a call includes the ranks' arrival skew (the first to arrive waits for the last). What a
    # collective adds to the step is its transfer plus the expected skew: the mean over ranks of
    # each rank's median time (back-to-back calls would leave the skew out)
    def mean_over_ranks(t: float) -> float:
        v = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(v)
        return float(v) / ranks

    def after_kernel(call: Callable[[], object], calls: int) -> float:
        samples = []
        for i in range(calls + 2):
            kernel()
            t0 = time.perf_counter()
            call()
            if i >= 2:
                samples.append(time.perf_counter() - t0)
        return mean_over_ranks(statistics.median(samples))

    # all-gather and reduce-scatter at the two sizes that set the all-reduce's bandwidth: gloo runs
    # each kind its own way (its ring all-reduce is not two of its all-gathers), so each kind's
    # bandwidth term is scaled by what it measured against the ring model (_collective_scale).
    # Three rounds over every size, each size keeping its fastest round: a burst of other load on
    # the machine (this VM's neighbours) inflates a round, never deflates it (one round measured a
    # 1 KiB all-reduce at 13 ms where the others measured 2-5 ms)
    out["all_reduce"], out["all_gather"], out["reduce_scatter"] = {}, {}, {}
    for _ in range(_COLLECTIVE_ROUNDS):
        timed = {}
        for size in _AR_SIZES:
            x = torch.ones(size // 4)
            timed["all_reduce", size] = after_kernel(lambda x=x: dist.all_reduce(x), 10)
        for size in _AR_SIZES[-2:]:
            full = torch.ones(size // 4 // ranks * ranks)
            part = torch.ones(full.numel() // ranks)
            timed["all_gather", size] = after_kernel(
                lambda f=full, p=part: dist.all_gather_into_tensor(f, p), 6
            )
            timed["reduce_scatter", size] = after_kernel(
                lambda f=full, p=part: dist.reduce_scatter_tensor(p, f), 6
            )
        for (kind, size), t in timed.items():
            out[kind][size] = min(out[kind].get(size, t), t)
    # the step's scalar loss all-reduce
    s = torch.zeros(1)
    out["scalar_all_reduce_s"] = slowest(_median_time(lambda: dist.all_reduce(s), 20))
    # AdamW: one big tensor vs many small ones, every rank stepping at once
    big = [torch.zeros(_BIG_ELEMS, requires_grad=True)]
    small = [torch.zeros(_SMALL[1], requires_grad=True) for _ in range(_SMALL[0])]
    for params in (big, small):
        for p in params:
            p.grad = torch.ones_like(p)
    times = {}
    for name, params in (("big", big), ("small", small)):
        opt = torch.optim.AdamW(params, lr=1e-4)
        dist.barrier()
        times[name] = slowest(_median_time(opt.step, 7))
    out["adamw_big_s"], out["adamw_small_s"] = times["big"], times["small"]
    # ZeRO-2/3 run FSDP2, whose parameters are DTensors: the optimizer dispatches every op per
    # tensor through DTensor, a per-tensor cost far above the plain foreach loop's
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (ranks,))
        sharded = [
            torch.nn.Parameter(distribute_tensor(torch.zeros(_SMALL[1] * ranks), mesh, [Shard(0)]))
            for _ in range(_SMALL[0] // 4)
        ]
        for p in sharded:
            p.grad = distribute_tensor(torch.ones(_SMALL[1] * ranks), mesh, [Shard(0)])
        opt = torch.optim.AdamW(sharded, lr=1e-4)
        dist.barrier()
        out["adamw_dtensor_s_per_tensor"] = slowest(_median_time(opt.step, 5)) / len(sharded)
        plain = _fsdp_probe(None, mesh, slowest)
        for stage in (2, 3):
            per = (_fsdp_probe(stage, mesh, slowest) - plain) / (_FSDP_UNITS + 1)
            out[f"fsdp{stage}_unit_s"] = max(per, 0.0)
    return out


_FSDP_UNITS = 8
_FSDP_UNIT_BYTES = 6 * (32 * 32 + 32) * 4
"""Parameter bytes of one probe unit (6 fp32 ``Linear(32, 32)``)."""


def _fsdp_probe(zero_stage: int | None, mesh: Any, slowest: Callable[[float], float]) -> float:
    """Forward + backward of ``_FSDP_UNITS`` blocks of 6 small Linears (12 tensors, like a
    transformer layer's), each block and the root under ``fully_shard`` (None: plain)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)]) for _ in range(_FSDP_UNITS)]
    model = torch.nn.Sequential(*blocks)
    if zero_stage is not None:
        for b in blocks:
            fully_shard(b, mesh=mesh, reshard_after_forward=zero_stage == 3)
        fully_shard(model, mesh=mesh, reshard_after_forward=zero_stage == 3)
    x = torch.randn(8, 32)

    def step() -> None:
        model(x).sum().backward()

    dist.barrier()
    samples = [_median_time(step, 5) for _ in range(3)]
    return slowest(min(samples))


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
    charged = gathers * collective_time_s("all_gather", _FSDP_UNIT_BYTES, group, calib=calib)
    charged += collective_time_s("reduce_scatter", _FSDP_UNIT_BYTES, group, calib=calib)
    return max(measured_s - charged, 0.0)


def fit_layout(ranks: int, threads: int, raw: dict) -> LayoutCalibration:
    """The layout's numbers from its raw measurements (what ``_measure_layout`` returns)."""
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
    k, n_small = _SMALL
    e = (raw["adamw_big_s"] - raw["adamw_small_s"] / k) / (_BIG_ELEMS - n_small)
    e = max(e, raw["adamw_big_s"] / _BIG_ELEMS / 2)
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
    raw = _spawn_layout(ranks, threads, timeout_s) if ranks > 1 else _single_layout(threads)
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
        raw = _measure_layout(rank, ranks)
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


def _single_layout(threads: int) -> dict:
    """One process: no collectives; compute and AdamW measured here with the rank's threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel = reference_kernel()
        alone = _median_time(kernel, 15, time.process_time if threads == 1 else time.perf_counter)
        together = _median_time(kernel, 15)
        big = [torch.zeros(_BIG_ELEMS, requires_grad=True)]
        small = [torch.zeros(_SMALL[1], requires_grad=True) for _ in range(_SMALL[0])]
        out = {"kernel_alone_s": alone, "kernel_together_s": together, "scalar_all_reduce_s": 0.0}
        for name, params in (("big", big), ("small", small)):
            for p in params:
                p.grad = torch.ones_like(p)
            out[f"adamw_{name}_s"] = _median_time(torch.optim.AdamW(params, lr=1e-4).step, 7)
        out["all_reduce"] = {s: 1e-6 + s * 1e-12 for s in _AR_SIZES}  # unused with one rank
        return out
    finally:
        torch.set_num_threads(before)


def _spawn_layout(ranks: int, threads: int, timeout_s: float) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_layout_worker, args=(r, ranks, port, threads, timeout_s, queue), daemon=True)
        for r in range(ranks)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 60
    try:
        while True:  # poll: a rank that dies (e.g. cannot import the caller's __main__) fails fast
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)]
                if dead or time.monotonic() > deadline:
                    why = (
                        f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]}"
                        if dead
                        else "timed out"
                    )
                    raise RuntimeFailure(
                        f"calibrate_layout: no result from {ranks} local gloo ranks ({why}); is 127.0.0.1 "
                        "reachable, the machine not overloaded, and the caller's script guarded by "
                        "`if __name__ == '__main__':` (processes are spawned)?"
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeFailure(f"calibrate_layout failed: {payload}")
    return payload


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

"""The layout measurements of the profiled mode: what N real gloo processes of this machine time
(:func:`measure_layout`, on every rank), spawned by :func:`spawn_layout` or inside a running group
(:func:`autopar.estimator.local.calibrate_in_group`); one process: :func:`single_layout`.
:func:`autopar.estimator.local.fit_layout` turns the raw numbers into a
:class:`~autopar.estimator.local.LayoutCalibration`. Split from ``local.py`` by responsibility:
this module measures, that one fits, caches and applies."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from autopar.estimator.profile_comm import join_gloo, spawn_ranks

AR_SIZES = (1 << 10, 16 << 10, 256 << 10, 2 << 20, 8 << 20, 32 << 20)
"""All-reduce sizes measured: the two largest set the bandwidth (their difference cancels the
latency and the arrival skew), the two smallest the latency. Up to 2 MiB only, a least-squares
slope through points dominated by latency and skew varied 5x between calibrations (2 ranks:
0.65 and 3.27 GB/s; now 1.31-1.47 GB/s over three)."""
COLLECTIVE_ROUNDS = 3
BIG_ELEMS = 1 << 21
SMALL_TENSORS = (64, 1024)  # 64 tensors of 1024 elements


def layout_worker(rank: int, ranks: int, port: int, threads: int, timeout_s: float, queue: Any) -> None:
    import torch.distributed as dist

    try:
        join_gloo(rank, ranks, port, threads, timeout_s)
        out = measure_layout(rank, ranks)
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


def median_time(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return statistics.median(samples)


def measure_layout(rank: int, ranks: int) -> dict:
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
        alone = slowest(median_time(kernel, 7, time.process_time) if rank == 0 else 0.0)
        dist.barrier()
        together = slowest(median_time(kernel, 7))
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
            t = median_time(kernel, 7) if rank < cores else 0.0
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
    for _ in range(COLLECTIVE_ROUNDS):
        timed = {}
        for size in AR_SIZES:
            x = torch.ones(size // 4)
            timed["all_reduce", size] = after_kernel(lambda x=x: dist.all_reduce(x), 10)
        for size in AR_SIZES[-2:]:
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
    out["scalar_all_reduce_s"] = slowest(median_time(lambda: dist.all_reduce(s), 20))
    # AdamW: one big tensor vs many small ones, every rank stepping at once
    big = [torch.zeros(BIG_ELEMS, requires_grad=True)]
    small = [torch.zeros(SMALL_TENSORS[1], requires_grad=True) for _ in range(SMALL_TENSORS[0])]
    for params in (big, small):
        for p in params:
            p.grad = torch.ones_like(p)
    times = {}
    for name, params in (("big", big), ("small", small)):
        opt = torch.optim.AdamW(params, lr=1e-4)
        dist.barrier()
        times[name] = slowest(median_time(opt.step, 7))
    out["adamw_big_s"], out["adamw_small_s"] = times["big"], times["small"]
    # ZeRO-2/3 run FSDP2, whose parameters are DTensors: the optimizer dispatches every op per
    # tensor through DTensor, a per-tensor cost far above the plain foreach loop's
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (ranks,))
        sharded = [
            torch.nn.Parameter(distribute_tensor(torch.zeros(SMALL_TENSORS[1] * ranks), mesh, [Shard(0)]))
            for _ in range(SMALL_TENSORS[0] // 4)
        ]
        for p in sharded:
            p.grad = distribute_tensor(torch.ones(SMALL_TENSORS[1] * ranks), mesh, [Shard(0)])
        opt = torch.optim.AdamW(sharded, lr=1e-4)
        dist.barrier()
        out["adamw_dtensor_s_per_tensor"] = slowest(median_time(opt.step, 5)) / len(sharded)
        plain = fsdp_probe(None, mesh, slowest)
        for stage in (2, 3):
            per = (fsdp_probe(stage, mesh, slowest) - plain) / (FSDP_UNITS + 1)
            out[f"fsdp{stage}_unit_s"] = max(per, 0.0)
    return out


FSDP_UNITS = 8
FSDP_UNIT_BYTES = 6 * (32 * 32 + 32) * 4
"""Parameter bytes of one probe unit (6 fp32 ``Linear(32, 32)``)."""


def fsdp_probe(zero_stage: int | None, mesh: Any, slowest: Callable[[float], float]) -> float:
    """Forward + backward of ``FSDP_UNITS`` blocks of 6 small Linears (12 tensors, like a
    transformer layer's), each block and the root under ``fully_shard`` (None: plain)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)]) for _ in range(FSDP_UNITS)]
    model = torch.nn.Sequential(*blocks)
    if zero_stage is not None:
        for b in blocks:
            fully_shard(b, mesh=mesh, reshard_after_forward=zero_stage == 3)
        fully_shard(model, mesh=mesh, reshard_after_forward=zero_stage == 3)
    x = torch.randn(8, 32)

    def step() -> None:
        model(x).sum().backward()

    dist.barrier()
    samples = [median_time(step, 5) for _ in range(3)]
    return slowest(min(samples))


def single_layout(threads: int) -> dict:
    """One process: no collectives; compute and AdamW measured here with the rank's threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel = reference_kernel()
        alone = median_time(kernel, 15, time.process_time if threads == 1 else time.perf_counter)
        together = median_time(kernel, 15)
        big = [torch.zeros(BIG_ELEMS, requires_grad=True)]
        small = [torch.zeros(SMALL_TENSORS[1], requires_grad=True) for _ in range(SMALL_TENSORS[0])]
        out = {"kernel_alone_s": alone, "kernel_together_s": together, "scalar_all_reduce_s": 0.0}
        for name, params in (("big", big), ("small", small)):
            for p in params:
                p.grad = torch.ones_like(p)
            out[f"adamw_{name}_s"] = median_time(torch.optim.AdamW(params, lr=1e-4).step, 7)
        out["all_reduce"] = {s: 1e-6 + s * 1e-12 for s in AR_SIZES}  # unused with one rank
        return out
    finally:
        torch.set_num_threads(before)


def spawn_layout(ranks: int, threads: int, timeout_s: float) -> dict:
    """:func:`measure_layout` on ``ranks`` spawned processes with ``threads`` threads each."""
    return spawn_ranks("calibrate_layout", layout_worker, ranks, (threads, timeout_s), timeout_s)


__all__ = [
    "AR_SIZES",
    "BIG_ELEMS",
    "COLLECTIVE_ROUNDS",
    "FSDP_UNITS",
    "FSDP_UNIT_BYTES",
    "SMALL_TENSORS",
    "fsdp_probe",
    "layout_worker",
    "measure_layout",
    "median_time",
    "reference_kernel",
    "single_layout",
    "spawn_layout",
]

"""Measured all-reduce bandwidth and latency of a local gloo group (part of the profiler).

``measure_collectives(ranks=2)`` spawns ``ranks`` real processes, times ``all_reduce`` of float32
tensors of several sizes (warm-up, then the median of ``repeats``, the slowest rank's time per
call), and fits the ring model by least squares::

    t(D) = 2(p-1) * latency_s + 2(p-1)/p * D / bandwidth_bytes_per_s

so the result's ``link`` is a :class:`~autopar.cluster.hardware.Link`-shaped dict for the cluster's
``intra_node`` level (``Cluster.local(ranks, intra_node_bandwidth_bytes_per_s=..., ...)``).
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from autopar.core.errors import RuntimeFailure

log = logging.getLogger(__name__)

DEFAULT_SIZES_BYTES = (4 * 1024, 64 * 1024, 1 << 20, 4 << 20, 16 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(what: str, target: Any, ranks: int, args: tuple, timeout_s: float) -> Any:
    """Run ``target(rank, ranks, port, *args, queue)`` in ``ranks`` spawned processes forming a gloo
    group on ``127.0.0.1:port``; returns the payload rank 0 puts as ``("ok", payload)``. Raises
    :class:`~autopar.core.errors.RuntimeFailure` naming ``what`` when a rank reports an error,
    dies (polled, so it fails fast: e.g. it cannot import the caller's ``__main__``) or nothing
    arrives within ``timeout_s + 60``; the processes are then killed."""
    import queue as queue_module

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(r, ranks, port, *args, queue), daemon=True) for r in range(ranks)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 60
    try:
        while True:
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
                        f"{what}: no result from {ranks} local gloo ranks ({why}); is 127.0.0.1 reachable, "
                        "the machine not overloaded, and the caller's script guarded by "
                        "`if __name__ == '__main__':` (processes are spawned)?"
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeFailure(f"{what} failed: {payload}")
    return payload


def join_gloo(rank: int, ranks: int, port: int, threads: int, timeout_s: float) -> None:
    """In a rank :func:`spawn_ranks` started: ``threads`` intra-op threads, then the local gloo group
    on ``port`` (``timeout_s``: the process group's timeout, so a dead peer fails, never hangs)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=ranks,
        timeout=timedelta(seconds=timeout_s),
    )


def _worker(  # runs in a spawned process
    rank: int, ranks: int, port: int, sizes: Sequence[int], repeats: int, timeout_s: float, queue: Any
) -> None:
    import torch
    import torch.distributed as dist

    try:
        join_gloo(rank, ranks, port, 1, timeout_s)
        times = {}
        for size in sizes:
            x = torch.ones(max(size // 4, 1))
            for _ in range(2):
                dist.all_reduce(x)
            samples = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                samples.append(float(t))
            times[size] = statistics.median(samples)
        dist.barrier()
        if rank == 0:
            queue.put(("ok", times))
        dist.destroy_process_group()
    except Exception as e:  # reported to the parent, which raises a typed error
        queue.put(("error", f"rank {rank}: {e!r}"))


def _fit(sizes: Sequence[float], times: Sequence[float], ranks: int) -> tuple[float, float]:
    """Least-squares line t = c0 + c1 * D; returns (latency_s per hop, bandwidth bytes/s)."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    c1 = sum((x - mx) * (y - my) for x, y in zip(sizes, times, strict=True)) / sxx
    c0 = my - c1 * mx
    hops = 2 * (ranks - 1)
    bandwidth = (hops / ranks) / c1 if c1 > 0 else float("inf")
    return max(c0, 0.0) / hops, bandwidth


def measure_collectives(
    ranks: int = 2,
    *,
    sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES,
    repeats: int = 10,
    timeout_s: float = 60.0,
) -> dict:
    """All-reduce times of a local gloo group of ``ranks`` processes and the fitted link.

    Returns ``{"ranks", "sizes_bytes", "times_s", "bus_bytes_per_s", "link": {"bandwidth_bytes_per_s",
    "latency_s", "source"}}`` (``bus_bytes_per_s``: NCCL-tests' bus bandwidth per size). Raises
    :class:`~autopar.core.errors.RuntimeFailure` if a rank fails or the group does not finish within
    ``timeout_s`` (the processes are then killed).
    """

    if ranks < 2 or len(sizes_bytes) < 2:
        raise RuntimeFailure(
            f"measure_collectives: ranks={ranks}, {len(sizes_bytes)} sizes; need ranks >= 2 and >= 2 sizes to fit"
        )
    payload = spawn_ranks(
        "measure_collectives", _worker, ranks, (tuple(sizes_bytes), repeats, timeout_s), timeout_s
    )
    return fit_times(ranks, payload)


def fit_times(ranks: int, times: dict) -> dict:
    """``measure_collectives``'s result from its times per size (the ring fit, see the module doc)."""
    sizes = sorted(times)
    ts = [times[s] for s in sizes]
    latency_s, bandwidth = _fit(sizes, ts, ranks)
    bus = [2 * (ranks - 1) / ranks * s / t for s, t in zip(sizes, ts, strict=True)]
    fit = f"ring fit over {len(sizes)} sizes"
    if bandwidth == float("inf"):
        # Times that do not grow with size are noise (a busy machine), not an infinitely fast link:
        # take the largest message's bus bandwidth, no latency, and say so.
        bandwidth, latency_s = bus[-1], 0.0
        fit = f"times did not grow with size ({_times_text(sizes, ts)}); bus bandwidth of the largest message"
        log.warning(
            "gloo all_reduce over %d ranks: %s. The machine was probably busy; rerun on a quiet machine.",
            ranks,
            fit,
        )
    log.info("gloo all_reduce over %d ranks: %.3g B/s per link, %.3g s per hop", ranks, bandwidth, latency_s)
    return {
        "ranks": ranks,
        "sizes_bytes": sizes,
        "times_s": ts,
        "bus_bytes_per_s": bus,
        "link": {
            "bandwidth_bytes_per_s": bandwidth,
            "latency_s": latency_s,
            "source": f"measured: gloo all_reduce, {ranks} local ranks, {fit}",
        },
    }


def _times_text(sizes: Sequence[int], times: Sequence[float]) -> str:
    return ", ".join(f"{s / 1024:.0f} KiB: {t * 1e3:.2f} ms" for s, t in zip(sizes, times, strict=True))

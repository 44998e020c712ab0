"""Profiler: measured per-op forward/backward times, saved activations and local collectives.

``profile(model, example_inputs, loss_fn=...)`` traces the model with its loss (or takes an
:class:`~autopar.core.ir.OpGraph`), runs the fx graph once on the example inputs to record every node's
real input tensors, then times each computing node on its own:

* **forward**: the node's target called on fresh copies of its inputs (float tensors, parameters
  included, require grad, as in training, so autograd's recording overhead is counted); warm-up,
  then the median of ``repeats`` calls (``torch.cuda.synchronize`` around each call on CUDA; on a
  single-threaded CPU run the process CPU clock, which other processes on a shared machine do not
  inflate, see :func:`resolve_clock`);
* **backward**: ``torch.autograd.grad`` of the node's differentiable outputs w.r.t. its float
  inputs (and a ``call_module``'s parameters) with a random upstream gradient, timed alone (the
  forward that builds the autograd graph is not timed); median of ``repeats``;
* **saved activations**: bytes autograd saves for backward in one forward
  (``saved_tensors_hooks``), parameters excluded.

Identical ops (same target, input shapes/dtypes, constant arguments, device and thread count)
share one measurement: a repeated transformer layer is measured once. Measurements are cached in
a JSON file keyed by that signature (``cache_path``), so a second run of the same model measures
nothing. ``Profile.op_times`` is what :func:`autopar.estimate` takes as ``op_times``.

``measure_collectives(ranks=2)`` times ``all_reduce`` in a real local gloo group (spawned
processes, timeouts) and fits the ring model ``t(D) = 2(p-1) a + 2(p-1)/p * D / B`` to give the
link bandwidth ``B`` and per-hop latency ``a`` a :class:`~autopar.cluster.Cluster` uses.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from autopar.core.errors import AutoparError, TraceError
from autopar.core.ir import OpGraph
from autopar.core.progress import Progress
from autopar.estimator.profile_comm import measure_collectives
from autopar.tracing import trace

log = logging.getLogger(__name__)

CACHE_VERSION = 1
COMPUTE_OPS = ("call_function", "call_method", "call_module")


# ------------------------------------------------------------------------------ results
@dataclass(kw_only=True)
class OpRecord:
    """One measured op signature."""

    target: str
    """The op (``aten``/``torch`` function, tensor method or module type)."""
    fwd_s: float
    """Median forward seconds."""
    bwd_s: float
    """Median backward seconds (0 when nothing differentiable flows through the op)."""
    saved_bytes: float = 0.0
    """Bytes autograd saves for backward (activations; parameters excluded)."""


@dataclass(kw_only=True)
class Profile:
    """Per-node measurements of one graph on one device."""

    device: str
    """Device key the measurements belong to (``cpu:<cpu>:threads=1:clock=cpu``, ``cuda:<name>``)."""
    records: dict[str, OpRecord] = field(default_factory=dict)
    """Per op signature."""
    nodes: dict[str, str] = field(default_factory=dict)
    """Graph node name -> op signature."""
    num_measured: int = 0
    """Signatures measured in this run (the rest came from identical ops or the cache)."""
    num_cached: int = 0
    """Signatures taken from the JSON cache."""
    profile_s: float = 0.0
    """Wall time of the profiling run."""

    @property
    def op_times(self) -> dict[str, tuple[float, float]]:
        """``{node_name: (forward_s, backward_s)}`` for :func:`autopar.estimate`."""
        return {n: (self.records[s].fwd_s, self.records[s].bwd_s) for n, s in self.nodes.items()}

    @property
    def saved_bytes(self) -> dict[str, float]:
        """``{node_name: saved activation bytes}``."""
        return {n: self.records[s].saved_bytes for n, s in self.nodes.items()}

    def total_s(self) -> tuple[float, float]:
        """Sum of forward and of backward seconds over all nodes (one step of the graph)."""
        times = self.op_times.values()
        return sum(f for f, _ in times), sum(b for _, b in times)

    def slowest(self, k: int = 10) -> list[tuple[str, str, float, float]]:
        """The ``k`` nodes with the largest forward+backward: ``(node, target, fwd_s, bwd_s)``."""
        rows = [(n, self.records[s].target, *self.op_times[n]) for n, s in self.nodes.items()]
        return sorted(rows, key=lambda r: -(r[2] + r[3]))[:k]

    def to_json(self) -> dict:
        return {
            "version": CACHE_VERSION,
            "device": self.device,
            "ops": {s: asdict(r) for s, r in self.records.items()},
            "nodes": dict(self.nodes),
            "num_measured": self.num_measured,
            "num_cached": self.num_cached,
            "profile_s": self.profile_s,
        }

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        if data.get("version") != CACHE_VERSION:
            raise AutoparError(
                f"profile JSON version {data.get('version')!r} is not {CACHE_VERSION}; re-run autopar.profile"
            )
        return cls(
            device=data["device"],
            records={s: OpRecord(**r) for s, r in data["ops"].items()},
            nodes=dict(data.get("nodes", {})),
            num_measured=int(data.get("num_measured", 0)),
            num_cached=int(data.get("num_cached", 0)),
            profile_s=float(data.get("profile_s", 0.0)),
        )

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        return cls.from_json(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------ entry point
def profile(
    model_or_graph: torch.nn.Module | OpGraph,
    example_inputs: Any = None,
    *,
    loss_fn: Callable | None = None,
    device: str | torch.device = "cpu",
    repeats: int = 7,
    warmup: int = 2,
    clock: str = "auto",
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Profile:
    """Measure every computing node of the model-with-loss graph on ``device``.

    ``model_or_graph``: an ``nn.Module`` (traced with ``example_inputs`` = ``(inputs..., targets...)``
    and ``loss_fn``) or an :class:`~autopar.core.ir.OpGraph` from :func:`autopar.trace` (then
    ``example_inputs`` are the graph's placeholder values, in order). Times are per node at the
    example batch size. ``clock``: ``auto`` (default; see :func:`resolve_clock`), ``wall`` or
    ``cpu`` (process CPU time). ``cache_path``: JSON cache of measurements, read if present and written
    after the run. Raises :class:`~autopar.core.errors.TraceError` when the graph cannot run.
    """
    if repeats < 1 or warmup < 0:
        raise AutoparError(f"profile: repeats={repeats}, warmup={warmup}; need repeats >= 1 and warmup >= 0")
    t0 = time.perf_counter()
    graph = _as_graph(model_or_graph, example_inputs, loss_fn)
    if example_inputs is None:
        raise TraceError("profile: example_inputs are needed to run the graph on real tensors")
    dev = torch.device(device)
    timer = Timer(dev, resolve_clock(clock, dev))
    gm = graph.gm.to(dev)
    inputs = _to_device(_as_tuple(example_inputs), dev)
    env = _record_values(gm, inputs)
    key = device_key(dev, timer.clock)
    prof = Profile(device=key)
    cache = _load_cache(cache_path, key)
    compute = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    bar = Progress(enabled=progress)
    bar.start(f"profiling {len(compute)} ops", len(compute))
    for node in compute:
        sig = op_signature(gm, node, env, key)
        prof.nodes[node.name] = sig
        if sig not in prof.records:
            if sig in cache:
                prof.records[sig] = cache[sig]
                prof.num_cached += 1
            else:
                prof.records[sig] = _measure(gm, node, env, timer, repeats, warmup)
                prof.num_measured += 1
        bar.advance(node.name)
    prof.profile_s = time.perf_counter() - t0
    bar.finish(f"{prof.num_measured} measured, {prof.num_cached} cached, {len(prof.nodes)} nodes")
    if cache_path is not None:
        _save_cache(cache_path, key, {**cache, **prof.records})
    return prof


def _as_graph(
    model_or_graph: torch.nn.Module | OpGraph, example_inputs: Any, loss_fn: Callable | None
) -> OpGraph:
    if isinstance(model_or_graph, OpGraph):
        if model_or_graph.gm is None:
            raise TraceError(
                "profile: this OpGraph has no fx GraphModule (loaded from JSON?); trace the model"
            )
        return model_or_graph
    if not isinstance(model_or_graph, torch.nn.Module):
        raise TraceError(f"profile: expected an nn.Module or OpGraph, got {type(model_or_graph).__name__}")
    if example_inputs is None:
        raise TraceError("profile: a model needs example_inputs=(inputs..., targets...)")
    return trace(model_or_graph, example_inputs, loss_fn=loss_fn)


def _as_tuple(x: Any) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)) else tuple(x)


def _to_device(values: tuple, dev: torch.device) -> tuple:
    return tuple(v.to(dev) if isinstance(v, torch.Tensor) else v for v in values)


def device_key(dev: torch.device, clock: str = "wall") -> str:
    """Which device (and clock) measurements belong to; CPU times depend on the thread count too."""
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    return f"{dev.type}:{cpu}:threads={torch.get_num_threads()}:clock={clock}"


def resolve_clock(clock: str, dev: torch.device) -> str:
    """``auto``: the process CPU clock for a single-threaded CPU run, else the wall clock.

    On a shared CPU the wall time of an op includes the time other processes held the core; the
    CPU time of a single-threaded process does not (it is what the op costs on an idle core). With
    several intra-op threads CPU time sums the threads, so wall time is used. CUDA: wall time
    between ``torch.cuda.synchronize`` calls.
    """
    if clock not in ("auto", "wall", "cpu"):
        raise AutoparError(f"profile: clock={clock!r}; use 'auto', 'wall' or 'cpu'")
    if clock == "cpu" and dev.type == "cuda":
        raise AutoparError("profile: clock='cpu' does not time CUDA kernels; use clock='wall' on cuda")
    if clock == "auto":
        return "cpu" if dev.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    return clock


@dataclass(frozen=True)
class Timer:
    """Times one call on a device with the chosen clock (``wall`` or ``cpu``)."""

    dev: torch.device
    clock: str = "wall"

    def now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    def __call__(self, fn: Callable[[], object]) -> float:
        _sync(self.dev)
        t0 = self.now()
        fn()
        _sync(self.dev)
        return self.now() - t0


# ------------------------------------------------------------------------------ recording
def _record_values(gm: torch.fx.GraphModule, inputs: tuple) -> dict[str, object]:
    """Every node's output on the example inputs (one no-grad run of the graph)."""
    env: dict[str, object] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            env[n.name] = out
            return out

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(placeholders):
        raise TraceError(
            f"profile: the graph takes {len(placeholders)} inputs "
            f"({', '.join(p.name for p in placeholders)}) but {len(inputs)} example inputs were given"
        )
    try:
        with torch.no_grad():
            _Recorder(gm).run(*inputs)
    except Exception as e:
        raise TraceError(f"profile: the traced graph failed on the example inputs: {e!r}") from e
    return env


def _target_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    return getattr(t, "__module__", "") and f"{t.__module__}.{getattr(t, '__name__', t)}" or str(t)


def _describe(value: Any) -> object:
    if isinstance(value, torch.Tensor):
        return ["T", list(value.shape), str(value.dtype).replace("torch.", ""), list(value.stride())]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value)


def op_signature(gm: torch.fx.GraphModule, node: torch.fx.Node, env: dict[str, Any], device: str) -> str:
    """Target + module config + input shapes/dtypes/strides + constants + device key."""
    args = torch.fx.node.map_arg(node.args, lambda a: env[a.name])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a.name])
    parts = [node.op, _target_name(gm, node), json.dumps([_describe(args), _describe(kwargs)])]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        parts.append(repr(mod) + repr(mod.training))
        parts.append(json.dumps([_describe(p) for p in mod.parameters()]))
    parts.append(device)
    return " | ".join(parts)


# ------------------------------------------------------------------------------ measuring
def _fresh(value: Any, leaves: list[torch.Tensor]) -> Any:
    """A copy of a recorded value; float tensors become grad-requiring leaves (listed)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        if t.is_floating_point():
            t.requires_grad_(True)
            leaves.append(t)
        return t
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v, leaves) for v in value)
    if isinstance(value, dict):
        return {k: _fresh(v, leaves) for k, v in value.items()}
    return value


def _callable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Callable[..., Any]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda self, *a, **k: getattr(self, node.target)(*a, **k)
    return node.target


def _out_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _out_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _out_tensors(o)]
    return []


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _measure(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    env: dict[str, Any],
    timer: Timer,
    repeats: int,
    warmup: int,
) -> OpRecord:
    fn = _callable(gm, node)
    leaves: list[torch.Tensor] = []
    args = torch.fx.node.map_arg(node.args, lambda a: _fresh(env[a.name], leaves))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: _fresh(env[a.name], leaves))
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    target = _target_name(gm, node)
    try:
        return _measure_grad(fn, args, kwargs, leaves + params, timer, repeats, warmup, target)
    except RuntimeError as e:  # in-place on a leaf, integer-only op...: forward without autograd
        log.debug("profile: %s (%s) timed without autograd: %s", node.name, target, e)
        plain = torch.fx.node.map_arg(node.args, lambda a: _fresh_nograd(env[a.name]))
        plain_kw = torch.fx.node.map_arg(node.kwargs, lambda a: _fresh_nograd(env[a.name]))
        with torch.no_grad():
            fwd = _median(lambda: fn(*plain, **plain_kw), timer, repeats, warmup)
        return OpRecord(target=target, fwd_s=fwd, bwd_s=0.0)


def _fresh_nograd(value: Any) -> Any:
    return _fresh(value, []) if not isinstance(value, torch.Tensor) else value.detach().clone()


def _median(fn: Callable[[], object], timer: Timer, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(repeats))


def _measure_grad(
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
    wrt: list[torch.Tensor],
    timer: Timer,
    repeats: int,
    warmup: int,
    target: str,
) -> OpRecord:
    with torch.enable_grad():
        fwd = _median(lambda: fn(*args, **kwargs), timer, repeats, warmup)
        saved = _saved_bytes(fn, args, kwargs, wrt)
        outs = _out_tensors(fn(*args, **kwargs))
        if not outs or not wrt:
            return OpRecord(target=target, fwd_s=fwd, bwd_s=0.0, saved_bytes=saved)
        grads = [torch.randn_like(o) for o in outs]
        times = []
        for i in range(warmup + repeats):
            outs = _out_tensors(fn(*args, **kwargs))
            t = timer(lambda o=outs: torch.autograd.grad(o, wrt, grads, allow_unused=True))
            if i >= warmup:
                times.append(t)
    return OpRecord(target=target, fwd_s=fwd, bwd_s=statistics.median(times), saved_bytes=saved)


def _saved_bytes(fn: Callable[..., Any], args: Any, kwargs: Any, wrt: list[torch.Tensor]) -> float:
    """Bytes autograd keeps for backward in one forward, parameters and duplicates excluded."""
    skip = {t.untyped_storage().data_ptr() for t in wrt if isinstance(t, torch.nn.Parameter)}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return float(sum(seen.values()))


# ------------------------------------------------------------------------------ cache
def _load_cache(path: str | os.PathLike | None, device: str) -> dict[str, OpRecord]:
    if path is None or not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
        records = Profile.from_json(data).records
    except (ValueError, KeyError, TypeError, AutoparError) as e:
        log.warning("profile cache %s unreadable (%s); measuring again", path, e)
        return {}
    return {s: r for s, r in records.items() if s.endswith(device)}


def _save_cache(path: str | os.PathLike, device: str, records: dict[str, OpRecord]) -> None:
    Profile(device=device, records=records).save(path)


__all__ = [
    "OpRecord",
    "Profile",
    "Timer",
    "resolve_clock",
    "device_key",
    "measure_collectives",
    "op_signature",
    "profile",
]

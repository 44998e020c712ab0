"""The outer search space: every mesh and knob combination the planner may choose.

A candidate is a dict of the short plan keys (``dp tp pp mbs vpp schedule recompute sp zero``),
the same vocabulary as ``autopar estimate --plan``. Keys the user fixed are kept; the rest range
over:

* ``tp``: divisors of the device count that divide the attention heads (and key/value heads) and,
  unless ``allow_cross_node_tp``, fit inside one node;
* ``pp``: divisors of ``devices / tp`` not above the number of repeated blocks;
* ``dp``: the devices left, which must divide the global batch;
* ``mbs``: divisors of the per-replica batch (capped by ``max_micro_batch``); only the whole
  per-replica batch for a model with train-mode BatchNorm (``one_micro_batch``);
* ``schedule`` / ``vpp``: ``1f1b`` (and ``gpipe`` when asked), ``interleaved`` with ``vpp`` that
  splits each stage's blocks evenly and a micro-batch count that is a multiple of ``pp``;
* ``ep`` (a model with mixture-of-experts layers): divisors of ``dp`` that divide the expert count
  (expert parallelism folds into dp); 1 otherwise;
* ``sp``: 0, and 1 when ``tp > 1``;
* ``recompute`` × ``zero``: the memory knobs, ordered cheapest first (see :data:`MEMORY_KNOBS`);
  ``zero`` only when ``dp > 1``;
* a model with mixture-of-experts layers: only the knobs the expert-parallel runtime builds
  (:func:`~autopar.core.plan_rules.moe_knobs_fit`: ``sp=0``, and ``zero=0`` when ``ep > 1``).

The legality rules are :mod:`autopar.core.plan_rules`' (the ones ``autopar estimate --plan``
applies); the rest (tp inside a node, an even split of the blocks per virtual stage, the caps) are
the search's own choices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from autopar.core.plan_rules import (
    batch_splits,
    divisors,
    ep_fits,
    interleaving_fits,
    moe_knobs_fit,
    pp_fits_layers,
    sequence_parallel_allowed,
    tp_divides_heads,
)

__all__ = [
    "MEMORY_KNOBS",
    "RECOMPUTE_ORDER",
    "SpaceSpec",
    "divisors",
    "expert_degrees",
    "knobs",
    "meshes",
    "pipelines",
    "size",
]

# Memory knobs in the order the planner tries them: each later entry saves memory and (under the
# cost model) never runs faster than the ones before it at the same mesh, so the first that fits
# is usually the fastest; the planner still evaluates all of them when the first fails.
RECOMPUTE_ORDER = ("none", "selective", "full")
"""Recompute settings by the memory they keep (most first) and the time they add (least first)."""

MEMORY_KNOBS = (
    ("none", 0),
    ("none", 1),
    ("selective", 0),
    ("selective", 1),
    ("none", 2),
    ("selective", 2),
    ("full", 0),
    ("full", 1),
    ("full", 2),
    ("none", 3),
    ("selective", 3),
    ("full", 3),
)


@dataclass(kw_only=True)
class SpaceSpec:
    """What the search space depends on: the cluster's size, the model's layers and head counts,
    the batch, the mode, the caps and the keys the user fixed."""

    num_devices: int
    devices_per_node: int
    num_layers: int
    heads: int | None
    kv_heads: int | None
    global_batch: int
    mode: str = "train"
    allow_cross_node_tp: bool = False
    max_micro_batch: int = 64
    max_virtual_stages: int = 8
    schedules: tuple[str, ...] = ("1f1b", "interleaved")
    fixed: dict | None = None
    """Keys the user chose; the planner searches only the others."""
    unshardable_tp: frozenset[int] = frozenset()
    """Degrees at which the tensor-parallel layout shards no parameter (no op has a rule that splits
    a weight): the lowering refuses them, so the space leaves them out."""
    one_micro_batch: bool = False
    """The model normalises with batch statistics (train-mode BatchNorm): ``mbs`` is the whole
    per-replica batch, as ``batchnorm="sync"`` needs (autopar/lower/batchnorm.py)."""
    experts: int | None = None
    """Routed experts of the model's mixture-of-experts layers (the smallest count); None: no MoE
    layers, ``ep`` stays 1."""


def _tp_options(s: SpaceSpec) -> list[int]:
    out = []
    for tp in divisors(s.num_devices):
        if not s.allow_cross_node_tp and tp > s.devices_per_node:
            continue
        if not tp_divides_heads(tp, s.heads, s.kv_heads) or tp in s.unshardable_tp:
            continue
        out.append(tp)
    return out


def meshes(s: SpaceSpec) -> Iterator[tuple[int, int, int]]:
    """(dp, tp, pp) with dp*tp*pp = devices, legal for the model and batch."""
    fixed = s.fixed or {}
    for tp in _tp_options(s):
        if "tp" in fixed and fixed["tp"] != tp:
            continue
        for pp in divisors(s.num_devices // tp):
            if not pp_fits_layers(pp, s.num_layers) or ("pp" in fixed and fixed["pp"] != pp):
                continue
            dp = s.num_devices // (tp * pp)
            if not batch_splits(s.global_batch, dp) or ("dp" in fixed and fixed["dp"] != dp):
                continue
            yield dp, tp, pp


def expert_degrees(s: SpaceSpec, dp: int) -> list[int]:
    """``ep`` for a mesh with ``dp`` data-parallel ranks: divisors of dp that divide the experts."""
    fixed = s.fixed or {}
    if not s.experts:
        return [1] if fixed.get("ep", 1) == 1 else []
    return [ep for ep in divisors(dp) if ep_fits(ep, dp, s.experts) and fixed.get("ep", ep) == ep]


def pipelines(s: SpaceSpec, dp: int, pp: int) -> Iterator[tuple[int, str, int]]:
    """(mbs, schedule, vpp) for one mesh."""
    fixed = s.fixed or {}
    per_replica = s.global_batch // dp
    for mbs in divisors(per_replica):
        if mbs != per_replica if s.one_micro_batch else mbs > s.max_micro_batch:
            continue  # batch statistics need the whole share, whatever the cap
        if "mbs" in fixed and fixed["mbs"] != mbs:
            continue
        m = per_replica // mbs
        for schedule, vpp in _schedules(s, pp, m):
            if "schedule" in fixed and fixed["schedule"] != schedule:
                continue
            if "vpp" in fixed and fixed["vpp"] != vpp:
                continue
            yield mbs, schedule, vpp


def _schedules(s: SpaceSpec, pp: int, m: int) -> Iterator[tuple[str, int]]:
    if pp == 1:
        yield "1f1b", 1
        return
    for schedule in s.schedules:
        if schedule != "interleaved":
            yield schedule, 1
            continue
        if not interleaving_fits(m, pp):
            continue
        fixed_vpp = (s.fixed or {}).get("vpp")  # a user's vpp is searched even above the planner's cap
        top = max(s.max_virtual_stages, fixed_vpp or 0)
        for vpp in range(2, top + 1):
            if s.num_layers % (pp * vpp) == 0:
                yield "interleaved", vpp


def knobs(s: SpaceSpec, tp: int, dp: int, ep: int = 1) -> Iterator[tuple[int, str, int]]:
    """(sp, recompute, zero), memory knobs cheapest first; inference has no recompute or ZeRO.

    With ``dp = 1`` every ZeRO stage is ZeRO-0 (nothing to shard over), so only ``zero=0`` is
    listed unless the user fixed another stage. A model with MoE layers (``s.experts``) gets only
    the knobs :func:`~autopar.core.plan_rules.moe_knobs_fit` allows at expert degree ``ep``."""
    fixed = s.fixed or {}
    sps = [0, 1] if sequence_parallel_allowed(tp) else [0]
    memory = MEMORY_KNOBS if s.mode == "train" else (("none", 0),)
    if dp == 1 and "zero" not in fixed:
        memory = tuple(k for k in memory if k[1] == 0)
    for sp in sps:
        if "sp" in fixed and fixed["sp"] != sp:
            continue
        for recompute, zero in memory:
            if "recompute" in fixed and fixed["recompute"] != recompute:
                continue
            if "zero" in fixed and fixed["zero"] != zero:
                continue
            if s.experts and not moe_knobs_fit(ep=ep, zero=zero, sp=bool(sp)):
                continue  # not built by the runtime (lower/expert.py refuses it): not offered
            yield sp, recompute, zero


def size(s: SpaceSpec, *, expert_pipelines_only: bool = False) -> int:
    """Number of candidates before any pruning (for progress and the report); with
    ``expert_pipelines_only``, those with ``ep > 1`` and ``pp > 1`` only (the ones the planner also
    costs under a second mesh order)."""
    n = 0
    for dp, tp, pp in meshes(s):
        if expert_pipelines_only and pp == 1:
            continue
        eps = [ep for ep in expert_degrees(s, dp) if ep > 1 or not expert_pipelines_only]
        pipes = sum(1 for _ in pipelines(s, dp, pp))
        n += pipes * sum(sum(1 for _ in knobs(s, tp, dp, ep)) for ep in eps)
    return n

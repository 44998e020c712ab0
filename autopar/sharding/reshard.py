"""Resharding: the collective that moves a tensor from one placement to another on the tp axis.

=============  ==========  ====================================================================
from -> to     collective  note
=============  ==========  ====================================================================
R -> S(d)      split       local slice, no communication (backward: all-gather)
P -> R         all_reduce  (backward: identity)
P -> S(d)      reduce_scatter (backward: all-gather)
S(d) -> R      all_gather  (backward: slice, or reduce-scatter when the result feeds sharded work)
S(a) -> S(b)   all_to_all  lowered as all-gather + slice
R|S -> P       --          not a resharding anyone needs; rejected
=============  ==========  ====================================================================

Bytes are those of the full (unsharded) tensor; the cost model applies each algorithm's factor
(ring all-reduce moves ``2 (n-1)/n`` of them per rank).
"""

from __future__ import annotations

from autopar.core.plan import Partial, Placement, Replicate, Shard

COMMUNICATING = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")

BACKWARD_OF: dict[str, str | None] = {
    "all_reduce": None,
    "split": "all_gather",
    "all_gather": "reduce_scatter",
    "reduce_scatter": "all_gather",
    "all_to_all": "all_to_all",
}
"""The one table of forward collective -> the collective its backward runs (Megatron's conjugate
pairs; None: the backward is the identity). The planner's intra-op costs, the estimator and the
lowering's autograd functions (:data:`autopar.lower.collectives.LOWERED`) all follow it; a test
checks the lowering against it on real process groups."""


def reshard_kind(src: Placement, dst: Placement) -> str | None:
    """The collective that turns ``src`` into ``dst`` (None when equal, ``"invalid"`` if none does)."""
    if src == dst:
        return None
    if isinstance(src, Replicate) and isinstance(dst, Shard):
        return "split"
    if isinstance(src, Partial):
        return "all_reduce" if isinstance(dst, Replicate) else "reduce_scatter"
    if isinstance(src, Shard) and isinstance(dst, Replicate):
        return "all_gather"
    if isinstance(src, Shard) and isinstance(dst, Shard):
        return "all_to_all"
    return "invalid"


def reshard_bytes(src: Placement, dst: Placement, full_bytes: int) -> int:
    """Bytes the resharding communicates (of the full tensor; 0 for a local slice)."""
    kind = reshard_kind(src, dst)
    return full_bytes if kind in COMMUNICATING else 0

"""The functions that perform the layout's reshardings (:mod:`autopar.sharding.layout` decides
which strategy each node runs and which reshardings that implies; this module names the calls)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch.fx

from autopar.core.errors import PlanError
from autopar.core.plan import Placement
from autopar.lower.collectives import LOWERED, autopar_copy_to_tp, autopar_gather
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.layout import Choice, choose, param_placements, reshardings

__all__ = ["Choice", "choose", "conversion_calls", "param_placements", "predict_collectives"]

Node = torch.fx.Node


_DIM_OF: dict[str, str | None] = {
    "split": "dst",
    "all_reduce": None,
    "reduce_scatter": "dst",
    "all_gather": "src",
}
"""Resharding kind -> whose placement's dim its collective takes (``src``, ``dst``, or no dim)."""


def conversion_calls(kind: str | None, partial_grad: bool) -> tuple[tuple[str, str | None], ...]:
    """The collective calls (name, which placement's dim they take) that perform one resharding.

    ``partial_grad``: the converted tensor feeds sharded work, so its gradient arrives as a
    partial sum and must be summed in backward. The function is then the resharding kind's
    :data:`~autopar.lower.collectives.LOWERED` one (whose backward is the one
    :data:`~autopar.sharding.reshard.BACKWARD_OF` names), plus ``copy_to_tp`` after an all-reduce
    (whose backward is the identity). Otherwise a gather keeps only its slice of the gradient
    (``gather``); ``all_to_all`` is a gather then a split.
    """
    copy_to_tp = ((autopar_copy_to_tp.__name__, None),)
    if kind is None:
        return copy_to_tp if partial_grad else ()
    if kind == "all_to_all":
        return ((autopar_gather.__name__, "src"), (LOWERED["split"].__name__, "dst"))
    if kind not in LOWERED:
        raise PlanError(f"no collective converts between these placements ({kind})")
    fn = autopar_gather if kind == "all_gather" and not partial_grad else LOWERED[kind]
    calls = ((fn.__name__, _DIM_OF[kind]),)
    return calls + copy_to_tp if kind == "all_reduce" and partial_grad else calls


FUSED_COLLECTIVE_OPS = {"cross_entropy": "autopar_vocab_parallel_cross_entropy"}
"""Ops whose sharded strategy communicates inside one emitted call (``Strategy.comm``)."""


def _calls(sg: ShardingGraph, choices: dict[Node, Choice], params: dict[str, Placement]) -> Iterator[str]:
    """The name of every collective call the rewrite emits for the layout's reshardings."""
    for at, _, kind, partial, fused in reshardings(sg, choices, params):
        if fused:
            yield FUSED_COLLECTIVE_OPS[sg.calls[at].kind]
        else:
            yield from (name for name, _ in conversion_calls(kind, partial))


def predict_collectives(
    sg: ShardingGraph, choices: dict[Node, Choice], params: dict[str, Placement]
) -> Counter:
    """Collective calls per name that the placements imply, one per distinct resharding."""
    return Counter(_calls(sg, choices, params))

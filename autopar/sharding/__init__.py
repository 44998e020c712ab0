"""Tensor-parallel placement rules, strategies and the default (Megatron-like) placements.

Public API:

* :func:`strategies` / :class:`ShardingGraph.strategies`: the legal strategies of a node — required
  input placements, output placement, parameter placements, collective bytes (what the planner
  enumerates).
* :func:`megatron_placements`: the default plan's placements, derived from the same rules.
* :func:`reshard_kind` / :func:`reshard_bytes`: the collective between two placements;
  :data:`autopar.sharding.reshard.BACKWARD_OF`: THE forward collective -> backward collective table.
* :mod:`autopar.sharding.layout`: the one tensor-parallel layout of a plan —
  :func:`~autopar.sharding.layout.choose` (the strategy each node runs given the placements),
  :func:`~autopar.sharding.layout.planned_collectives` (every collective that implies, forward and
  backward, with bytes) and :func:`~autopar.sharding.layout.issued`; the lowering emits it, the
  estimator costs it.
* :func:`functionalize` -> :class:`Normalized`: the graph with leaf modules in functional form.
* :mod:`autopar.sharding.ops`: the canonical view of a node (:class:`~autopar.sharding.ops.OpCall`,
  :func:`~autopar.sharding.ops.parse`) and the rule families' name sets, derived from the one op
  table :data:`autopar.tracing.opkinds.OPS`.
* :mod:`autopar.sharding.view_rules`: :func:`~autopar.sharding.view_rules.reshape_dim_map` and
  :func:`~autopar.sharding.view_rules.getitem_dim_map` (which dims carry a shard through a view).

How a planner enumerates (node names are those of the traced graph; ``call_module`` nodes appear
in functional form with their parameters as inputs)::

    sg = ShardingGraph(gm, tp=4)
    for node in sg.nodes:
        for s in sg.strategies(node):        # s.inputs, s.output, s.params, s.comm, s.compute_fraction
            for inp, req in zip(sg.calls[node].inputs, s.inputs):
                ...  # edge cost: reshard_bytes(placement_of[inp], req, sg.tensor_bytes(inp))
    plan.placements[node.name] = NodePlacement(output=..., params=s.param_placements)
"""

from autopar.sharding.graph import ShardingGraph, strategies
from autopar.sharding.megatron import megatron_placements
from autopar.sharding.normalize import Normalized, functionalize
from autopar.sharding.reshard import reshard_bytes, reshard_kind
from autopar.sharding.rules import Comm, Strategy

__all__ = [
    "Comm",
    "Normalized",
    "ShardingGraph",
    "Strategy",
    "functionalize",
    "megatron_placements",
    "reshard_bytes",
    "reshard_kind",
    "strategies",
]

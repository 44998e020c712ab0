"""Tensor-parallel placement rules, strategies and the default (Megatron-like) placements.

* :func:`strategies` / :class:`ShardingGraph.strategies`: the legal strategies of a node — required
  input placements, output placement, parameter placements, collective bytes (what the planner
  enumerates).
* :func:`megatron_placements`: the default plan's placements, derived from the same rules.
* :func:`reshard_kind` / :func:`reshard_bytes`: the collective between two placements.
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

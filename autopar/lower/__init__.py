"""Lowering: from a plan to per-rank fx programs with collectives as graph nodes.

* :func:`lower_tensor_parallel` (tensor parallelism; this package),
* the pipeline split and data-parallel wrapping live in :mod:`autopar.runtime` / the compiler.
"""

from autopar.lower.collectives import TPContext
from autopar.lower.tensor_parallel import LoweredModule, ShardSpec, chosen_strategies, lower_tensor_parallel

__all__ = ["LoweredModule", "ShardSpec", "TPContext", "chosen_strategies", "lower_tensor_parallel"]

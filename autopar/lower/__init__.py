"""Lowering: from a plan to per-rank fx programs with collectives as graph nodes.

Public API (everything else in the package is internal to the lowering):

* :func:`lower_tensor_parallel` -> :class:`LoweredModule` (the rank's graph module, its
  :class:`ShardSpec` per parameter, the generated code); :func:`chosen_strategies` (which strategy
  each node runs, decided by :mod:`autopar.sharding.layout`);
  :func:`autopar.lower.tensor_parallel.collective_volume` (the bytes per collective and phase the
  program moves, what the estimator must cost).
* :func:`autopar.lower.program.build_program` -> :class:`~autopar.lower.program.RankProgram`: one
  rank's whole program (tensor-parallel lowering, pipeline segments and stages,
  :class:`~autopar.lower.stages.StageModule`), what ``autopar.compile`` runs and ``rank_code`` shows.
* :mod:`autopar.lower.collectives`: the autograd-aware collectives the graphs call, with
  :class:`TPContext`; :data:`~autopar.lower.collectives.LOWERED` (resharding kind -> function, whose
  backward is :data:`autopar.sharding.reshard.BACKWARD_OF`'s) and
  :data:`~autopar.lower.collectives.COLLECTIVES` (name -> function);
  :func:`autopar.lower.choose.conversion_calls` (the calls that perform one resharding).
* :mod:`autopar.lower.parallel_ops`: the sharded ops (vocabulary-parallel embedding and cross
  entropy, sharded dropout, shape helpers); :func:`autopar.lower.rewrite.noncontiguous_layout`.
* :mod:`autopar.lower.expert`: expert parallelism for mixture-of-experts regions:
  :func:`~autopar.lower.expert.lower_experts` (swaps in :class:`~autopar.lower.expert.ExpertParallelMoE`,
  experts split over ``ep``, tp inside each expert), :func:`~autopar.lower.expert.autopar_all_to_all`
  (the autograd-aware all-to-all), :func:`~autopar.lower.expert.all_to_all_volume` (the all-to-alls
  of a step and their bytes, what the estimator must cost) and :func:`~autopar.lower.expert.moe_layers`.
* :mod:`autopar.lower.rng` (counter-based deterministic dropout) and
  :func:`autopar.lower.passes.replace_dropout` (puts it into a traced graph).

The pipeline schedules and data-parallel wrapping live in :mod:`autopar.runtime`.
"""

from autopar.lower.collectives import TPContext
from autopar.lower.tensor_parallel import LoweredModule, ShardSpec, chosen_strategies, lower_tensor_parallel

__all__ = ["LoweredModule", "ShardSpec", "TPContext", "chosen_strategies", "lower_tensor_parallel"]

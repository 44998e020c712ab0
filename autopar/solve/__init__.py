"""The planner: outer search over meshes and knobs, inter-op ILP for stage splits.

Public API:

* :func:`plan` (:mod:`.planner`): the fastest plan that fits, with runner-ups and explanations;
  :class:`~autopar.solve.planner.Search` is one run of its outer search and
  :func:`~autopar.solve.planner.space_spec` the search space of a graph on a cluster;
  :data:`~autopar.solve.planner.EP_ORDER` / :func:`~autopar.solve.planner.ep_orders` the second
  mesh order costed for expert-parallel pipelines (ep groups inside a node).
* :mod:`.space`: the outer search space (meshes, pipelines, memory knobs), built on the legality
  rules of :mod:`autopar.core.plan_rules`.
* :mod:`.bounds`: the pruning bounds (B1-B4) the search uses, each a pure function.
* :mod:`.candidate`: :class:`~autopar.solve.candidate.Candidate` (a costed plan),
  :class:`~autopar.solve.candidate.SearchStats` and :func:`~autopar.solve.candidate.make_plan`.
* :mod:`.refine` and :mod:`.inter_op`: uneven pipeline splits (the inter-op ILP).
* :mod:`.placements` and :mod:`.intra_op`: per-node tensor-parallel placements (the intra-op ILP;
  :class:`~autopar.solve.intra_op.Quotient` is the graph quotiented by block repetition).
* :mod:`.explain`: runner-ups, rejected configurations and the infeasibility message.
* :mod:`.ilp`: solver choice and honest status reporting around pulp.
"""

from autopar.solve.planner import plan

__all__ = ["plan"]

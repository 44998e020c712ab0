"""The leaf layer: what every stage shares and nothing in it imports from the rest of autopar.

* :mod:`~autopar.core.errors`: the typed user errors (value seen, rule, fix);
* :mod:`~autopar.core.ir`: :class:`OpGraph` / :class:`OpNode`, the analysed graph every stage reads;
* :mod:`~autopar.core.plan`: :class:`Plan`, mesh axes, placements (``Replicate``, ``Shard``,
  ``Partial``), the predicted cost; JSON round-trip;
* :mod:`~autopar.core.plan_file`: reading and validating plan files (``autopar plan --out``);
* :mod:`~autopar.core.plan_rules`: the one set of plan legality rules (CLI keys, the search space
  and the estimator all ask it);
* :mod:`~autopar.core.explain`: ``Plan.explain()`` text;
* :mod:`~autopar.core.text`: did-you-mean hints and the one formatter of numbers with units (bytes
  in decimal GB/MB, seconds, SI prefixes, parameter counts) that the CLI, the report and the
  planner's explanations share;
* :mod:`~autopar.core.progress`: progress lines for long work.
"""

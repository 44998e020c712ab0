"""Helpers the tests (and anyone checking a plan end to end) use; not needed to plan or compile.

* :mod:`autopar.testing.dist`: :func:`~autopar.testing.dist.run_ranks`, a function on N real gloo
  ranks of this machine with timeouts (a rank that fails raises ``LaunchFailure`` instead of
  hanging).
* :mod:`autopar.testing.equivalence`: THE reference-vs-parallel helper: the single-device eager run
  of a :class:`~autopar.testing.equivalence.Case` against its compiled run under any plan, step by
  step (loss, full gradients, updated parameters).

This package sits at the top of the layer order (with the command line): it may import anything in
:mod:`autopar`, and nothing in :mod:`autopar` imports it.
"""

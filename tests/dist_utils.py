"""Run a function on N real gloo ranks with timeouts and collect what each rank returns.

    from dist_utils import run_ranks
    results = run_ranks(my_fn, 2, args=(cfg,))      # [rank 0 result, rank 1 result]

``my_fn`` must be a module-level function (it is pickled into the workers); it runs after
``init_process_group`` so ``dist.get_rank()`` works. Every process group has ``timeout_s``; a rank
that raises makes the call raise ``LaunchFailure`` (``.rank_errors`` per rank) instead of hanging.
Workers come from a forkserver with torch preloaded: after the first launch in a pytest session,
a launch costs ~0.1-0.3 s, so reuse one launch for several checks only when it keeps tests clear.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Workers unpickle test functions by module name: make the tests directory importable there too.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

from autopar.runtime.launch import LaunchFailure, run_local  # noqa: E402

__all__ = ["LaunchFailure", "run_ranks"]


def run_ranks(fn, nprocs: int, args=(), *, timeout_s: float = 60.0, deadline_s: float | None = 300.0, **kw):
    """``fn(*args)`` on ``nprocs`` gloo ranks; the per-rank results in rank order."""
    return run_local(fn, nprocs, args, timeout_s=timeout_s, deadline_s=deadline_s, **kw)

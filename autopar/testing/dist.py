"""Run a function on N real gloo ranks with timeouts and collect what each rank returns.

    from autopar.testing.dist import run_ranks
    results = run_ranks(my_fn, 2, args=(cfg,))      # [rank 0 result, rank 1 result]

``my_fn`` must be a module-level function (it is pickled into the workers by module and name; a
test module's functions are found because the forkserver starts with the parent's ``sys.path``,
where pytest put the tests directory); it runs after ``init_process_group`` so
``dist.get_rank()`` works. Every process group has ``timeout_s``; a rank that raises makes the call
raise ``LaunchFailure`` (``.rank_errors`` per rank) instead of hanging. Workers come from a
forkserver with torch preloaded: after the first launch in a pytest session, a launch costs
~0.1-0.3 s, so reuse one launch for several checks only when it keeps tests clear.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from autopar.runtime.launch import LaunchFailure, run_local

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["LaunchFailure", "run_ranks"]


def run_ranks(
    fn: Callable,
    nprocs: int,
    args: Sequence = (),
    *,
    timeout_s: float = 60.0,
    deadline_s: float | None = 300.0,
    **kw: Any,
) -> list[Any]:
    """``fn(*args)`` on ``nprocs`` gloo ranks; the per-rank results in rank order."""
    return run_local(fn, nprocs, args, timeout_s=timeout_s, deadline_s=deadline_s, **kw)

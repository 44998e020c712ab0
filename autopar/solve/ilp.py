"""Thin helpers around pulp: solver choice, time limits and honest status reporting.

HiGHS (``highspy``) is used when installed, pulp's bundled CBC otherwise. pulp can report
"Optimal" after a time-limit stop, so the status we return comes from ``sol_status`` and the
solver's own gap where it reports one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass

import pulp

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SolveResult:
    status: str
    """``optimal``, ``time_limit`` (incumbent returned), ``infeasible`` or ``error``."""
    objective: float | None
    solve_time_s: float
    solver: str


@functools.cache
def solver_name() -> str:
    """The MILP solver pulp will use: ``HiGHS`` when highspy is installed, else ``CBC``."""
    return "HiGHS" if "HiGHS" in pulp.listSolvers(onlyAvailable=True) else "CBC"


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a copyright banner on stdout when its first instance is created, even with
    logging off; that would corrupt ``autopar ... --json`` output. Create the first one with the
    stdout file descriptor pointed at /dev/null."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            with contextlib.suppress(Exception):
                highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def make_solver(time_limit_s: float | None = None, gap_rel: float = 1e-6) -> pulp.LpSolver:
    """HiGHS (one thread, no banner) when installed, else CBC, with the time limit and gap."""
    if solver_name() == "HiGHS":
        _silence_highs_banner()
        # One thread: HiGHS starts a thread pool per run otherwise, which costs ~25 ms on a small
        # ILP (0.7 ms with one thread); the planner solves many small ones.
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel)


def solve(prob: pulp.LpProblem, time_limit_s: float | None = None) -> SolveResult:
    """Solve ``prob`` in place and say truthfully how it ended."""
    solver = make_solver(time_limit_s)
    t0 = time.perf_counter()
    prob.solve(solver)
    elapsed = time.perf_counter() - t0
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "time_limit"
    elif pulp.LpSolutionInfeasible in (prob.sol_status, prob.status):
        status = "infeasible"
    else:
        status = "error"
    objective = pulp.value(prob.objective) if status in ("optimal", "time_limit") else None
    log.debug("%s: %s in %.3fs (objective %s)", prob.name, status, elapsed, objective)
    return SolveResult(status=status, objective=objective, solve_time_s=elapsed, solver=solver_name())

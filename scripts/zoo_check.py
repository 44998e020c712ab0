"""Every zoo model under dp=2, tp=2, pp=2 and a 4-rank mix, against one device: a table.

    python scripts/zoo_check.py                 # all models, all plans
    python scripts/zoo_check.py resnet t5       # some models
    python scripts/zoo_check.py --plans tp2     # some plans

Each (model, plan) is its own gloo launch (a failing rank cannot disturb the next one). A cell is
``ok`` (losses, gradients and updated parameters equal one device), ``DIFF`` (how many values
differ) or the first line of the error.
"""

from __future__ import annotations

import argparse
import time

from autopar.testing import zoo
from autopar.testing.dist import LaunchFailure, run_ranks
from autopar.testing.equivalence import compare, reference, run_plans


def cell(name: str, plan_name: str) -> str:
    case = zoo.case(name)
    plan = zoo.plan(name, plan_name, case.global_batch)
    try:
        trajs = run_ranks(run_plans, plan.world_size, args=(case, [plan]), timeout_s=60, deadline_s=240)
    except LaunchFailure as e:
        first = next(iter(e.rank_errors.values()), str(e)) if getattr(e, "rank_errors", None) else str(e)
        lines = [ln for ln in str(first).strip().splitlines() if ln.strip()]
        return "ERR " + (lines[-1] if lines else "?")[:150]
    problems = compare(reference(case), trajs[0][0])
    return "ok" if not problems else f"DIFF {len(problems)}: {problems[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(zoo.CASES))
    ap.add_argument("--plans", nargs="*", default=list(zoo.PLANS))
    args = ap.parse_args()
    for name in args.models:
        for plan_name in args.plans:
            t0 = time.perf_counter()
            result = cell(name, plan_name)
            print(f"{name:14s} {plan_name:7s} {time.perf_counter() - t0:5.1f}s  {result}", flush=True)


if __name__ == "__main__":
    main()

"""Fuzzed equivalence at scale: many random (small GPT, plan) pairs, each trained 3 AdamW steps on
real gloo ranks and compared with one device.

    python benchmarks/fuzz_equivalence.py                     # 200 examples, worlds 2, 4 and 8
    python benchmarks/fuzz_equivalence.py --examples 40 --worlds 2 4 --seed 1

The strategies, the legality checks and the comparison are the CI test's
(``tests/test_fuzz_equivalence.py``); this script only draws many more examples (``--batch`` per
gloo launch) and prints how many were tried, rejected (a plan rule or ``compile``'s ``PlanError``),
run, mismatched and failed (a launch that broke, or a plan the planner would offer that ``compile``
refused), with the wall time. Exit status 1 if anything mismatched or failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from test_fuzz_equivalence import Example, Tally, batches, run_batch  # noqa: E402


def fuzz(examples: int, worlds: tuple[int, ...], batch: int, rng_seed: int, verbose: bool) -> Tally:
    """Run ``ceil(examples / batch)`` launches of ``batch`` examples each; the summed tally."""
    total = Tally()

    @seed(rng_seed)
    @settings(
        max_examples=math.ceil(examples / batch),
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=batches(worlds=worlds, size=batch))
    def one_launch(drawn: list[Example]) -> None:
        start = time.perf_counter()
        tally = run_batch(drawn)
        total.add(tally)
        if verbose:
            print(
                f"world {drawn[0].world}: {tally.ran} ran, {tally.rejected} rejected, "
                f"{len(tally.mismatched)} mismatched, {len(tally.errors)} errors "
                f"({time.perf_counter() - start:.1f} s; {total.tried} tried so far)",
                flush=True,
            )
            for line in tally.mismatched + tally.errors:
                print("  " + line[:2000], flush=True)

    one_launch()
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=200, help="(model, plan) pairs to draw")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8], help="world sizes to draw from")
    p.add_argument("--batch", type=int, default=6, help="pairs per gloo launch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="only the final tally")
    args = p.parse_args()
    start = time.perf_counter()
    tally = fuzz(args.examples, tuple(args.worlds), args.batch, args.seed, not args.quiet)
    elapsed = time.perf_counter() - start
    print(
        f"tried {tally.tried}, rejected {tally.rejected}, ran {tally.ran}, mismatched "
        f"{len(tally.mismatched)}, failed {len(tally.errors)} in {elapsed:.0f} s"
    )
    for line in tally.mismatched + tally.errors:
        print("  " + line)
    return 1 if tally.mismatched or tally.errors else 0


if __name__ == "__main__":
    sys.exit(main())

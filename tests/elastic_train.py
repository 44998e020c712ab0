"""The training script of tests/test_elastic.py, started by ``torchrun`` with elastic settings.

Every (re)start of the workers does what an elastic job does after a failure: read the world size
torchrun gives it, plan for it (here the rule "data parallel over every rank", so the test does not
depend on the planner's search or its local calibration; a job would call ``autopar.plan`` or
``autopar.compile(plan=None)``), resume from the newest complete checkpoint under ``--root``
(re-sharded to the new plan), and train up to ``--steps``, saving after every step. On the first
attempt (``TORCHELASTIC_RESTART_COUNT == 0``) rank ``--kill-rank`` SIGKILLs itself at the start of
step ``--kill-at``, inside training, while the other ranks wait in the step's collectives.

Rank 0 appends one JSON line per step to ``--out``: attempt, world size, plan, step, loss.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import autopar
from autopar.runtime.checkpoint import list_checkpoints
from autopar.testing.equivalence import gpt_case

CASE = gpt_case(hidden=32, layers=2, heads=4, dropout=0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=4)
    parser.add_argument("--kill-rank", type=int, default=1)
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    resume = args.root if any(c.complete for c in list_checkpoints(args.root)) else None
    batches = CASE.make_batches(args.steps)
    plan = autopar.Plan.manual(dp=world, global_batch=CASE.global_batch)
    compiled = autopar.compile(
        CASE.build(),
        world,
        plan=plan,
        example_inputs=batches[0],
        loss_fn=CASE.loss_fn,
        optimizer=CASE.optimizer,
        global_batch=CASE.global_batch,
        resume_from=resume,
        timeout_s=20,
    )
    for step in range(compiled.global_step, args.steps):
        if attempt == 0 and step == args.kill_at and compiled.rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = compiled.step(batches[step])
        compiled.save(args.root, keep=2)
        if compiled.rank == 0:
            record = {
                "attempt": attempt,
                "world": world,
                "plan": compiled.plan.summary(),
                "step": step,
                "loss": loss,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

"""The training script of tests/test_elastic.py, started by ``torchrun`` with elastic settings.

Every (re)start of the workers does what an elastic job does after a failure: read the world size
torchrun gives it, ask the planner for a plan for it (``autopar.compile(plan=None)`` on
``Cluster.local(world)``: the running ranks measure the layout, nothing is spawned), resume from
the newest complete checkpoint under ``--root`` (re-sharded to the new plan), and train up to
``--steps``, saving after every step.

Failures, on the first attempt only (``TORCHELASTIC_RESTART_COUNT == 0``), at the start of step
``--kill-at``, inside training, while the other ranks wait in the step's collectives:

* ``--kill-rank R``: rank R SIGKILLs itself (its agent restarts the workers, same world size);
* ``$AUTOPAR_TEST_LOSE_NODE=1`` in an agent's environment: that agent's workers SIGKILL their agent
  (their parent process), then themselves: the node is lost, the surviving agents re-rendezvous
  without it and the world shrinks.

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
LOSE_NODE_ENV = "AUTOPAR_TEST_LOSE_NODE"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=4)
    parser.add_argument("--kill-rank", type=int, default=None)
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    resume = args.root if any(c.complete for c in list_checkpoints(args.root)) else None
    batches = CASE.make_batches(args.steps)
    compiled = autopar.compile(
        CASE.build(),
        autopar.Cluster.local(world),
        example_inputs=batches[0],
        loss_fn=CASE.loss_fn,
        optimizer=CASE.optimizer,
        global_batch=CASE.global_batch,
        resume_from=resume,
        timeout_s=20,
    )
    lose_node = os.environ.get(LOSE_NODE_ENV) == "1"
    for step in range(compiled.global_step, args.steps):
        if attempt == 0 and step == args.kill_at:
            if lose_node:
                os.kill(os.getppid(), signal.SIGKILL)  # the agent: the whole "node" is gone
                os.kill(os.getpid(), signal.SIGKILL)
            if compiled.rank == args.kill_rank:
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

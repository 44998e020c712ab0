"""The training script of ``tests/test_multinode.py``: run under ``torchrun`` on every rank.

    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT \\
        --rdzv-id=ID tests/multinode_train.py --plan dp2pp2 --out traj.pt

It does what a user's script does across machines: nothing distributed by hand. ``autopar.compile``
initialises the process group from torchrun's environment (``autopar.runtime.groups.init_from_env``),
builds the plan's groups over the ranks of both agents and trains :func:`case` for 3 AdamW steps.
Rank 0 then writes the trajectory (losses, full gradients, parameters per step) with ``torch.save``
for the test to compare with one device.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist

from autopar.core.plan import Plan
from autopar.testing.equivalence import Case, gpt_case, parallel

PLANS = {
    "dp2": lambda batch: Plan.manual(dp=2, global_batch=batch),
    "dp2pp2": lambda batch: Plan.manual(dp=2, pp=2, global_batch=batch, micro_batch_size=2),
}


def case() -> Case:
    """The model both the agents and the test's one-device reference train."""
    return gpt_case(layers=2, hidden=16, heads=4, vocab=32, seq=8, batch=8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", choices=sorted(PLANS), required=True)
    p.add_argument("--out", required=True, help="where rank 0 writes the trajectory")
    args = p.parse_args()
    c = case()
    trajectory = parallel(c, PLANS[args.plan](c.global_batch))
    if dist.get_rank() == 0:
        torch.save(dataclasses.asdict(trajectory), args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

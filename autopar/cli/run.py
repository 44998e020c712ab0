"""``autopar run PLAN.json --nproc N [--master-port P] -- train.py [ARGS...]``: torchrun with a plan.

A thin wrapper over ``torchrun`` (``python -m torch.distributed.run``): it checks the plan against
``--nproc``, puts the plan file's path in ``AUTOPAR_PLAN`` and starts N processes of the script.
Inside, ``autopar.compile(..., plan=None)`` takes that plan (instead of asking the planner), and
initialises the process group from torchrun's environment::

    # train.py
    compiled = autopar.compile(model, autopar.Cluster.local(ranks=4), example_inputs=batch,
                               loss_fn=loss, global_batch=16)
    for batch in data:
        compiled.step(batch)

``--resume CKPT`` continues a checkpointed run (``compiled.save``) under this plan, whatever plan
and world size wrote it: the path goes in ``AUTOPAR_RESUME``, which ``autopar.compile`` reads as
``resume_from`` (the checkpoint is checked here first: an incomplete or foreign one exits with 2).

``--dry-run`` prints the torchrun command and exits.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from autopar.cli.args import int_in, positive_int
from autopar.core.errors import PlanError, UsageError

ORDER = 45
PLAN_ENV = "AUTOPAR_PLAN"
RESUME_ENV = "AUTOPAR_RESUME"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a training script on N local processes under a plan (wraps torchrun)",
        description="Start NPROC processes of SCRIPT with torchrun; autopar.compile(plan=None) in the "
        "script uses PLAN.json (passed in the AUTOPAR_PLAN environment variable).",
    )
    p.add_argument("plan_file", metavar="PLAN.json", help="a plan written by `autopar plan --out`")
    p.add_argument(
        "--nproc", type=positive_int, required=True, help="processes on this machine (the plan's ranks)"
    )
    p.add_argument("--master-port", type=int_in(1, 65535), default=None, help="torchrun's rendezvous port")
    p.add_argument(
        "--resume",
        metavar="CKPT",
        default=None,
        help="continue from this checkpoint (or the newest under it)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("script", metavar="SCRIPT", help="the training script (after --)")
    p.add_argument("script_args", nargs="*", metavar="ARGS", help="the script's arguments")
    p.set_defaults(func=run)


def command(
    plan_file: str, nproc: int, script: str, script_args: list[str], master_port: int | None
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if master_port is not None:
        cmd.append(f"--master-port={master_port}")
    return [*cmd, script, *script_args]


def run(args: argparse.Namespace) -> int:
    from autopar.core.plan_file import load_plan

    plan = load_plan(args.plan_file)
    if plan.world_size != args.nproc:
        raise PlanError(
            f"the plan {args.plan_file} ({plan.summary()}) needs {plan.world_size} processes but --nproc is "
            f"{args.nproc}; pass --nproc {plan.world_size} or re-plan for {args.nproc} devices"
        )
    cmd = command(args.plan_file, args.nproc, args.script, args.script_args, args.master_port)
    env = {**os.environ, PLAN_ENV: os.path.abspath(args.plan_file)}
    if getattr(args, "resume", None):
        from autopar.runtime.checkpoint import read_manifest, resolve

        checkpoint = resolve(args.resume)
        read_manifest(checkpoint)  # format and version, before starting N processes
        # As given: a root resolves to its newest complete checkpoint at each (re)start under torchrun.
        env[RESUME_ENV] = os.path.abspath(args.resume)
    if args.dry_run:
        shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in (PLAN_ENV, RESUME_ENV) if k in env)
        print(f"{shown} {shlex.join(cmd)}")
        return 0
    if not os.path.isfile(args.script):
        what = "is a directory" if os.path.isdir(args.script) else "does not exist"
        raise UsageError(
            f"the training script {args.script!r} {what} (cwd {os.getcwd()}); give the path of a Python "
            "file after --, e.g. `autopar run plan.json --nproc 4 -- train.py`"
        )
    return subprocess.call(cmd, env=env)

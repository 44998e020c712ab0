"""A rank that fails never hangs the others: every rank exits with an error naming the failing
rank, within the group timeout. Real gloo processes; the failure is injected into rank 1's
pipeline stage during its second training step (a forward pre-hook on its stage module). Times are
measured from the fault (the hook writes its wall time to a file), not from the launch: process
start and compile times vary with the machine's load, the failure handling must not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import autopar
from autopar.core.errors import RuntimeFailure
from autopar.testing.dist import LaunchFailure, run_ranks
from autopar.testing.equivalence import gpt_case

pytestmark = pytest.mark.multiproc


def _train_with_fault(fault: str, plan: autopar.Plan, timeout_s: float, mark: str):
    case = gpt_case()
    batches = case.make_batches(3)
    compiled = autopar.compile(
        case.build(), plan.world_size, example_inputs=batches[0], loss_fn=case.loss_fn,
        plan=plan, global_batch=case.global_batch, timeout_s=timeout_s,
    )  # fmt: skip
    steps_done = []

    def hook(module, args, kwargs):
        if len(steps_done) == 1:  # inside step 1
            Path(mark).write_text(repr(time.time()))
            if fault == "raise":
                raise ValueError("injected fault")
            if fault == "exit":
                os._exit(3)
            if fault == "kill":  # as the out-of-memory killer would: no Python runs after it
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(60)

    if dist.get_rank() == 1:
        compiled.program.stage.register_forward_pre_hook(hook, with_kwargs=True)
    for batch in batches:
        compiled.step(batch)
        steps_done.append(1)
    return "finished"


def _launch(fault: str, plan: autopar.Plan, timeout_s: float, **kw):
    """Every rank's error, and the seconds from the fault to the launcher's return."""
    with tempfile.TemporaryDirectory() as tmp:
        mark = Path(tmp) / "fault_at"
        args = (fault, plan, timeout_s, str(mark))
        with pytest.raises(LaunchFailure) as info:
            run_ranks(_train_with_fault, plan.world_size, args=args, timeout_s=timeout_s, **kw)
        return info.value.rank_errors, time.time() - float(mark.read_text())


@pytest.mark.parametrize(
    "plan",
    [
        autopar.Plan.manual(pp=2, global_batch=8, micro_batch_size=2),
        autopar.Plan.manual(dp=2, global_batch=8),
    ],
    ids=["pp2", "dp2"],
)
def test_a_raising_rank_makes_every_rank_fail_naming_it(plan):
    errors, elapsed = _launch("raise", plan, timeout_s=20)
    assert sorted(errors) == [0, 1]
    assert errors[1].startswith("RuntimeFailure: rank 1 failed in step 1: ValueError: injected fault")
    assert errors[0].startswith("RuntimeFailure: rank 0: stopped in step 1 because rank 1 failed in step 1")
    assert elapsed < 20  # gloo sees the failed rank's exit at once; the group timeout is the bound


@pytest.mark.parametrize(
    ("fault", "plan"),
    [
        ("exit", autopar.Plan.manual(pp=2, global_batch=8, micro_batch_size=2)),
        ("kill", autopar.Plan.manual(pp=2, global_batch=8, micro_batch_size=2)),
        ("kill", autopar.Plan.manual(dp=2, global_batch=8)),
    ],
    ids=["exit-pp2", "sigkill-pp2", "sigkill-dp2"],
)
def test_a_killed_rank_is_named_by_its_peer_with_its_step(fault, plan):
    """A rank that dies without a word (os._exit, SIGKILL) cannot report; its peer notices that
    its heartbeat stopped and names it and the step it was in."""
    errors, elapsed = _launch(fault, plan, timeout_s=20)
    code = 3 if fault == "exit" else -signal.SIGKILL
    assert f"rank 1 exited with code {code} without a result" in errors[1]
    assert errors[0].startswith(
        "RuntimeFailure: rank 0: stopped in step 1 because rank 1 (in step 1) stopped without "
        "reporting an error (no heartbeat for 2 s): it was killed or crashed"
    ), errors[0]
    assert elapsed < 20


def test_a_hung_rank_times_out_its_peer_and_is_terminated():
    plan = autopar.Plan.manual(pp=2, global_batch=8, micro_batch_size=2)
    errors, elapsed = _launch("hang", plan, timeout_s=3, grace_s=1)
    assert "rank 0: a collective in step 1 failed (group timeout 3 s)" in errors[0]
    assert "rank 1 did not finish within the group timeout; terminated" in errors[1]
    assert elapsed < 20  # the hung rank would sleep 60 s: the launcher did not wait for it


def test_step_without_processes_names_the_fix():
    case = gpt_case()
    batch = case.make_batches(1)[0]
    plan = autopar.Plan.manual(dp=2, global_batch=8)
    compiled = autopar.compile(
        case.build(), 2, example_inputs=batch, loss_fn=case.loss_fn, plan=plan, global_batch=8
    )
    with pytest.raises(RuntimeFailure, match="torchrun or autopar.runtime.launch.run_local"):
        compiled.step(batch)


_KILLED_UNDER_TORCHRUN = """
import os, signal
import torch.distributed as dist
import autopar
from autopar.testing.equivalence import gpt_case

case = gpt_case()
batches = case.make_batches(3)
plan = autopar.Plan.manual(pp=2, global_batch=8, micro_batch_size=2)
compiled = autopar.compile(case.build(), 2, example_inputs=batches[0], loss_fn=case.loss_fn,
                           plan=plan, global_batch=8, timeout_s=20)
steps = []
def hook(module, args, kwargs):
    if len(steps) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
if dist.get_rank() == 1:
    compiled.program.stage.register_forward_pre_hook(hook, with_kwargs=True)
for batch in batches:
    compiled.step(batch)
    steps.append(1)
"""


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_is_named_by_autopar(tmp_path):
    """torchrun SIGTERMs the survivors as soon as a rank dies; the survivor still gets to name
    the dead rank and its step (failure.defer_termination) before it exits."""
    script = tmp_path / "train.py"
    script.write_text(_KILLED_UNDER_TORCHRUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert (
        "rank 0: stopped in step 1 because rank 1 (in step 1) stopped without reporting an error"
        in done.stdout + done.stderr
    )

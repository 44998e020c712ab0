"""A rank killed under torchrun's elastic agent: the job restarts and resumes from its checkpoint.

Invariant: ``torchrun --nnodes=1:1 --nproc-per-node=2 --max-restarts=1`` runs
``tests/elastic_train.py`` (plan for the world size torchrun gives, resume from the newest complete
checkpoint, save after every step). Rank 1 SIGKILLs itself at the start of step 4 on the first
attempt; torchrun stops rank 0 (blocked in the step's collectives) and restarts both workers,
which re-plan, load the step-4 checkpoint and finish. Oracle: every loss, those of the first
attempt (steps 0-3) and of the restarted one (steps 4-5), equals 6 uninterrupted steps on one
device (rtol 1e-6; dp2 reduces as one device here, so they are in fact bit-identical). No hang:
each group has a 20 s timeout and the whole job 120 s.

World size: with one node (``--nnodes=1:1``) torchrun restarts the same ``--nproc-per-node``
workers, so the world cannot shrink here; resuming on fewer ranks (4 -> 2) is tested in
tests/test_checkpoint.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autopar.runtime.checkpoint import list_checkpoints
from autopar.testing.equivalence import clone_case, gpt_case, reference

pytestmark = pytest.mark.multiproc

SCRIPT = Path(__file__).with_name("elastic_train.py")
TIMEOUT_S = 120


def test_sigkilled_rank_restarts_and_resumes_from_the_last_checkpoint(tmp_path):
    out, root, log = tmp_path / "losses.jsonl", tmp_path / "ckpt", tmp_path / "torchrun.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1:1",
        "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.5",
        str(SCRIPT), "--root", str(root), "--out", str(out), "--steps", "6", "--kill-at", "4",
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as handle:
        agent = subprocess.Popen(
            cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = agent.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)  # the agent and any worker left behind
            agent.wait()
    tail = log.read_text()[-4000:]
    assert code == 0, f"torchrun exit code {code} (None: timed out after {TIMEOUT_S} s):\n{tail}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["attempt"], r["step"]) for r in records] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (1, 5)]
    assert "exitcode: -9" in log.read_text(), tail  # torchrun saw rank 1 die of SIGKILL
    ref = reference(clone_case(gpt_case(hidden=32, layers=2, heads=4, dropout=0.1), steps=6))
    for r in records:
        want = ref.losses[r["step"]]
        assert torch.isclose(torch.tensor(r["loss"]), torch.tensor(want), rtol=1e-6, atol=0), (r, want)
    assert [c.step for c in list_checkpoints(root) if c.complete] == [5, 6]  # keep=2

"""Failures under torchrun's elastic agent: the job restarts, re-plans and resumes from its checkpoint.

Both tests run ``tests/elastic_train.py`` under ``python -m torch.distributed.run``: every (re)start
asks the planner for a plan for the world size torchrun gives (``compile(plan=None)`` on
``Cluster.local(world)``; the ranks measure the layout themselves), resumes from the newest
complete checkpoint and saves after every step. Oracle: every loss of the job, before and after the
failure, equals 6 uninterrupted AdamW steps of the same model on one device (rtol 1e-6).

The planner may choose another plan on another run (its profile is measured, and timings vary);
the check does not depend on the choice: every plan autopar runs computes the one-device trajectory
(tests/test_compile_equivalence.py at rtol 1e-5; tests/test_checkpoint.py checks dp, tp, pp and
ZeRO plans of this model at rtol 1e-6 on losses), so a plan that broke the losses would fail here,
which is the point. The plans chosen are recorded in the losses file and shown on failure. On 2
ranks it has picked data parallelism (dp2, ZeRO-0 or ZeRO-1: the one-device losses to the last
bit); on 1 rank the one-device plan, bit-identical.

No hang: every process group has a 20 s timeout, the rendezvous a 30 s join timeout, and each test
kills what is left of its agents after ``TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autopar.runtime.checkpoint import list_checkpoints
from autopar.testing.equivalence import clone_case, gpt_case, reference

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("elastic_train.py")
TIMEOUT_S = 150
RDZV_CONF = (
    "join_timeout=30,last_call_timeout=4,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=2"
)
"""Rendezvous settings (torch.distributed.elastic.rendezvous.dynamic_rendezvous.create_handler):
a node that joins within 4 s of the first is in the first round (``last_call_timeout``); a node
that stops sending keep-alives for 2 s is dropped from the next (``keep_alive_*``)."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One measurement cache for the module: the second test reuses the first's 2-rank layout."""
    return tmp_path_factory.mktemp("autopar_cache")


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return {**env, "AUTOPAR_CACHE": str(cache), "LOGLEVEL": "INFO", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_agents(agents: list[tuple[list[str], dict, Path]]) -> list[int | None]:
    """Start every agent ``(command, env, log)`` at once, wait for all (``TIMEOUT_S`` in all), kill
    whatever is left of each (its process group: the agent and its workers); the exit codes, None
    for an agent that had to be killed."""
    procs = []
    for cmd, env, log in agents:
        handle = log.open("w")
        procs.append(
            (
                subprocess.Popen(
                    cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                ),
                handle,
            )
        )
    codes: list[int | None] = []
    try:
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=TIMEOUT_S))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for proc, handle in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            handle.close()
    return codes


def _check_losses(out: Path, expected: list[tuple[int, int, int]], logs: str) -> list[dict]:
    """The records are ``expected`` (attempt, world, step) and every loss is the one-device loss."""
    assert out.exists(), logs
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["attempt"], r["world"], r["step"]) for r in records] == expected, (records, logs)
    ref = reference(clone_case(gpt_case(hidden=32, layers=2, heads=4, dropout=0.1), steps=6))
    for r in records:
        want = ref.losses[r["step"]]
        assert torch.isclose(torch.tensor(r["loss"]), torch.tensor(want), rtol=1e-6, atol=0), (r, want)
    return records


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    root, out = tmp_path / "ckpt", tmp_path / "losses.jsonl"
    return [str(SCRIPT), "--root", str(root), "--out", str(out), "--steps", "6", "--kill-at", "4", *extra]


def test_sigkilled_rank_restarts_and_resumes_from_the_last_checkpoint(tmp_path, cache):
    """One node (``--nnodes=1:1``), 2 workers: rank 1 SIGKILLs itself at the start of step 4;
    torchrun stops rank 0 (blocked in the step's collectives) and restarts both workers, which
    re-plan for 2 ranks, load the step-4 checkpoint and finish. torchrun restarts the same
    ``--nproc-per-node`` workers on one node, so the world stays 2."""
    log = tmp_path / "torchrun.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1:1",
        "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.5",
        *_train_args(tmp_path, "--kill-rank", "1"),
    ]  # fmt: skip
    (code,) = _run_agents([(cmd, _env(cache), log)])
    text = log.read_text()
    assert code == 0, f"torchrun exit code {code} (None: killed after {TIMEOUT_S} s):\n{text[-4000:]}"
    assert "exitcode: -9" in text, text[-4000:]  # torchrun saw rank 1 die of SIGKILL
    expected = [(0, 2, s) for s in range(4)] + [(1, 2, 4), (1, 2, 5)]
    _check_losses(tmp_path / "losses.jsonl", expected, text[-4000:])
    assert [c.step for c in list_checkpoints(tmp_path / "ckpt") if c.complete] == [5, 6]  # keep=2


def test_lost_node_shrinks_the_world_and_resumes_resharded(tmp_path, cache):
    """Two agents ("nodes") on this machine, ``--nnodes=1:2 --nproc-per-node=1``, one c10d
    rendezvous on loopback (agent A hosts its store: ``is_host=1``; B connects: ``is_host=0``).
    They form a world of 2. At the start of step 4, B's worker SIGKILLs its agent and itself: the
    node is lost. A's worker fails in the step's collectives (the peer's socket is closed), A
    re-rendezvous (``--max-restarts=1``), B's keep-alives have stopped so the round closes with A
    alone: world 1. The restarted worker re-plans for one rank, loads the step-4 checkpoint written
    by 2 ranks under dp2 and finishes steps 4 and 5 with the one-device losses."""
    port = _free_port()
    common = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
        "--max-restarts=1", "--monitor-interval=0.5", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=elastic-{port}",
    ]  # fmt: skip
    logs = (tmp_path / "agent_a.log", tmp_path / "agent_b.log")
    a = [*common, f"--rdzv-conf=is_host=1,{RDZV_CONF}", *_train_args(tmp_path)]
    b = [*common, f"--rdzv-conf=is_host=0,{RDZV_CONF}", *_train_args(tmp_path)]
    codes = _run_agents([(a, _env(cache), logs[0]), (b, _env(cache, AUTOPAR_TEST_LOSE_NODE="1"), logs[1])])
    text = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs)
    assert codes == [0, -signal.SIGKILL], f"exit codes {codes} (None: killed after {TIMEOUT_S} s)\n{text}"
    a_log = logs[0].read_text()
    assert "group_world_size=2" in a_log and "group_world_size=1" in a_log, text  # the shrink
    expected = [(0, 2, s) for s in range(4)] + [(1, 1, 4), (1, 1, 5)]
    records = _check_losses(tmp_path / "losses.jsonl", expected, text)
    assert all(r["plan"].startswith("dp=1 pp=1 tp=1 ") for r in records if r["world"] == 1), records
    assert [c.step for c in list_checkpoints(tmp_path / "ckpt") if c.complete] == [5, 6]

"""Multi-node on one machine: two ``torchrun`` agents joined by a c10d rendezvous on loopback.

Invariant: a compiled dp x pp plan whose ranks are started by two agents (``--nnodes=2``, two local
ranks each, so the data-parallel groups cross the "nodes" and the pipeline stays inside each) trains
exactly as one device: losses, full gradients and parameters after 3 AdamW steps equal
:func:`autopar.testing.equivalence.reference` (fp32, rtol 1e-5). This is the path users take across
machines: torchrun's elastic agent, the c10d rendezvous, ``autopar.compile`` initialising the process
group from the environment. The training script is ``tests/multinode_train.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from multinode_train import case

from autopar.testing.equivalence import Trajectory, assert_equivalent, reference

SCRIPT = Path(__file__).with_name("multinode_train.py")
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command(node: int, port: int, nproc_per_node: int, plan: str, out: Path) -> list[str]:
    """One torchrun agent; agent 0 hosts the rendezvous store (``is_host``), agent 1 joins it."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=autopar-test-{port}",
        f"--rdzv-conf=is_host={int(node == 0)},join_timeout=60",
        "--local-addr=127.0.0.1", "--max-restarts=0",
        str(SCRIPT), "--plan", plan, "--out", str(out),
    ]  # fmt: skip


def run_two_agents(plan: str, nproc_per_node: int, tmp_path: Path) -> Trajectory:
    """Start both agents, wait for both (killing both on a timeout), return rank 0's trajectory."""
    port, out = free_port(), tmp_path / "trajectory.pt"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    logs = [tmp_path / f"agent{node}.log" for node in range(2)]
    agents, handles = [], [log.open("w") for log in logs]
    try:
        for node in range(2):
            agents.append(
                subprocess.Popen(
                    agent_command(node, port, nproc_per_node, plan, out),
                    env=env,
                    stdout=handles[node],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: kill the agent and its workers
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        codes = [a.wait(timeout=max(0.1, deadline - time.monotonic())) for a in agents]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for a in agents:  # the agent and any worker left in its session, even after a clean exit
            with contextlib.suppress(ProcessLookupError):
                os.killpg(a.pid, signal.SIGKILL)
            a.wait()
        for handle in handles:
            handle.close()
    tails = "\n".join(f"--- agent {n} ---\n{log.read_text()[-3000:]}" for n, log in enumerate(logs))
    assert codes is not None, f"the agents did not finish within {TIMEOUT_S} s:\n{tails}"
    assert codes == [0, 0], f"agent exit codes {codes}:\n{tails}"
    return Trajectory(**torch.load(out))


def test_two_torchrun_agents_run_dp2_pp2_like_one_device(tmp_path: Path) -> None:
    got = run_two_agents("dp2pp2", 2, tmp_path)
    assert_equivalent(reference(case()), got, "dp2 x pp2 over two torchrun agents")

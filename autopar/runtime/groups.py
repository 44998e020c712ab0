"""Process groups for every mesh axis of a plan, passed around as one object (no globals).

Rank layout is the plan's: row-major over ``plan.mesh``, ``tp`` innermost. For ``dp=2, pp=2, tp=2``::

    rank = ((dp_i * pp) + pp_i) * tp + tp_i
    tp groups  [[0,1],[2,3],[4,5],[6,7]]
    pp groups  [[0,2],[1,3],[4,6],[5,7]]
    dp groups  [[0,4],[1,5],[2,6],[3,7]]
    tie groups [[0,2],[1,3],[4,6],[5,7]]   (first and last pipeline stage: tied-weight gradients)

With ``ep`` (folded into dp; ``dp=4, ep=2`` on 4 ranks): ep groups ``[[0,1],[2,3]]`` (the expert
all-to-all), edp groups ``[[0,2],[1,3]]`` (ranks holding the same experts: their gradient sum).

Every group gets the same ``timeout_s`` so a failed peer turns a collective into an error, never a hang.
``dist.new_group`` must be called by every rank for every group in the same order, so all groups of
all axes are created on every rank and each rank keeps those that contain it.

Groups are created once per (ranks, timeout) and default process group, and reused by later
compiles in the same process (:func:`mesh_group`). Each gloo group keeps its own I/O loop and
worker threads for as long as it lives, and those threads wake up even when idle: measured on this
2-core machine, 20 compiles of 4-rank plans left 36 loop and 72 worker threads per process, whose
idle wake-ups took 6.5 % of a core per rank (0.5 % before), and a benchmark compiling ~100 plans
in one launch ran its second pass about 2x slower than its first. Every rank calls
:func:`build_process_groups` with the same plans in the same order, so every rank finds the same
groups in the cache and calls ``new_group`` for the same new ones: the collective order holds.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from autopar.core.errors import PlanError, RuntimeFailure
from autopar.core.plan import Plan

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def tie_groups(plan: Plan) -> list[list[int]]:
    """Pairs (first stage, last stage) with equal dp and tp coordinates; empty when pp == 1."""
    if plan.pp == 1:
        return []
    return [[g[0], g[-1]] for g in plan.groups("pp")]


@dataclass
class ProcessGroups:
    """This rank's view of the mesh: its coordinates and one group per axis.

    A group is ``None`` when the axis has size 1 (nothing to communicate).
    """

    plan: Plan
    rank: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)
    """The global ranks of this rank's group on each axis (and ``tie``), in group order."""

    @property
    def coords(self) -> dict[str, int]:
        return self.plan.coords(self.rank)

    def group(self, axis: str) -> dist.ProcessGroup | None:
        return self.groups.get(axis)

    def size(self, axis: str) -> int:
        return len(self.ranks.get(axis, [self.rank]))

    def index(self, axis: str) -> int:
        """This rank's position in its ``axis`` group (its coordinate on that axis)."""
        return self.ranks.get(axis, [self.rank]).index(self.rank)

    def describe(self) -> str:
        return " ".join(f"{a}={r}" for a, r in self.ranks.items())


def _all_axis_groups(plan: Plan) -> dict[str, list[list[int]]]:
    out = {a.name: plan.groups(a.name) for a in plan.mesh if a.size > 1}
    if plan.ep > 1:  # expert parallelism, folded into dp (core/plan.py: Plan.groups)
        out["ep"] = plan.groups("ep")
        if plan.dp // plan.ep > 1:
            out["edp"] = plan.groups("edp")
    ties = tie_groups(plan)
    if ties:
        out["tie"] = ties
    return out


def describe_groups(plan: Plan, rank: int) -> dict[str, list[int]]:
    """The ranks of each of ``rank``'s groups, without creating any (for ``rank_code``)."""
    out: dict[str, list[int]] = {}
    for axis, groups in _all_axis_groups(plan).items():
        for g in groups:
            if rank in g:
                out[axis] = g
    return out


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) when it is set and nobody has yet; True if it initialised one.

    NCCL with one GPU per process (``LOCAL_RANK``) when CUDA is available, gloo otherwise.
    """
    if dist.is_initialized() or "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend, timeout = "nccl" if cuda else "gloo", datetime.timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps its agent's store across restarts, so a restarted group would read the
        # dead attempt's addresses (gloo: "connection refused"): key each attempt apart.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout
        )
        store = dist.PrefixStore(f"autopar/attempt_{attempt}", agent)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    log.info(
        "initialised %s rank %d/%d from the environment",
        dist.get_backend(),
        dist.get_rank(),
        dist.get_world_size(),
    )
    return True


_MESH_GROUPS: dict[tuple[tuple[int, ...], float], dist.ProcessGroup] = {}
_MESH_GROUPS_WORLD: list = [None]
"""The default process group the cached groups belong to (a new one clears the cache)."""


def mesh_group(ranks: list[int], timeout_s: float) -> dist.ProcessGroup:
    """``dist.new_group(ranks)``, created once per default process group (see the module docstring).
    Collective on first use, like ``new_group``."""
    world = dist.distributed_c10d._get_default_group()
    if _MESH_GROUPS_WORLD[0] is not world:
        _MESH_GROUPS.clear()
        _MESH_GROUPS_WORLD[0] = world
    key = (tuple(ranks), float(timeout_s))
    if key not in _MESH_GROUPS:
        _MESH_GROUPS[key] = dist.new_group(list(ranks), timeout=datetime.timedelta(seconds=timeout_s))
    return _MESH_GROUPS[key]


def build_process_groups(plan: Plan, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessGroups:
    """Create the groups of ``plan`` on the initialised default process group (collective call)."""
    if not dist.is_initialized():
        raise RuntimeFailure(
            "torch.distributed is not initialised: launch with torchrun (each rank calls autopar.compile) "
            "or autopar.runtime.launch.run_local(fn, nprocs)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != plan.world_size:
        raise PlanError(
            f"the plan needs {plan.world_size} ranks ({plan.summary()}) but {world} processes were "
            f"launched; launch {plan.world_size} processes or choose a plan for {world}"
        )
    pg = ProcessGroups(plan=plan, rank=rank, timeout_s=timeout_s)
    for axis, groups in _all_axis_groups(plan).items():
        for g in groups:
            handle = mesh_group(g, timeout_s)
            if rank in g:
                pg.groups[axis] = handle
                pg.ranks[axis] = list(g)
    log.debug("rank %d groups: %s", rank, pg.describe())
    return pg

"""What the planner's phases share: a costed :class:`Candidate`, the :class:`SearchStats` and the
:class:`SearchView` of a running search that the refinement (:mod:`autopar.solve.refine`) and the
explanations (:mod:`autopar.solve.explain`) read (:class:`autopar.solve.planner.Search` is one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from autopar.cluster import Cluster
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan, PredictedCost
from autopar.core.plan_rules import mesh_label

DEFAULT_ORDER = ("dp", "pp", "tp")
"""The mesh axis order, outermost first, of a candidate without an ``order`` key."""


@dataclass(kw_only=True)
class Candidate:
    """One plan the search costed: its short keys, the plan and its predicted cost."""

    keys: dict
    plan: Plan
    cost: PredictedCost
    work: Any = field(default=None, repr=False, compare=False)
    """The estimator's workload (its stages serve every memory knob of the same pipeline)."""

    @property
    def time_s(self) -> float:
        return self.cost.step_time_s

    @property
    def overflow_bytes(self) -> float:
        return self.cost.memory_bytes_per_device - self.cost.memory_capacity_bytes


@dataclass(kw_only=True)
class SearchStats:
    """Counters of one search (stored in ``Plan.search["stats"]``)."""

    space_size: int = 0
    evaluated: int = 0
    pruned: int = 0
    """Skipped because a lower bound on their step time was not below the incumbent's."""
    screened: int = 0
    """Skipped because their memory (computed without timing them) fits under no split."""
    invalid: int = 0
    intra_op: dict = field(default_factory=dict)
    """tp -> what the intra-op ILP gave at that tp (adopted or not, both step times, solve time)."""
    ilp_solves: int = 0
    """Inter-op ILPs solved (uneven splits)."""
    refined: int = 0
    """Candidates an uneven split made faster (or made fit)."""
    solve_time_s: float = 0.0
    status: str = "optimal"
    """``optimal``: the whole space was covered (pruning is exact); ``time_limit``: incumbent."""
    gap: float = 0.0
    """Relative optimality gap bound ``1 - lower/incumbent``: 0 when optimal; after a time limit the
    incumbent's ``1 - MFU`` (no plan beats all devices computing at peak), a loose but valid bound."""
    invalid_reasons: dict[str, str] = field(default_factory=dict)


class SearchView(Protocol):
    """The state of a running search that the later phases read and extend."""

    graph: OpGraph
    cluster: Cluster
    fitting: list[Candidate]
    overflowing: list[Candidate]
    stats: SearchStats
    best_s: float

    def out_of_time(self) -> bool:
        """Past the deadline with an incumbent."""
        ...

    def time_left_s(self) -> float:
        """Seconds left before the deadline."""
        ...

    def add_split(self, even: Candidate, better: Candidate) -> None:
        """A re-split candidate replaces its even-split twin among the fitting ones."""
        ...


def label(keys: dict) -> str:
    """A mesh's name in the search's notes: ``dp=8 tp=1 pp=1`` (`` ep=4`` with expert parallelism)."""
    ep = keys.get("ep", 1)
    return mesh_label(keys) + (f" ep={ep}" if ep > 1 else "")


def make_plan(keys: dict, global_batch: int, mode: str, placements: dict | None = None) -> Plan:
    """The :class:`~autopar.core.plan.Plan` of a candidate's short keys."""
    return Plan.manual(
        axis_order=keys.get("order", DEFAULT_ORDER),
        placements=placements or {},
        dp=keys["dp"],
        tp=keys["tp"],
        pp=keys["pp"],
        global_batch=global_batch,
        micro_batch_size=keys["mbs"],
        schedule=keys["schedule"],
        virtual_stages=keys["vpp"],
        recompute=keys["recompute"],
        sequence_parallel=bool(keys["sp"]),
        zero_stage=keys["zero"],
        ep=keys.get("ep", 1),
        mode=mode,
    )

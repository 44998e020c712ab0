"""Pipeline schedules as plain data: per-stage action orders and a step x rank grid.

An action is ``<stage><F|B><micro-batch>`` (``1F0`` = stage 1 forward of micro-batch 0), the
notation of ``torch.distributed.pipelining``. The order of actions on each stage is exactly the
order in which ``torch.distributed.pipelining`` runs them (we execute with its schedules):

* GPipe: all forwards, then all backwards.
* 1F1B: stage ``s`` runs ``min(m, pp - s)`` warm-up forwards, then alternates one backward and one
  forward, then drains the backwards (torch's variant keeps one more micro-batch in flight than
  Megatron's ``pp - s - 1``). torch requires ``m >= pp`` for 1F1B.

The grid places every action at the earliest unit time step where its stage is free and its
dependencies are done (forward after the previous stage's forward, backward after the next
stage's backward), with forward and backward taking one step each::

    >>> print(one_f_one_b(2, 3).grid())
    step  rank0  rank1
       0    0F0      .
       1    0F1    1F0
       2      .    1B0
       3    0B0    1F1
    ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from autopar.core.errors import PlanError


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    """``F`` (forward) or ``B`` (backward)."""
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro_batch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        for kind in ("F", "B"):
            if kind in text:
                stage, mb = text.split(kind)
                return cls(int(stage), kind, int(mb))
        raise ValueError(f"action {text!r} is not <stage><F|B><micro-batch>")


@dataclass
class Schedule:
    """Per-rank action orders of one training step of one pipeline.

    Without virtual stages rank ``r`` runs stage ``r``; with them (interleaved) it runs the
    virtual stages ``r, r + pp, r + 2pp, ...`` and ``num_stages = pp * vpp``.
    """

    name: str
    num_stages: int
    num_micro_batches: int
    orders: list[list[Action]]
    """``orders[r]``: the actions of pipeline rank ``r`` in execution order."""

    @property
    def num_ranks(self) -> int:
        return len(self.orders)

    def steps(self) -> list[list[Action | None]]:
        """``steps[t][r]``: the action rank ``r`` runs at unit time ``t`` (None = idle)."""
        done_at: dict[Action, int] = {}
        cursor = [0] * self.num_ranks
        timeline: list[list[Action | None]] = []
        t = 0
        while any(cursor[s] < len(self.orders[s]) for s in range(self.num_ranks)):
            row: list[Action | None] = []
            for s in range(self.num_ranks):
                act = self.orders[s][cursor[s]] if cursor[s] < len(self.orders[s]) else None
                ready = act is not None and all(done_at.get(d, t) < t for d in self._deps(act))
                row.append(act if ready else None)
            for s, act in enumerate(row):
                if act is not None:
                    done_at[act] = t
                    cursor[s] += 1
            if t > 4 * sum(len(o) for o in self.orders) + 10:
                raise PlanError(f"schedule {self.name} deadlocks: check the per-stage orders")
            timeline.append(row)
            t += 1
        return timeline

    def _deps(self, act: Action) -> list[Action]:
        if act.kind == "F":
            return [Action(act.stage - 1, "F", act.micro_batch)] if act.stage > 0 else []
        if act.stage == self.num_stages - 1:
            return [Action(act.stage, "F", act.micro_batch)]
        return [Action(act.stage + 1, "B", act.micro_batch)]

    def grid(self) -> str:
        """The step x rank table (one pipeline; rank = stage)."""
        steps = self.steps()
        width = max(5, *(len(str(a)) for o in self.orders for a in o))
        head = "step " + " ".join(f"{'rank' + str(s):>{width}}" for s in range(self.num_ranks))
        lines = [head]
        for t, row in enumerate(steps):
            cells = " ".join(f"{(str(a) if a else '.'):>{width}}" for a in row)
            lines.append(f"{t:>4} {cells}")
        return "\n".join(lines)

    def bubble_fraction(self) -> float:
        """Idle share of the grid (both directions one step each)."""
        steps = self.steps()
        busy = sum(len(o) for o in self.orders)
        return 1.0 - busy / (len(steps) * self.num_ranks)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "num_stages": self.num_stages,
                "num_micro_batches": self.num_micro_batches,
                "orders": [[str(a) for a in o] for o in self.orders],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        d = json.loads(text)
        orders = [[Action.parse(a) for a in o] for o in d["orders"]]
        return cls(d["name"], d["num_stages"], d["num_micro_batches"], orders)

    def __repr__(self) -> str:
        return f"Schedule({self.name}, stages={self.num_stages}, micro_batches={self.num_micro_batches})"


def gpipe(num_stages: int, num_micro_batches: int) -> Schedule:
    m = num_micro_batches
    orders = [
        [Action(s, "F", i) for i in range(m)] + [Action(s, "B", i) for i in range(m)]
        for s in range(num_stages)
    ]
    return Schedule("gpipe", num_stages, m, orders)


def one_f_one_b(num_stages: int, num_micro_batches: int) -> Schedule:
    m = num_micro_batches
    if m < num_stages:
        raise PlanError(
            f"1F1B needs at least as many micro-batches as stages (torch.distributed.pipelining): "
            f"m={m} < pp={num_stages}; raise global_batch/(dp*mbs) to >= {num_stages} or use schedule=gpipe"
        )
    orders = []
    for s in range(num_stages):
        warmup = min(m, num_stages - s)
        order = [Action(s, "F", i) for i in range(warmup)]
        f, b = warmup, 0
        while f < m:
            order += [Action(s, "B", b), Action(s, "F", f)]
            b, f = b + 1, f + 1
        order += [Action(s, "B", i) for i in range(b, m)]
        orders.append(order)
    return Schedule("1f1b", num_stages, m, orders)


def interleaved(num_ranks: int, virtual_stages: int, num_micro_batches: int) -> Schedule:
    """torch's ``ScheduleInterleaved1F1B`` order (depth first; Narayanan et al. 2021, relaxed to any
    ``m`` divisible by ``max(1, m // pp)`` rounds), computed by torch's own per-rank routine."""
    from torch.distributed.pipelining import schedules as ts

    m = num_micro_batches
    rounds = max(1, m // num_ranks)
    if m % rounds:
        raise PlanError(
            f"interleaved 1F1B needs m divisible by max(1, m // pp) = {rounds} (torch): m={m}, pp={num_ranks}; "
            f"choose m a multiple of {num_ranks} or below it"
        )
    # The order depends only on these fields; torch computes it in __init__ from real stages.
    calc = object.__new__(ts.ScheduleInterleaved1F1B)
    calc.n_local_stages, calc.pp_group_size, calc._n_microbatches = virtual_stages, num_ranks, m
    calc.number_of_rounds, calc.microbatches_per_round = rounds, m // rounds
    orders = []
    for rank in range(num_ranks):
        ops = [a for a in calc._calculate_single_rank_operations(rank) if a is not None]
        kinds = {ts._ComputationType.FORWARD: "F", ts._ComputationType.FULL_BACKWARD: "B"}
        orders.append([Action(a.stage_index, kinds[a.computation_type], a.microbatch_index) for a in ops])
    return Schedule("interleaved", num_ranks * virtual_stages, m, orders)


def runs_as(schedule: str, num_stages: int, num_micro_batches: int) -> str:
    """The schedule the runtime executes: 1F1B with fewer micro-batches than stages runs as GPipe
    (torch's 1F1B needs ``m >= pp``; with ``m < pp`` no stage reaches a steady 1F1B phase anyway,
    and the gradients are the same)."""
    if schedule == "1f1b" and num_micro_batches < num_stages:
        return "gpipe"
    return schedule


def for_plan(schedule: str, num_stages: int, num_micro_batches: int, virtual_stages: int = 1) -> Schedule:
    """The schedule the runtime runs for a plan's ``schedule`` (see :func:`runs_as`)."""
    if schedule == "interleaved":
        return interleaved(num_stages, virtual_stages, num_micro_batches)
    schedule = runs_as(schedule, num_stages, num_micro_batches)
    if schedule == "gpipe":
        return gpipe(num_stages, num_micro_batches)
    if schedule == "1f1b":
        return one_f_one_b(num_stages, num_micro_batches)
    raise PlanError(f"schedule={schedule!r} is not supported by the runtime; use gpipe, 1f1b or interleaved")

"""A timed pipeline schedule: when each forward / backward of each micro-batch runs on each stage.

The per-stage action *orders* are those of :mod:`autopar.runtime.schedule` (GPipe, 1F1B, in the
order ``torch.distributed.pipelining`` runs them) plus Megatron's interleaved 1F1B for virtual
stages. Given a duration per (stage, direction), every action starts as soon as its stage is free
and its dependency has finished (forward after the previous virtual stage's forward, backward
after the next virtual stage's backward), which is a list schedule with fixed orders::

    >>> tl = simulate(orders("1f1b", 2, 3, 1), fwd_s=[1, 1], bwd_s=[2, 2])
    >>> tl.makespan_s          # (m + p - 1) * (f + b) for equal stages
    12.0

No matplotlib here: :mod:`autopar.report.figures` draws the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.core.errors import PlanError
from autopar.runtime import schedule as rs


@dataclass(frozen=True)
class Action:
    """``kind`` (``F``/``B``) of ``micro_batch`` on pipeline ``stage``, model chunk ``chunk``."""

    stage: int
    chunk: int
    kind: str
    micro_batch: int

    def virtual(self, num_stages: int) -> int:
        """Virtual stage index: chunk ``c`` of stage ``s`` is ``c * pp + s`` (Megatron's layout)."""
        return self.chunk * num_stages + self.stage


@dataclass(frozen=True)
class Event:
    action: Action
    start_s: float
    end_s: float
    p2p_s: float = 0.0
    """The blocking send at the end of the action (included in ``end_s``)."""


@dataclass
class Timeline:
    num_stages: int
    num_micro_batches: int
    virtual_stages: int
    schedule: str
    events: list[Event]
    note: str = ""
    """Set when the drawn order is an approximation of the real one."""

    @property
    def makespan_s(self) -> float:
        return max((e.end_s for e in self.events), default=0.0)

    def busy_s(self, stage: int) -> float:
        return sum(e.end_s - e.start_s for e in self.events if e.action.stage == stage)

    def idle_fraction(self, stage: int) -> float:
        span = self.makespan_s
        return 1.0 - self.busy_s(stage) / span if span > 0 else 0.0


# ------------------------------------------------------------------------------- orders
def _runtime_orders(schedule: str, p: int, m: int) -> list[list[Action]]:
    sched = rs.gpipe(p, m) if schedule == "gpipe" else rs.one_f_one_b(p, m)
    return [[Action(a.stage, 0, a.kind, a.micro_batch) for a in order] for order in sched.orders]


def _interleaved(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron-LM's interleaved 1F1B: micro-batches in groups of ``p``, chunks round-robin
    (forward ``k`` of a stage runs chunk ``(k // p) % v``; backwards visit the chunks in reverse)."""
    total = m * v

    def action(s: int, k: int, kind: str) -> Action:
        c = (k // p) % v
        mb = (k // (p * v)) * p + k % p
        return Action(s, v - 1 - c if kind == "B" else c, kind, mb)

    out = []
    for s in range(p):
        warmup = min((p - s - 1) * 2 + (v - 1) * p, total)
        fwd = [action(s, k, "F") for k in range(total)]
        bwd = [action(s, k, "B") for k in range(total)]
        order = fwd[:warmup]
        for i in range(total - warmup):
            order += [fwd[warmup + i], bwd[i]]
        order += bwd[total - warmup :]
        out.append(order)
    return out


def _depth_first(p: int, m: int, v: int) -> list[list[Action]]:
    """All forwards chunk by chunk, then all backwards in reverse: valid for any ``m``, drawn when
    the interleaved order's ``m % pp == 0`` requirement does not hold."""
    out = []
    for s in range(p):
        fwd = [Action(s, c, "F", i) for c in range(v) for i in range(m)]
        bwd = [Action(s, c, "B", i) for c in reversed(range(v)) for i in range(m)]
        out.append(fwd + bwd)
    return out


def orders(
    schedule: str,
    num_stages: int,
    num_micro_batches: int,
    virtual_stages: int = 1,
    *,
    forward_only: bool = False,
) -> tuple[list[list[Action]], str]:
    """Per-stage action orders and a note when the order drawn is not the exact one.
    ``forward_only`` (inference): the forwards of the same order."""
    out, note = _orders(schedule, num_stages, num_micro_batches, virtual_stages)
    if forward_only:
        out = [[a for a in order if a.kind == "F"] for order in out]
    return out, note


def _orders(
    schedule: str, num_stages: int, num_micro_batches: int, virtual_stages: int
) -> tuple[list[list[Action]], str]:
    p, m, v = num_stages, num_micro_batches, virtual_stages
    if schedule == "interleaved" and v > 1:
        if m % p == 0:
            return _interleaved(p, m, v), ""
        note = (
            f"interleaved order needs m % pp == 0 (m={m}, pp={p}); drawn as chunk-by-chunk forwards "
            "then backwards, which has the same critical path but not the same memory"
        )
        return _depth_first(p, m, v), note
    if schedule == "gpipe":
        return _runtime_orders("gpipe", p, m), ""
    if m >= p:
        return _runtime_orders("1f1b", p, m), ""
    note = (
        f"1F1B with fewer micro-batches than stages (m={m} < pp={p}) runs as GPipe "
        "(torch.distributed.pipelining needs m >= pp); drawn as GPipe"
    )
    return _runtime_orders("gpipe", p, m), note


# ---------------------------------------------------------------------------- simulation
def _dep(a: Action, p: int, num_virtual: int) -> tuple[int, str, int] | None:
    vs = a.virtual(p)
    if a.kind == "F":
        return (vs - 1, "F", a.micro_batch) if vs > 0 else None
    if vs == num_virtual - 1:
        return (vs, "F", a.micro_batch)
    return (vs + 1, "B", a.micro_batch)


def simulate(
    stage_orders: list[list[Action]],
    *,
    fwd_s: list[float],
    bwd_s: list[float],
    p2p_s: list[float] | None = None,
    virtual_stages: int = 1,
    schedule: str = "1f1b",
    num_micro_batches: int | None = None,
) -> Timeline:
    """Start every action at ``max(stage free, dependency done)``.

    ``fwd_s[s]`` / ``bwd_s[s]``: seconds of one forward / backward of one *chunk* on stage ``s``;
    ``p2p_s[s]``: the blocking send added at the end of each action.
    """
    p = len(stage_orders)
    num_virtual = p * virtual_stages
    p2p_s = p2p_s or [0.0] * p
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * p
    cursor = [0] * p
    events: list[Event] = []
    remaining = sum(len(o) for o in stage_orders)
    while remaining:
        progressed = False
        for s in range(p):
            while cursor[s] < len(stage_orders[s]):
                a = stage_orders[s][cursor[s]]
                dep = _dep(a, p, num_virtual)
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done.get(dep, 0.0)) if dep else free[s]
                dur = fwd_s[s] if a.kind == "F" else bwd_s[s]
                end = start + dur + p2p_s[s]
                events.append(Event(a, start, end, p2p_s[s]))
                done[(a.virtual(p), a.kind, a.micro_batch)] = end
                free[s] = end
                cursor[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [str(stage_orders[s][cursor[s]]) for s in range(p) if cursor[s] < len(stage_orders[s])]
            raise PlanError(f"pipeline schedule {schedule} deadlocks at {stuck[:3]}; check the action orders")
    m = num_micro_batches if num_micro_batches is not None else 1 + max(e.action.micro_batch for e in events)
    return Timeline(p, m, virtual_stages, schedule, events)

"""Measurements of a compiled run, overlaid on the predictions.

The runtime (``compiled.report(path)``) or a user passes a plain dict; every key is optional::

    {
      "step_time_s": 0.84,                      # mean measured step time
      "memory_bytes_per_rank": [1.2e9, ...],    # peak memory per rank, one entry per rank
      "events": [                               # one pipeline's timeline, seconds from step start
        {"stage": 0, "kind": "F", "micro_batch": 0, "start_s": 0.0, "end_s": 0.1, "chunk": 0},
        ...
      ],
      "source": "4 gloo ranks, steps 3-10"      # shown in the report
    }

:func:`check_measured` validates it and says which field is wrong.
"""

from __future__ import annotations

import math

from autopar.core.errors import ReportError
from autopar.core.plan import Plan

KEYS = ("step_time_s", "memory_bytes_per_rank", "events", "source")
EVENT_KEYS = ("stage", "kind", "micro_batch", "start_s", "end_s")


def _number(value: object, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ReportError(f"measured {where}={value!r}: must be a finite number >= 0")
    return float(value)


def _event(e: object, i: int, plan: Plan) -> dict:
    where = f"events[{i}]"
    if not isinstance(e, dict):
        raise ReportError(f"measured {where}: must be an object with {', '.join(EVENT_KEYS)}")
    for key in EVENT_KEYS:
        if key not in e:
            raise ReportError(f"measured {where} is missing the field {key!r}")
    if e["kind"] not in ("F", "B"):
        raise ReportError(f"measured {where}.kind={e['kind']!r}: must be 'F' (forward) or 'B' (backward)")
    for key in ("stage", "micro_batch"):
        if not isinstance(e[key], int) or e[key] < 0:
            raise ReportError(f"measured {where}.{key}={e[key]!r}: must be an integer >= 0")
    if e["stage"] >= plan.pp:
        raise ReportError(
            f"measured {where}.stage={e['stage']}: the plan has pp={plan.pp} stages (0..{plan.pp - 1})"
        )
    start, end = _number(e["start_s"], f"{where}.start_s"), _number(e["end_s"], f"{where}.end_s")
    if end < start:
        raise ReportError(f"measured {where}: end_s={end} is before start_s={start}")
    return {**e, "start_s": start, "end_s": end, "chunk": int(e.get("chunk", 0))}


def check_measured(measured: dict | None, plan: Plan) -> dict | None:
    """A validated copy of ``measured`` (None stays None)."""
    if measured is None:
        return None
    if not isinstance(measured, dict):
        raise ReportError(
            f"measured must be a dict with keys {', '.join(KEYS)}, got {type(measured).__name__}"
        )
    unknown = sorted(set(measured) - set(KEYS))
    if unknown:
        raise ReportError(f"measured has unknown field(s) {unknown}; known: {', '.join(KEYS)}")
    out: dict = {"source": str(measured.get("source", ""))}
    if measured.get("step_time_s") is not None:
        out["step_time_s"] = _number(measured["step_time_s"], "step_time_s")
    mem = measured.get("memory_bytes_per_rank")
    if mem is not None:
        if not isinstance(mem, (list, tuple)) or len(mem) != plan.world_size:
            n = len(mem) if isinstance(mem, (list, tuple)) else type(mem).__name__
            raise ReportError(
                f"measured memory_bytes_per_rank has {n} entries; the plan has {plan.world_size} ranks (one each)"
            )
        out["memory_bytes_per_rank"] = [_number(v, f"memory_bytes_per_rank[{r}]") for r, v in enumerate(mem)]
    events = measured.get("events")
    if events is not None:
        if not isinstance(events, (list, tuple)):
            raise ReportError(f"measured events must be a list, got {type(events).__name__}")
        out["events"] = [_event(e, i, plan) for i, e in enumerate(events)]
    return out

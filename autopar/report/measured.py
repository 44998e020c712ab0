"""Measurements of a compiled run, overlaid on the predictions.

The runtime (``compiled.report(path)``) or a user passes a plain dict; every key is optional::

    {
      "step_time_s": 0.84,                      # mean measured step time
      "memory_bytes_per_rank": [1.2e9, ...],    # peak memory per rank, one entry per rank
      "events": [                               # one pipeline's timeline, seconds from step start
        {"stage": 0, "kind": "F", "micro_batch": 0, "start_s": 0.0, "end_s": 0.1, "chunk": 0},
        ...
      ],
      "source": "4 gloo ranks, steps 3-10",     # shown in the report
      "components_per_rank": [                  # each rank's median step, split as the cost model
        {"step_s": 0.84, "compute_s": 0.6, "optimizer_s": 0.05, "other_s": 0.19}, ...
      ],
      "predicted": {"step_time_s": 0.8, "breakdown_s": {...}}   # the plan's prediction (informative)
    }

:func:`check_measured` validates it and says which field is wrong.
"""

from __future__ import annotations

import math

from autopar.core.errors import ReportError
from autopar.core.plan import Plan

KEYS = ("step_time_s", "memory_bytes_per_rank", "events", "source", "components_per_rank", "predicted")
COMPONENT_KEYS = ("step_s", "compute_s", "optimizer_s", "other_s")
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
    comps = measured.get("components_per_rank")
    if comps is not None:
        if not isinstance(comps, (list, tuple)) or len(comps) != plan.world_size:
            raise ReportError(
                f"measured components_per_rank must be a list with one entry per rank ({plan.world_size})"
            )
        out["components_per_rank"] = [
            {k: _number(c.get(k, 0.0), f"components_per_rank[{r}].{k}") for k in COMPONENT_KEYS}
            if isinstance(c, dict)
            else _number(c, f"components_per_rank[{r}]")
            for r, c in enumerate(comps)
        ]
    return out


def predicted_components(breakdown_s: dict[str, float]) -> dict[str, float]:
    """The cost model's breakdown grouped as a run can measure it: compute (forward, backward and
    recompute of the slowest stage), the optimizer step, and the rest (collectives, p2p, bubble,
    per-step overhead)."""
    compute = breakdown_s.get("compute", 0.0) + breakdown_s.get("recompute", 0.0)
    opt = breakdown_s.get("optimizer", 0.0)
    other = sum(breakdown_s.values()) - compute - opt
    return {"compute_s": compute, "optimizer_s": opt, "other_s": other}

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
      "predicted": {"step_time_s": 0.8, "breakdown_s": {...}},  # the plan's prediction (informative)
      "replans": [                              # live re-planning checks (compiled.replans)
        {"step": 2, "measured_step_time_s": 0.9, "predicted_step_time_s": 0.5, "decision": "moved",
         "from_plan": "...", "to_plan": "...", "reason": "...", ...}, ...
      ],
      "expert_tokens": [[812, 790, ...], ...]   # MoE: routed slots per expert, one list per layer
    }

:func:`check_measured` validates it and says which field is wrong.
"""

from __future__ import annotations

import math

from autopar.core.errors import ReportError
from autopar.core.plan import Plan

KEYS = (
    "step_time_s",
    "memory_bytes_per_rank",
    "events",
    "source",
    "components_per_rank",
    "predicted",
    "replans",
    "expert_tokens",
)
REPLAN_KEYS = ("step", "measured_step_time_s", "predicted_step_time_s", "decision", "from_plan", "reason")
COMPONENT_KEYS = ("step_s", "compute_s", "tp_comm_s", "optimizer_s", "other_s")
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
    replans = measured.get("replans")
    if replans is not None:
        out["replans"] = [_replan(r, i) for i, r in enumerate(_as_list(replans, "replans"))]
    tokens = measured.get("expert_tokens")
    if tokens is not None:
        out["expert_tokens"] = _expert_tokens(tokens)
    return out


def _expert_tokens(value: object) -> list[list[float]]:
    """Per MoE layer, the routed token-expert slots of each expert (one list per layer, all of
    the same length E)."""
    layers = _as_list(value, "expert_tokens")
    out = []
    for i, row in enumerate(layers):
        counts = _as_list(row, f"expert_tokens[{i}]")
        if not counts:
            raise ReportError(f"measured expert_tokens[{i}] is empty: one count per expert")
        out.append([_number(v, f"expert_tokens[{i}][{e}]") for e, v in enumerate(counts)])
    if len({len(r) for r in out}) > 1:
        raise ReportError(
            f"measured expert_tokens: layers list {sorted({len(r) for r in out})} experts; one count per expert"
        )
    return out


def _as_list(value: object, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ReportError(f"measured {where} must be a list, got {type(value).__name__}")
    return list(value)


def _replan(r: object, i: int) -> dict:
    where = f"replans[{i}]"
    if not isinstance(r, dict):
        raise ReportError(f"measured {where}: must be an object with {', '.join(REPLAN_KEYS)}")
    for key in REPLAN_KEYS:
        if key not in r:
            raise ReportError(f"measured {where} is missing the field {key!r}")
    if r["decision"] not in ("kept", "moved"):
        raise ReportError(f"measured {where}.decision={r['decision']!r}: must be 'kept' or 'moved'")
    for key in ("measured_step_time_s", "predicted_step_time_s"):
        _number(r[key], f"{where}.{key}")
    return dict(r)


def predicted_components(breakdown_s: dict[str, float]) -> dict[str, float]:
    """The cost model's breakdown grouped as a run can measure it: compute (forward, backward and
    recompute of the slowest stage), the tensor-parallel collectives (timed in the lowered
    program's collective calls), the optimizer step, and the rest (DP/ZeRO sync, p2p, bubble,
    per-step overhead: on CPU they run on the compute thread and are measured as one remainder)."""
    compute = breakdown_s.get("compute", 0.0) + breakdown_s.get("recompute", 0.0)
    tp_comm = breakdown_s.get("tp_comm", 0.0)
    opt = breakdown_s.get("optimizer", 0.0)
    other = sum(breakdown_s.values()) - compute - tp_comm - opt
    return {"compute_s": compute, "tp_comm_s": tp_comm, "optimizer_s": opt, "other_s": other}

"""Why the planner chose what it chose: runner-ups, rejected configurations, infeasibility.

All of it is plain data stored on ``Plan.search`` (so it survives the JSON round-trip and the
report can draw it); :func:`autopar.core.explain.explain_text` renders it for terminals.
"""

from __future__ import annotations

from autopar.cluster import Cluster
from autopar.core.explain import BREAKDOWN_LABELS
from autopar.core.plan import Plan
from autopar.core.plan_rules import plan_keys
from autopar.core.text import bytes_text
from autopar.solve.candidate import Candidate, SearchView, label


def _why_slower(best: Candidate, other: Candidate) -> str:
    """The breakdown term that grew most from the best plan to ``other``."""
    b, o = best.cost.breakdown_s, other.cost.breakdown_s
    diffs = {k: o.get(k, 0.0) - b.get(k, 0.0) for k in set(b) | set(o)}
    key = max(diffs, key=diffs.get)
    pct = 100.0 * (other.time_s / best.time_s - 1.0)
    if diffs[key] <= 1e-9 * best.time_s:
        mem = other.cost.memory_bytes_per_device - best.cost.memory_bytes_per_device
        return f"ties on step time; uses {bytes_text(abs(mem))} {'more' if mem >= 0 else 'less'} memory per device"
    return f"+{pct:.1f}% step time, mostly {BREAKDOWN_LABELS.get(key, key)} (+{diffs[key]:.3g} s)"


def _entry(c: Candidate, why: str) -> dict:
    return {
        "plan": plan_keys(c.plan),
        "summary": c.plan.summary(),
        "step_time_s": c.time_s,
        "memory_bytes_per_device": c.cost.memory_bytes_per_device,
        "fits": c.cost.fits,
        "breakdown_s": dict(c.cost.breakdown_s),
        "why": why,
    }


def _fix_hint(c: Candidate) -> str:
    keys = c.keys
    hints = []
    if keys["recompute"] != "full":
        hints.append("recompute=full")
    if keys["zero"] < 3 and keys["dp"] > 1:
        hints.append("a higher ZeRO stage")
    if keys["mbs"] > 1:
        hints.append("a smaller micro-batch")
    if keys["pp"] == 1 or keys["tp"] == 1:
        hints.append("more tensor/pipeline parallelism")
    hints.append("more devices")
    return ", ".join(hints)


def _overflow_text(c: Candidate) -> str:
    return (
        f"needs {bytes_text(c.cost.memory_bytes_per_device)} per device, "
        f"{bytes_text(c.overflow_bytes)} over the {bytes_text(c.cost.memory_capacity_bytes)} capacity"
    )


def _rejected(ranked: list[Candidate], search: SearchView) -> list[dict]:
    """Per mesh not among the alternatives: its best fitting plan (why it lost) or its smallest
    overflow (why it did not fit), and invalid meshes with the rule they break."""
    best = ranked[0]
    by_mesh: dict[str, list] = {}
    for c in search.fitting + search.overflowing:
        by_mesh.setdefault(label(c.keys), []).append(c)
    out = []
    for mesh, cands in by_mesh.items():
        fitting = [c for c in cands if c.cost.fits]
        if fitting:
            c = min(fitting, key=lambda c: c.time_s)
            if c is not best:
                out.append(
                    {"config": mesh, "fits": True, "step_time_s": c.time_s, "why": _why_slower(best, c)}
                )
        else:
            c = min(cands, key=lambda c: c.overflow_bytes)
            out.append({"config": mesh, "fits": False, "step_time_s": c.time_s, "why": _overflow_text(c)})
    for mesh, reason in search.stats.invalid_reasons.items():
        if mesh not in by_mesh:
            out.append({"config": mesh, "fits": False, "step_time_s": None, "why": reason})
    out.sort(key=lambda e: (not e["fits"], e["step_time_s"] or float("inf")))
    return out


def attach_search(
    plan: Plan, ranked: list[Candidate], search: SearchView, *, top_k: int, cluster: Cluster
) -> None:
    """Store the runner-ups (``ranked``, best first), the rejected configurations and the search's
    statistics on ``plan.search``."""
    best = ranked[0]
    alternatives = [_entry(c, _why_slower(best, c)) for c in ranked[1:top_k]]
    st = search.stats
    plan.search = {
        "alternatives": alternatives,
        "rejected": _rejected(ranked, search),
        "stats": {
            "space_size": st.space_size,
            "evaluated": st.evaluated,
            "pruned": st.pruned,
            "screened": st.screened,
            "invalid": st.invalid,
            "ilp_solves": st.ilp_solves,
            "refined": st.refined,
            "solve_time_s": st.solve_time_s,
            "status": st.status,
            "gap": st.gap,
            "intra_op": {str(tp): v for tp, v in st.intra_op.items()},
            "cluster": getattr(cluster, "name", ""),
            "num_devices": cluster.num_devices,
        },
    }
    experts = expert_parallel_notes(best, search)
    if experts:
        plan.search["expert_parallel"] = experts


def expert_parallel_notes(best: Candidate, search: SearchView) -> dict | None:
    """Why this ``ep``: per expert-parallel degree costed, its best plan's step time, all-to-all
    seconds and memory, or its smallest overflow; and a sentence weighing the chosen degree's
    all-to-all cost against the expert memory it saves (None when no ``ep > 1`` was considered)."""
    per_ep: dict[int, list[Candidate]] = {}
    for c in search.fitting + search.overflowing:
        per_ep.setdefault(c.keys.get("ep", 1), []).append(c)
    if set(per_ep) <= {1}:
        return None
    rows = []
    for ep, cands in sorted(per_ep.items()):
        fitting = [c for c in cands if c.cost.fits]
        c = min(fitting, key=lambda c: c.time_s) if fitting else min(cands, key=lambda c: c.overflow_bytes)
        rows.append(
            {
                "ep": ep,
                "fits": bool(fitting),
                "step_time_s": c.time_s,
                "ep_comm_s": c.cost.breakdown_s.get("ep_comm", 0.0),
                "memory_bytes_per_device": c.cost.memory_bytes_per_device,
                "summary": c.plan.summary(),
            }
        )
    return {"chosen": best.keys.get("ep", 1), "options": rows, "why": _ep_why(best, rows)}


def _ep_why(best: Candidate, rows: list[dict]) -> str:
    ep = best.keys.get("ep", 1)
    mine = next(r for r in rows if r["ep"] == ep)
    lower = [r for r in rows if r["ep"] < ep]
    higher = [r for r in rows if r["ep"] > ep]
    parts = [
        f"ep={ep}: all-to-all {mine['ep_comm_s']:.3g} s per step, "
        f"{bytes_text(mine['memory_bytes_per_device'])} per device"
    ]
    for r in lower:
        if not r["fits"]:
            parts.append(
                f"ep={r['ep']} does not fit ({bytes_text(r['memory_bytes_per_device'])}: more experts per rank)"
            )
        else:
            parts.append(
                f"ep={r['ep']} fits but is {100 * (r['step_time_s'] / mine['step_time_s'] - 1):+.1f}% step time"
            )
    for r in higher:
        if r["fits"]:
            parts.append(
                f"ep={r['ep']} saves {bytes_text(max(0.0, mine['memory_bytes_per_device'] - r['memory_bytes_per_device']))} "
                f"but its all-to-all takes {r['ep_comm_s']:.3g} s ({100 * (r['step_time_s'] / mine['step_time_s'] - 1):+.1f}% step time)"
            )
        else:
            parts.append(f"ep={r['ep']} does not fit")
    return "; ".join(parts)


def infeasible_message(search: SearchView) -> tuple[str, dict]:
    """The message and details of the error raised when no plan fits (or none is valid)."""
    st = search.stats
    if not search.overflowing:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(st.invalid_reasons.items())[:3])
        fixed = getattr(getattr(search, "spec", None), "fixed", None) or {}
        if not reasons and fixed:
            keys = ", ".join(f"{k}={v}" for k, v in fixed.items())
            reasons = (
                f"no mesh, micro-batch, schedule and memory knobs go with the keys you fixed ({keys}); "
                "fix fewer keys, or check that they divide the cluster, the batch and the layers"
            )
        return (f"no valid plan for this model, batch and cluster ({reasons or 'empty search space'})", {})
    c = min(search.overflowing, key=lambda c: c.overflow_bytes)
    message = (
        f"no plan fits in memory: the closest candidate ({c.plan.summary()}) {_overflow_text(c)}. "
        f"Try {_fix_hint(c)}."
    )
    details = {
        "closest_plan": plan_keys(c.plan),
        "memory_bytes_per_device": c.cost.memory_bytes_per_device,
        "memory_capacity_bytes": c.cost.memory_capacity_bytes,
        "overflow_bytes": c.overflow_bytes,
        "memory_breakdown_bytes": dict(c.cost.memory_breakdown_bytes),
    }
    return message, details

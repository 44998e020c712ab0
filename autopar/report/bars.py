"""Figures 3, 4 and 6: memory per device against capacity (stacked by kind, one bar per pipeline
stage), the step-time breakdown, and the best step time of every mesh the planner costed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.core.explain import BREAKDOWN_LABELS
from autopar.core.text import byte_unit, gb_text, time_unit
from autopar.report import figures as F
from autopar.report.context import ReportData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MEMORY_KINDS = {
    "params": ("parameters", "#4e79a7"),
    "grads": ("gradients", "#76b7b2"),
    "optimizer": ("optimizer state", "#59a14f"),
    "activations": ("activations", "#f28e2b"),
    "activations_transient": ("activations (transient)", "#ffbe7d"),
    "kv_cache": ("KV cache", "#e15759"),
    "comm_buffers": ("comm buffers", "#b07aa1"),
    "reserved": ("reserved (context, allocator)", "#bab0ac"),
}
BREAKDOWN_COLORS = {
    "compute": "#4e79a7",
    "recompute": "#a0cbe8",
    "tp_comm": "#f28e2b",
    "zero_comm_exposed": "#ffbe7d",
    "pp_p2p": "#3b3b3b",
    "pp_bubble": "#bab0ac",
    "dp_comm_exposed": F.DP_SYNC,
    "optimizer": F.OPTIMIZER,
}


# ----------------------------------------------------------------------------------- memory
def memory_per_stage(data: ReportData) -> tuple[list[dict[str, float]], str]:
    """Per stage a breakdown dict, and where it comes from."""
    if data.stages:
        return [s.memory_bytes for s in data.stages], "estimator"
    p = data.predicted
    worst = (p.extra or {}).get("largest_memory_stage", 0)
    totals = (p.extra or {}).get("memory_bytes_per_stage") or [p.memory_bytes_per_device]
    out = [{"total (breakdown not stored)": t} for t in totals]
    if 0 <= worst < len(out):
        out[worst] = dict(p.memory_breakdown_bytes)
    return out, "plan"


def _measured_per_stage(data: ReportData) -> list[float] | None:
    mem = (data.measured or {}).get("memory_bytes_per_rank")
    if not mem:
        return None
    plan = data.plan
    out = [0.0] * plan.pp
    for rank, value in enumerate(mem):
        s = plan.coords(rank).get("pp", 0)
        out[s] = max(out[s], value)
    return out


OFF_SCALE = 20.0
"""Capacity more than this many times the largest bar is written in the title, not drawn (the
bars would be invisible)."""


def stage_capacities(data: ReportData) -> list[float]:
    """Memory capacity of each stage's devices (each stage its own on a heterogeneous cluster)."""
    n = data.plan.pp
    if data.stage_capacity_bytes and len(data.stage_capacity_bytes) == n:
        return list(data.stage_capacity_bytes)
    capacity = data.predicted.memory_capacity_bytes if data.predicted else 0.0
    return [capacity] * n if capacity else []


def _capacity_runs(caps: list[float], kinds: list[str]) -> list[tuple[int, int, float, str]]:
    """Consecutive stages with the same capacity and kind: (first, last, capacity, kind)."""
    runs: list[tuple[int, int, float, str]] = []
    for i, (c, k) in enumerate(zip(caps, kinds)):
        if runs and runs[-1][2] == c and runs[-1][3] == k:
            runs[-1] = (runs[-1][0], i, c, k)
        else:
            runs.append((i, i, c, k))
    return runs


def _draw_capacity(ax: Axes, caps: list[float], kinds: list[str], size: float, unit: str) -> None:
    """One dashed line for a single capacity; otherwise a dashed segment over each run of stages
    on the same device kind, labelled with the kind, so every bar meets its own capacity."""
    runs = _capacity_runs(caps, kinds)
    if len(runs) == 1:
        c = caps[0] / size
        ax.axhline(c, color=F.CAPACITY, linestyle="--", linewidth=1.2)
        ax.text(-0.55, c, f"capacity {c:.3g} {unit}", color=F.CAPACITY, ha="left", va="bottom", fontsize=8)
        return
    for first, last, c, kind in runs:
        y = c / size
        ax.plot([first - 0.45, last + 0.45], [y, y], color=F.CAPACITY, linestyle="--", linewidth=1.2)
        label = f"{kind + ' ' if kind else ''}capacity {y:.3g} {unit}"
        ax.text(first - 0.45, y, label, color=F.CAPACITY, ha="left", va="bottom", fontsize=8)


def memory(data: ReportData) -> Figure:
    stages, _ = memory_per_stage(data)
    caps = stage_capacities(data)
    measured = _measured_per_stage(data) or []
    n = len(stages)
    kinds = data.stage_kinds if data.stage_kinds and len(data.stage_kinds) == n else [""] * n
    mixed_kinds = len(set(kinds)) > 1
    caps = caps if len(caps) == n else []
    used = max([sum(s.values()) for s in stages] + measured)
    draw_capacity = bool(caps) and max(caps) <= OFF_SCALE * used
    size, unit = byte_unit(max(used, max(caps) if draw_capacity else 0.0))
    fig = F.new_figure(F.WIDTH_IN if n > 8 else 9.0, 4.2)
    ax = fig.add_subplot()
    parts = [k for k in MEMORY_KINDS if any(s.get(k, 0) > 0 for s in stages)]
    parts += sorted({k for s in stages for k in s if k not in MEMORY_KINDS})
    bottoms = [0.0] * n
    for k in parts:
        label, color = MEMORY_KINDS.get(k, (k, "#d3d3d3"))
        heights = [s.get(k, 0.0) / size for s in stages]
        ax.bar(range(n), heights, bottom=bottoms, color=color, label=label, width=0.7)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if n <= 16:
        for i, b in enumerate(bottoms):
            ax.text(i, b, f"{b:.3g}", ha="center", va="bottom", fontsize=8)
    title = "Memory per device by pipeline stage"
    if mixed_kinds:
        title += ", each against its own device's capacity"
    if draw_capacity:
        _draw_capacity(ax, caps, kinds, size, unit)
    elif caps:
        off = sorted({(k, c) for k, c in zip(kinds, caps)}, key=lambda kc: -kc[1])
        text = ", ".join(f"{k + ' ' if k else ''}{gb_text(c)}" for k, c in off)
        title += f" (capacity {text}, off this scale)"
    if measured:
        ax.plot(range(n), [m / size for m in measured], "D", color="black", label="measured (max over ranks)")
    top = max([*bottoms, max(caps) / size if draw_capacity else 0.0, *(m / size for m in measured)])
    ax.set_ylim(0, top * 1.12 if top else 1)
    ax.set_xlim(-0.6, n - 0.4)
    step = max(1, n // 16)
    ticks = range(0, n, step)
    labels = [f"stage {s}" + (f"\n{kinds[s]}" if mixed_kinds else "") for s in ticks]
    ax.set_xticks(ticks, labels, fontsize=8)
    power = {1e12: "12", 1e9: "9", 1e6: "6", 1e3: "3"}.get(size)
    ax.set_ylabel(f"{unit} per device" + (f" (1 {unit} = 10$^{{{power}}}$ bytes)" if power else ""))
    ax.set_title(title, fontsize=11, loc="left")
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.grid(axis="y", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    return fig


# -------------------------------------------------------------------------------- breakdown
def breakdown(data: ReportData) -> Figure:
    p = data.predicted
    parts = [(k, v) for k, v in p.breakdown_s.items() if v > 0]
    scale, unit = time_unit(p.step_time_s)
    rows = [*parts, ("total", p.step_time_s)]
    measured = (data.measured or {}).get("step_time_s")
    if measured:
        rows.append(("measured", measured))
    fig = F.new_figure(9.0, 0.9 + 0.34 * len(rows))
    ax = fig.add_subplot()
    labels, values, colors = [], [], []
    for k, v in rows:
        labels.append(BREAKDOWN_LABELS.get(k, k) if k not in ("total", "measured") else f"{k} step")
        values.append(v * scale)
        colors.append(BREAKDOWN_COLORS.get(k, "#333333" if k == "total" else "#888888"))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=colors, height=0.65)
    right = max(values)
    for yi, (k, v), val in zip(y, rows, values):
        share = f" · {100 * v / p.step_time_s:.1f}%" if k not in ("total", "measured") else ""
        ax.text(val + right * 0.01, yi, f"{val:.3g} {unit}{share}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_xlim(0, right * 1.25)
    ax.set_xlabel(f"time per step ({unit})")
    ax.set_title("Step-time breakdown (the parts add up to the total)", fontsize=11, loc="left")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    return fig


# ------------------------------------------------------------------------------------ meshes
MAX_MESHES = 20


def mesh_entries(data: ReportData) -> list[tuple[str, float, str]]:
    """(label, step time, status) for the chosen plan and every costed mesh: ``chosen``, ``fits``
    or ``overflow`` (the mesh's smallest overflow; its time is shown for scale)."""
    plan, search = data.plan, data.plan.search or {}
    out = []
    if data.predicted:
        out.append((f"dp={plan.dp} tp={plan.tp} pp={plan.pp} (chosen)", data.predicted.step_time_s, "chosen"))
    for r in search.get("rejected", []):
        if r.get("step_time_s") is not None:
            out.append((r.get("config", "?"), r["step_time_s"], "fits" if r.get("fits") else "overflow"))
    out.sort(key=lambda e: (e[2] == "overflow", e[1]))
    return out


def meshes(data: ReportData) -> Figure:
    everything = mesh_entries(data)
    if len(everything) < 2:
        return None
    entries = everything[:MAX_MESHES]
    shown = (
        f"; the {MAX_MESHES} best of {len(everything)}, all in the table below"
        if len(everything) > MAX_MESHES
        else ""
    )
    scale, unit = time_unit(max(e[1] for e in entries))
    colors = {"chosen": "#59a14f", "fits": "#4e79a7", "overflow": "#d3d3d3"}
    fig = F.new_figure(9.0, 0.9 + 0.3 * len(entries))
    ax = fig.add_subplot()
    y = list(range(len(entries)))[::-1]
    values = [t * scale for _, t, _ in entries]
    ax.barh(
        y,
        values,
        color=[colors[s] for *_, s in entries],
        hatch=None,
        height=0.65,
        edgecolor=["#999999" if s == "overflow" else "none" for *_, s in entries],
    )
    best = entries[0][1]
    for yi, (_, t, status), val in zip(y, entries, values):
        note = (
            "does not fit"
            if status == "overflow"
            else ("" if status == "chosen" else f"+{100 * (t / best - 1):.1f}%")
        )
        ax.text(val + max(values) * 0.01, yi, f"{val:.3g} {unit}  {note}", va="center", fontsize=8)
    ax.set_yticks(y, [label for label, *_ in entries], fontsize=8)
    ax.set_xlim(0, max(values) * 1.3)
    ax.set_xlabel(f"best predicted step time of the mesh ({unit})")
    title = "Best plan per mesh (green: chosen, blue: fits, grey: does not fit)"
    ax.set_title(title + ("\n" + shown.lstrip("; ") if shown else ""), fontsize=11, loc="left")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    return fig

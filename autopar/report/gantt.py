"""Figure 2, the pipeline schedule as a Gantt chart: one row per pipeline stage (the ranks of the
``dp = 0, tp = 0`` pipeline; every replica runs the same timeline), forward and backward of each
micro-batch, the blocking p2p send at the end of each, idle time (the bubble) left blank, then
the exposed data-parallel sync and the optimizer step. Measured events, when given, are drawn as
thin hatched bars under the predicted ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.core.text import time_unit
from autopar.report import figures as F
from autopar.report.context import ReportData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ZOOM_ACTIONS = 40
"""Rows with more actions than this get a second panel zoomed on the warm-up."""
LABEL_PX = 14
"""A bar gets its micro-batch number when it is at least this wide (pixels)."""


def _tail(data: ReportData) -> list[tuple[str, float, str]]:
    """(label, seconds, colour) drawn after the pipeline: exposed DP sync and the optimizer."""
    p = data.predicted
    if p is None or data.timing == "unit":
        return []
    out = []
    dp = p.breakdown_s.get("dp_comm_exposed", 0.0)
    if dp > 0:
        out.append(("DP sync", dp, F.DP_SYNC))
    if p.breakdown_s.get("optimizer", 0.0) > 0:
        out.append(("optimizer", p.breakdown_s["optimizer"], F.OPTIMIZER))
    return out


def _row_label(data: ReportData, stage: int) -> str:
    plan = data.plan
    rank = plan.groups("pp")[0][stage]
    tp = next(g for g in plan.groups("tp") if rank in g)
    ranks = f"ranks {tp[0]}-{tp[-1]}" if len(tp) > 1 else f"rank {rank}"
    kinds = data.stage_kinds or []
    kind = f"\n{kinds[stage]}" if len(set(kinds)) > 1 and stage < len(kinds) else ""
    return f"stage {stage}\n{ranks}{kind}"


def _bars(ax: Axes, data: ReportData, scale: float, x_max: float, px_per_unit: float) -> None:
    """One ``broken_barh`` per (stage, direction, chunk): thousands of bars stay fast."""
    tl, v = data.timeline, data.plan.virtual_stages
    p = tl.num_stages
    groups: dict[tuple[int, str, int], list] = {}
    sends: dict[int, list] = {}
    for e in tl.events:
        a = e.action
        start, width = e.start_s * scale, (e.end_s - e.start_s - e.p2p_s) * scale
        if start > x_max:
            continue
        groups.setdefault((a.stage, a.kind, a.chunk), []).append((start, width))
        if e.p2p_s > 0:
            sends.setdefault(a.stage, []).append((start + width, e.p2p_s * scale))
        if width * px_per_unit >= LABEL_PX and start + width <= x_max:
            ax.text(
                start + width / 2,
                p - 1 - a.stage + 0.75,
                str(a.micro_batch),
                ha="center",
                va="center",
                fontsize=7,
            )
    per_row = len(tl.events) / max(p, 1)
    dense_px = px_per_unit * tl.makespan_s * scale / max(per_row, 1)  # mean bar width (pixels)
    for (stage, kind, chunk), spans in groups.items():
        base = F.FORWARD if kind == "F" else F.BACKWARD
        color = F.lighten(base, 0.45 * chunk / max(v - 1, 1)) if v > 1 else base
        edge = "white" if dense_px > 4 else "none"
        ax.broken_barh(spans, (p - 1 - stage + 0.55, 0.4), facecolors=color, edgecolor=edge, linewidth=0.3)
    sends_px = max((w for spans in sends.values() for _, w in spans), default=0.0) * px_per_unit
    for stage, spans in sends.items() if sends_px >= 1.0 else ():  # sub-pixel slivers only alias
        ax.broken_barh(spans, (p - 1 - stage + 0.55, 0.4), facecolors=F.P2P)


def _measured(ax: Axes, data: ReportData, scale: float, *, overlay: bool) -> None:
    """Measured events: thin hatched bars under the predicted ones (``overlay``), or full bars in a
    panel of their own; the measured step time as a dashed line."""
    events = (data.measured or {}).get("events") or []
    p = data.plan.pp
    y0, height = (0.22, 0.25) if overlay else (0.55, 0.4)
    if overlay:
        style = dict(edgecolor="black", linewidth=0.4, hatch="///")
    else:
        style = dict(edgecolor="white", linewidth=0.3)
    for (stage, kind), spans in _group_events(events, scale).items():
        color = F.lighten(F.FORWARD if kind == "F" else F.BACKWARD, 0.3 if overlay else 0.0)
        ax.broken_barh(spans, (p - 1 - stage + y0, height), facecolors=color, **style)
    step = (data.measured or {}).get("step_time_s")
    if step:
        ax.axvline(step * scale, color="black", linestyle="--", linewidth=1.0)


def _group_events(events: list[dict], scale: float) -> dict[tuple[int, str], list]:
    out: dict[tuple[int, str], list] = {}
    for e in events:
        span = (e["start_s"] * scale, (e["end_s"] - e["start_s"]) * scale)
        out.setdefault((e["stage"], e["kind"]), []).append(span)
    return out


def _measured_span(data: ReportData) -> float:
    m = data.measured or {}
    return max([e["end_s"] for e in m.get("events") or []] + [m.get("step_time_s") or 0.0])


def _overlay_ok(data: ReportData, predicted_s: float) -> bool:
    """Measured times share the predicted axis only when they are on a comparable scale."""
    span = _measured_span(data)
    return data.timing != "unit" and span > 0 and 0.5 <= span / max(predicted_s, 1e-12) <= 2.0


def _measured_panel(ax: Axes, data: ReportData) -> None:
    span = _measured_span(data)
    scale, unit = time_unit(span)
    p = data.plan.pp
    _measured(ax, data, scale, overlay=False)
    ax.set_ylim(0.5, p)
    ax.set_xlim(0, span * scale * 1.01)
    ax.set_yticks([p - 1 - s + 0.75 for s in range(p)], [_row_label(data, s) for s in range(p)], fontsize=8)
    ax.set_xlabel(f"measured time ({unit})")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    source = (data.measured or {}).get("source", "")
    title = "measured, on its own time axis (the prediction's scale differs by more than 2x)"
    ax.set_title(title + (f"; {source}" if source else ""), fontsize=10, loc="left")


def _panel(
    ax: Axes,
    data: ReportData,
    scale: float,
    unit: str,
    x_max: float,
    width_px: float,
    tail: list,
    *,
    overlay: bool,
) -> None:
    tl = data.timeline
    p = tl.num_stages
    _bars(ax, data, scale, x_max, width_px / max(x_max, 1e-12))
    end = tl.makespan_s * scale
    for _label, seconds, color in tail:
        if end > x_max:
            break
        ax.broken_barh([(end, seconds * scale)], (0.5, p - 0.45), facecolors=color, alpha=0.85)
        end += seconds * scale
    if overlay:
        _measured(ax, data, scale, overlay=True)
    lo = 0.15 if overlay and (data.measured or {}).get("events") else 0.5
    ax.set_ylim(lo, p)
    ax.set_xlim(0, x_max)
    ax.set_yticks([p - 1 - s + 0.75 for s in range(p)], [_row_label(data, s) for s in range(p)], fontsize=8)
    ax.set_xlabel(f"time ({unit})" if data.timing != "unit" else "time (units: forward = 1, backward = 2)")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)


def _legend(fig: Figure, data: ReportData, tail: list, *, overlay: bool) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=F.FORWARD, label="forward"), Patch(facecolor=F.BACKWARD, label="backward")]
    if data.plan.virtual_stages > 1:
        handles.append(Patch(facecolor=F.lighten(F.FORWARD, 0.45), label="later chunks: lighter"))
    if any(e.p2p_s > 0 for e in data.timeline.events):
        handles.append(Patch(facecolor=F.P2P, label="p2p send"))
    handles += [Patch(facecolor=c, label=label) for label, _, c in tail]
    if overlay and (data.measured or {}).get("events"):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="measured"))
    if (data.measured or {}).get("step_time_s"):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", linestyle="--", label="measured step time"))
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="idle (bubble)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)


def _zoom_end(data: ReportData) -> float | None:
    tl = data.timeline
    per_row = len(tl.events) / max(tl.num_stages, 1)
    if per_row <= ZOOM_ACTIONS:
        return None
    first_b = [e.end_s for e in tl.events if e.action.stage == 0 and e.action.kind == "B"]
    end = 1.15 * min(first_b) if first_b else 0.2 * tl.makespan_s
    return end if end < 0.6 * tl.makespan_s else None


def gantt(data: ReportData) -> Figure:
    tl = data.timeline
    tail = _tail(data)
    total = tl.makespan_s + sum(s for _, s, _ in tail)
    overlay = _overlay_ok(data, total)
    separate = bool((data.measured or {}).get("events")) and not overlay
    right = max(total, _measured_span(data)) if overlay else total
    scale, unit = time_unit(right) if data.timing != "unit" else (1.0, "units")
    row_in = 0.42 if tl.num_stages <= 16 else 0.26
    panel_in = 0.9 + row_in * tl.num_stages
    zoom = _zoom_end(data)
    n = 1 + bool(zoom) + separate
    fig = F.new_figure(F.WIDTH_IN, panel_in * n + 0.6)
    axes = list(fig.subplots(n, 1, squeeze=False)[:, 0])
    width_px = F.WIDTH_IN * F.DPI * 0.85
    _panel(axes[0], data, scale, unit, right * scale * 1.01, width_px, tail, overlay=overlay)
    axes[0].set_title(_title(data), fontsize=11, loc="left")
    if zoom:
        _panel(axes[1], data, scale, unit, zoom * scale, width_px, tail, overlay=overlay)
        axes[1].set_title("zoom on the start: warm-up of the pipeline", fontsize=10, loc="left")
    if separate:
        _measured_panel(axes[-1], data)
    _legend(fig, data, tail, overlay=overlay)
    return fig


def _title(data: ReportData) -> str:
    plan, tl = data.plan, data.timeline
    vpp = f", {plan.virtual_stages} chunks per stage" if plan.virtual_stages > 1 else ""
    idle = sum(tl.idle_fraction(s) for s in range(tl.num_stages)) / max(tl.num_stages, 1)
    return (
        f"Pipeline schedule ({plan.schedule}{vpp}): {plan.pp} stage(s), {plan.num_micro_batches} "
        f"micro-batch(es) of {plan.micro_batch_size}; mean idle {100 * idle:.1f}%"
    )

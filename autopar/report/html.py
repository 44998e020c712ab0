"""The HTML page: one self-contained file (inline CSS, figures as base64 PNG, no external URL)."""

from __future__ import annotations

import base64
import html
import logging
import time
from typing import TYPE_CHECKING

from autopar.core.text import bytes_text, gb_text, seconds_text
from autopar.report import bars, devmap, experts, gantt
from autopar.report import figures as F
from autopar.report import tables as T
from autopar.report.context import ReportData
from autopar.report.measured import predicted_components

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       margin: 0; background: #f6f6f4; color: #222; }
main { max-width: 1320px; margin: 0 auto; padding: 16px 28px 48px; }
h1 { font-size: 24px; margin: 12px 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
section { background: white; border-radius: 6px; padding: 6px 18px 14px; margin-top: 18px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { color: #555; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.kv td:first-child { color: #555; padding-right: 18px; white-space: nowrap; }
.note { color: #8a5a00; background: #fff7e0; padding: 4px 8px; border-radius: 4px; font-size: 13px; }
.caption { color: #555; font-size: 13px; margin: 2px 0 8px; }
.toc a { margin-right: 14px; font-size: 13px; color: #2b5d9b; text-decoration: none; }
.grid2 { display: flex; gap: 40px; flex-wrap: wrap; }
pre { background: #f3f3f3; padding: 8px; font-size: 12px; overflow-x: auto; }
"""

NO_COSTS = '<p class="note">no prediction for this plan (see the note at the top)</p>'
SECTIONS = [
    ("device-map", "1. Device map"),
    ("schedule", "2. Pipeline schedule"),
    ("memory", "3. Memory"),
    ("time", "4. Step time"),
    ("sharding", "5. Shardings"),
    ("alternatives", "6. Alternatives"),
    ("inputs", "7. Inputs"),
]


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def img(fig: Figure, alt: str) -> str:
    t0 = time.perf_counter()
    data = base64.b64encode(F.png_bytes(fig)).decode("ascii")
    log.debug("figure %r rendered in %.2f s", alt, time.perf_counter() - t0)
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def notes(data: ReportData, section: str) -> str:
    return "".join(f'<p class="note">{esc(n)}</p>' for n in data.notes.get(section, []))


def table(t: T.Table, *, kv: bool = False, title: bool = True) -> str:
    out = [f"<h3>{esc(t.title)}</h3>"] if title else []
    if t.note:
        out.append(f'<p class="caption">{esc(t.note)}</p>')
    if not t.rows:
        return "".join(out)
    out.append(f'<table class="{"kv" if kv else ""}">')
    if not kv:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.header) + "</tr>")
    for row in t.rows:
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


# ------------------------------------------------------------------------------- sections
def section_device_map(data: ReportData) -> str:
    return (
        img(devmap.device_map(data), "device map")
        + '<p class="caption">Each box is one device: its rank and its coordinates on the mesh axes; the '
        "colour is its pipeline stage. Ranks are numbered node-major; tp is the innermost axis, so a "
        "tensor-parallel group sits on consecutive devices of one node.</p>"
        + notes(data, "device_map")
        + table(T.layer_stage_table(data.plan, (data.facts or {}).get("num_blocks"), data.stage_kinds))
        + _experts(data)
    )


def _experts(data: ReportData) -> str:
    """Mixture-of-experts models: the expert placement on the devices, its table, the all-to-all
    volume per step and the measured load per expert (:mod:`autopar.report.experts`)."""
    fig = experts.placement_figure(data.moe, data.plan, data.cluster)
    if fig is None:
        return ""
    return (
        '<h3 id="experts">Experts</h3>'
        + img(fig, "expert placement")
        + "".join(table(t) for t in experts.moe_tables(data.moe, data.plan, data.measured))
    )


def section_schedule(data: ReportData) -> str:
    if data.timeline is None:
        return notes(data, "schedule") or '<p class="note">no schedule</p>'
    tl = data.timeline
    source = {
        "estimator": "stage times from the cost model (forward, backward incl. recompute and exposed "
        "collectives, blocking p2p sends)",
        "plan": "the plan's per-stage time per micro-batch, split forward : backward = 1 : 2 (give the "
        "model for the cost model's split)",
        "unit": "no costs: forward = 1 unit, backward = 2 units",
    }[data.timing]
    cap = f"Durations: {source}."
    p = data.predicted
    if p is not None and data.timing != "unit":
        tail = p.breakdown_s.get("dp_comm_exposed", 0.0) + p.breakdown_s.get("optimizer", 0.0)
        cap += (
            f" The drawn step ends at {seconds_text(tl.makespan_s + tail)}; the cost model's step time is "
            f"{seconds_text(p.step_time_s)}."
        )
    if data.plan.mode != "train":
        cap += " Inference: forwards only."
    return (
        img(gantt.gantt(data), "pipeline schedule")
        + f'<p class="caption">{esc(cap)}</p>'
        + notes(data, "schedule")
    )


def _memory_table(data: ReportData) -> str:
    mem = (data.measured or {}).get("memory_bytes_per_rank")
    if not mem:
        return ""
    stages, _ = bars.memory_per_stage(data)
    t = T.Table("Predicted vs measured memory per rank", ["rank", "stage", "predicted", "measured", "error"])
    for rank, m in enumerate(mem):
        s = data.plan.coords(rank).get("pp", 0)
        pred = sum(stages[s].values())
        err = f"{100 * (pred / m - 1):+.1f}%" if m else "-"
        t.rows.append([str(rank), str(s), bytes_text(pred, 2), bytes_text(m, 2), err])
    return table(t)


def section_memory(data: ReportData) -> str:
    if data.predicted is None:
        return NO_COSTS
    _, source = bars.memory_per_stage(data)
    cap = (
        "Predicted memory of one device of each pipeline stage (all devices of a stage hold the same), "
        "stacked by kind; the dashed line is the device capacity."
    )
    kinds, caps = data.stage_kinds or [], bars.stage_capacities(data)
    if len(set(kinds)) > 1 and len(caps) == len(kinds):
        per_kind = ", ".join(f"{k} {gb_text(c)}" for k, c in dict(zip(kinds, caps)).items())
        cap = cap.replace(
            "the dashed line is the device capacity.",
            f"each stage's dashed line is the capacity of its own devices ({per_kind}).",
        )
    if source == "plan":
        cap += " Only the fullest stage's breakdown is stored in the plan; give the model for every stage's."
    return (
        img(bars.memory(data), "memory per device")
        + f'<p class="caption">{esc(cap)}</p>'
        + _memory_table(data)
    )


def _components_table(data: ReportData) -> str:
    comps = (data.measured or {}).get("components_per_rank")
    if not comps or data.predicted is None:
        return ""
    pred = predicted_components(data.predicted.breakdown_s)
    t = T.Table(
        "Predicted vs measured step per rank (median step; compute = this rank's forward and backward)",
        ["rank", "stage", "step", "compute", "TP collectives", "optimizer", "DP sync, p2p, bubble, other"],
    )

    def cell(p: float, m: float) -> str:
        err = f" ({100 * (p / m - 1):+.0f}%)" if m > 0 else ""
        return f"{seconds_text(p)} / {seconds_text(m)}{err}"

    for rank, c in enumerate(comps):
        s = data.plan.coords(rank).get("pp", 0)
        t.rows.append([
            str(rank), str(s), cell(data.predicted.step_time_s, c["step_s"]),
            cell(pred["compute_s"], c["compute_s"]), cell(pred["tp_comm_s"], c["tp_comm_s"]),
            cell(pred["optimizer_s"], c["optimizer_s"]), cell(pred["other_s"], c["other_s"]),
        ])  # fmt: skip
    return table(t) + '<p class="caption">Each cell: predicted / measured (prediction error).</p>'


def _replans_table(data: ReportData) -> str:
    """The live re-planning checks of the run (compile(replan_after=N), runtime/replan.py)."""
    replans = (data.measured or {}).get("replans")
    if not replans:
        return ""
    t = T.Table(
        "Live re-planning (measured step time against the prediction; re-planned with measured numbers)",
        ["after step", "plan", "measured", "predicted", "off", "decision", "to plan", "why"],
    )
    for r in replans:
        off = r.get("off")
        t.rows.append([
            str(r["step"]), r["from_plan"], seconds_text(r["measured_step_time_s"]),
            seconds_text(r["predicted_step_time_s"]),
            f"{100 * off:.0f}%" if isinstance(off, (int, float)) and off != float("inf") else "-",
            r["decision"], r.get("to_plan") or "-", r["reason"],
        ])  # fmt: skip
    return table(t)


def section_time(data: ReportData) -> str:
    if data.predicted is None:
        return _replans_table(data) or NO_COSTS
    return (
        _replans_table(data)
        + _components_table(data)
        + img(bars.breakdown(data), "step-time breakdown")
        + '<p class="caption">Compute and recompute of the slowest stage over all micro-batches, its exposed '
        "tensor-parallel and ZeRO collectives and p2p sends, the pipeline bubble (fill and drain), the "
        "exposed data-parallel gradient sync after the last backward, and the optimizer step.</p>"
        + notes(data, "costs")
    )


def section_sharding(data: ReportData) -> str:
    t = data.sharding
    intro = (
        '<p class="caption">Placements along the tensor-parallel axis in DTensor\'s words: R replicated, '
        "S(d) split on tensor dim d, P partial sums. Identical blocks share one row set.</p>"
    )
    return intro + table(t, title=False)


def section_alternatives(data: ReportData) -> str:
    out = [table(T.alternatives_table(data))]
    fig = bars.meshes(data)
    if fig is not None:
        out.append(img(fig, "best plan per mesh"))
    rej = T.rejected_table(data.plan)
    if rej.rows:
        out.append(table(rej))
    return "".join(out)


def section_inputs(data: ReportData) -> str:
    tables = [T.model_table(data), T.cluster_table(data), T.planner_table(data)]
    cells = "".join(f"<div>{table(t, kv=True)}</div>" for t in tables)
    explain = esc(data.plan.explain())
    return (
        f'<div class="grid2">{cells}</div><h3>As text (<code>plan.explain()</code>)</h3><pre>{explain}</pre>'
    )


def _heading(data: ReportData) -> str:
    model = f" of {data.model}" if data.model else ""
    where = f" on {data.cluster.name}" if data.cluster is not None else ""
    return f"Plan{model}{where}"


def page(data: ReportData) -> str:
    t0 = time.perf_counter()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>autopar plan: {esc(data.plan.summary())}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(_heading(data))}</h1>",
        '<p class="toc">' + "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in SECTIONS) + "</p>",
        kv_table(T.summary_rows(data)),
        notes(data, "costs") if data.predicted is None else "",
    ]
    builders = {
        "device-map": section_device_map,
        "schedule": section_schedule,
        "memory": section_memory,
        "time": section_time,
        "sharding": section_sharding,
        "alternatives": section_alternatives,
        "inputs": section_inputs,
    }
    for key, title in SECTIONS:
        t = time.perf_counter()
        parts.append(f'<section id="{key}"><h2>{esc(title)}</h2>{builders[key](data)}</section>')
        log.debug("section %s in %.2f s", key, time.perf_counter() - t)
    parts.append("</main></body></html>")
    log.info("report page built in %.2f s", time.perf_counter() - t0)
    return "\n".join(parts)

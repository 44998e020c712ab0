"""The report for terminals: the same tables as the HTML page, a text device map and schedule."""

from __future__ import annotations

from autopar.report import experts
from autopar.report import tables as T
from autopar.report.context import ReportData

MAX_MAP_NODES = 8
MAX_GRID_STEPS = 48


def _table(t: T.Table) -> list[str]:
    lines = [t.title, "-" * len(t.title)]
    if t.note:
        lines.append(t.note)
    if not t.rows:
        return lines
    header = t.header if any(t.header) else None
    rows = ([header] if header else []) + t.rows
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if header and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _device_map(data: ReportData) -> list[str]:
    plan, c = data.plan, data.cluster
    per = c.devices_per_node if c is not None else min(8, plan.world_size)
    nodes = c.nodes if c is not None else -(-plan.world_size // per)
    names = ",".join(a.name for a in plan.mesh)
    lines = [f"Device map (rank:{names}; nodes 0-{min(nodes, MAX_MAP_NODES) - 1} of {nodes})", "-" * 20]
    for n in range(min(nodes, MAX_MAP_NODES)):
        cells = []
        for d in range(per):
            r = n * per + d
            if r >= plan.world_size:
                cells.append("idle")
                continue
            cells.append(f"{r}:" + ",".join(str(v) for v in plan.coords(r).values()))
        kind = f" {c.device_of(n * per).name}" if c is not None and c.is_heterogeneous else ""
        lines.append(f"node {n}{kind}: " + "  ".join(cells))
    return lines


def _schedule(data: ReportData) -> list[str]:
    tl = data.timeline
    if tl is None:
        return []
    lines = [
        f"Pipeline schedule ({data.plan.schedule}), order per stage (first {MAX_GRID_STEPS} actions)",
        "-" * 20,
    ]
    for s in range(tl.num_stages):
        acts = sorted((e for e in tl.events if e.action.stage == s), key=lambda e: e.start_s)
        text = " ".join(
            f"{e.action.kind}{e.action.micro_batch}" + (f".{e.action.chunk}" if tl.virtual_stages > 1 else "")
            for e in acts[:MAX_GRID_STEPS]
        )
        lines.append(
            f"stage {s} (idle {100 * tl.idle_fraction(s):.0f}%): {text}"
            + (" ..." if len(acts) > MAX_GRID_STEPS else "")
        )
    return lines


def render(data: ReportData) -> str:
    lines = [f"{k:<20} {v}" for k, v in T.summary_rows(data)]
    for section in data.notes.values():
        lines += [f"note: {n}" for n in section]
    blocks = [
        lines,
        _device_map(data),
        _table(T.layer_stage_table(data.plan, (data.facts or {}).get("num_blocks"), data.stage_kinds)),
        *[_table(t) for t in experts.moe_tables(data.moe, data.plan, data.measured)],
        _schedule(data),
        _table(data.sharding),
        _table(T.alternatives_table(data)),
        _table(T.rejected_table(data.plan)),
        _table(T.model_table(data)),
        _table(T.cluster_table(data)),
        _table(T.planner_table(data)),
    ]
    return "\n\n".join("\n".join(b) for b in blocks if b)

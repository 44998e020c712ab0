"""The report's tables as plain rows (lists of strings): shardings per layer, layers per stage,
alternatives and rejected meshes, and the inputs (model, cluster, planner). Both the HTML and the
terminal rendering read these."""

from __future__ import annotations

import math

from autopar.cluster import Link
from autopar.core.errors import PlanError
from autopar.core.plan import Plan
from autopar.core.text import bytes_text, count_text, gb_text, seconds_text
from autopar.report.context import ReportData
from autopar.report.table import Table


# ---------------------------------------------------------------------------- layers/stages
def _ranges(blocks: list[int]) -> str:
    """``[0, 1, 16, 17]`` -> ``0-1, 16-17``."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b - 1:
            out[-1][1] = b
        else:
            out.append([b, b])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in out)


def _mixed(stage_kinds: list[str] | None, pp: int) -> bool:
    return bool(stage_kinds) and len(stage_kinds) == pp and len(set(stage_kinds)) > 1


def layer_stage_table(plan: Plan, num_blocks: int | None, stage_kinds: list[str] | None = None) -> Table:
    """The blocks each pipeline stage runs (all its model chunks under the interleaved schedule);
    with ``stage_kinds`` of more than one device kind, a column names each stage's kind."""
    devices = _mixed(stage_kinds, plan.pp)
    header = ["stage", *(["devices"] if devices else []), "ranks (dp=0)", "blocks", "count", "also"]
    table = Table("Layers per pipeline stage", header)
    if not num_blocks:
        table.note = "needs the model" if num_blocks is None else "the model has no repeated blocks"
        return table
    try:
        stages = plan.stage_of_layers(num_blocks)
    except PlanError as e:
        table.note = str(e)
        return table
    pp_ranks = plan.groups("pp")[0]
    for s in range(plan.pp):
        blocks = [i for i, vs in enumerate(stages) if vs % plan.pp == s]
        also = [x for x, i in (("stem", 0), ("head", num_blocks - 1)) if i in blocks]
        kind = [stage_kinds[s]] if devices else []
        table.rows.append(
            [
                str(s),
                *kind,
                _ranks_text(plan, pp_ranks[s]),
                _ranges(blocks),
                str(len(blocks)),
                " + ".join(also),
            ]
        )
    chunks = f"; {plan.virtual_stages} chunks per stage (interleaved)" if plan.virtual_stages > 1 else ""
    table.note = f"{num_blocks} blocks{chunks}; every dp replica repeats this split"
    return table


def layer_split_text(plan: Plan, num_blocks: int | None, stage_kinds: list[str] | None) -> str:
    """How the blocks are split across device kinds, e.g. ``stage 0 (a100-80g): 26 layers, stage 1
    (v100-32g): 14 layers``; empty on one device kind or without the model."""
    if not num_blocks or not _mixed(stage_kinds, plan.pp):
        return ""
    try:
        stages = plan.stage_of_layers(num_blocks)
    except PlanError:
        return ""
    counts = [sum(1 for vs in stages if vs % plan.pp == s) for s in range(plan.pp)]
    per_stage = ", ".join(
        f"stage {s} ({stage_kinds[s]}): {c} layer{'s' if c != 1 else ''}" for s, c in enumerate(counts)
    )
    per_kind: dict[str, int] = {}
    for kind, c in zip(stage_kinds, counts):
        per_kind[kind] = per_kind.get(kind, 0) + c
    totals = " and ".join(f"{k} {c}" for k, c in per_kind.items())
    how = "sized by the planner" if plan.layer_stages is not None else "even split"
    return f"{per_stage}; {totals} of {num_blocks} layers ({how})"


def _ranks_text(plan: Plan, rank: int) -> str:
    group = next(g for g in plan.groups("tp") if rank in g)
    return f"{group[0]}-{group[-1]}" if len(group) > 1 else str(rank)


# --------------------------------------------------------------------------- alternatives
def alternatives_table(data: ReportData) -> Table:
    header = ["#", "plan", "step time", "vs chosen", "memory / device", "why it lost"]
    table = Table("Runner-up plans", header)
    plan, predicted = data.plan, data.predicted
    search = plan.search or {}
    best = predicted.step_time_s if predicted else None
    if predicted:
        table.rows.append(
            [
                "1",
                plan.summary(),
                seconds_text(best),
                "chosen",
                bytes_text(predicted.memory_bytes_per_device, 2),
                "-",
            ]
        )
    for i, a in enumerate(search.get("alternatives", []), start=2):
        t = a.get("step_time_s")
        delta = f"+{100 * (t / best - 1):.1f}%" if (t is not None and best) else "-"
        table.rows.append(
            [
                str(i),
                a.get("summary", ""),
                seconds_text(t),
                delta,
                bytes_text(a.get("memory_bytes_per_device"), 2),
                a.get("why", ""),
            ]
        )
    if not search:
        table.note = "hand-written plan: no search to compare against"
    return table


def rejected_table(plan: Plan) -> Table:
    header = ["mesh", "fits", "best step time", "why not"]
    table = Table("Why not the other meshes", header)
    for r in (plan.search or {}).get("rejected", []):
        table.rows.append(
            [
                r.get("config", ""),
                "yes" if r.get("fits") else "no",
                seconds_text(r.get("step_time_s")),
                r.get("why", ""),
            ]
        )
    return table


# -------------------------------------------------------------------------------- inputs
def model_table(data: ReportData) -> Table:
    table = Table("Model", ["", ""])
    f, plan = data.facts or {}, data.plan
    p = data.predicted
    rows = [["model", data.model or ("(a traced graph; no spec given)" if f else "(not given)")]]
    if f:
        rows += [
            ["parameters", f"{count_text(f['num_params'])} ({bytes_text(f['param_bytes'], 2)} as traced)"],
            ["repeated blocks", str(f["num_blocks"])],
            ["sequence length", str(data.seq or f.get("seq") or "-")],
            ["graph nodes", f"{f['num_nodes']} ({f['tracer']})"],
        ]
    flops = p.model_flops_per_step if p and p.model_flops_per_step else None
    if flops is None and f.get("flops_per_sample"):
        flops = f["flops_per_sample"] * plan.global_batch
    if flops:
        executed = f", {p.hardware_flops_per_step:.3g} executed" if p and p.hardware_flops_per_step else ""
        rows.append(["FLOPs per step", f"{flops:.3g} (model){executed}"])
    rows.append(["global batch", f"{plan.global_batch} sequences ({plan.mode})"])
    table.rows = rows
    return table


def cluster_table(data: ReportData) -> Table:
    table = Table("Cluster", ["", ""])
    c = data.cluster
    if c is None:
        table.note = "cluster unknown (give --cluster)"
        return table
    rows = [
        ["name", c.name],
        ["shape", f"{c.nodes} node(s) x {c.devices_per_node} = {c.num_devices} devices"],
    ]
    start = 0
    for grp in c.node_groups:
        d = grp.device
        span = f"nodes {start}-{start + grp.nodes - 1}" if c.is_heterogeneous else "device"
        peak = max(d.peak_flops_per_s.values()) if getattr(d, "peak_flops_per_s", None) else 0.0
        rows.append(
            [
                span,
                f"{d.name}: {bytes_text(d.memory_bytes, 2)}, {peak / 1e12:.4g} TFLOP/s peak, {bytes_text(d.hbm_bytes_per_s, 2)}/s memory",
            ]
        )
        start += grp.nodes
    rows.append(["intra-node link", _link(c.intra_node)])
    if c.nodes > 1:
        rows.append(["inter-node link", _link(c.inter_node)])
    table.rows = rows
    return table


def _link(link: Link) -> str:
    return f"{bytes_text(link.bandwidth_bytes_per_s, 2)}/s per device, {link.latency_s * 1e6:.3g} µs"


def planner_table(data: ReportData) -> Table:
    plan = data.plan
    table = Table("Planner", ["", ""])
    rows = [["plan", plan.summary()]]
    stats = (plan.search or {}).get("stats") or {}
    if stats:
        rows += [
            ["search space", f"{stats.get('space_size', '-')} configurations"],
            [
                "costed / pruned / invalid",
                f"{stats.get('evaluated', '-')} / {stats.get('pruned', '-')} / {stats.get('invalid', '-')}",
            ],
            ["solve time", f"{seconds_text(stats.get('solve_time_s'))} ({stats.get('status', '-')})"],
        ]
    else:
        rows.append(["search", "none (hand-written plan)"])
    for key, value in sorted(data.settings.items()):
        rows.append([key.replace("_", " "), str(value) if value not in ("", None) else "-"])
    table.rows = rows
    return table


MAX_STAGES_LISTED = 8


def _memory_text(data: ReportData) -> str:
    """Used of capacity; on several device kinds, the binding stage and every stage's numbers."""
    p, kinds = data.predicted, data.stage_kinds
    fits = "fits" if p.fits else "DOES NOT FIT"
    head = f"{bytes_text(p.memory_bytes_per_device, 2)} of {bytes_text(p.memory_capacity_bytes, 2)}"
    if not _mixed(kinds, data.plan.pp):
        return f"{head} ({fits})"
    extra = p.extra or {}
    worst = extra.get("largest_memory_stage", 0)
    head += f" on stage {worst} ({kinds[worst]}, the least headroom)"
    used, caps = extra.get("memory_bytes_per_stage"), data.stage_capacity_bytes
    if used and caps and len(used) == len(caps) <= MAX_STAGES_LISTED:
        per = ", ".join(f"{gb_text(u, unit=False)} of {gb_text(c, unit=False)}" for u, c in zip(used, caps))
        head += f"; per stage GB: {per}"
    return f"{head} ({fits})"


def summary_rows(data: ReportData) -> list[tuple[str, str]]:
    """The headline numbers of the chosen plan."""
    plan, p = data.plan, data.predicted
    rows = [
        ("plan", plan.summary()),
        ("ranks", f"{plan.world_size} ({' x '.join(f'{a.name}={a.size}' for a in plan.mesh)})"),
    ]
    split = layer_split_text(plan, (data.facts or {}).get("num_blocks"), data.stage_kinds)
    if split:
        rows.append(("layers per kind", split))
    if p is None:
        rows.append(("predicted", "not available (see the note below)"))
        return rows
    rows += [
        ("step time", seconds_text(p.step_time_s)),
        ("throughput", f"{p.tokens_per_s:,.0f} tokens/s" if p.tokens_per_s else "-"),
        ("MFU", f"{100 * p.mfu:.1f}%"),
        ("memory / device", _memory_text(data)),
    ]
    m = data.measured or {}
    if "step_time_s" in m:
        err = 100 * (p.step_time_s / m["step_time_s"] - 1) if m["step_time_s"] else math.nan
        rows.append(("measured step time", f"{seconds_text(m['step_time_s'])} (prediction {err:+.1f}%)"))
    return rows

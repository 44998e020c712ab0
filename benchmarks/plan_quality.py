"""Plan quality: the planner against the hand-tuned plans of Megatron-LM SC'21 Table 1.

For every row (model shape, GPU count, global batch, DGX A100 80GB nodes) the planner chooses a plan
with every key left free; the published plan (tp, pp, micro-batch, virtual stages, full recompute,
no sequence parallelism, no ZeRO) is costed by the same estimator. The chosen plan must fit and be
predicted at least as fast: ``ratio = chosen / published <= 1``.

Two more columns separate where the gain comes from: ``2021 knobs`` plans with the features the
published runs had (full recompute, no sequence parallelism, no ZeRO: only the mesh, micro-batch,
schedule and split are free), ``mesh fixed`` keeps the published tp, pp, micro-batch and schedule
and frees recompute, sequence parallelism, ZeRO and the split.

    python benchmarks/plan_quality.py              # the table and a summary line
    python benchmarks/plan_quality.py --markdown   # the table for docs/planner.md
    python benchmarks/plan_quality.py --json out.json
    python benchmarks/plan_quality.py --sets       # instead: rows of the sets beyond SC'21 (benchmarks/data/)

``--sets`` plans a few rows of the sets beyond SC'21 the same way (the llm-foundry MPT sweep on H100,
A100 80GB and A100 40GB with FSDP; Nemotron-4 15B and 340B on H100 with Megatron-Core; Megatron-LM
2019 on V100): free plan against the published one (its mesh, ZeRO stage, micro-batch and recompute),
both costed by the same estimator with the default constants.

Exit status 1 when a row fails (chosen plan does not fit or is predicted slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import autopar
from autopar.cluster import Cluster
from autopar.core.errors import AutoparError
from autopar.core.plan import Plan
from autopar.estimator import estimate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "published_runs.json"
PRESETS = {
    1.7: "megatron-1.7b",
    3.6: "megatron-3.6b",
    7.5: "megatron-7.5b",
    18.4: "megatron-18.4b",
    39.1: "megatron-39.1b",
    76.1: "megatron-76.1b",
    145.6: "megatron-145.6b",
    310.1: "megatron-310.1b",
    529.6: "megatron-529.6b",
    1008.0: "megatron-1t",
}


@dataclass
class Row:
    params_b: float
    layers: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    mbs: int
    vpp: int

    @property
    def model(self) -> str:
        return PRESETS[self.params_b]

    def published(self) -> Plan:
        return Plan.manual(
            dp=self.gpus // (self.tp * self.pp),
            tp=self.tp,
            pp=self.pp,
            global_batch=self.global_batch,
            micro_batch_size=self.mbs,
            schedule="interleaved" if self.vpp > 1 else "1f1b",
            virtual_stages=self.vpp,
            recompute="full",
        )


VARIANTS = {
    "2021 knobs": lambda row: {"recompute": "full", "sp": 0, "zero": 0},
    "mesh fixed": lambda row: {
        "tp": row.tp,
        "pp": row.pp,
        "mbs": row.mbs,
        "vpp": row.vpp,
        "schedule": "interleaved" if row.vpp > 1 else "1f1b",
    },
}


def load_rows(path: Path = DATA) -> list[Row]:
    rows = []
    for r in json.loads(path.read_text())["megatron_sc21_table1"]["rows"]:
        params, _heads, _hidden, layers, tp, pp, gpus, gb, mbs, vpp, _tflops, _pct = r
        rows.append(Row(params, layers, tp, pp, gpus, gb, mbs, vpp))
    return rows


def run_row(row: Row) -> dict:
    t0 = time.perf_counter()
    model, inputs, loss_fn = autopar.build_model(row.model)
    graph = autopar.trace(model, inputs, loss_fn=loss_fn)
    trace_s = time.perf_counter() - t0
    cluster = Cluster.preset("dgx-a100-80g", nodes=row.gpus // 8)
    published = estimate(graph, cluster, row.published())
    t0 = time.perf_counter()
    try:
        plan = autopar.plan(graph, cluster, global_batch=row.global_batch, progress=False)
    except AutoparError as e:
        return {"row": row, "error": str(e), "published": published, "trace_s": trace_s}
    plan_s = time.perf_counter() - t0
    stats = plan.search["stats"]
    variants = {}
    for name, fixed in VARIANTS.items():
        keys = fixed(row)
        try:
            variants[name] = autopar.plan(
                graph, cluster, global_batch=row.global_batch, fixed=keys, progress=False
            ).predicted.step_time_s
        except AutoparError:
            variants[name] = None
    return {
        "variants": variants,
        "row": row,
        "plan": plan,
        "chosen": plan.predicted,
        "published": published,
        "ratio": plan.predicted.step_time_s / published.step_time_s,
        "ok": plan.predicted.fits and plan.predicted.step_time_s <= published.step_time_s * (1 + 1e-9),
        "trace_s": trace_s,
        "plan_s": plan_s,
        "evaluated": stats["evaluated"],
        "space": stats["space_size"],
    }


def _published_text(row: Row) -> str:
    v = f" v={row.vpp}" if row.vpp > 1 else ""
    return f"tp={row.tp} pp={row.pp} mbs={row.mbs}{v} full"


def _chosen_text(plan: Plan) -> str:
    v = f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    split = ""
    if plan.layer_stages:
        counts = [plan.layer_stages.count(s) for s in range(plan.pp)]
        split = f" split={min(counts)}..{max(counts)}"
    return (
        f"tp={plan.tp} pp={plan.pp} mbs={plan.micro_batch_size}{v} {plan.recompute}"
        f"{' sp' if plan.sequence_parallel else ''}{f' z{plan.zero_stage}' if plan.zero_stage else ''}{split}"
    )


def _ratio(seconds: float | None, published_s: float) -> str:
    return "-" if seconds is None else f"{seconds / published_s:.3f}"


def table(results: list[dict], markdown: bool) -> str:
    head = [
        "model",
        "GPUs",
        "batch",
        "published plan",
        "pub. s",
        "fits",
        "chosen plan",
        "chosen s",
        "ratio",
        *VARIANTS,
        "plan s",
    ]
    lines = []
    for r in results:
        row, pub = r["row"], r["published"]
        if "error" in r:
            cells = [row.model, row.gpus, row.global_batch, _published_text(row), f"{pub.step_time_s:.2f}"]
            cells += ["yes" if pub.fits else "no", "ERROR: " + r["error"][:60], "", ""]
            cells += [""] * (len(VARIANTS) + 1)
        else:
            cells = [
                row.model,
                row.gpus,
                row.global_batch,
                _published_text(row),
                f"{pub.step_time_s:.2f}",
                "yes" if pub.fits else "no",
                _chosen_text(r["plan"]),
                f"{r['chosen'].step_time_s:.2f}",
                f"{r['ratio']:.3f}",
                *(_ratio(r["variants"][name], pub.step_time_s) for name in VARIANTS),
                f"{r['plan_s']:.1f}",
            ]
        lines.append([str(c) for c in cells])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in lines]
    )


def summary(results: list[dict]) -> str:
    done = [r for r in results if "error" not in r]
    ok = [r for r in done if r["ok"]]
    ratios = sorted(r["ratio"] for r in done)
    gm = 1.0
    for x in ratios:
        gm *= x ** (1 / len(ratios)) if ratios else 1.0
    return (
        f"{len(ok)}/{len(results)} rows: chosen plan fits and is predicted at least as fast as the published one; "
        f"ratio chosen/published min {ratios[0]:.3f}, geomean {gm:.3f}, max {ratios[-1]:.3f}"
        if ratios
        else f"0/{len(results)} rows planned"
    )


SET_ROWS = (
    "mpt_h100_large:70b/s2048/512g/mb8",
    "mpt_h100_large:7b/s2048/128g/mb6",
    "mpt_h100_large:1b/s2048/128g/mb12",
    "mpt_h100:13b/s2048/8g/mb2",
    "mpt_a100_80g:13b/s2048/8g/mb2",
    "mpt_a100_80g:1b/s2048/8g/mb14",
    "mpt_a100_40g:7b/s2048/64g/mb18",
    "dgxc_nemotron4_h100:15b/16g",
    "dgxc_nemotron4_h100:340b/256g",
    "megatron2019_scaling:8.3B-32h/512",
)
"""One row per regime (large / small model, one node / many, each device kind)."""


def run_set_rows() -> list[dict]:
    """Free plan vs the published FSDP plan on the rows of :data:`SET_ROWS`."""
    from fidelity_sets import cluster_for, graph_for, load_megatron2019, load_mpt, load_nemotron4, plan_for

    out = []
    for run in load_mpt(max_seq=2048) + load_nemotron4() + load_megatron2019():
        if f"{run.set_name}:{run.label}" not in SET_ROWS:
            continue
        graph, cluster = graph_for(run), cluster_for(run)
        published = estimate(graph, cluster, plan_for(run))
        gb = run.gpus // (run.tp * run.pp) * run.mbs * run.grad_accum
        try:
            plan = autopar.plan(graph, cluster, global_batch=gb, progress=False)
        except AutoparError as e:
            out.append({"label": f"{run.set_name}:{run.label}", "error": str(e)})
            continue
        ratio = plan.predicted.step_time_s / published.step_time_s
        ok = plan.predicted.fits and ratio <= 1 + 1e-9
        out.append({"label": f"{run.set_name}:{run.label}", "ratio": ratio, "ok": ok, "plan": plan.summary()})
        print(f"  {run.set_name}:{run.label}: {ratio:.3f}", file=sys.stderr)
    return out


def set_table(rows: list[dict]) -> str:
    lines = ["| row | chosen plan | chosen / published | ok |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:60]} | | no |")
        else:
            lines.append(f"| {r['label']} | {r['plan']} | {r['ratio']:.3f} | {'yes' if r['ok'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    ap.add_argument("--sets", action="store_true", help="only the rows of the sets beyond SC'21")
    args = ap.parse_args(argv)
    if args.sets:
        set_results = run_set_rows()
        print(set_table(set_results))
        return 0 if all(r.get("ok") for r in set_results) else 1
    results = []
    for row in load_rows():
        r = run_row(row)
        results.append(r)
        print(f"  {row.model}: {r.get('ratio', float('nan')):.3f}", file=sys.stderr)
    print(table(results, args.markdown))
    print()
    print(summary(results))
    if args.json:
        rows = [
            {
                "model": r["row"].model,
                "gpus": r["row"].gpus,
                "global_batch": r["row"].global_batch,
                "published_plan": _published_text(r["row"]),
                "published_step_time_s": r["published"].step_time_s,
                "published_fits": r["published"].fits,
                "chosen_plan": r["plan"].summary() if "plan" in r else None,
                "chosen_layer_stages": r["plan"].layer_stages if "plan" in r else None,
                "chosen_step_time_s": r["chosen"].step_time_s if "chosen" in r else None,
                "ratio": r.get("ratio"),
                "variants_step_time_s": r.get("variants"),
                "plan_s": r.get("plan_s"),
                "error": r.get("error"),
            }
            for r in results
        ]
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

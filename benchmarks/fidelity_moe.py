"""Fidelity of the mixture-of-experts cost model against published MoE training throughputs.

    python benchmarks/fidelity_moe.py            # per row: predicted vs published step time and error

Rows: ``benchmarks/data/moe_published.json`` (each with its source). A row is predicted when autopar
can build its model (a preset of :mod:`autopar.models.presets`) in a precision and on a device kind
the cost model has (16-bit GEMMs; device kinds of :mod:`autopar.cluster.hardware`); otherwise it is
listed with the reason it is not. ``usable: "indicative"`` rows are predicted and shown with their
error but not counted in the mean (their ``why_not`` says why the evidence is weaker). Rows that
publish model TFLOP/s per GPU but no tokens/s are compared as TFLOP/s: autopar's model FLOPs per step
over its predicted step time, against the published figure (as close as the two FLOP counts are).
Nothing is fitted here: the shipped constants (:data:`cost_models.DEFAULT`, per-kind ones from
:func:`cost_models.hardware.calibration_for`) are used as they are, so there is no leave-one-out
error to report.

:func:`moe_fidelity_lines` is what ``benchmarks/fidelity.py`` calls to add this set to its report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "moe_published.json"


def load_rows(path: Path = DATA) -> list[dict]:
    """The published rows, each with a derived ``published_step_s`` where the throughput allows."""
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        if "step_time_s_published" in r:
            r["published_step_s"] = r["step_time_s_published"]
        elif {"global_batch", "seq", "tokens_per_s_per_gpu", "gpus"} <= set(r):
            r["published_step_s"] = r["global_batch"] * r["seq"] / (r["tokens_per_s_per_gpu"] * r["gpus"])
    return rows


def predict_step_s(row: dict) -> float:
    """Estimate the row's published plan (its model preset on its device kind) with autopar: the
    predicted step time in seconds."""
    return _predict(row).step_time_s


def predict_tflops_per_gpu(row: dict) -> float:
    """autopar's model TFLOP/s per GPU for the row's plan (model FLOPs / predicted step / GPUs)."""
    cost = _predict(row)
    return cost.model_flops_per_step / cost.step_time_s / row["gpus"] / 1e12


def row_graph(row: dict):
    """The row's model (its preset at the row's sequence) traced at its micro-batch, with the row's
    benchmark gate (``gate_routing``, :data:`cost_models.moe.ROUTINGS`) on its MoE layers."""
    from autopar.estimator.moe import moe_nodes
    from autopar.models.spec import load_model

    graph = load_model(f"{row['model']}:seq={row['seq']}").trace(row["mbs"])
    if "gate_routing" in row:  # a fixed benchmark gate in place of the model's router
        for node in moe_nodes(graph):
            node.meta["moe"]["routing"] = row["gate_routing"]
    return graph


def _predict(row: dict):
    """The row's published plan (its model preset on its device kind) estimated by autopar."""
    from autopar.cluster import Cluster
    from autopar.core.plan import Plan
    from autopar.estimator import estimate
    from cost_models.hardware import calibration_for

    presets = {"h100-sxm": "dgx-h100", "h200": "hgx-h200", "a100-80g": "dgx-a100-80g"}
    cluster = Cluster.parse(f"{presets[row['device']]}:{row['gpus']}")
    graph = row_graph(row)
    dp = row["gpus"] // (row.get("tp", 1) * row.get("pp", 1))
    plan = Plan.manual(
        dp=dp,
        tp=row.get("tp", 1),
        pp=row.get("pp", 1),
        global_batch=row["global_batch"],
        micro_batch_size=row["mbs"],
        ep=row.get("ep", 1),
        # autopar builds no ZeRO with ep > 1 (docs/moe.md); Megatron orders pp outermost (ep in a node)
        zero_stage=0 if row.get("ep", 1) > 1 else (3 if row.get("fsdp", 0) > 1 else 1),
        axis_order=("pp", "dp", "tp") if row.get("ep", 1) > 1 else ("dp", "pp", "tp"),
        recompute=row.get("recompute", "none"),
        **({"virtual_stages": row["vp"], "schedule": "interleaved"} if row.get("vp", 1) > 1 else {}),
    )
    calib = calibration_for(row["device"], framework=row.get("framework", "megatron"))
    return estimate(graph, cluster, plan, calib=calib, dtype="bf16")


def moe_fidelity_lines(path: Path = DATA) -> list[str]:
    """Per row: predicted vs published step time and the error, or why the row is not predicted."""
    lines = [
        "MoE set (benchmarks/data/moe_published.json)",
        f"{'row':<48} {'published':>10} {'predicted':>10} {'error':>8}",
    ]
    errors = []
    for r in load_rows(path):
        name = f"{r['model']} {r.get('gpus', '?')}x{r['device']} {r['precision']} ep={r.get('ep', '?')}"
        published = r.get("published_step_s")
        if not r.get("usable"):
            shown = f"{published:.3f}s" if published else "-"
            lines.append(f"{name:<48} {shown:>10} {'-':>10} {'-':>8}  not predicted: {r['why_not']}")
            continue
        if published:
            predicted = predict_step_s(r)
            err = predicted / published - 1.0
            cells = f"{published:>9.3f}s {predicted:>9.3f}s {100 * err:>+7.1f}%"
        else:  # only TFLOP/s published: a faster prediction is a higher TFLOP/s (error sign as time)
            tflops = predict_tflops_per_gpu(r)
            err = r["model_tflops_per_gpu"] / tflops - 1.0
            cells = f"{r['model_tflops_per_gpu']:>6.0f}TF/s {tflops:>6.0f}TF/s {100 * err:>+7.1f}%"
        if r["usable"] == "indicative":
            lines.append(f"{name:<48} {cells}  indicative, not counted: {r['why_not']}")
            continue
        errors.append(abs(err))
        lines.append(f"{name:<48} {cells}  {r.get('why_not', '')}".rstrip())
    if errors:
        mean = 100 * sum(errors) / len(errors)
        lines.append(f"mean |error| {mean:.1f}%, max {100 * max(errors):.1f}% over {len(errors)} rows")
    else:
        lines.append("no counted row yet: see the reasons above (docs/moe_cost.md, validation)")
    return lines


def main() -> int:
    print("\n".join(moe_fidelity_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

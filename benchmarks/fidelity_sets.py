"""Validation sets beyond SC'21: published throughputs on other device kinds (``benchmarks/data/``).

Each set is a list of :class:`Run`: a GPT-family shape, a data-parallel plan (FSDP as ZeRO-3 or
ZeRO-2), a cluster preset and the published step time. ``benchmarks/fidelity.py --sets`` prints
per-set errors and the leave-one-set-out fit; this module only turns the JSON into cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import autopar
from autopar.cluster import Cluster
from autopar.core.plan import Plan
from autopar.estimator import Workload, workload
from autopar.models import GPTConfig
from cost_models import Calibration, step_time
from cost_models.hardware import calibration_for

DATA_DIR = Path(__file__).resolve().parent / "data"
MPT = DATA_DIR / "mpt_llm_foundry.json"

FRAMEWORK = "composer"
"""llm-foundry trains in eager PyTorch with FSDP under Composer (cost_models.hardware.FRAMEWORKS)."""

KIND_OF_PRESET = {"dgx-h100": "h100-sxm", "dgx-a100-80g": "a100-80g", "dgx-a100-40g": "a100-40g"}


@dataclass(frozen=True)
class Run:
    """One published run: shape, plan knobs, cluster and the published step time."""

    set_name: str
    label: str
    hidden: int
    heads: int
    layers: int
    vocab: int
    seq: int
    gpus: int
    mbs: int
    grad_accum: int
    zero: int
    recompute: str
    preset: str
    published_s: float
    citation: str

    @property
    def kind(self) -> str:
        return KIND_OF_PRESET[self.preset]


def excluded_rows(path: Path = MPT) -> list[dict]:
    """The published rows the data file excludes, each with its set, source line and reason."""
    return list(json.loads(path.read_text()).get("excluded", {}).get("rows", []))


def load_mpt(path: Path = MPT, *, max_seq: int | None = None) -> list[Run]:
    """The llm-foundry MPT sweep: one Run per published row (``max_seq`` drops longer rows; the
    rows of :func:`excluded_rows` are left out)."""
    d = json.loads(path.read_text())
    shapes, cols, src = d["shapes"], d["columns"], d["sources"]["llm_foundry_readme"].split(":")[0]
    skip = {(e["set"], e["source_line"]) for e in excluded_rows(path)}
    runs = []
    for name, s in d["sets"].items():
        for cells in s["rows"]:
            r = dict(zip(cols, cells))
            if max_seq is not None and r["seq"] > max_seq:
                continue
            if (name, r["source_line"]) in skip:
                continue
            shape = shapes[r["model"]]
            runs.append(
                Run(
                    set_name=name,
                    label=f"{r['model']}/s{r['seq']}/{r['gpus']}g/mb{r['micro_batch']}",
                    hidden=shape["hidden"],
                    heads=shape["heads"],
                    layers=shape["layers"],
                    vocab=shapes["vocab"],
                    seq=r["seq"],
                    gpus=r["gpus"],
                    mbs=r["micro_batch"],
                    grad_accum=r["grad_accum"],
                    zero=3 if r["sharding"] == "FULL_SHARD" else 2,
                    recompute="full" if r["activation_checkpointing"] else "none",
                    preset=s["preset"],
                    published_s=r["global_batch_tokens"] / r["throughput_tokens_per_s"],
                    citation=f"{src}, table '{s['table']}', line {r['source_line']}",
                )
            )
    return runs


_GRAPHS: dict[tuple, object] = {}


def graph_for(run: Run, attention: str = "fused"):
    """MPT-like GPT on meta (bf16, no biases, learned positions, flash attention) at the micro-batch."""
    key = (run.hidden, run.heads, run.layers, run.vocab, run.seq, run.mbs, attention)
    if key not in _GRAPHS:
        cfg = GPTConfig(
            hidden=run.hidden,
            layers=run.layers,
            heads=run.heads,
            vocab=run.vocab,
            seq=run.seq,
            bias=False,
            fused_attention=attention == "fused",
        )
        model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=run.mbs, dtype=torch.bfloat16)
        _GRAPHS[key] = autopar.trace(model, inputs, loss_fn=loss_fn)
    return _GRAPHS[key]


def plan_for(run: Run) -> Plan:
    return Plan.manual(
        dp=run.gpus,
        global_batch=run.gpus * run.mbs * run.grad_accum,
        micro_batch_size=run.mbs,
        recompute=run.recompute,
        zero_stage=run.zero,
    )


def cluster_for(run: Run) -> Cluster:
    return Cluster.preset(run.preset, nodes=max(1, run.gpus // 8))


@dataclass
class SetCase:
    run: Run
    work: Workload

    def predict_s(self, calib: Calibration) -> float:
        return step_time(self.work.spec, self.work.rates, calib).step_time_s

    def error(self, calib: Calibration) -> float:
        return self.predict_s(calib) / self.run.published_s - 1.0


def build_set_cases(
    runs: list[Run], calib: Calibration | None = None, attention: str = "fused"
) -> list[SetCase]:
    """Workloads are built once per run (under the run's device-kind calibration: fusion flags)."""
    out = []
    for run in runs:
        c = calib or calibration_for(run.kind, framework=FRAMEWORK)
        out.append(
            SetCase(run, workload(graph_for(run, attention), cluster_for(run), plan_for(run), calib=c))
        )
    return out

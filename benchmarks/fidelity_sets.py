"""Validation sets beyond SC'21: published throughputs on other device kinds (``benchmarks/data/``).

Each set is a list of :class:`Run`: a GPT-family shape, the published plan (data parallelism with
FSDP as ZeRO-3 or ZeRO-2; or Megatron's tensor, pipeline and data parallelism), a cluster preset,
the software it ran under and the published step time. ``benchmarks/fidelity.py --sets`` prints
per-set errors and the leave-one-set-out fit; this module only turns the JSON into cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import autopar
from autopar.cluster import Cluster
from autopar.cluster.hardware import PRESETS
from autopar.core.plan import Plan
from autopar.estimator import Workload, workload
from autopar.models import GPTConfig
from cost_models import Calibration, step_time
from cost_models.hardware import calibration_for

DATA_DIR = Path(__file__).resolve().parent / "data"
MPT = DATA_DIR / "mpt_llm_foundry.json"
MEGATRON_2019 = DATA_DIR / "megatron_lm_2019_v100.json"
NEMOTRON4 = DATA_DIR / "dgxc_nemotron4_h100.json"
GPT3_H100 = DATA_DIR / "dgxc_gpt3_h100.json"

FRAMEWORK = "composer"
"""llm-foundry trains in eager PyTorch with FSDP under Composer (cost_models.hardware.FRAMEWORKS)."""

KIND_OF_PRESET = {
    "dgx-h100": "h100-sxm",
    "dgx-a100-80g": "a100-80g",
    "dgx-a100-40g": "a100-40g",
    "dgx-2h": "v100-sxm3-32g",
}


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
    tp: int = 1
    """Tensor (Megatron model) parallel degree; ``gpus = tp * dp``."""
    dtype: str = "bf16"
    dropout: float = 0.0
    attention: str = "fused"
    """``fused`` (flash / SDPA) or ``explicit`` (materialised scores and softmax)."""
    framework: str = FRAMEWORK
    """The run's software (:data:`cost_models.hardware.FRAMEWORKS`)."""
    pp: int = 1
    """Pipeline stages; ``gpus = tp * pp * dp``."""
    vp: int = 1
    """Virtual stages per pipeline rank (interleaved 1F1B when > 1)."""
    kv_heads: int | None = None
    ffn: int | None = None
    tie_embeddings: bool = True
    sequence_parallel: bool = False
    act: str = "gelu"
    """The MLP activation (``GPTConfig.act``): ``gelu_tanh`` for code that writes GELU as arithmetic."""
    bias: bool | None = None
    """Linear biases; None: GPT-2-like (biases) for the Megatron-LM frameworks, MPT-like otherwise."""

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


def load_megatron2019(path: Path = MEGATRON_2019) -> list[Run]:
    """Megatron-LM 2019 on DGX-2H (V100): the scaling study (published step from the paper's 39 TFLOPS
    baseline and its efficiencies or speedups) and the GPT-2 training runs (time per epoch)."""
    from cost_models.transformer import megatron_flops_per_iteration

    d = json.loads(path.read_text())
    seq, vocab = 1024, 51200
    runs = []
    scaling = d["tables"]["scaling"]
    base_rate = scaling["baseline_tflops_per_gpu"] * 1e12
    rows = [dict(zip(scaling["columns"], cells)) for cells in scaling["rows"]]
    t_one = {}
    for r in rows:  # the single-GPU baseline of each shape first: the strong-scaling rows divide it
        if r["gpus"] == 1:
            f = megatron_flops_per_iteration(
                batch=r["batch"], seq=seq, layers=r["layers"], hidden=r["hidden"], vocab=vocab
            )
            t_one[(r["hidden"], r["layers"], r["batch"])] = f / base_rate
    for r in rows:
        if r["speedup"] is not None:
            published = t_one[(r["hidden"], r["layers"], r["batch"])] / r["speedup"]
        else:
            f = megatron_flops_per_iteration(
                batch=r["batch"], seq=seq, layers=r["layers"], hidden=r["hidden"], vocab=vocab
            )
            published = f / (r["gpus"] * base_rate * r["efficiency"])
        runs.append(_megatron2019_run("megatron2019_scaling", r, seq, vocab, published))
    epoch = d["tables"]["epoch"]
    for cells in epoch["rows"]:
        r = dict(zip(epoch["columns"], cells))
        published = r["days_per_epoch"] * 86400.0 / epoch["iterations_per_epoch"]
        runs.append(_megatron2019_run("megatron2019_epoch", r, seq, vocab, published))
    return runs


def load_nemotron4(path: Path = NEMOTRON4) -> list[Run]:
    """dgxc-benchmarking's Nemotron-4 15B / 340B BF16 rows on DGX H100 (NeMo 25.02, Megatron-Core):
    tensor parallelism with sequence parallelism and TP communication overlap, the distributed
    optimizer (ZeRO-1), no recompute; the sources are in the data file."""
    d = json.loads(path.read_text())
    cite = d["sources"]["readme"].split(",")[0]
    runs = []
    for cells in d["rows"]:
        r = dict(zip(d["columns"], cells))
        shape = d["shapes"][r["model"]]
        runs.append(
            _dgxc_run(
                "dgxc_nemotron4_h100",
                f"{r['model']}/{r['gpus']}g",
                {**shape, "vocab": d["vocab"], "seq": d["seq"]},
                r,
                r["global_batch"],
                r["step_time_s"],
                f"{cite}, nemotron/README.md, 'Nemotron4 {r['model']} BF16', {r['gpus']} GPUs",
                tie_embeddings=False,
            )
        )
    return runs


def load_gpt3_h100(path: Path = GPT3_H100) -> list[Run]:
    """dgxc-benchmarking's GPT-3 175B BF16 rows on DGX H100 (NeMo Megatron 24.11 on Megatron-Core):
    the same software features as :func:`load_nemotron4` (sources in the data file)."""
    d = json.loads(path.read_text())
    cite = d["sources"]["readme"].split(",")[0]
    shape, lay = d["shape"], d["layout"]
    return [
        _dgxc_run(
            "dgxc_gpt3_h100",
            f"175b/{gpus}g",
            shape,
            {**lay, "gpus": gpus},
            lay["global_batch_per_gpu"] * gpus,
            step,
            f"{cite}, nemo_megatron/README_175b.md, 'NeMo Megatron 24.11 BF16', {gpus} GPUs",
            dropout=shape["dropout"],
            bias=True,
        )
        for gpus, step in d["rows"]
    ]


def _dgxc_run(
    set_name: str, label: str, shape: dict, lay: dict, global_batch: int, step_s: float, citation: str, **kw
) -> Run:
    """A dgxc-benchmarking row: a Megatron-Core run on DGX H100 with sequence parallelism, the
    distributed optimizer (ZeRO-1) and no recompute, under ``nemo-mcore``."""
    dp = lay["gpus"] // (lay["tp"] * lay["pp"])
    return Run(
        set_name=set_name,
        label=label,
        hidden=shape["hidden"],
        heads=shape["heads"],
        layers=shape["layers"],
        vocab=shape["vocab"],
        seq=shape["seq"],
        gpus=lay["gpus"],
        mbs=lay["mbs"],
        grad_accum=global_batch // (dp * lay["mbs"]),
        zero=1,
        recompute="none",
        preset="dgx-h100",
        published_s=step_s,
        citation=citation,
        tp=lay["tp"],
        pp=lay["pp"],
        vp=lay["vp"],
        kv_heads=shape.get("kv_heads"),
        ffn=shape.get("ffn"),
        sequence_parallel=lay["tp"] > 1,
        framework="nemo-mcore",
        **kw,
    )


def _megatron2019_run(set_name: str, r: dict, seq: int, vocab: int, published_s: float) -> Run:
    dp = r["gpus"] // r["mp"]
    return Run(
        set_name=set_name,
        label=r["label"],
        hidden=r["hidden"],
        heads=r["heads"],
        layers=r["layers"],
        vocab=vocab,
        seq=seq,
        gpus=r["gpus"],
        mbs=r["batch"] // dp,
        grad_accum=1,
        zero=0,
        recompute="full",
        preset="dgx-2h",
        published_s=published_s,
        citation=f"Shoeybi et al. 2019 (arXiv 1909.08053): {r['citation']}",
        tp=r["mp"],
        dtype="fp16",
        dropout=0.1,
        attention="explicit",
        act="gelu_tanh",  # megatron/model/utils.py gelu_impl: the tanh form as Python arithmetic
        framework="megatron-2019",
    )


_GRAPHS: dict[tuple, object] = {}


def graph_for(run: Run, attention: str | None = None):
    """The run's GPT on meta at the micro-batch: MPT-like (bf16, no biases, learned positions, flash
    attention) or, for the Megatron-LM 2019 rows, GPT-2-like (fp16, biases, dropout 0.1, explicit
    attention). ``attention`` overrides the run's."""
    attention = attention or run.attention
    gpt2 = run.framework.startswith("megatron") if run.bias is None else run.bias
    key = (run.hidden, run.heads, run.layers, run.vocab, run.seq, run.mbs, attention, run.dtype, run.dropout)
    key += (run.kv_heads, run.ffn, run.tie_embeddings, gpt2, run.act)
    if key not in _GRAPHS:
        cfg = GPTConfig(
            hidden=run.hidden,
            layers=run.layers,
            heads=run.heads,
            vocab=run.vocab,
            seq=run.seq,
            bias=gpt2,
            dropout=run.dropout,
            fused_attention=attention == "fused",
            kv_heads=run.kv_heads,
            ffn=run.ffn,
            tie_embeddings=run.tie_embeddings,
            act=run.act,
        )
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[run.dtype]
        model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=run.mbs, dtype=dtype)
        _GRAPHS[key] = autopar.trace(model, inputs, loss_fn=loss_fn)
    return _GRAPHS[key]


def plan_for(run: Run) -> Plan:
    dp = run.gpus // (run.tp * run.pp)
    return Plan.manual(
        dp=dp,
        tp=run.tp,
        pp=run.pp,
        global_batch=dp * run.mbs * run.grad_accum,
        micro_batch_size=run.mbs,
        recompute=run.recompute,
        zero_stage=run.zero,
        sequence_parallel=run.sequence_parallel,
        schedule="interleaved" if run.vp > 1 else "1f1b",
        virtual_stages=run.vp,
    )


def cluster_for(run: Run) -> Cluster:
    per_node = PRESETS[run.preset].devices_per_node
    if run.gpus < per_node:
        return Cluster.preset(run.preset, devices=run.gpus)
    return Cluster.preset(run.preset, nodes=run.gpus // per_node)


@dataclass
class SetCase:
    run: Run
    work: Workload

    def predict_s(self, calib: Calibration) -> float:
        return step_time(self.work.spec, self.work.rates, calib).step_time_s

    def error(self, calib: Calibration) -> float:
        return self.predict_s(calib) / self.run.published_s - 1.0


def build_set_cases(
    runs: list[Run], calib: Calibration | None = None, attention: str | None = None
) -> list[SetCase]:
    """Workloads are built once per run (under the run's device-kind calibration: fusion flags)."""
    out = []
    for run in runs:
        c = calib or calibration_for(run.kind, framework=run.framework)
        out.append(
            SetCase(run, workload(graph_for(run, attention), cluster_for(run), plan_for(run), calib=c))
        )
    return out

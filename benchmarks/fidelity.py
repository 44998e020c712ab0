"""Fidelity of the cost model against published large-scale training runs.

For every row of Narayanan et al. SC'21 Table 1 and Table 2 (PTD-P and ZeRO-3) it builds the model on
``meta``, traces it at the row's micro-batch size, estimates the published plan on DGX A100 80GB
nodes and compares the predicted iteration time with the published one,
``t = F / (gpus * TFLOP/s * 1e12)`` with the paper's ``F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))``.

    python benchmarks/fidelity.py                 # the table with the shipped constants
    python benchmarks/fidelity.py --fit           # refit the constants on all rows, then the table
    python benchmarks/fidelity.py --crossval      # fit on half the rows, test on the other half
    python benchmarks/fidelity.py --markdown      # tables for docs/cost_model.md
    python benchmarks/fidelity.py --sets          # also the sets beyond SC'21 (benchmarks/data/), per
                                                  # set, the rows the data file excludes (with its
                                                  # reasons), and the leave-one-set-out fit
    python benchmarks/fidelity.py --sets --rows   # plus every row of the V100 (Megatron-LM 2019) sets
    python benchmarks/fidelity.py --sets --rows mpt_h100 dgxc_gpt3_h100   # every row of the named sets
    python benchmarks/fidelity.py --sets --figure docs/img/fig-fidelity.png   # the parity plot

The SC'21 rows are modelled as they ran: explicit (non-flash) attention and the 2021 software's
ZeRO-3 gathers at the per-GPU NIC rate (``FRAMEWORK``, cost_models.hardware.FRAMEWORKS). The sets
beyond SC'21 (``fidelity_sets.py``): llm-foundry's MPT sweep (H100, A100 80GB / 40GB; FSDP under
Composer), Megatron-LM 2019 on DGX-2H (V100), and dgxc-benchmarking's Nemotron-4 15B/340B and
GPT-3 175B on H100 (Megatron-Core under NeMo), each under its own software
(``framework=`` of :func:`cost_models.hardware.calibration_for`).

It also checks memory: every published plan fits in 80 GB and the same model with tp = pp = 1
does not (with the overflow in bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import autopar
from autopar.cluster import Cluster
from autopar.core.plan import Plan
from autopar.estimator import Workload, predicted_cost, workload
from autopar.models import GPTConfig
from cost_models import DEFAULT, FITTED, Calibration, step_time
from cost_models.constants import FIT_BOUNDS as BOUNDS
from cost_models.hardware import calibration_for
from cost_models.transformer import megatron_flops_per_iteration

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "published_runs.json"
SEQ, VOCAB = 2048, 51200


@dataclass
class Row:
    table: str
    label: str
    hidden: int
    heads: int
    layers: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    mbs: int
    vpp: int
    zero: int
    tflops: float

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def published_s(self) -> float:
        f = megatron_flops_per_iteration(
            batch=self.global_batch, seq=SEQ, layers=self.layers, hidden=self.hidden, vocab=VOCAB
        )
        return f / (self.gpus * self.tflops * 1e12)


def load_rows(path: Path) -> list[Row]:
    d = json.loads(path.read_text())
    rows = []
    for r in d["megatron_sc21_table1"]["rows"]:
        params, heads, hidden, layers, tp, pp, gpus, gb, mbs, vpp, tflops, _ = r
        rows.append(Row("T1", f"{params:g}B", hidden, heads, layers, tp, pp, gpus, gb, mbs, vpp, 0, tflops))
    t2 = d["megatron_sc21_table2_zero3_vs_ptdp"]
    shapes = {174.6: t2["model_175b"], 529.6: t2["model_530b"]}
    for scheme, params, mp, gb, gpus, mbs, tflops in t2["rows"]:
        s = shapes[params]
        tp, pp, zero = (1, 1, 3) if scheme == "zero3" else (8, mp // 8, 0)
        table = "Z3" if scheme == "zero3" else "T2"
        label = f"{params:g}B/{gpus}"
        rows.append(
            Row(table, label, s["hidden"], s["heads"], s["layers"], tp, pp, gpus, gb, mbs, 1, zero, tflops)
        )
    return rows


# ------------------------------------------------------------------------------ the real path
_GRAPHS: dict[tuple, object] = {}


def graph_for(row: Row):
    """build_model on meta (fp16, Megatron's dropout 0.1, explicit attention) -> trace at the row's
    micro-batch size."""
    key = (row.hidden, row.heads, row.layers, row.mbs)
    if key not in _GRAPHS:
        cfg = GPTConfig(
            hidden=row.hidden,
            layers=row.layers,
            heads=row.heads,
            vocab=VOCAB,
            seq=SEQ,
            dropout=0.1,
            fused_attention=False,  # Megatron-LM 2021: explicit scaled-masked softmax, no flash
        )
        model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=row.mbs, dtype=torch.float16)
        _GRAPHS[key] = autopar.trace(model, inputs, loss_fn=loss_fn)
    return _GRAPHS[key]


def plan_for(row: Row, *, tp: int | None = None, pp: int | None = None) -> Plan:
    tp = row.tp if tp is None else tp
    pp = row.pp if pp is None else pp
    vpp = row.vpp if pp > 1 else 1
    return Plan.manual(
        dp=row.gpus // (tp * pp),
        tp=tp,
        pp=pp,
        global_batch=row.global_batch,
        micro_batch_size=row.mbs,
        schedule="interleaved" if vpp > 1 else "1f1b",
        virtual_stages=vpp,
        recompute="full",
        zero_stage=row.zero,
    )


def cluster_for(row: Row) -> Cluster:
    return Cluster.preset("dgx-a100-80g", nodes=row.gpus // 8)


FRAMEWORK = "megatron-deepspeed-2021"
"""The SC'21 rows' software (cost_models.hardware.FRAMEWORKS): Megatron-LM and DeepSpeed ZeRO-3."""


def sc21_calibration(base: Calibration, framework: str = FRAMEWORK) -> Calibration:
    """``base`` under the SC'21 software (DGX A100 80GB is the reference kind: constants unchanged)."""
    return calibration_for("a100-80g", base, framework=framework)


@dataclass
class Case:
    row: Row
    work: Workload
    plan: Plan
    cluster: Cluster
    framework: str = FRAMEWORK

    def predict_s(self, calib: Calibration) -> float:
        calib = sc21_calibration(calib, self.framework)
        return step_time(self.work.spec, self.work.rates, calib).step_time_s

    def error(self, calib: Calibration) -> float:
        return self.predict_s(calib) / self.row.published_s - 1.0


def build_cases(rows: list[Row], calib: Calibration = DEFAULT) -> list[Case]:
    cases = []
    for row in rows:
        plan, cluster = plan_for(row), cluster_for(row)
        cases.append(Case(row, workload(graph_for(row), cluster, plan, calib=calib), plan, cluster))
    return cases


ABLATIONS = {
    "shipped model": {},
    "no elementwise fusion": {"fuse_elementwise": False},
    "separate q/k/v GEMMs": {"fuse_sibling_gemms": False},
    "TP collectives hidden": {"tp_comm_overlap": 1.0},
    "no DP overlap": {"dp_overlap": False},
    "perfect overlap (max)": {"overlap_sharpness": 64.0},
    "no overlap (sum)": {"overlap_sharpness": 1.0},
    "hierarchy-blind p2p": {"pp_scatter_gather": False},
    "ZeRO-3 at node NIC rate": {"framework": "megatron"},
}
"""Switch one modelled effect off (constants not refitted) to show what each term is worth."""


def ablation_lines(rows: list[Row], markdown: bool) -> list[str]:
    head = ("variant", "T1 mean", "T1 max", "T2 mean", "T2 max", "Z3 mean", "Z3 max")
    plain = head[0].ljust(24) + "".join(h.rjust(9) for h in head[1:])
    lines = ["| " + " | ".join(head) + " |\n|" + "---|" * len(head) if markdown else plain]
    for name, change in ABLATIONS.items():
        change = dict(change)
        framework = change.pop("framework", FRAMEWORK)
        calib = DEFAULT.with_(**change)
        cases = build_cases(rows, calib)
        for c in cases:
            c.framework = framework
        stats = table_stats(cases, calib)
        cells = [name] + [f"{x * 100:.1f}%" for t in ("T1", "T2", "Z3") for x in stats[t]]
        plain = cells[0].ljust(24) + "".join(c.rjust(9) for c in cells[1:])
        lines.append("| " + " | ".join(cells) + " |" if markdown else plain)
    return lines


# ------------------------------------------------------------------------------ fitting
def objective(cases: list[Case], calib: Calibration) -> float:
    """Mean squared relative error of the predicted iteration time."""
    return sum(c.error(calib) ** 2 for c in cases) / len(cases)


def fit(cases: list[Case], start: Calibration = DEFAULT, rounds: int = 40) -> Calibration:
    """Pattern search over the FITTED constants within BOUNDS (no per-row freedom)."""
    best, best_f = start, objective(cases, start)
    step = 0.2
    for _ in range(rounds):
        improved = False
        for name in FITTED:
            lo, hi = BOUNDS[name]
            for direction in (1.0, -1.0):
                value = getattr(best, name)
                trial_value = min(hi, max(lo, value * (1.0 + direction * step)))
                trial = best.with_(**{name: trial_value})
                f = objective(cases, trial)
                if f < best_f - 1e-12:
                    best, best_f, improved = trial, f, True
        if not improved:
            step /= 2
            if step < 1e-3:
                break
    return best


def halves(cases: list[Case]) -> tuple[list[Case], list[Case]]:
    """Alternate rows within each table: even positions vs odd positions."""
    a, b, seen = [], [], {}
    for c in cases:
        k = seen.get(c.row.table, 0)
        (a if k % 2 == 0 else b).append(c)
        seen[c.row.table] = k + 1
    return a, b


# ------------------------------------------------------------------------------ output
def summarise(errors: list[float]) -> tuple[float, float]:
    return sum(abs(e) for e in errors) / len(errors), max(abs(e) for e in errors)


def time_table(cases: list[Case], calib: Calibration, markdown: bool) -> list[str]:
    head = ("table", "run", "tp", "pp", "dp", "mbs", "vpp", "gpus", "published s", "predicted s", "error")
    lines = [_fmt(head, markdown, header=True)]
    for c in cases:
        r = c.row
        pred = c.predict_s(calib)
        lines.append(
            _fmt(
                (
                    r.table,
                    r.label,
                    r.tp,
                    r.pp,
                    r.dp,
                    r.mbs,
                    r.vpp,
                    r.gpus,
                    f"{r.published_s:.2f}",
                    f"{pred:.2f}",
                    f"{(pred / r.published_s - 1) * 100:+.1f}%",
                ),
                markdown,
            )
        )
    return lines


def memory_table(cases: list[Case], calib: Calibration, markdown: bool) -> tuple[list[str], bool]:
    head = ("run", "published plan GB", "fits", "tp=pp=1 GB", "fits", "overflow GB")
    lines, ok = [_fmt(head, markdown, header=True)], True
    done = set()
    for c in cases:
        r = c.row
        if r.zero or (r.hidden, r.mbs) in done:
            continue
        done.add((r.hidden, r.mbs))
        cost = predicted_cost(c.work, c.plan, c.cluster, calib)
        if r.tp == 1 and r.pp == 1:
            single = ("n/a (published plan is tp=pp=1)", "", "")
            ok &= cost.fits
        else:
            # Memory per device does not depend on dp: one node, dp = 8, one micro-batch each.
            node = Cluster.preset("dgx-a100-80g", nodes=1)
            plan1 = Plan.manual(dp=8, global_batch=8 * r.mbs, micro_batch_size=r.mbs, recompute="full")
            one = predicted_cost(workload(graph_for(r), node, plan1), plan1, node, calib)
            single = (
                f"{one.memory_bytes_per_device / 1e9:.1f}",
                "yes" if one.fits else "no",
                f"{one.extra['overflow_bytes'] / 1e9:.1f}",
            )
            ok &= cost.fits and not one.fits
        lines.append(
            _fmt(
                (
                    f"{r.table} {r.label}",
                    f"{cost.memory_bytes_per_device / 1e9:.1f}",
                    "yes" if cost.fits else "no",
                    *single,
                ),
                markdown,
            )
        )
    return lines, ok


def _fmt(cells, markdown: bool, header: bool = False) -> str:
    cells = [str(x) for x in cells]
    if markdown:
        line = "| " + " | ".join(cells) + " |"
        return line + "\n|" + "---|" * len(cells) if header else line
    widths = [5, 12, 3, 3, 3, 4, 4, 5, 12, 12, 8] if len(cells) == 11 else [22, 18, 5, 34, 5, 11]
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def table_stats(cases: list[Case], calib: Calibration) -> dict[str, tuple[float, float]]:
    out = {}
    for table in ("T1", "T2", "Z3"):
        errs = [c.error(calib) for c in cases if c.row.table == table]
        if errs:
            out[table] = summarise(errs)
    return out


# ------------------------------------------------------------------------------ sets beyond SC'21
def set_runs(max_seq: int) -> list:
    """Every published row of ``benchmarks/data/`` beyond SC'21 (read, not yet traced)."""
    from fidelity_sets import load_gpt3_h100, load_megatron2019, load_mpt, load_nemotron4

    return load_mpt(max_seq=max_seq) + load_megatron2019() + load_nemotron4() + load_gpt3_h100()


def set_cases(max_seq: int) -> dict[str, list]:
    """SC'21 (one set: its three tables) and each set of ``benchmarks/data/`` as cases whose
    ``error(base)`` applies the case's device-kind calibration on top of ``base``."""
    from fidelity_sets import build_set_cases

    out: dict[str, list] = {"sc21": [_Kinded(c, None) for c in build_cases(load_rows(DATA))]}
    for c in build_set_cases(set_runs(max_seq)):
        out.setdefault(c.run.set_name, []).append(_Kinded(c, c.run.kind, c.run.framework))
    return out


@dataclass
class _Kinded:
    """A case timed under ``calibration_for(kind, base)`` (SC'21 rows: ``base`` itself)."""

    case: object
    kind: str | None
    framework: str = "megatron"

    def error(self, base: Calibration) -> float:
        calib = base if self.kind is None else calibration_for(self.kind, base, framework=self.framework)
        return self.case.error(calib)


def set_lines(sets: dict[str, list], base: Calibration, markdown: bool) -> list[str]:
    head = ("set", "rows", "mean |error|", "max |error|", "mean error")
    lines = [_row(head, markdown, header=True)]
    for name, cases in sets.items():
        errs = [c.error(base) for c in cases]
        mean, worst = summarise(errs)
        bias = sum(errs) / len(errs)
        lines.append(_row((name, len(errs), f"{mean:.1%}", f"{worst:.1%}", f"{bias:+.1%}"), markdown))
    return lines


def set_row_lines(sets: dict[str, list], base: Calibration, markdown: bool, names: list[str]) -> list[str]:
    """Each row of the sets ``names`` (beyond SC'21, whose rows the main table prints): plan,
    published and predicted step, error, where the predicted time goes, and the row's citation."""
    head = (
        "set",
        "run",
        "tp",
        "pp",
        "dp",
        "mbs",
        "recompute",
        "published s",
        "predicted s",
        "error",
        "comp+recomp",
        "tp_comm",
        "dp_comm",
        "zero3_comm",
    )
    lines = [_fmt_wide(head, markdown, header=True)]
    for name, cases in sets.items():
        if name not in names or name == "sc21":
            continue
        for k in cases:
            run = k.case.run
            calib = calibration_for(k.kind, base, framework=k.framework)
            st = step_time(k.case.work.spec, k.case.work.rates, calib)
            b = st.breakdown_s
            cells = (
                name,
                run.label,
                run.tp,
                run.pp,
                run.gpus // (run.tp * run.pp),
                run.mbs,
                run.recompute,
                f"{run.published_s:.3f}",
                f"{st.step_time_s:.3f}",
                f"{st.step_time_s / run.published_s - 1:+.1%}",
                f"{b['compute'] + b['recompute']:.3f}",
                f"{b['tp_comm']:.3f}",
                f"{b['dp_comm_exposed']:.3f}",
                f"{b['zero_comm_exposed']:.3f}",
            )
            lines.append(_fmt_wide(cells, markdown))
            if not markdown:
                lines.append(f"    {run.citation}")
    return lines


def _fmt_wide(cells, markdown: bool, header: bool = False) -> str:
    cells = [str(x) for x in cells]
    if markdown:
        line = "| " + " | ".join(cells) + " |"
        return line + "\n|" + "---|" * len(cells) if header else line
    return cells[0].ljust(22) + cells[1].ljust(26) + "".join(c.rjust(12) for c in cells[2:])


def excluded_lines() -> list[str]:
    """The published rows left out of the sets, with the data file's reasons (never silent)."""
    from fidelity_sets import excluded_rows

    rows = excluded_rows()
    out = [f"excluded: {len(rows)} published rows (benchmarks/data/mpt_llm_foundry.json 'excluded'):"]
    out += [f"  {e['set']} line {e['source_line']}: {e['reason']}" for e in rows]
    return out if rows else []


def loso_lines(sets: dict[str, list], markdown: bool) -> list[str]:
    """Fit the FITTED constants on every other set, test on the one left out."""
    head = ("left out", *FITTED, "mean |error|", "max |error|")
    lines = [_row(head, markdown, header=True)]
    for name, test in sets.items():
        train = [c for other, cs in sets.items() if other != name for c in cs]
        c = fit(train, rounds=20)
        mean, worst = summarise([x.error(c) for x in test])
        consts = [f"{getattr(c, k):.3g}" for k in FITTED]
        lines.append(_row((name, *consts, f"{mean:.1%}", f"{worst:.1%}"), markdown))
    return lines


def parity_figure(sets: dict[str, list], base: Calibration, path: Path) -> None:
    """Two panels a person can read at a glance: predicted against published step time of every row
    (log axes, one colour per set, the +-10 % band), and each set's row errors side by side with
    the +-5 % and +-10 % lines (the issue's in-sample targets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ex) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 1.2]})
    lo, hi = float("inf"), 0.0
    for k, (name, cases) in enumerate(sets.items()):
        pub = [_published_s(c) for c in cases]
        err = [c.error(base) for c in cases]
        pred = [p * (1.0 + e) for p, e in zip(pub, err)]
        color = f"C{k % 10}"
        ax.scatter(pub, pred, s=16, alpha=0.8, color=color, label=name)
        lo, hi = min(lo, *pub, *pred), max(hi, *pub, *pred)
        jitter = [k + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(err))]
        ex.scatter(jitter, [100 * e for e in err], s=14, alpha=0.8, color=color)
        mean = sum(abs(e) for e in err) / len(err)
        ex.text(k, 100 * max(err) + 2, f"{mean:.1%}", ha="center", fontsize=7)
    line = [lo / 1.2, hi * 1.2]
    ax.plot(line, line, color="black", linewidth=1)
    ax.fill_between(line, [x * 0.9 for x in line], [x * 1.1 for x in line], color="grey", alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title("predicted vs published (grey: within 10 %)")
    ax.legend(fontsize=7, loc="upper left")
    for y, style in ((5, ":"), (10, "--")):
        for sign in (1, -1):
            ex.axhline(sign * y, color="grey", linestyle=style, linewidth=1)
    ex.axhline(0, color="black", linewidth=1)
    ex.set_xticks(range(len(sets)))
    ex.set_xticklabels(list(sets), rotation=35, ha="right", fontsize=8)
    ex.set_ylabel("error of each row (%), + = predicted slower")
    ex.set_title("row errors per set (number: mean |error|; lines: 5 % and 10 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _published_s(case) -> float:
    """The published step time of an SC'21 case or a set case."""
    inner = case.case
    return inner.row.published_s if hasattr(inner, "row") else inner.run.published_s


def _row(cells, markdown: bool, header: bool = False) -> str:
    cells = [str(x) for x in cells]
    if markdown:
        line = "| " + " | ".join(cells) + " |"
        return line + "\n|" + "---|" * len(cells) if header else line
    return cells[0].ljust(16) + "".join(c.rjust(22) for c in cells[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="published_runs.json")
    ap.add_argument("--fit", action="store_true", help="refit the constants on all rows first")
    ap.add_argument("--crossval", action="store_true", help="fit on half the rows, test on the other half")
    ap.add_argument("--markdown", action="store_true", help="markdown tables (for docs/cost_model.md)")
    ap.add_argument("--ablate", action="store_true", help="error with each modelled effect switched off")
    ap.add_argument("--sets", action="store_true", help="per-set errors beyond SC'21 and leave-one-set-out")
    ap.add_argument("--max-seq", type=int, default=4096, help="--sets: skip rows with a longer sequence")
    ap.add_argument(
        "--rows",
        nargs="*",
        metavar="SET",
        help="--sets: print each row of the named sets with where its predicted time goes "
        "(no name: the V100 / Megatron-LM 2019 sets)",
    )
    ap.add_argument("--figure", type=Path, help="--sets: write the predicted-vs-published parity plot (PNG)")
    args = ap.parse_args(argv)
    if args.rows:  # named sets checked before the minutes of tracing
        known = {r.set_name for r in set_runs(args.max_seq)}
        unknown = sorted(set(args.rows) - known)
        if unknown:
            print(f"--rows: no set {', '.join(unknown)}; sets: {', '.join(sorted(known))}", file=sys.stderr)
            return 2

    t0 = time.perf_counter()
    cases = build_cases(load_rows(args.data))
    calib = fit(cases) if args.fit else DEFAULT
    if args.fit:
        print("fitted constants: " + ", ".join(f"{k}={getattr(calib, k):.4g}" for k in FITTED))
    print("\n".join(time_table(cases, calib, args.markdown)))
    print()
    mem_lines, mem_ok = memory_table(cases, calib, args.markdown)
    print("\n".join(mem_lines))
    print()
    if args.crossval:
        a, b = halves(cases)
        for train, test, name in ((a, b, "A->B"), (b, a, "B->A")):
            c = fit(train)
            consts = ", ".join(f"{k}={getattr(c, k):.3g}" for k in FITTED)
            per_table = "; ".join(
                f"{t}: mean {m * 100:.2f}% max {w * 100:.2f}%" for t, (m, w) in table_stats(test, c).items()
            )
            mean, worst = summarise([x.error(c) for x in test])
            print(f"cross-validation {name}: fitted on {len(train)} rows ({consts})")
            print(
                f"    tested on the other {len(test)}: mean {mean * 100:.2f}%, max {worst * 100:.2f}% ({per_table})"
            )
        print()
    if args.ablate:
        print("\n".join(ablation_lines(load_rows(args.data), args.markdown)))
        print()
    if args.sets:
        sets = set_cases(args.max_seq)
        print("\n".join(set_lines(sets, calib, args.markdown)))
        print("\n".join(excluded_lines()))
        if args.rows is not None:
            names = args.rows or [n for n in sets if n.startswith("megatron2019")]
            print()
            print("\n".join(set_row_lines(sets, calib, args.markdown, names)))
        print()
        if args.figure:
            parity_figure(sets, calib, args.figure)
            print(f"parity plot: {args.figure}")
        print("\n".join(loso_lines(sets, args.markdown)))
        print()
        from fidelity_moe import moe_fidelity_lines  # the mixture-of-experts rows (docs/moe_cost.md)

        print("\n".join(moe_fidelity_lines()))
        print()
    stats = table_stats(cases, calib)
    limits = {"T1": (0.05, 0.10), "T2": (0.05, 0.10), "Z3": (0.15, 0.15)}
    ok = mem_ok and all(m <= limits[t][0] and w <= limits[t][1] for t, (m, w) in stats.items())
    parts = [f"{t}: mean {m * 100:.2f}% max {w * 100:.2f}%" for t, (m, w) in stats.items()]
    allm, allw = summarise([c.error(calib) for c in cases])
    print(
        f"SUMMARY {'PASS' if ok else 'FAIL'}  all {len(cases)} rows: mean |error| {allm * 100:.2f}%, "
        f"max {allw * 100:.2f}%  ({'; '.join(parts)}); memory checks {'ok' if mem_ok else 'FAILED'}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

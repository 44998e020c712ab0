"""``autopar report PLAN.json [-o plan.html] [--cluster C] [--model M] [--measured m.json] [--text]``.

Draws the HTML report of a plan file (``autopar plan --out``): device map, pipeline schedule,
memory, step-time breakdown, shardings, alternatives and inputs (:mod:`autopar.report`). The
model and cluster default to those stored with the plan; give them for hand-written plans.
``--text`` prints the report's tables instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from autopar.cli.args import positive_int
from autopar.cli.files import check_output, write_with
from autopar.core.errors import ReportError

ORDER = 30


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="draw the HTML report of a plan file",
        description="Write one self-contained HTML report (figures embedded, no network needed) of a plan "
        "written by `autopar plan --out`: device map, pipeline schedule, memory, step time, shardings, "
        "alternatives, inputs.",
    )
    p.add_argument("plan_file", metavar="PLAN.json", help="a plan written by `autopar plan --out`")
    p.add_argument("-o", "--output", metavar="FILE", help="the HTML file (default: PLAN.html)")
    p.add_argument("--cluster", metavar="CLUSTER", help="the cluster (default: the one stored with the plan)")
    p.add_argument("--model", metavar="MODEL", help="the model spec (default: the one stored with the plan)")
    p.add_argument(
        "--seq", type=positive_int, default=None, metavar="S", help="sequence length of a GPT spec"
    )
    p.add_argument("--measured", metavar="FILE", help="measurements of a run (JSON; see docs/reports.md)")
    p.add_argument("--text", action="store_true", help="print the report as text instead of writing HTML")
    p.set_defaults(func=run)


def _read_measured(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ReportError(f"cannot read the measurements file {path!r}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"measurements file {path!r} is not valid JSON text: {e}") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autopar.report import load_plan, report_text, write_report

    t0 = time.perf_counter()
    out = Path(args.output) if args.output else Path(args.plan_file).with_suffix(".html")
    if not args.text:  # before reading anything: the output must not be an input
        check_output(out, flag="-o", inputs=[args.plan_file, args.measured, args.cluster])
    plan = load_plan(args.plan_file)
    measured = _read_measured(args.measured)
    kwargs = dict(cluster=args.cluster, model=args.model, seq=args.seq, measured=measured)
    if args.text:
        print(report_text(plan, **kwargs))
        return 0
    write_with(out, lambda tmp: write_report(plan, tmp, **kwargs), flag="-o")
    print(f"report written to {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.2f} s")
    sys.stdout.flush()
    return 0

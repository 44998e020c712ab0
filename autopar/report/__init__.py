"""Plan reports: one self-contained HTML file a person would rather look at than read.

    from autopar.report import write_report
    write_report(plan, "plan.html", cluster=cluster, model="gpt3-175b", graph=graph)

Sections: (1) the device map, (2) the pipeline schedule as a Gantt chart, (3) memory per device
against capacity, (4) the step-time breakdown, (5) the tensor-parallel sharding of each layer,
(6) the runner-up plans and why other meshes lost, (7) the inputs (model, cluster, planner).
Measurements of a run (``measured=``, see :mod:`autopar.report.measured`) are overlaid on the
predictions. :func:`report_text` is the same content for terminals. matplotlib is imported only
when a report is drawn, torch only when a model must be traced.

Public API: :func:`write_report`, :func:`build_html`, :func:`report_text`; :func:`attach_inputs`
(store what a later ``autopar report plan.json`` needs in the plan); :class:`ReportData` (what a
report shows, from :func:`autopar.report.context.gather`); :func:`load_plan` and
:class:`ReportError` re-exported for the CLI. The modules inside: ``context`` gathers,
``tables``/``table``/``sharding_table`` make rows, ``bars``/``gantt``/``devmap``/``figures`` draw,
``html``/``terminal`` render, ``timeline`` simulates the schedule, ``measured`` checks a run's
measurements, ``experts`` adds the MoE placement, all-to-all volume and expert load. Numbers are written by :mod:`autopar.core.text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from autopar.cluster import Cluster
from autopar.core.errors import ReportError
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan
from autopar.core.plan_file import load_plan
from autopar.report.context import ReportData, attach_inputs, gather
from autopar.report.html import page
from autopar.report.terminal import render

if TYPE_CHECKING:
    from autopar.models.spec import LoadedModel

__all__ = [
    "ReportData",
    "ReportError",
    "attach_inputs",
    "build_html",
    "load_plan",
    "report_text",
    "write_report",
]


def build_html(
    plan: Plan,
    *,
    cluster: Cluster | str | None = None,
    model: str | LoadedModel | OpGraph | None = None,
    graph: OpGraph | None = None,
    seq: int | None = None,
    measured: dict | None = None,
) -> str:
    """The report page as a string. Arguments as for :func:`write_report`."""
    data = gather(plan, cluster=cluster, model=model, graph=graph, seq=seq, measured=measured)
    return page(data)


def write_report(
    plan: Plan,
    path: str | Path,
    *,
    cluster: Cluster | str | None = None,
    model: str | LoadedModel | OpGraph | None = None,
    graph: OpGraph | None = None,
    seq: int | None = None,
    measured: dict | None = None,
) -> Path:
    """Write the HTML report of ``plan`` to ``path``; returns the path.

    ``cluster``: a :class:`~autopar.cluster.Cluster` or a ``--cluster`` spec; default: the one stored
    with the plan (``autopar plan --out``) or named by its search. ``model``: a MODEL spec string
    (traced on ``meta`` when ``graph`` is not given), a loaded model or an OpGraph. ``graph``: the
    traced :class:`~autopar.core.ir.OpGraph` (saves re-tracing). Without a model the report leaves out
    the per-layer shardings and per-stage detail and says so. ``measured``: a run's measurements.
    """
    path = Path(path)
    text = build_html(plan, cluster=cluster, model=model, graph=graph, seq=seq, measured=measured)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write the report to {str(path)!r}: {e.strerror or e}") from None
    return path


def report_text(
    plan: Plan,
    *,
    cluster: Cluster | str | None = None,
    model: str | LoadedModel | OpGraph | None = None,
    graph: OpGraph | None = None,
    seq: int | None = None,
    measured: dict | None = None,
) -> str:
    """The report's tables for a terminal (no figures)."""
    return render(gather(plan, cluster=cluster, model=model, graph=graph, seq=seq, measured=measured))

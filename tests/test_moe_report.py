"""The plan report's mixture-of-experts part (autopar/report/experts.py, issue 15 item 5).

Oracles: the all-to-all volume worked out by hand from the layer's shape (T tokens of a
micro-batch, k choices, width h, 2-byte bf16 activations: dispatch and combine of T·k·h·2 bytes, E
int64 counts; 5 calls per layer and micro-batch in training), cross-checked against the
lowering's own count (``autopar.lower.expert.all_to_all_volume``); the placement rule of
``Plan.groups("ep")`` (ep position i holds experts [i·E/ep, (i+1)·E/ep)); the measured load's
max/mean computed here.
"""

from __future__ import annotations

import base64
import re

import pytest

from autopar.cluster import Cluster
from autopar.core.plan import Plan
from autopar.report import ReportError, attach_inputs, build_html, report_text
from autopar.report.context import gather

SPEC = "gpt:hidden=64,layers=4,heads=4,vocab=128,seq=16,experts=8,top_k=2,act=swiglu,norm=rmsnorm"
E, K, H, SEQ, LAYERS = 8, 2, 64, 16, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def graph():
    from autopar.models.spec import load_model

    return load_model(SPEC).trace(batch=1)


@pytest.fixture(scope="module")
def cluster():
    return Cluster.parse("dgx-h100:8")


def ep_plan(**kwargs) -> Plan:
    kw = dict(dp=4, pp=2, ep=2, global_batch=16, micro_batch_size=2)
    kw.update(kwargs)
    return Plan.manual(**kw)


def by_hand(plan: Plan, layers_on_stage: int) -> tuple[int, float, float]:
    """(calls, buffer bytes, bytes sent) of one rank in a step."""
    tokens = plan.micro_batch_size * SEQ
    data = tokens * K * H * 2  # bf16 on an H100: 2 bytes per element
    per_layer = E * 8 + 4 * data  # counts, dispatch, combine, and the two backward transposes
    m = plan.num_micro_batches
    total = per_layer * layers_on_stage * m
    return 5 * layers_on_stage * m, total, total * (plan.ep - 1) / plan.ep


def test_all_to_all_volume_per_stage_equals_the_hand_count_and_the_lowering(graph, cluster):
    from autopar.lower.expert import all_to_all_volume as lowered

    plan = ep_plan()
    data = gather(plan, cluster=cluster, graph=graph)
    assert data.moe is not None and data.moe["experts"] == E and data.moe["layers"] == LAYERS
    for s in data.moe["stages"]:
        calls, total, sent = by_hand(plan, LAYERS // plan.pp)
        assert (s["layers"], s["count"]) == (LAYERS // plan.pp, calls)
        assert s["bytes"] == pytest.approx(total, rel=1e-12)
        assert s["sent_bytes"] == pytest.approx(sent, rel=1e-12)
    # The lowering's count for a rank of stage 0 and of stage 1 (bytes there are the graph's dtype).
    for rank in (0, plan.world_size - 1):
        low = lowered(graph, plan, rank=rank)
        stage = plan.coords(rank)["pp"]
        assert low["count"] == data.moe["stages"][stage]["count"]


def test_report_shows_placement_figure_and_volume_table(graph, cluster):
    plan = ep_plan()
    html = build_html(plan, cluster=cluster, graph=graph)
    assert 'id="experts"' in html and 'alt="expert placement"' in html
    imgs = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert all(i.startswith(PNG_MAGIC) for i in imgs)
    calls, total, sent = by_hand(plan, LAYERS // plan.pp)
    from autopar.core.text import bytes_text, count_text

    row = re.search(r"<h3>Expert all-to-all per step.*?</table>", html, re.S).group(0)
    cells = re.findall(r"<tr><td>0</td>(.*?)</tr>", row)[0]
    want = [str(LAYERS // plan.pp), count_text(calls), bytes_text(total), bytes_text(sent)]
    assert re.findall(r"<td>(.*?)</td>", cells)[:4] == want
    # Placement: ep position i holds experts [4i, 4i+4) and its ranks are those of Plan.groups("ep").
    table = report_text(plan, cluster=cluster, graph=graph).split("Expert placement")[1]
    for i in range(plan.ep):
        ranks = sorted(r for g in plan.groups("ep") for j, r in enumerate(g) if j == i)
        line = next(x for x in table.splitlines() if x.startswith(f"{i}  "))
        assert f"{4 * i}-{4 * i + 3}" in line and ", ".join(map(str, ranks)) in line


def test_ep1_says_no_all_to_all_and_dense_plans_have_no_expert_part(graph, cluster):
    text = report_text(Plan.manual(dp=4, global_batch=16, micro_batch_size=2), cluster=cluster, graph=graph)
    assert "ep=1: every rank holds every expert" in text and "0-7" in text
    from autopar.models.spec import load_model

    dense = load_model("tiny:layers=2").trace(batch=1)
    html = build_html(
        Plan.manual(dp=2, global_batch=4, micro_batch_size=2), cluster=Cluster.local(2), graph=dense
    )
    assert 'id="experts"' not in html and "Expert placement" not in html


def test_measured_expert_load_shows_the_imbalance_and_bad_input_is_refused(graph, cluster):
    plan = ep_plan()
    layer0 = [10, 10, 10, 10, 10, 10, 10, 50]  # mean 15, max 50: imbalance 3.33, expert 7
    load = [layer0] + [[16] * E] * (LAYERS - 1)
    text = report_text(plan, cluster=cluster, graph=graph, measured={"expert_tokens": load})
    table = text.split("Measured load per expert")[1]
    row0 = next(x for x in table.splitlines() if x.startswith("0 "))
    assert f"{50 / 15:.2f}" in row0 and row0.split()[-1] == "7"
    assert "1.00" in next(x for x in table.splitlines() if x.startswith("1 "))
    with pytest.raises(ReportError, match="8 experts"):
        gather(plan, cluster=cluster, graph=graph, measured={"expert_tokens": [[1, 2, 3]]})
    with pytest.raises(ReportError, match=r"expert_tokens\[0\]\[1\]"):
        gather(plan, cluster=cluster, graph=graph, measured={"expert_tokens": [[1, -2] + [1] * 6]})


def test_facts_stored_with_the_plan_serve_a_report_without_the_model(graph, cluster):
    import autopar

    plan = autopar.plan(graph, cluster, global_batch=16, progress=False, fixed={"dp": 8, "ep": 4})
    assert plan.ep == 4
    attach_inputs(plan, cluster=cluster, model=SPEC, graph=graph)
    stored = plan.search["report_inputs"]["moe"]
    live = gather(plan, cluster=cluster, graph=graph).moe
    assert stored == live
    again = Plan.from_json(plan.to_json())
    data = gather(again, cluster=cluster)
    assert data.graph is None and data.moe == live
    assert "Expert all-to-all per step" in report_text(again, cluster=cluster)

"""Plan reports (autopar.report, `autopar report`). No browser needed: the screenshots are made by
scripts/screenshot_report.sh.

Oracles: the cost model's closed-form pipeline time (``m * t + (p - 1) * t / v`` for equal stages)
and its predicted step time and memory for the same plan; the runtime's own 1F1B / GPipe action
orders; the sharding rules run on the full graph; the plan file's fields for the error messages.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest

from autopar.cli.main import main
from autopar.cluster import Cluster
from autopar.core.errors import PlanError
from autopar.core.plan import MeshAxis, Plan
from autopar.report import ReportError, attach_inputs, build_html, report_text, write_report
from autopar.report import timeline as tl
from autopar.report.context import gather

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("device-map", "schedule", "memory", "time", "sharding", "alternatives", "inputs")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def graph():
    from autopar.models.spec import load_model

    return load_model("tiny:layers=4").trace(batch=1)


@pytest.fixture(scope="module")
def local4():
    return Cluster.local(4)


def tp2_pp2(global_batch: int = 16, **kwargs) -> Plan:
    return Plan.manual(dp=1, tp=2, pp=2, global_batch=global_batch, micro_batch_size=2, **kwargs)


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def planned(graph, cluster, **kwargs) -> Plan:
    """A plan with a search attached, as `autopar plan` writes it (fixed keys keep it quick)."""
    import autopar

    return autopar.plan(graph, cluster, global_batch=16, progress=False, **kwargs)


# ----------------------------------------------------------------------------- timeline
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 3), (4, 8), (8, 48)])
def test_equal_stages_take_the_closed_form_pipeline_time(schedule, p, m):
    orders, note = tl.orders(schedule, p, m)
    t = tl.simulate(orders, fwd_s=[1.0] * p, bwd_s=[2.0] * p)
    assert note == ""
    assert t.makespan_s == pytest.approx((m + p - 1) * 3.0)
    assert len(t.events) == 2 * p * m


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (8, 48, 6)])
def test_interleaved_divides_the_bubble_by_the_chunks(p, m, v):
    """The cost model's ``T = m t + (p - 1) t / v`` (cost_models/step.py) for f = t/3, b = 2t/3."""
    orders, note = tl.orders("interleaved", p, m, v)
    t = tl.simulate(orders, fwd_s=[1.0 / v] * p, bwd_s=[2.0 / v] * p, virtual_stages=v)
    assert note == ""
    assert t.makespan_s == pytest.approx(m * 3.0 + (p - 1) * 3.0 / v)


def test_schedule_respects_dependencies_and_never_overlaps_on_a_stage():
    p, m, v = 4, 8, 2
    orders, _ = tl.orders("interleaved", p, m, v)
    t = tl.simulate(
        orders, fwd_s=[0.3, 0.5, 0.4, 0.6], bwd_s=[0.7, 1.1, 0.9, 1.0], p2p_s=[0.05] * 4, virtual_stages=v
    )
    end = {(e.action.virtual(p), e.action.kind, e.action.micro_batch): e.end_s for e in t.events}
    assert len(end) == 2 * p * m * v  # every action exactly once
    for e in t.events:
        vs, mb = e.action.virtual(p), e.action.micro_batch
        dep = (vs - 1, "F", mb) if e.action.kind == "F" else (vs + 1, "B", mb)
        if e.action.kind == "B" and vs == p * v - 1:
            dep = (vs, "F", mb)
        if dep[0] >= 0:
            assert e.start_s >= end[dep] - 1e-12
    for s in range(p):
        spans = sorted((e.start_s, e.end_s) for e in t.events if e.action.stage == s)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))


def test_orders_are_the_runtimes_and_1f1b_with_few_micro_batches_runs_as_gpipe():
    from autopar.runtime import schedule as rs

    orders, _ = tl.orders("1f1b", 3, 5)
    want = [[str(a) for a in o] for o in rs.one_f_one_b(3, 5).orders]
    assert [[f"{a.stage}{a.kind}{a.micro_batch}" for a in o] for o in orders] == want
    orders, note = tl.orders("1f1b", 4, 2)
    assert "GPipe" in note
    assert [a.kind for a in orders[0]] == ["F", "F", "B", "B"]
    orders, note = tl.orders("interleaved", 4, 6, 2)  # m % pp != 0: drawn chunk by chunk
    assert "m % pp" in note and len(orders[0]) == 2 * 6 * 2


# ------------------------------------------------------------------------------ content
def test_report_has_every_section_and_is_self_contained(graph, local4):
    html = build_html(tp2_pp2(), cluster=local4, model="tiny:layers=4", graph=graph)
    for key in SECTIONS:
        assert f'id="{key}"' in html
    imgs = images(html)
    assert len(imgs) == 4  # device map, schedule, memory, breakdown (no search: no mesh chart)
    assert all(i.startswith(PNG_MAGIC) for i in imgs)
    assert not re.search(
        r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.sub(r"data:image/png;base64,[^\"]+", "", html)
    )
    assert "<script" not in html and "<link" not in html


def test_schedule_and_memory_agree_with_the_cost_model(graph, local4):
    """The drawn step (pipeline + exposed DP sync + optimizer) is the estimator's step time, and
    the fullest stage's memory bars add up to its memory per device."""
    import autopar

    plan = tp2_pp2(global_batch=32, schedule="1f1b")
    want = autopar.estimate(graph, local4, plan)
    data = gather(plan, cluster=local4, graph=graph)
    tail = want.breakdown_s["dp_comm_exposed"] + want.breakdown_s["optimizer"]
    assert data.timing == "estimator"
    assert data.timeline.makespan_s + tail == pytest.approx(want.step_time_s, rel=1e-6)
    assert max(sum(s.memory_bytes.values()) for s in data.stages) == pytest.approx(
        want.memory_bytes_per_device
    )
    assert data.predicted.step_time_s == pytest.approx(want.step_time_s)  # costed now: plan had none


def test_inference_schedule_is_forwards_only_and_matches_the_cost_model(graph, local4):
    import autopar

    plan = tp2_pp2(mode="inference")
    want = autopar.estimate(graph, local4, plan)
    data = gather(plan, cluster=local4, graph=graph)
    assert {e.action.kind for e in data.timeline.events} == {"F"}
    assert data.timeline.makespan_s == pytest.approx(want.step_time_s, rel=1e-6)


def test_sharding_table_shows_megatron_layout(graph, local4):
    data = gather(tp2_pp2(), cluster=local4, graph=graph)
    header = data.sharding.header
    rows = {r[header.index("module")]: dict(zip(header, r)) for r in data.sharding.rows}
    assert rows["layers.0.attn.q_proj"]["split"] == "column-parallel"
    assert rows["layers.0.attn.q_proj"]["parameters"] == "weight S(0), bias S(0)"
    assert rows["layers.0.attn.o_proj"]["split"] == "row-parallel"
    assert rows["layers.0.attn.o_proj"]["collective after"] == "all_reduce"
    assert rows["layers.0.mlp.fc2"]["split"] == "row-parallel"
    assert "vocab-parallel" in rows["tok_emb"]["split"]
    assert not [m for m in rows if m.startswith("layers.1.")]  # identical blocks: one instance shown
    sp = gather(tp2_pp2(sequence_parallel=True), cluster=local4, graph=graph).sharding
    sp_rows = {r[header.index("module")]: dict(zip(header, r)) for r in sp.rows}
    # Sequence parallelism: one all-gather of the norm's output feeds q, k and v (the lowering
    # converts a producer once), and the row-parallel outputs are reduce-scattered.
    assert sp_rows["layers.0.attn.q_proj"]["collective before"] == "all_gather of layers.0.ln_1"
    assert sp_rows["layers.0.attn.k_proj"]["collective before"] == "(same all_gather as q_proj)"
    assert sp_rows["layers.0.mlp.fc2"]["collective after"] == "reduce_scatter"
    assert "layers.0.mlp.fc1" in report_text(tp2_pp2(), cluster=local4, graph=graph)


def test_collapsed_graph_gives_the_full_graphs_placements(graph):
    from autopar.sharding import megatron_placements
    from autopar.tracing.collapse import first_blocks_module

    small = first_blocks_module(graph)
    assert len(small.graph.nodes) < len(graph.gm.graph.nodes)
    for sp in (False, True):
        full = megatron_placements(graph.gm, 2, sp)
        part = megatron_placements(small, 2, sp)
        kept = [n.name for n in graph.nodes if n.block in (None, 0) and n.name in full]
        assert kept and all(part[k].to_dict() == full[k].to_dict() for k in kept)


def test_plan_placements_of_every_block_give_the_derived_table(graph, local4):
    """A plan carrying placements for all block instances (as the planner's intra-op solver writes
    them) is shown on the collapsed graph: the same rows as the Megatron default they equal."""
    from autopar.sharding import megatron_placements
    from autopar.tracing.collapse import first_blocks_module

    derived = gather(tp2_pp2(), cluster=local4, graph=graph).sharding
    own = tp2_pp2(placements=megatron_placements(graph.gm, 2, False))
    assert set(own.placements) - {n.name for n in first_blocks_module(graph).graph.nodes}
    table = gather(own, cluster=local4, graph=graph).sharding
    assert "the plan's placements" in table.note and table.rows == derived.rows


def hetero2(memory_bytes: tuple[float, float] | None = None) -> Cluster:
    """1 node of 2 A100 80GB + 1 node of 2 V100 32GB; ``memory_bytes``: small memories instead (kinds
    ``a100-small`` and ``v100-small``) so that the tiny model's bars reach the capacity lines."""
    kinds: list = ["a100-80g", "v100-32g"]
    if memory_bytes:
        from autopar.cluster.hardware import device_kind

        kinds = [
            {**device_kind(k).to_dict(), "name": k.split("-")[0] + "-small", "memory_bytes": m}
            for k, m in zip(kinds, memory_bytes)
        ]
    return Cluster.from_dict(
        {
            "devices_per_node": 2,
            "node_groups": [{"nodes": 1, "device": kinds[0]}, {"nodes": 1, "device": kinds[1]}],
            "intra_node": {"bandwidth_bytes_per_s": 1e11, "latency_s": 1e-5},
            "inter_node": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5},
        }
    )


def test_heterogeneous_plan_is_costed_per_device_kind(graph):
    """Oracle: the estimator's per-stage lists in the plan's prediction (each stage on its own kind)."""
    from autopar.report import bars

    cluster = hetero2()
    plan = planned(graph, cluster, fixed={"pp": 2})
    extra = plan.predicted.extra
    assert extra["stage_devices"] == [["a100-80g"], ["v100-32g"]]
    data = gather(plan, cluster=cluster, graph=graph)
    assert "costs" not in data.notes and data.timing == "estimator"
    assert data.stage_kinds == ["a100-80g", "v100-32g"]
    assert data.stage_capacity_bytes == extra["memory_capacity_bytes_per_stage"] == [80e9, 32e9]
    used = [sum(s.memory_bytes.values()) for s in data.stages]
    assert used == pytest.approx(extra["memory_bytes_per_stage"])
    # 55 MB against 80 and 32 GB: the capacities are written in the memory chart's title.
    title = bars.memory(data).axes[0].get_title(loc="left")
    assert "(capacity a100-80g 80 GB, v100-32g 32 GB, off this scale)" in title

    html = build_html(plan, cluster=cluster, graph=graph)
    assert "unavailable" not in html and "not available" not in html
    assert len(images(html)) == 5  # map, schedule, memory, breakdown, meshes
    assert "a100-80g 80 GB, v100-32g 32 GB" in html  # the memory caption: each kind's capacity
    assert "nodes 0-0" in html and "v100-32g: 32.00 GB" in html  # inputs: both kinds
    blocks = plan.stage_of_layers(4)
    a100, v100 = blocks.count(0), blocks.count(1)
    split = f"stage 0 (a100-80g): {a100} layer{'s' * (a100 != 1)}, stage 1 (v100-32g): {v100} layer"
    assert split in html
    text = report_text(plan, cluster=cluster, graph=graph)
    assert split in text and "of 80, " in text and "of 32 (fits)" in text

    # From the plan file alone (no graph): the stored per-stage costs give the same report data.
    attach_inputs(plan, cluster=cluster, model="tiny:layers=4", graph=graph)
    stored = gather(Plan.from_json(plan.to_json()))
    assert stored.graph is None and stored.timing == "estimator" and "costs" not in stored.notes
    assert stored.stage_capacity_bytes == [80e9, 32e9] and stored.stage_kinds == data.stage_kinds
    assert stored.timeline.makespan_s == pytest.approx(data.timeline.makespan_s)


def test_memory_chart_draws_each_stage_against_its_own_capacity(graph):
    from autopar.report import bars
    from autopar.report import figures as F

    cluster = hetero2(memory_bytes=(0.3e9, 0.1e9))
    plan = planned(graph, cluster, fixed={"pp": 2})
    data = gather(plan, cluster=cluster, graph=graph)
    assert data.stage_kinds == ["a100-small", "v100-small"] and data.stage_capacity_bytes == [0.3e9, 0.1e9]
    ax = bars.memory(data).axes[0]  # MB: one dashed segment over each stage's bar, at its capacity
    segments = [ln for ln in ax.get_lines() if ln.get_color() == F.CAPACITY]
    got = sorted((tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in segments)
    assert got == [((-0.45, 0.45), (300.0, 300.0)), ((0.55, 1.45), (100.0, 100.0))]
    labels = {t.get_text() for t in ax.texts}
    assert {"a100-small capacity 300 MB", "v100-small capacity 100 MB"} <= labels


def test_heterogeneous_plan_without_a_prediction_falls_back(graph):
    cluster = hetero2()
    plan = Plan(mesh=[MeshAxis("pp", 2), MeshAxis("tp", 2)], global_batch=8, micro_batch_size=2)
    data = gather(plan, cluster=cluster)  # no model: nothing to cost
    assert data.timing == "unit" and data.predicted is None
    assert "needs the model" in data.notes["costs"][0]
    assert data.stage_kinds == ["a100-80g", "v100-32g"] and data.stage_capacity_bytes == [80e9, 32e9]
    html = build_html(plan, cluster=cluster)
    assert len(images(html)) == 2 and "no prediction for this plan" in html  # device map and schedule
    assert "v100-32g" in report_text(plan, cluster=cluster)
    # With the model, the hand-written plan is costed now, on each stage's own kind.
    costed = gather(plan, cluster=cluster, graph=graph)
    assert costed.predicted is not None and costed.timing == "estimator"
    assert costed.predicted.extra["stage_devices"] == [["a100-80g"], ["v100-32g"]]


def test_large_cluster_without_the_model(tmp_path):
    """1024 GPUs, interleaved schedule, no graph: overview + detail map, schedule in the plan's
    per-stage times or units, notes instead of the shardings."""
    cluster = Cluster.parse("dgx-a100-80g:nodes=128")
    plan = Plan.manual(
        dp=32, pp=8, tp=4, global_batch=1536, micro_batch_size=1, schedule="interleaved", virtual_stages=6
    )
    path = write_report(plan, tmp_path / "big.html", cluster=cluster)
    html = path.read_text()
    assert "needs the model" in html and len(images(html)) == 2
    data = gather(plan, cluster=cluster)
    assert data.timing == "unit" and len(data.timeline.events) == 2 * 8 * 48 * 6


# ----------------------------------------------------------------------------- measured
def test_measured_values_are_overlaid(graph, local4):
    plan = tp2_pp2()
    measured = {
        "step_time_s": 0.5,
        "memory_bytes_per_rank": [1e6, 1.1e6, 2e6, 2.1e6],
        "events": [{"stage": 0, "kind": "F", "micro_batch": 0, "start_s": 0.0, "end_s": 0.01}],
        "source": "test",
    }
    html = build_html(plan, cluster=local4, graph=graph, measured=measured)
    assert "measured step time" in html and "Predicted vs measured memory per rank" in html


def test_measured_timeline_on_another_scale_gets_its_own_panel(graph, local4):
    """Measured events share the predicted axis when within 2x of it; otherwise (a CPU run 40x
    faster than the nominal CPU numbers predict) they get a panel with their own time axis."""
    from autopar.report.gantt import gantt

    plan = tp2_pp2()
    predicted = gather(plan, cluster=local4, graph=graph).timeline.makespan_s
    for factor, panels in ((1.0, 1), (0.02, 2)):
        events = [
            {
                "stage": s,
                "kind": k,
                "micro_batch": 0,
                "start_s": i * predicted * factor / 4,
                "end_s": (i + 1) * predicted * factor / 4,
            }
            for i, (s, k) in enumerate([(0, "F"), (1, "F"), (1, "B"), (0, "B")])
        ]
        data = gather(plan, cluster=local4, graph=graph, measured={"events": events})
        assert len(gantt(data).axes) == panels


@pytest.mark.parametrize(
    "measured,fragment",
    [
        ({"memory_bytes_per_rank": [1.0, 2.0]}, "memory_bytes_per_rank has 2 entries"),
        (
            {"events": [{"stage": 0, "kind": "F", "start_s": 0, "end_s": 1}]},
            "events[0] is missing the field 'micro_batch'",
        ),
        (
            {"events": [{"stage": 5, "kind": "F", "micro_batch": 0, "start_s": 0, "end_s": 1}]},
            "events[0].stage=5",
        ),
        ({"step_time": 1.0}, "unknown field(s) ['step_time']"),
        ({"step_time_s": -1}, "step_time_s=-1"),
    ],
)
def test_bad_measurements_name_the_field(measured, fragment):
    with pytest.raises(ReportError) as e:
        gather(tp2_pp2(), cluster=Cluster.local(4), measured=measured)
    assert fragment in str(e.value)


# ---------------------------------------------------------------------- plan files, CLI
def test_stored_inputs_make_the_report_without_the_model(graph, local4, tmp_path):
    """What `autopar plan --out` stores is enough: no re-trace, same shardings and costs."""
    plan = planned(graph, local4, fixed={"tp": 2})
    attach_inputs(plan, cluster=local4, model="tiny:layers=4", graph=graph, settings={"top_k": 5})
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    live = gather(plan, cluster=local4, graph=graph)
    stored = gather(Plan.from_json(path.read_text()))
    assert stored.graph is None and stored.cluster == local4
    assert stored.sharding.rows == live.sharding.rows and stored.sharding.rows
    assert stored.timeline.makespan_s == pytest.approx(live.timeline.makespan_s)
    assert stored.facts == live.facts
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    splits = {r[stored.sharding.header.index("split")] for r in stored.sharding.rows}
    assert len(images(html)) == 5 and "Runner-up plans" in html and all(x in html for x in splits)


def plan_file(tmp_path, mutate) -> str:
    d = json.loads(tp2_pp2().to_json())
    d["predicted"] = {"step_time_s": 1.0, "breakdown_s": {"compute": 1.0}}
    d["search"] = {"alternatives": [{"summary": "x", "step_time_s": 2.0, "why": "slower"}], "rejected": []}
    mutate(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (lambda d: d.update(version=2), ["version=2", "is not supported"]),
        (lambda d: d.pop("micro_batch_size"), ["missing the field 'micro_batch_size'"]),
        (lambda d: d["mesh"][0].pop("size"), ["mesh[0]", "'size'"]),
        (lambda d: d["predicted"].pop("step_time_s"), ["predicted", "'step_time_s'"]),
        (lambda d: d["search"]["alternatives"][0].pop("why"), ["search.alternatives[0]", "'why'"]),
        (lambda d: d.update(global_batch="16"), ["global_batch='16'", "integer"]),
    ],
)
def test_bad_plan_files_name_the_field(tmp_path, capsys, mutate, fragments):
    path = plan_file(tmp_path, mutate)
    assert main(["report", path, "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "plan.json" in err
    for fragment in fragments:
        assert fragment in err


def test_cli_errors_exit_2_without_traceback(tmp_path):
    path = plan_file(tmp_path, lambda d: d.update(version=99))
    r = subprocess.run(
        [sys.executable, "-m", "autopar", "report", path], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "version=99" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "autopar", "report", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "cannot read the plan file" in r.stderr and "Traceback" not in r.stderr


def test_cli_text_and_world_size_check(tmp_path, capsys):
    path = plan_file(tmp_path, lambda d: None)
    assert main(["report", path, "--cluster", "local:4", "--text"]) == 0
    out = capsys.readouterr().out
    assert "Device map" in out and "0:0,0,0" in out and "Runner-up plans" in out
    assert main(["report", path, "--cluster", "local:2"]) == 2
    assert "the plan uses 4 ranks but cluster" in capsys.readouterr().err


def test_write_report_refuses_a_non_plan(tmp_path):
    with pytest.raises(PlanError):
        write_report({"mesh": []}, tmp_path / "x.html")


def test_stages_mixing_device_kinds_are_named_and_noted(graph):
    cluster = hetero2()  # dp outermost: each stage has one device of each node
    plan = Plan(mesh=[MeshAxis("dp", 2), MeshAxis("pp", 2)], global_batch=8, micro_batch_size=2)
    data = gather(plan, cluster=cluster, graph=graph)
    assert data.stage_kinds == ["a100-80g+v100-32g"] * 2 and data.stage_capacity_bytes == [32e9, 32e9]
    assert any("more than one device kind" in n for n in data.notes["costs"])

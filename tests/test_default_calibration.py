"""Without a ``calib``, a cluster is costed with its device kind's measured constants.

``autopar.estimate``, the planner and the plan report all time a plan with
``default_calibration(cluster)`` (``cost_models.hardware.calibration_for`` of the cluster's one
device kind); A100 (the kind ``cost_models.DEFAULT`` was fitted on) and clusters mixing kinds keep
``DEFAULT``; a caller's own calibration is used as given.
"""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar import Plan
from autopar.cluster import Cluster
from autopar.estimator import default_calibration, estimate
from autopar.models import GPTConfig
from cost_models import DEFAULT
from cost_models.hardware import calibration_for


@pytest.fixture(scope="module")
def graph():
    cfg = GPTConfig(hidden=1024, layers=4, heads=16, vocab=8192, seq=2048, bias=False)
    model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=2, dtype=torch.bfloat16)
    return autopar.trace(model, inputs, loss_fn=loss_fn)


PLAN = Plan.manual(dp=4, tp=2, global_batch=16, micro_batch_size=2)


def test_a_kind_with_measurements_is_costed_with_them(graph):
    h100 = Cluster.preset("dgx-h100", nodes=1)
    assert default_calibration(h100) == calibration_for("h100-sxm") != DEFAULT
    by_kind = estimate(graph, h100, PLAN)
    assert by_kind.step_time_s == pytest.approx(
        estimate(graph, h100, PLAN, calib=calibration_for("h100-sxm")).step_time_s
    )
    assert by_kind.step_time_s != pytest.approx(estimate(graph, h100, PLAN, calib=DEFAULT).step_time_s)


def test_the_reference_kind_and_mixed_clusters_keep_default(graph):
    a100 = Cluster.preset("dgx-a100-80g", nodes=1)
    assert default_calibration(a100) == DEFAULT
    assert estimate(graph, a100, PLAN).step_time_s == estimate(graph, a100, PLAN, calib=DEFAULT).step_time_s
    links = a100.to_dict()
    mixed = Cluster.from_dict(
        {
            "devices_per_node": 8,
            "node_groups": [{"nodes": 1, "device": "h100-sxm"}, {"nodes": 1, "device": "v100-32g"}],
            "intra_node": links["intra_node"],
            "inter_node": links["inter_node"],
        }
    )
    assert default_calibration(mixed) == DEFAULT


def test_the_planner_predicts_what_estimate_predicts(graph):
    """The plan the planner returns carries the step time ``estimate`` gives it on that cluster,
    under the kind's constants (not DEFAULT's)."""
    h100 = Cluster.preset("dgx-h100", nodes=1)
    plan = autopar.plan(graph, h100, global_batch=16, progress=False)
    again = estimate(graph, h100, plan)
    assert plan.predicted.step_time_s == pytest.approx(again.step_time_s, rel=1e-6)
    assert plan.predicted.step_time_s != pytest.approx(estimate(graph, h100, plan, calib=DEFAULT).step_time_s)


def test_the_autopar_software_entry_describes_what_the_profiled_mode_runs():
    """``--software autopar`` and the profiled mode describe one runtime: the same unfused kernels,
    separate sibling GEMMs and FSDP2 ZeRO (the profiled mode adds only this machine's links)."""
    from autopar.estimator.local import LayoutCalibration, local_calibration
    from cost_models.hardware import FRAMEWORKS

    layout = LayoutCalibration(
        ranks=2,
        threads=1,
        machine="test",
        slowdown=1.0,
        latency_s=1e-4,
        bandwidth_bytes_per_s=1e9,
        optimizer_s_per_element=1e-9,
        optimizer_s_per_tensor=1e-6,
        step_overhead_s=1e-3,
    )
    profiled = local_calibration(layout, DEFAULT)
    entry = FRAMEWORKS["autopar"]
    for name in ("fuse_elementwise", "fused_norms", "fuse_sibling_gemms", "zero_fsdp2"):
        assert entry[name] == getattr(profiled, name), name
    autopar_h100 = calibration_for("h100-sxm", framework="autopar")
    assert not autopar_h100.fuse_elementwise and autopar_h100.zero_fsdp2
    assert autopar_h100.gemm_max_efficiency == calibration_for("h100-sxm").gemm_max_efficiency

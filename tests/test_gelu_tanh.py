"""``GPTConfig(act="gelu_tanh")``: GELU's tanh approximation written as arithmetic (GPT-2-era code).

It computes what ``F.gelu(approximate="tanh")`` computes, traces as the elementwise ops an eager run
launches (which the cost model prices one by one where the framework does not fuse), and splits
under tensor parallelism like any pointwise op.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import autopar
from autopar import Plan
from autopar.core.errors import ModelSpecError
from autopar.models.gpt import GPTConfig, gelu_tanh
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import check_jobs, gpt_case, run_jobs
from cost_models.hardware import calibration_for


def test_gelu_tanh_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=0, atol=1e-12)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ModelSpecError, match="gelu_tanh"):
        GPTConfig(hidden=16, layers=1, heads=2, vocab=32, seq=8, act="relu")


def _graph(act: str):
    cfg = GPTConfig(
        hidden=64, layers=2, heads=4, vocab=128, seq=16, act=act, dropout=0.1, fused_attention=False
    )
    model, inputs, loss_fn = autopar.build_model(cfg, device="meta", batch=2, dtype=torch.float16)
    return autopar.trace(model, inputs, loss_fn=loss_fn)


def test_the_arithmetic_form_is_traced_and_costed_kernel_by_kernel():
    """Nine elementwise ops per layer where F.gelu is one (x*x, 0.044715*, 1+, x*, 0.79788*, tanh,
    1+, 0.5*x, *): unfused (Megatron-LM 2019, eager PyTorch) each is a kernel of its own; under
    elementwise fusion the intermediates with one reader that saves nothing are not written (the
    products save their inputs for the backward, so part of the chain stays)."""
    one, nine = _graph("gelu"), _graph("gelu_tanh")
    assert len(nine.nodes) - len(one.nodes) == 2 * 8
    cluster = autopar.Cluster.parse("dgx-a100-80g:1")
    plan = Plan.manual(global_batch=2)
    eager = calibration_for("v100-sxm3-32g", framework="megatron-2019")
    fused = calibration_for("a100-80g")

    def compute(graph, calib):
        return autopar.estimate(graph, cluster, plan, calib=calib).breakdown_s["compute"]

    extra_eager = compute(nine, eager) - compute(one, eager)
    extra_fused = compute(nine, fused) - compute(one, fused)
    assert extra_eager > extra_fused >= 0


@pytest.mark.multiproc
def test_two_ranks_gelu_tanh_matches_one_device():
    case = dataclasses.replace(gpt_case(batch=8, act="gelu_tanh", hidden=32), name="gpt-gelu-tanh")
    jobs = [
        (case, [Plan.manual(global_batch=8, micro_batch_size=2, tp=2), Plan.manual(global_batch=8, dp=2)])
    ]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)

"""Tensor parallelism beyond Linear: convolutions, BatchNorm/GroupNorm, pooling, RNNs, MoE experts.

Invariants, each against its oracle:

* equivalence: ResNet (conv + BatchNorm + pooling), an ``nn.Sequential`` CNN, an LSTM language
  model, a wide MLP and a CNN with grouped/depthwise convolutions and GroupNorm, under tp=2 on real
  gloo processes, equal the single-device run after 3 AdamW steps (losses, full gradients, updated
  parameters and buffers: BatchNorm running statistics are sharded with their channels and
  gathered back);
* coverage, read from the compiled program's own parameter table (its slots and their shards):
  tp=2 shards most parameter elements of ResNet and the wide MLP;
* never silent: the LSTM is reported as replicated for lack of a rule (and logged), MoE experts
  stored as one 3-D parameter are named as an expert grouped matmul, and a model tp cannot shard
  at all is refused with a PlanError suggesting dp or pp.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.core.errors import PlanError
from autopar.core.plan import Plan, Shard
from autopar.lower.tensor_parallel import lower_tensor_parallel
from autopar.sharding import layout
from autopar.sharding.fallback import EXPERT_REASON, replicated_ops, sharded_param_share
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.megatron import megatron_placements
from autopar.testing import zoo
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import (
    Case,
    Trajectory,
    assert_equivalent,
    clone_case,
    parallel_run,
    reference,
)
from autopar.tracing import fx_trace


# ------------------------------------------------------------------------------ models
def grouped_cnn() -> nn.Module:
    """Grouped and depthwise convolutions (split by whole groups), GroupNorm on channel-split input,
    BatchNorm1d-free pooling: the families the zoo's CNNs do not cover."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise (a bias before BN: zero grad)
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 1, groups=2),
        nn.AvgPool2d(2),
        nn.GELU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


class GroupedExperts(nn.Module):
    """Experts as one 3-D parameter each, read per token (HF Mixtral's ``batched_mm`` form)."""

    def __init__(self, dim: int = 16, hidden: int = 32, experts: int = 4):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, dim, hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, dim) * 0.1)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x.unsqueeze(1), self.gate_up_proj[expert_ids]).squeeze(1)
        return torch.bmm(F.silu(h).unsqueeze(1), self.down_proj[expert_ids]).squeeze(1)


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.router = nn.Linear(16, 4)
        self.experts = GroupedExperts()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(h + self.experts(h, self.router(h).argmax(-1)))


class OnlyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def _cases() -> list[Case]:
    # AdamW's update m / (sqrt(v) + eps) turns the fp32 rounding of a near-zero gradient (1e-7
    # relative to the layer's largest, identical within rtol 1e-5) into a visible step with
    # eps=1e-6; under BatchNorm some conv weight gradients are that small. eps=1e-4 keeps such
    # noise below the tolerance while every real gradient still moves its parameter.
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-4)
    grouped = clone_case(zoo.case("seq-cnn"), name="grouped-cnn", build=grouped_cnn, optimizer=adamw)
    return [
        clone_case(zoo.case("resnet"), optimizer=adamw),
        zoo.case("seq-cnn"),
        zoo.case("lstm"),
        zoo.case("wide-mlp"),
        grouped,
    ]


CASES = {c.name: c for c in _cases()}


# ------------------------------------------------------------------------------ ranks
def _program_share(compiled: autopar.ParallelModule) -> float:
    """Share of the model's parameter elements this rank holds a tensor-parallel shard of."""
    sharded = total = 0
    for slot in compiled.program.slots:
        full = slot.tensor().numel() * slot.shard.num_shards
        total += full
        sharded += full if slot.shard.dim is not None and slot.shard.num_shards > 1 else 0
    return sharded / total


def _run_tp2(cases: list[Case]) -> dict[str, tuple[Trajectory, float]]:
    out = {}
    for case in cases:
        traj, compiled = parallel_run(case, Plan.manual(tp=2, global_batch=case.global_batch))
        out[case.name] = (traj, _program_share(compiled))
    return out


@pytest.fixture(scope="module")
def tp2_runs():
    return run_ranks(_run_tp2, 2, args=(list(CASES.values()),), timeout_s=90)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(CASES))
def test_tp2_equals_one_device(tp2_runs, name):
    assert_equivalent(reference(CASES[name]), tp2_runs[0][name][0], f"{name} under tp=2")
    assert tp2_runs[1][name][0].losses == tp2_runs[0][name][0].losses, "rank 1 reports other losses"


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["resnet", "wide-mlp"])
def test_tp2_shards_most_parameter_elements(tp2_runs, name):
    for rank, runs in enumerate(tp2_runs):
        share = runs[name][1]
        assert share > 0.5, f"rank {rank}: tp=2 shards only {share:.1%} of {name}'s parameter elements"


# ------------------------------------------------------------------------------ reports
def _traced(model: nn.Module, batch: tuple, loss_fn) -> torch.fx.GraphModule:
    return fx_trace(model, batch, loss_fn=loss_fn)


def _layout(gm: torch.fx.GraphModule, tp: int = 2) -> tuple[ShardingGraph, dict]:
    sg = ShardingGraph(gm, tp)
    _, params = layout.choose(sg, megatron_placements(sg, tp))
    return sg, params


def test_lstm_is_reported_replicated_and_the_rest_sharded(caplog):
    case = zoo.case("lstm")
    gm = _traced(case.build(), case.make_batches(1)[0], case.loss_fn)
    sg, params = _layout(gm)
    ops = replicated_ops(sg, params)
    assert [(o.op, o.module) for o in ops] == [("LSTM", "lstm")]
    assert ops[0].source and "zoo.py" in ops[0].source
    assert ops[0].param_share > 0.5 and ops[0].flops_share > 0.5  # the LSTM is most of the model
    assert isinstance(params["model.emb.weight"], Shard) and isinstance(params["model.head.weight"], Shard)
    assert 0 < sharded_param_share(sg, params) < 0.5
    with caplog.at_level(logging.WARNING, logger="autopar"):
        lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=8), 0, None)
    assert any("LSTM" in r.getMessage() and "replicated" in r.getMessage() for r in caplog.records)


def test_expert_grouped_matmul_is_named():
    torch.manual_seed(0)
    gm = _traced(TinyMoE(), (torch.randn(8, 8), torch.randint(0, 4, (8,))), F.cross_entropy)
    sg, params = _layout(gm)
    experts = [o for o in replicated_ops(sg, params) if o.reason == EXPERT_REASON]
    assert {o.module for o in experts} == {"experts"} and len(experts) == 2
    assert sum(o.param_share for o in experts) > 0.9  # the two 3-D expert parameters


def test_a_model_tp_cannot_shard_is_refused():
    torch.manual_seed(0)
    gm = _traced(OnlyLSTM(), (torch.randn(4, 5, 8), torch.randn(4, 5, 8)), F.mse_loss)
    with pytest.raises(PlanError, match=r"cannot be tensor-parallelised.*LSTM.*\bdp\b.*\bpp\b"):
        lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=4), 0, None)


def test_conv_batchnorm_layout_splits_channels_and_buffers():
    case = zoo.case("resnet")
    gm = _traced(case.build(), case.make_batches(1)[0], case.loss_fn)
    sg, params = _layout(gm)
    assert sharded_param_share(sg, params) > 0.9
    assert replicated_ops(sg, params) == []
    # column conv -> BatchNorm on its channels: weight, bias and running statistics split alike
    assert params["model.conv1.weight"] == Shard(0)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert params[f"model.bn1.{name}"] == Shard(0), name
    low = lower_tensor_parallel(gm, Plan.manual(tp=2, global_batch=8), 1, None)
    spec = low.buffer_shards["model.bn1.running_mean"]
    assert (spec.dim, spec.num_shards, spec.index) == (0, 2, 1)
    assert low.gm.get_buffer("model.bn1.running_mean").shape == (4,)
    assert "model.bn1.num_batches_tracked" not in low.buffer_shards


def test_grouped_conv_splits_whole_groups_or_reports():
    gm = _traced(grouped_cnn(), zoo.image_batches(8, 1)[0], F.cross_entropy)
    sg2, sg4 = ShardingGraph(gm, 2), ShardingGraph(gm, 4)
    names2 = {n: {s.name for s in sg2.strategies(sg2.node(n))} for n in ("model_0", "model_3", "model_5")}
    assert "column" in names2["model_0"] and "row" not in names2["model_0"]  # 3 input channels
    assert "grouped" in names2["model_3"] and "grouped" in names2["model_5"]  # depthwise; 2 groups
    # groups=2 under tp=4: no whole-group split; replicated and reported (unless the layout
    # shards it by output channels some other way)
    assert "grouped" not in {s.name for s in sg4.strategies(sg4.node("model_5"))}
    _, params4 = layout.choose(sg4, megatron_placements(sg4, 4))
    reported = {o.node: o.reason for o in replicated_ops(sg4, params4)}
    assert "groups=2" in reported.get("model_5", "") or isinstance(params4.get("model.5.weight"), Shard)

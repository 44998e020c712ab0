"""Cutting the traced graph into segments and pipeline stages (no processes).

Oracle: the traced model-with-loss graph itself; running the stage modules one after the other in
one process must give the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

from autopar import Plan
from autopar.core.errors import PlanError
from autopar.lower.program import build_program
from autopar.lower.segments import find_units, split_segments, stage_of_segments
from autopar.lower.stages import build_stage
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.testing.equivalence import MLPNet, hf_case
from autopar.tracing import fx_trace


def _gpt(layers=3):
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden=16, layers=layers, heads=4, vocab=32, seq=8))
    tokens = torch.randint(0, 32, (4, 8))
    targets = torch.randint(0, 32, (4, 8))
    return model, fx_trace(model, (tokens, targets), loss_fn=gpt_loss), tokens, targets


def test_units_are_the_indexed_module_instances_or_the_children():
    _, gm, *_ = _gpt(layers=3)
    assert find_units(gm).prefixes == ("layers.0", "layers.1", "layers.2")
    x = torch.randn(2, 8)
    assert find_units(fx_trace(MLPNet(), (x,))).count == 2
    # Indexed children of different types are units too (a Sequential's layers).
    seq = fx_trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (x,))
    assert find_units(seq).prefixes == ("0", "1")


def test_stages_run_in_sequence_equal_the_whole_graph():
    _, gm, tokens, targets = _gpt(layers=3)
    expected = gm(tokens, targets)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in gm.named_parameters()}
    for p in gm.parameters():
        p.grad = None
    blocks = find_units(gm)
    split, n_segments = split_segments(gm, blocks)
    assert n_segments == 5  # stem, 3 blocks, head
    seg_stage = stage_of_segments(n_segments, blocks, [0, 1, 2])
    assert seg_stage == [0, 0, 1, 2, 2]
    stages = [build_stage(split, seg_stage, 3, s, ["tokens"]) for s in range(3)]
    assert [st.spec.side_names for st in stages] == [[], [], ["targets"]]
    x = stages[0](tokens, tokens=tokens, targets=targets)
    x = stages[1](x, tokens=tokens, targets=targets)
    loss = stages[2](x, tokens=tokens, targets=targets)
    assert torch.equal(loss, expected)
    loss.backward()
    for name, p in gm.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=0, atol=0)


def test_program_records_stage_parameters_and_tied_embeddings():
    _, gm, *_ = _gpt(layers=2)
    plan = Plan.manual(pp=2, global_batch=4, micro_batch_size=2)
    prog = build_program(gm, plan, rank=1, model_input_names=["tokens"])
    assert prog.stage.spec.index == 1 and prog.stage.spec.segments == [2, 3]
    assert prog.tied_names() == ["model.tok_emb.weight"]  # embedding on stage 0, lm_head on stage 1
    assert {s.full_name for s in prog.slots} == prog.params_by_stage[1]


def test_input_only_values_are_recomputed_per_stage_not_sent():
    pytest.importorskip("transformers")
    case = hf_case("llama")
    tokens, targets = case.make_batches(1)[0]
    gm = fx_trace(case.build(), (tokens[:2], targets[:2]), loss_fn=case.loss_fn)
    plan = Plan.manual(pp=2, global_batch=4, micro_batch_size=2)
    prog = build_program(gm, plan, rank=0, model_input_names=["input_ids"])
    # Only the hidden state crosses; the rotary tables and the mask are rebuilt on stage 1.
    assert len(prog.stage.spec.output_names) == 1


def test_bad_stage_layouts_raise_plan_errors():
    _, gm, *_ = _gpt(layers=2)
    with pytest.raises(PlanError, match="non-decreasing"):
        build_program(gm, Plan.manual(pp=2, global_batch=4, layer_stages=[1, 0]), 0, ["tokens"])
    x = torch.randn(4, 8)
    one = fx_trace(torch.nn.Sequential(torch.nn.Linear(8, 8)), (x,))
    with pytest.raises(PlanError, match="at least 2 pipeline units and this model has 1: 0"):
        build_program(one, Plan.manual(pp=2, global_batch=4, micro_batch_size=1), 0, ["input"])

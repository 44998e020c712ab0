"""Compiled runs on real gloo ranks equal one device: the loss of every step, every full gradient
and every updated parameter (``state_dict()``) after each of 3 AdamW steps, within rtol 1e-5 /
atol 1e-6 in fp32. Oracle and comparison: ``autopar/testing/equivalence.py``. Several plans share one
launch, so process start-up is paid once per world size.

Dropout runs with p=0.1 for the built-in GPT: the reference draws the masks with the same
counter-based generator over the whole batch (see ``autopar/lower/rng.py``), so equality is exact.
"""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar import Plan
from autopar.models.gpt import GPTConfig
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import (
    build_gpt,
    check_jobs,
    gpt_case,
    hf_case,
    mlp_case,
    reference_output,
    run_inference_plans,
    run_jobs,
)

pytestmark = pytest.mark.multiproc

B = 8  # global batch of every case


def P(**kw) -> Plan:
    kw.setdefault("micro_batch_size", 2)
    return Plan.manual(global_batch=B, **kw)


def test_two_ranks_every_single_axis_mode_matches_one_device():
    plans = [
        P(dp=2),
        P(pp=2, schedule="gpipe"),
        P(pp=2, schedule="1f1b"),
        P(dp=2, zero_stage=3),
        P(dp=2, micro_batch_size=4, recompute="full"),
        P(pp=2, recompute="full"),
        P(tp=2, micro_batch_size=4),
        P(tp=2, sequence_parallel=True),
    ]
    dropout_plans = [P(dp=2), P(pp=2, recompute="full"), P(tp=2), P(tp=2, sequence_parallel=True)]
    interleaved = [
        P(pp=2, schedule="interleaved", virtual_stages=2),
        P(pp=2, micro_batch_size=1, schedule="interleaved", virtual_stages=2, recompute="full"),
    ]
    jobs = [
        (gpt_case(), plans),
        (gpt_case(dropout=0.1), dropout_plans),
        (gpt_case(layers=4, dropout=0.1), interleaved),
    ]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)


def test_four_ranks_two_axis_meshes_match_one_device():
    plans = [
        P(dp=2, pp=2, schedule="1f1b"),
        P(dp=2, pp=2, schedule="gpipe", zero_stage=3),
        P(dp=2, tp=2),
        P(dp=2, tp=2, zero_stage=3),
        P(tp=2, pp=2),
    ]
    interleaved = dict(schedule="interleaved", virtual_stages=2)
    jobs = [
        (gpt_case(), plans),
        (gpt_case(layers=4), [P(dp=2, pp=2, zero_stage=3, **interleaved), P(tp=2, pp=2, **interleaved)]),
    ]
    check_jobs(run_ranks(run_jobs, 4, args=(jobs,)), jobs)


def _load_then_read(case, plans, state):
    out = []
    for plan in plans:
        batch = case.make_batches(1)[0]
        compiled = autopar.compile(
            case.build(),
            plan.world_size,
            example_inputs=batch,
            loss_fn=case.loss_fn,
            plan=plan,
            global_batch=B,
        )
        compiled.load_state_dict(state)
        out.append(compiled.state_dict())
    return out


def test_load_state_dict_shards_and_state_dict_gathers_exactly():
    case = gpt_case()
    state = build_gpt(GPTConfig(hidden=16, layers=2, heads=4, vocab=64, seq=8), seed=7).state_dict()
    plans = [P(dp=2, tp=2, zero_stage=3), P(tp=2, pp=2), P(dp=2, pp=2, zero_stage=3)]
    for per_plan in run_ranks(_load_then_read, 4, args=(case, plans, state)):
        for plan, got in zip(plans, per_plan):
            assert list(got) == list(state), plan.summary()
            for key in state:
                assert torch.equal(got[key], state[key]), f"{plan.summary()}: {key}"


def test_eight_ranks_dp_tp_pp_matches_one_device():
    jobs = [
        (gpt_case(), [P(dp=2, tp=2, pp=2)]),
        (gpt_case(dropout=0.1), [P(dp=2, tp=2, pp=2, sequence_parallel=True, recompute="full")]),
    ]
    check_jobs(run_ranks(run_jobs, 8, args=(jobs,)), jobs)


def test_mlp_and_huggingface_models_match_one_device():
    plans = [P(dp=2), P(pp=2), P(tp=2, micro_batch_size=4)]
    pytest.importorskip("transformers")
    jobs = [(mlp_case(), plans), (hf_case("gpt2"), plans), (hf_case("llama"), plans)]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)


def test_inference_outputs_equal_one_device_on_every_rank():
    # Inference: dropout is off, as in eval mode.
    plans = [P(pp=2, mode="inference"), P(tp=2, mode="inference"), P(dp=2, mode="inference")]
    case = gpt_case(layers=4, dropout=0.1)  # 4 layers: room for 2 virtual stages per rank
    expected = reference_output(case)
    plans.append(P(pp=2, mode="inference", schedule="interleaved", virtual_stages=2))
    for rank, outputs in enumerate(run_ranks(run_inference_plans, 2, args=(case, plans))):
        for plan, out in zip(plans, outputs):
            torch.testing.assert_close(
                out, expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {plan.summary()}"
            )


def _measure(case, plan):
    batches = case.make_batches(2)
    compiled = autopar.compile(
        case.build(),
        plan.world_size,
        example_inputs=batches[0],
        loss_fn=case.loss_fn,
        plan=plan,
        global_batch=B,
    )
    for batch in batches:
        compiled.step(batch)
    return compiled.measured()


def test_measured_timeline_has_every_forward_and_backward_of_the_pipeline():
    plan = P(pp=2, schedule="1f1b")
    for measured in run_ranks(_measure, 2, args=(gpt_case(), plan)):
        events = measured["events"]
        got = sorted((e["stage"], e["kind"], e["micro_batch"]) for e in events)
        m = plan.num_micro_batches
        assert got == sorted((s, k, i) for s in range(2) for k in "FB" for i in range(m))
        assert all(0 <= e["start_s"] <= e["end_s"] for e in events)
        assert measured["step_time_s"] > 0

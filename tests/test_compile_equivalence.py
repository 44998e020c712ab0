"""Compiled runs on real gloo ranks equal one device: losses, full gradients and updated parameters
after every one of 3 AdamW steps, within rtol 1e-5 / atol 1e-6 (fp32). Oracle and comparison:
``tests/equivalence.py``. Several plans share one launch to keep process start-up out of the budget.
"""

from __future__ import annotations

import pytest
from dist_utils import run_ranks
from equivalence import assert_equivalent, assert_same_on_all_ranks, gpt_case, reference, run_plans

from autopar import Plan

pytestmark = pytest.mark.multiproc


def _check(case, plans, nprocs):
    per_rank = run_ranks(run_plans, nprocs, args=(case, plans))
    ref = reference(case)
    for plan, traj in zip(plans, per_rank[0]):
        assert_equivalent(ref, traj, plan.summary())
    assert_same_on_all_ranks(per_rank, case.name)


def test_two_ranks_dp_pp_zero3_recompute_match_one_device():
    plans = [
        Plan.manual(dp=2, global_batch=8, micro_batch_size=2),
        Plan.manual(pp=2, global_batch=8, micro_batch_size=2, schedule="gpipe"),
        Plan.manual(pp=2, global_batch=8, micro_batch_size=2, schedule="1f1b"),
        Plan.manual(dp=2, global_batch=8, micro_batch_size=2, zero_stage=3),
        Plan.manual(dp=2, global_batch=8, micro_batch_size=4, recompute="full"),
        Plan.manual(pp=2, global_batch=8, micro_batch_size=2, recompute="full"),
    ]
    _check(gpt_case(layers=2), plans, 2)


def test_four_ranks_dp_times_pp_match_one_device():
    plans = [
        Plan.manual(dp=2, pp=2, global_batch=8, micro_batch_size=2, schedule="1f1b"),
        Plan.manual(dp=2, pp=2, global_batch=8, micro_batch_size=2, schedule="gpipe", zero_stage=3),
    ]
    _check(gpt_case(layers=2), plans, 4)

"""Data-parallel shares and micro-batches (no processes)."""

from __future__ import annotations

import pytest
import torch

from autopar.core.errors import PlanError
from autopar.runtime.microbatch import data_parallel_share, merge_micro_batches, split_micro_batches


def test_shares_and_micro_batches_are_consecutive_and_merge_back():
    x, y = torch.arange(16).view(8, 2), torch.arange(8)
    share = data_parallel_share((x, y), global_batch=8, dp=2, dp_index=1)
    assert torch.equal(share[1], torch.arange(4, 8))
    chunks = split_micro_batches(share, 2)
    assert [c[1].tolist() for c in chunks] == [[4, 5], [6, 7]]
    assert torch.equal(merge_micro_batches([c[0] for c in chunks]), share[0])


def test_a_batch_of_one_share_is_taken_as_is_and_wrong_sizes_name_the_fix():
    x = torch.zeros(4, 3)
    assert data_parallel_share((x,), global_batch=8, dp=2, dp_index=1)[0] is x
    with pytest.raises(PlanError, match="global batch is 8"):
        data_parallel_share((torch.zeros(6, 3),), global_batch=8, dp=2, dp_index=0)
    with pytest.raises(PlanError, match="samples first"):
        split_micro_batches((torch.zeros(4), torch.zeros(5)), 2)


def test_merge_keeps_structure():
    outs = [{"a": torch.ones(2, 1), "b": (torch.zeros(2),)} for _ in range(3)]
    merged = merge_micro_batches(outs)
    assert merged["a"].shape == (6, 1) and merged["b"][0].shape == (6,)

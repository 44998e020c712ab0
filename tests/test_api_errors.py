"""Mistakes a user makes with ``autopar.compile`` and ``step()`` give a typed error naming the
argument, what was expected and what was given, not an error from deep inside torch; a NaN/inf
step is reported with its number and leaves the parameters as they were. One-rank plans: no
processes needed (the checks run before anything is distributed), but for one test of a NaN step
on four ranks."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import autopar
from autopar.core.errors import InputError, NonFiniteError
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import gpt_case

PLAN = autopar.Plan.manual(global_batch=8)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Lookup(nn.Module):
    """An embedding and no config: nothing to check the ids against before running."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(dim=1))


def _batch(features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, features, generator=g), torch.randn(8, 2, generator=g)


def _compile(model: nn.Module | None = None, example=None, **kw) -> autopar.ParallelModule:
    kw.setdefault("loss_fn", nn.functional.mse_loss)
    return autopar.compile(
        model or Regressor(), 1, example_inputs=example or _batch(), plan=PLAN, global_batch=8, **kw
    )


def test_example_longer_than_the_position_table_is_refused_at_compile():
    case = gpt_case(seq=8)
    tokens = torch.randint(0, 64, (8, 16))
    with pytest.raises(InputError, match=r"example_inputs\[0\] has shape \[8, 16\].*config\.seq=8"):
        autopar.compile(
            case.build(), 1, example_inputs=(tokens, tokens), loss_fn=case.loss_fn, plan=PLAN, global_batch=8
        )


def test_an_out_of_range_lookup_in_step_names_the_batch():
    ids = torch.randint(0, 10, (8, 3))
    compiled = _compile(Lookup(), example=(ids, torch.randn(8, 2)))
    bad = ids.clone()
    bad[0, 0] = 20
    with pytest.raises(
        InputError, match=r"index lookup.*token id >= vocab.*batch\[0\] shape \[8, 3\] torch.int64 max 20"
    ):
        compiled.step((bad, torch.randn(8, 2)))


def test_a_loss_that_is_not_a_scalar_is_refused_at_compile():
    def per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).sum(dim=1)

    with pytest.raises(InputError, match=r"loss_fn returned a tensor of shape \[8\].*must be a scalar"):
        _compile(loss_fn=per_sample)


def test_an_optimizer_instance_asks_for_a_factory():
    model = Regressor()
    with pytest.raises(InputError, match=r"got an instance of AdamW.*functools.partial\(torch.optim.AdamW"):
        _compile(model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    _compile(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))  # the fix works


def test_a_batch_with_another_feature_size_names_position_and_shapes():
    compiled = _compile()
    x, y = _batch(features=5)
    with pytest.raises(
        InputError, match=r"batch\[0\] \(x\): expected shape \[B, 4\] with B = 8.*got \[8, 5\]"
    ):
        compiled.step((x, y))
    with pytest.raises(InputError, match=r"batch\[1\] .*got \[8, 3\]"):
        compiled.step((_batch()[0], torch.randn(8, 3)))
    with pytest.raises(InputError, match=r"expected dtype torch.float32.*got torch.int64"):
        compiled.step((torch.zeros(8, 4, dtype=torch.long), y))


def test_a_batch_without_targets_names_the_counts():
    compiled = _compile()
    x, _ = _batch()
    with pytest.raises(InputError, match=r"got 1 tensor\(s\) but the model was compiled for 2: \(x, "):
        compiled.step((x,))
    with pytest.raises(InputError, match=r"expected a tuple \(inputs\.\.\., targets\.\.\.\).*got Tensor"):
        compiled.step(x)


def test_a_nan_loss_raises_with_the_step_and_keeps_the_parameters():
    compiled = _compile()
    assert compiled.nan_check == "loss"  # the default: the global loss is a float every rank has
    compiled.step(_batch())
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    x, y = _batch()
    x[3, 1] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"step 1: the global loss is nan; the optimizer did not step"
    ) as info:
        compiled.step((x, y))
    assert info.value.step == 1
    after = compiled.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(torch.tensor(compiled.step(_batch())))  # training goes on after a skip


def test_nan_check_grads_names_the_parameters_and_off_trains_on():
    compiled = _compile(nan_check="grads")
    x, y = _batch()
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 0: .*non-finite gradients in fc1\.weight") as info:
        compiled.step((x, y))
    assert "fc1.weight" in info.value.parameters
    off = _compile(nan_check="off")
    off.step((x, y))  # the user's choice: no check, no error
    assert not torch.isfinite(off.state_dict()["fc1.weight"]).all()
    with pytest.raises(InputError, match=r"nan_check='maybe': choose one of 'loss', 'grads', 'off'"):
        _compile(nan_check="maybe")


def _nan_on_ranks(plan: autopar.Plan) -> tuple:
    """Rank function: step 0 clean, step 1 with an inf input; what this rank saw."""
    compiled = autopar.compile(
        Regressor(), plan.world_size, example_inputs=_batch(), loss_fn=nn.functional.mse_loss,
        plan=plan, global_batch=8, nan_check="grads",
    )  # fmt: skip
    compiled.step(_batch())
    before = compiled.state_dict()
    x, y = _batch()
    x[5, 2] = float("inf")  # sample 5: the second data-parallel replica's share
    try:
        compiled.step((x, y))
    except NonFiniteError as exc:
        after = compiled.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        return exc.step, sorted(exc.parameters), unchanged, compiled.step(_batch())
    return None


@pytest.mark.multiproc
def test_a_nan_step_raises_on_every_rank_alike():
    """dp=2 x pp=2: the replica without the bad sample and the stage without the bad gradient raise
    at the same step too (the global loss is the same everywhere; the gradient flag is
    all-reduced), so no rank is left waiting in a collective."""
    plan = autopar.Plan.manual(dp=2, pp=2, global_batch=8, micro_batch_size=2)
    results = run_ranks(_nan_on_ranks, 4, args=(plan,), timeout_s=30)
    names = ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    for step, parameters, unchanged, next_loss in results:
        assert (step, parameters, unchanged) == (1, names, True)
        assert next_loss == results[0][3] and torch.isfinite(torch.tensor(next_loss))

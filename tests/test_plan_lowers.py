"""One space for planner and compiler: every plan the planner returns lowers on every rank.

The planner ranks every candidate that fits (``plan.search["alternatives"]`` holds them all with a
large ``top_k``); each distinct lowering (mesh, micro-batch size, sequence parallelism, schedule,
virtual stages) is compiled and lowered for every rank with ``rank_code`` (no processes), and the
lowered programs pass :func:`autopar.lower.invariants.check_program`. Over the zoo of
non-transformer models and over random small GPT / MLP shapes (hypothesis).
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import autopar
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.solve.candidate import make_plan
from autopar.testing import zoo
from autopar.testing.equivalence import Case, MLPNet, mse_loss, regression_batches, token_batches

_MAX_LOWERINGS = 6
"""Distinct lowerings checked per (model, cluster): spread over the ranked candidates."""


def _lowering_key(keys: dict) -> tuple:
    return tuple(keys[k] for k in ("dp", "tp", "pp", "mbs", "sp", "vpp", "schedule"))


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def _check_planner_plans_lower(case: Case, ranks: int) -> list[str]:
    """Plan ``case`` on ``Cluster.local(ranks)``; lower each distinct candidate on every rank."""
    model = case.build()
    batch = case.make_batches(1)[0]
    common = {"loss_fn": case.loss_fn, "num_targets": case.num_targets}
    best = autopar.plan(
        model,
        autopar.Cluster.local(ranks),
        global_batch=case.global_batch,
        example_inputs=batch,
        progress=False,
        top_k=1000,
        **common,
    )
    plans = {_lowering_key(autopar.core.plan_rules.plan_keys(best)): best}
    for alt in best.search["alternatives"]:
        plans.setdefault(_lowering_key(alt["plan"]), make_plan(alt["plan"], case.global_batch, "train"))
    checked = []
    for plan in [best, *_spread([p for p in plans.values() if p is not best], _MAX_LOWERINGS - 1)]:
        compiled = autopar.compile(
            model, ranks, example_inputs=batch, plan=plan, global_batch=case.global_batch, **common
        )
        for rank in range(ranks):
            compiled.rank_code(rank)  # lowers (raises on a plan the compiler rejects) and checks invariants
        checked.append(plan.summary())
    return checked


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("name", [n for n in zoo.CASES if n not in ("t5", "bart", "gpt2-dropout")])
def test_every_planned_zoo_plan_lowers(name: str, ranks: int) -> None:
    checked = _check_planner_plans_lower(zoo.case(name), ranks)
    assert checked, "the planner returned no plan"


@pytest.mark.parametrize("name", ["t5", "bart", "gpt2-dropout"])
def test_planned_hf_plan_lowers(name: str) -> None:
    pytest.importorskip("transformers")
    case = zoo.case(name)
    model = case.build()
    batch = case.make_batches(1)[0]
    common = {"loss_fn": case.loss_fn, "num_targets": case.num_targets}
    best = autopar.plan(
        model, autopar.Cluster.local(4), global_batch=8, example_inputs=batch, progress=False, **common
    )
    compiled = autopar.compile(model, 4, example_inputs=batch, plan=best, global_batch=8, **common)
    for rank in range(4):
        compiled.rank_code(rank)


def _gpt_case(hidden_per_head: int, heads: int, layers: int, vocab: int, seq: int) -> Case:
    cfg = GPTConfig(hidden=hidden_per_head * heads, layers=layers, heads=heads, vocab=vocab, seq=seq)
    return Case(
        name="gpt",
        build=functools.partial(GPT, cfg),
        make_batches=functools.partial(token_batches, vocab, 8, seq),
        loss_fn=gpt_loss,
        global_batch=8,
    )


def _mlp_case(width: int, hidden: int, layers: int) -> Case:
    return Case(
        name="mlp",
        build=functools.partial(MLPNet, width=width, hidden=hidden, layers=layers),
        make_batches=functools.partial(regression_batches, 8),
        loss_fn=mse_loss,
        global_batch=8,
    )


_SETTINGS = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,  # deterministic: the same shapes on every run
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure prints its shapes at once
    suppress_health_check=list(HealthCheck),
)


@_SETTINGS
@given(
    hidden_per_head=st.sampled_from([4, 8]),
    heads=st.sampled_from([1, 2, 4, 6]),
    layers=st.integers(1, 5),
    vocab=st.sampled_from([30, 64, 96]),
    seq=st.sampled_from([4, 8]),
    ranks=st.sampled_from([2, 4]),
)
def test_random_gpt_plans_lower(
    hidden_per_head: int, heads: int, layers: int, vocab: int, seq: int, ranks: int
) -> None:
    assert _check_planner_plans_lower(_gpt_case(hidden_per_head, heads, layers, vocab, seq), ranks)


@_SETTINGS
@given(
    width=st.sampled_from([6, 16, 24]),
    hidden=st.sampled_from([10, 32, 48]),
    layers=st.integers(1, 5),
    ranks=st.sampled_from([2, 4]),
)
def test_random_mlp_plans_lower(width: int, hidden: int, layers: int, ranks: int) -> None:
    assert _check_planner_plans_lower(_mlp_case(width, hidden, layers), ranks)

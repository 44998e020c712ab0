"""Pipelines on any model: one definition of the pipeline units for the planner and the compiler,
and in-place writes kept through the cut.

Oracles: the planner's unit count (``OpGraph.block_order``) for the compiler's cut; the eager model
(one process, stages run in sequence, and 3 AdamW steps on real gloo ranks) for the numerics;
the traced graph's mutation nodes for :func:`autopar.lower.invariants.check_program`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
import torch
from torch import nn

import autopar
from autopar import Plan
from autopar.core.errors import PlanError
from autopar.lower.invariants import check_program, mutation_counts
from autopar.lower.program import build_program
from autopar.lower.segments import find_units, is_mutation
from autopar.testing import zoo
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import check_jobs, clone_case, gpt_case, run_jobs
from autopar.tracing import fx_trace


def _traced(name: str) -> tuple[torch.fx.GraphModule, tuple]:
    case = zoo.case(name)
    batch = case.make_batches(1)[0]
    return fx_trace(case.build(), batch, loss_fn=case.loss_fn, num_targets=case.num_targets), batch


def _all_stages(gm: torch.fx.GraphModule, plan: Plan, input_names: list[str]) -> list:
    """Every rank's program of the first dp/tp replica, pipeline stage by stage."""
    return [build_program(gm, plan, rank * plan.tp, input_names) for rank in range(plan.pp)]


@pytest.mark.parametrize(
    ("name", "units"),
    [
        ("resnet", ("layer1.0", "layer1.1", "layer2.0", "layer2.1")),
        ("wide-mlp", ("fc1", "fc2", "fc3", "fc4", "fc5")),
        ("lstm", ("emb", "lstm", "head")),
        ("seq-cnn", tuple(str(i) for i in range(8))),
    ],
)
def test_planner_counts_the_units_the_compiler_cuts_at(name: str, units: tuple) -> None:
    case = zoo.case(name)
    batch = case.make_batches(1)[0]
    graph = autopar.trace(case.build(), batch, loss_fn=case.loss_fn, num_targets=case.num_targets)
    assert len(graph.block_order) == len(units)
    gm, _ = _traced(name)
    assert find_units(gm).prefixes == units
    plan = Plan.manual(pp=2, global_batch=case.global_batch, micro_batch_size=case.global_batch)
    first, last = _all_stages(gm, plan, gm.meta["autopar"]["input_names"])
    stage_of = plan.stage_of_layers(len(units))
    # Segment 0 is the stem, 1..L the units, L+1 the head: each with the stage the planner gave it.
    assert first.stage_of_segment == [stage_of[0], *stage_of, stage_of[-1]]
    made = [s for s in range(len(units) + 2) if hasattr(first.split, f"submod_{s}")]  # stem may be empty
    assert first.stage.spec.segments == [s for s in made if first.stage_of_segment[s] == 0]
    assert last.stage.spec.segments == [s for s in made if last.stage_of_segment[s] == 1]


def test_encoder_decoder_units_are_both_stacks_in_order() -> None:
    pytest.importorskip("transformers")
    gm, _ = _traced("t5")
    assert find_units(gm).prefixes == (
        "model.encoder.block.0", "model.encoder.block.1", "model.decoder.block.0", "model.decoder.block.1",
    )  # fmt: skip
    # The decoder-input shift writes in place (copy_ into a slice, fill_, masked_fill_): every write
    # is in some stage's program, and every segment runs on exactly one stage.
    mutations = mutation_counts(gm)
    assert sum(mutations.values()) >= 3
    plan = Plan.manual(pp=2, global_batch=8, micro_batch_size=8)
    progs = _all_stages(gm, plan, ["input_ids", "labels"])
    check_program(mutations, progs[0].split, [p.stage for p in progs])


def test_too_few_units_is_a_plan_error_naming_them() -> None:
    gm, _ = _traced("lstm")
    with pytest.raises(
        PlanError, match=r"pp\*vpp=4 stages need at least 4 pipeline units .* 3: emb, lstm, head"
    ):
        build_program(gm, Plan.manual(pp=4, global_batch=8, micro_batch_size=8), 0, ["tokens"])


class _ShiftRight(nn.Module):
    """Builds decoder inputs from the targets the way HF T5/BART do (``new_zeros``, slice writes,
    ``masked_fill_``), and writes into a graph input, read again on the last stage."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1].clone()
        shifted[:, 0] = 3
        shifted.masked_fill_(shifted == 5, 1)
        h = self.emb(tokens) + self.emb(shifted)
        tokens.clamp_(max=14)
        h = self.mid(torch.relu(h))
        logits = self.head(h) + tokens.unsqueeze(-1).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_in_place_writes_survive_the_cut_and_run_as_in_eager() -> None:
    torch.manual_seed(0)
    model = _ShiftRight()
    tokens, labels = torch.randint(0, 16, (4, 6)), torch.randint(0, 16, (4, 6))
    expected = model(tokens.clone(), labels)
    gm = fx_trace(model, (tokens.clone(), labels), num_targets=0)
    assert {n.name for n in gm.graph.nodes if is_mutation(n)} >= {"copy_", "masked_fill_", "clamp_"}
    plan = Plan.manual(pp=2, global_batch=4, micro_batch_size=4, layer_stages=[0, 1, 1])
    progs = _all_stages(gm, plan, ["tokens", "labels"])
    check_program(mutation_counts(gm), progs[0].split, [p.stage for p in progs])
    side = {"tokens": tokens.clone(), "labels": labels}
    x = progs[0].stage(side["tokens"], labels, **side)
    loss = progs[1].stage(*(x if isinstance(x, tuple) else (x,)), **side)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_check_program_reports_a_lost_write() -> None:
    gm, _ = _traced("lstm")
    plan = Plan.manual(pp=2, global_batch=8, micro_batch_size=8)
    progs = _all_stages(gm, plan, ["tokens"])
    fake = mutation_counts(gm) + Counter({"call_function:masked_fill_": 1})
    with pytest.raises(AssertionError, match="lost mutations"):
        check_program(fake, progs[0].split, [p.stage for p in progs])
    with pytest.raises(AssertionError, match="exactly one stage"):
        check_program(mutation_counts(gm), progs[0].split, [progs[0].stage])


def _checked_jobs(jobs: list) -> list:
    os.environ["AUTOPAR_CHECK"] = "1"  # check_program on every rank's program
    return run_jobs(jobs)


@pytest.mark.multiproc
def test_models_without_repeated_blocks_and_seq2seq_match_one_device_on_two_ranks() -> None:
    pytest.importorskip("transformers")

    def pp2(case):  # one micro-batch: the schedule is not what is tested here
        return Plan.manual(pp=2, global_batch=case.global_batch, micro_batch_size=case.global_batch)

    def dp2(case):
        return Plan.manual(dp=2, global_batch=case.global_batch)

    jobs = []
    for name, kinds in [
        ("wide-mlp", [pp2]), ("seq-cnn", [dp2, pp2]), ("dict-out", [pp2]), ("lstm", [pp2]),
        ("t5", [dp2, pp2]), ("bart", [dp2, pp2]),
    ]:  # fmt: skip
        steps = 1 if name in ("t5", "bart") else 2  # HF: slow; a lost write is wrong from step 0
        case = clone_case(zoo.case(name), steps=steps)
        jobs.append((case, [kind(case) for kind in kinds]))
    check_jobs(run_ranks(_checked_jobs, 2, args=(jobs,), timeout_s=90, deadline_s=300), jobs)


@pytest.mark.multiproc
def test_tied_weights_and_encoder_output_across_four_pipeline_stages_match_one_device() -> None:
    pytest.importorskip("transformers")
    # GPT: stages 1 and 2 hold neither end of the tied embedding and must not take part in its sum.
    gpt = clone_case(gpt_case(layers=4, hidden=32, heads=4, vocab=64, seq=8), steps=2)
    # T5: the encoder output (stage 1) is passed through stage 2 to stage 3; the shared embedding is
    # read on stages 0 (encoder), 1 (decoder inputs, after the encoder) and 3 (head).
    t5 = clone_case(zoo.case("t5"), steps=1)
    jobs = [(case, [Plan.manual(pp=4, global_batch=8, micro_batch_size=2)]) for case in (gpt, t5)]
    check_jobs(run_ranks(_checked_jobs, 4, args=(jobs,), timeout_s=90, deadline_s=300), jobs)


# ----------------------------------------------------------------- uneven units: balanced split
def _bottleneck(times: list[float], counts: list[int], first: float, last: float) -> float:
    out, start = [], 0
    for s, n in enumerate(counts):
        t = (
            sum(times[start : start + n])
            + (first if s == 0 else 0.0)
            + (last if s == len(counts) - 1 else 0.0)
        )
        out.append(t)
        start += n
    return max(out)


def test_balanced_split_is_the_best_contiguous_split() -> None:
    """The linear-partition DP against every composition of the units (exhaustive)."""
    import itertools
    import random

    from autopar.solve.refine import balanced_split

    rng = random.Random(0)
    for _ in range(200):
        n, stages = rng.randint(2, 8), rng.randint(1, 4)
        if stages > n:
            continue
        times = [rng.choice([0.5, 1.0, 2.0, 5.0]) * rng.random() for _ in range(n)]
        first, last = rng.random(), rng.random()
        counts = balanced_split(times, stages, first, last)
        assert sum(counts) == n and min(counts) >= 1
        best = min(
            _bottleneck(times, [b - a for a, b in zip((0, *cuts), (*cuts, n))], first, last)
            for cuts in itertools.combinations(range(1, n), stages - 1)
        )
        assert _bottleneck(times, counts, first, last) == pytest.approx(best)


def test_planner_splits_units_of_different_cost_at_the_estimators_best() -> None:
    """Units of different types (a heavy MLP unit, then four light Linears) are split where the
    estimator prices the step fastest among every contiguous split (here not the even one), and
    the compiler cuts where the plan says."""

    class Heavy(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    class Uneven(nn.Module):
        def __init__(self, w: int = 256) -> None:
            super().__init__()
            self.e = Heavy(w)
            self.a, self.b, self.c, self.d = (nn.Linear(w, w) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.e(x)
            for layer in (self.a, self.b, self.c, self.d):
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    model = Uneven()
    batch = (torch.randn(512, 256), torch.randn(512, 256))
    loss = torch.nn.functional.mse_loss
    cluster = autopar.Cluster.parse("dgx-a100-80g:2")
    graph = autopar.trace(model, batch, loss_fn=loss)
    fixed = {"pp": 2, "mbs": 64, "vpp": 1, "schedule": "1f1b"}
    plan = autopar.plan(graph, cluster, global_batch=512, progress=False, fixed=fixed)
    splits = ([0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1])
    costs = {
        tuple(s): autopar.estimate(
            graph, cluster, dataclasses.replace(plan, layer_stages=s, predicted=None)
        ).step_time_s
        for s in splits
    }
    best = min(costs, key=costs.get)
    assert best != (0, 0, 0, 1, 1), "the model should make an uneven split the best"
    assert tuple(plan.layer_stages) == best
    assert plan.predicted.step_time_s == pytest.approx(costs[best], rel=1e-9)
    compiled = autopar.compile(model, 2, example_inputs=batch, loss_fn=loss, plan=plan, global_batch=512)
    stage0 = next(line for line in compiled.rank_code(0).splitlines() if line.startswith("# stage 0 of 2"))
    assert stage0 == "# stage 0 of 2: e, a"

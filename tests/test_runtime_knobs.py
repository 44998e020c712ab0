"""Every memory knob the planner may choose runs as it was costed.

* Equivalence (oracle: one device, ``autopar/testing/equivalence.py``; 3 AdamW steps, fp32, rtol
  1e-5, dropout 0.1): selective recompute under dp=2 (with ZeRO-3 too), tp=2, dp=2 x tp=2 and
  dp=2 x pp=2; ZeRO-1 under dp=2, dp=2 x tp=2 and dp=2 x pp=2; ZeRO-2 under dp=2 and dp=2 x pp=2;
  ZeRO-3 under dp=2.
* Memory: the activation bytes one forward keeps for backward (tensors saved outside checkpoints
  plus the inputs each checkpoint holds) order none > selective > full and equal the estimator's
  activation memory for the same model and plan.
* Distinct behaviour: for every recompute value and ZeRO stage the planner's space offers, the
  runtime builds that knob's own engine, with what each ZeRO stage shards observed on a rank (optimizer
  state, gradients, parameters between forward and backward), and warns of no fallback.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

import autopar
from autopar import Plan
from autopar.models.gpt import gpt_loss
from autopar.runtime.engines import RECOMPUTE_ENGINES, ZERO_ENGINES, shard_rows
from autopar.runtime.recompute import REGION_PREFIX, Checkpointed, apply_selective
from autopar.solve.space import SpaceSpec, knobs
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import check_jobs, gpt_case, run_jobs

B = 8  # global batch of every case


def P(**kw) -> Plan:
    kw.setdefault("micro_batch_size", 2)
    return Plan.manual(global_batch=B, **kw)


# ----------------------------------------------------------------------------------- equivalence
TWO_RANK_JOBS = [
    (
        gpt_case(dropout=0.1),
        [
            P(dp=2, recompute="selective"),
            P(tp=2, recompute="selective"),
            P(dp=2, zero_stage=1),
            P(dp=2, zero_stage=2),  # two micro-batches: parameters kept gathered between them
            P(dp=2, zero_stage=3, recompute="selective"),
        ],
    ),
]
KNOBS = [("none", 0), ("selective", 1), ("full", 2), ("selective", 3)]
"""Every recompute value and every ZeRO stage of the planner's space (checked against
``solve.space.knobs`` below), each at least once, observed under dp=2."""


def two_rank_launch(jobs: list, observed: list[tuple[str, int]]) -> tuple:
    """Rank function: the equivalence trajectories of ``jobs`` and the observations of ``observed``."""
    return run_jobs(jobs), observe_knobs(observed)


@pytest.fixture(scope="module")
def two_ranks() -> list:
    """One 2-rank launch shared by the tests below (process start-up paid once)."""
    return run_ranks(two_rank_launch, 2, args=(TWO_RANK_JOBS, KNOBS))


@pytest.mark.multiproc
def test_two_ranks_selective_recompute_and_zero_stages_match_one_device(two_ranks):
    check_jobs([trajs for trajs, _ in two_ranks], TWO_RANK_JOBS)


@pytest.mark.multiproc
def test_four_ranks_zero_1_and_2_with_tp_and_pp_match_one_device():
    jobs = [
        (
            gpt_case(dropout=0.1),
            [
                P(dp=2, tp=2, zero_stage=1, recompute="selective"),
                P(dp=2, pp=2, zero_stage=1, micro_batch_size=1),
                P(dp=2, pp=2, zero_stage=2, recompute="selective", micro_batch_size=1),
            ],
        ),
    ]
    check_jobs(run_ranks(run_jobs, 4, args=(jobs,)), jobs)


def test_zero1_rows_cover_each_parameter_exactly_once():
    """ZeRO-1's row split: every row of a parameter belongs to exactly one dp rank."""
    for rows in (1, 2, 5, 7, 8):
        for world in (2, 3, 4):
            owned = [r for rank in range(world) for r in range(*shard_rows(rows, world, rank))]
            assert owned == list(range(rows)), (rows, world)


ODD_SHAPES = ((5,), (7, 3), (), (4, 4), (1, 6), (2,))


def _zero1_against_adamw() -> list[float]:
    """Rank function: ``ShardedOptimizer`` over the world and plain AdamW step the same parameters
    with the same (replicated) gradients three times; the largest difference after each step."""
    import torch.distributed as dist

    from autopar.runtime.engines import ShardedOptimizer

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in ODD_SHAPES]
    plain = [nn.Parameter(t.clone()) for t in start]
    sharded = [nn.Parameter(t.clone()) for t in start]
    ref = torch.optim.AdamW(plain, lr=0.1)
    zero = ShardedOptimizer(lambda ps: torch.optim.AdamW(ps, lr=0.1), sharded, dist.group.WORLD)
    gaps = []
    for _ in range(3):
        for a, b in zip(plain, sharded, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ref.step()
        zero.step()
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(plain, sharded, strict=True)))
    return gaps


@pytest.mark.multiproc
def test_zero1_steps_parameters_whose_rows_do_not_divide_like_one_optimizer():
    """3 ranks: rows 5, 7, 4, 1 and 2 split unevenly (a rank may own none), a 0-dim parameter is
    one row; the all-gathered parameters equal plain AdamW's on every rank, bit for bit."""
    for gaps in run_ranks(_zero1_against_adamw, 3):
        assert gaps == [0.0, 0.0, 0.0]


def _fsdp_collectives(plans: list[dict]) -> list[tuple[int, int]]:
    """Rank function: the all-gathers and reduce-scatters FSDP2 issues in one training step (the
    second) of each plan, counted at ``torch.distributed``'s entry points it calls."""
    import torch.distributed as dist

    case = gpt_case(layers=3)
    out = []
    for kw in plans:
        batches = case.make_batches(2)
        compiled = autopar.compile(
            case.build(), dist.get_world_size(), plan=P(**kw), example_inputs=batches[0],
            loss_fn=case.loss_fn, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), global_batch=B,
        )  # fmt: skip
        compiled.step(batches[0])
        counts = [0, 0]
        gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

        def counted(i, fn, counts=counts):
            def call(*a, **k):
                counts[i] += 1
                return fn(*a, **k)

            return call

        dist.all_gather_single, dist.reduce_scatter_single = counted(0, gather), counted(1, scatter)
        try:
            compiled.step(batches[1])
        finally:
            dist.all_gather_single, dist.reduce_scatter_single = gather, scatter
        out.append(tuple(counts))
    return out


@pytest.mark.multiproc
def test_fsdp_issues_the_gathers_and_reduce_scatters_the_cost_model_charges():
    """ZeRO-2 and ZeRO-3 under dp=2 with one and two micro-batches: per FSDP unit (3 blocks and
    the stage), the runtime's collectives per step equal the cost model's count per micro-batch
    (``zero3_counts``; ZeRO-2: one of each per step) times the micro-batches."""
    from cost_models import DEFAULT, BlockWork, StageWork, StepSpec
    from cost_models.step import zero3_counts

    plans = [{"dp": 2, "zero_stage": z, "micro_batch_size": mbs} for z in (2, 3) for mbs in (4, 2)]
    measured = run_ranks(_fsdp_collectives, 2, args=(plans,))[0]
    units = 3 + 1
    stage = StageWork(blocks=((BlockWork(name="b", param_count=1.0), 3),))
    for kw, (gathers, scatters) in zip(plans, measured, strict=True):
        m = B // 2 // kw["micro_batch_size"]
        if kw["zero_stage"] == 2:
            want = (units, units)
        else:
            spec = StepSpec(stages=(stage,), num_micro_batches=m, zero_stage=3)
            per_ag, per_rs = zero3_counts(spec, 0, DEFAULT.with_(zero_fsdp2=True))
            want = (round(units * m * per_ag), round(units * m * per_rs))
        assert (gathers, scatters) == want, (kw, m)


# ----------------------------------------------------------------------------------- region
class _Attention(nn.Module):
    """A score region with an external mask input and an output read between its nodes."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        probs = torch.softmax(q @ k.transpose(-2, -1) + mask, dim=-1)
        peek = probs.sum()  # a reader of the region's softmax placed before the second matmul
        return probs @ v, peek


def test_selective_region_is_outlined_and_recomputes_exactly():
    """The outlined, checkpointed region gives the eager outputs and gradients; the region spans
    both matmuls and everything between them, and takes the mask as an input."""
    gm = torch.fx.symbolic_trace(_Attention())
    assert apply_selective(gm, "test") == 1
    region = gm.get_submodule(f"{REGION_PREFIX}0")
    assert isinstance(region, Checkpointed)
    inner = [str(n.target) for n in region.inner.graph.nodes if n.op.startswith("call")]
    assert inner[0] == "<built-in function matmul>" and inner[-1] == "<built-in function matmul>", inner
    assert len([n for n in region.inner.graph.nodes if n.op == "placeholder"]) == 4  # q, k^T, mask, v
    torch.manual_seed(0)
    args = [torch.randn(2, 3, 3, requires_grad=True) for _ in range(4)]
    want = _Attention()(*args)
    want_grads = torch.autograd.grad(want[0].sum() + want[1], args)
    got = gm(*args)
    got_grads = torch.autograd.grad(got[0].sum() + got[1], args)
    for a, b in zip((*want, *want_grads), (*got, *got_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- memory
# explicit attention: selective recompute drops the materialised scores, which SDPA never saves
MEMORY_CASE = functools.partial(
    gpt_case, layers=2, hidden=64, heads=4, seq=32, batch=B, fused_attention=False
)


def saved_activation_bytes(stage: nn.Module, args: list, side: dict) -> int:
    """Bytes one forward of ``stage`` keeps for backward: every tensor autograd saves outside a
    checkpoint plus every input a checkpoint holds, parameters excluded, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    kept: dict[int, int] = {}

    def count(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    def checkpoint_inputs(module: nn.Module, inputs: tuple) -> None:
        for t in inputs:
            count(t)

    hooks = [
        m.register_forward_pre_hook(checkpoint_inputs) for m in stage.modules() if isinstance(m, Checkpointed)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stage(*args, **side)
    finally:
        for h in hooks:
            h.remove()
    return sum(kept.values())


def test_activation_memory_orders_none_selective_full_and_matches_the_estimator():
    case = MEMORY_CASE()
    batch = case.make_batches(1)[0]
    graph = autopar.trace(case.build(), batch, loss_fn=gpt_loss, num_targets=1)
    cluster = autopar.Cluster.local(ranks=1)
    measured, predicted = {}, {}
    for mode in ("none", "selective", "full"):
        plan = Plan.manual(global_batch=B, recompute=mode)
        pm = autopar.compile(
            case.build(), 1, example_inputs=batch, loss_fn=gpt_loss, plan=plan, global_batch=B
        )
        side = dict(zip(pm.input_names + pm.target_names, batch))
        measured[mode] = saved_activation_bytes(pm.program.stage, [side[n] for n in pm.input_names], side)
        cost = autopar.estimate(graph, cluster, plan, dtype="fp32")
        predicted[mode] = cost.memory_breakdown_bytes["activations"]
    assert measured["none"] > measured["selective"] > measured["full"], measured
    assert predicted["none"] > predicted["selective"] > predicted["full"], predicted
    for mode in measured:
        assert measured[mode] == pytest.approx(predicted[mode], rel=0.02), (mode, measured, predicted)


# ----------------------------------------------------------------------------------- distinct
def _observe(recompute: str, zero: int) -> dict:
    """What one rank of a dp=2 run holds under (recompute, zero): see the test below."""
    case = gpt_case(fused_attention=False)  # selective recompute needs materialised scores
    batch = case.make_batches(1)[0]
    made: list = []

    def factory(params: list) -> torch.optim.Optimizer:
        made.append(torch.optim.AdamW(params, lr=1e-3))
        return made[-1]

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("autopar").addHandler(handler)
    try:
        plan = P(dp=2, recompute=recompute, zero_stage=zero, micro_batch_size=4)
        pm = autopar.compile(
            case.build(),
            2,
            example_inputs=batch,
            loss_fn=gpt_loss,
            optimizer=factory,
            plan=plan,
            global_batch=B,
        )
        pm.step(batch)
    finally:
        logging.getLogger("autopar").removeHandler(handler)
    stage = pm.program.stage
    blocks = [getattr(stage.gm, f"submod_{s}") for s in sorted(pm.program.block_segments)]

    def local(t: torch.Tensor) -> int:
        return t.to_local().numel() if hasattr(t, "to_local") else t.numel()

    grads = sum(local(p.grad) for p in stage.parameters() if p.grad is not None)
    state = sum(local(v) for s in made[-1].state.values() for k, v in s.items() if k == "exp_avg")
    side = dict(zip(pm.input_names + pm.target_names, (t[:4] for t in batch)))
    stage(*[side[n] for n in pm.input_names], **side)  # forward only: what stays for backward
    between = sum(local(p) for b in blocks for p in b.parameters())
    return {
        "checkpointed_blocks": sum(isinstance(b, Checkpointed) for b in blocks),
        "regions": sum(name.startswith(REGION_PREFIX) for b in blocks for name, _ in b.named_children()),
        "optimizer_state": state,
        "grads": grads,
        "block_params_between_forward_and_backward": between,
        "warnings": [r.getMessage() for r in records],
    }


def observe_knobs(pairs: list[tuple[str, int]]) -> dict:
    return {pair: _observe(*pair) for pair in pairs}


@pytest.mark.multiproc
def test_every_knob_the_planner_offers_runs_its_own_engine(two_ranks):
    """Every recompute value and ZeRO stage the planner's space yields (``solve/space.py: knobs``)
    runs its own engine. Observed on a dp=2 rank: ``full`` checkpoints every block, ``selective``
    outlines one score region per block and checkpoints no whole block, ``none`` neither; ZeRO-0
    holds all optimizer state, gradients and parameters, ZeRO-1 half the optimizer state, ZeRO-2
    also half the gradients, ZeRO-3 also half the block parameters between forward and backward;
    and nothing warns of running otherwise."""
    spec = SpaceSpec(num_devices=8, devices_per_node=8, num_layers=4, heads=4, kv_heads=4, global_batch=B)
    offered = {(r, z) for tp in (1, 2) for dp in (1, 2, 4) for _, r, z in knobs(spec, tp, dp)}
    assert {r for r, _ in offered} == {r for r, _ in KNOBS} == set(RECOMPUTE_ENGINES)
    assert {z for _, z in offered} == {z for _, z in KNOBS} == set(ZERO_ENGINES)
    observed = two_ranks[0][1]
    total = sum(p.numel() for p in gpt_case().build().parameters())
    block_total = sum(
        p.numel() for name, p in gpt_case().build().named_parameters() if ".layers." in f".{name}"
    )
    for (recompute, zero), seen in observed.items():
        label = f"recompute={recompute} zero={zero}: {seen}"
        assert seen["warnings"] == [], label
        assert seen["checkpointed_blocks"] == (2 if recompute == "full" else 0), label
        assert seen["regions"] == (2 if recompute == "selective" else 0), label
        half = pytest.approx(total / 2, rel=0.05)
        assert seen["optimizer_state"] == (total if zero == 0 else half), label
        assert seen["grads"] == (total if zero <= 1 else half), label
        between = seen["block_params_between_forward_and_backward"]
        assert between == (block_total if zero <= 2 else pytest.approx(block_total / 2, rel=0.05)), label

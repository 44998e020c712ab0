"""``autopar.compile`` without processes: argument checks, the in-process 1-rank run, state dicts,
and ``rank_code(r)`` for any rank of a big mesh (its collectives counted against the plan)."""

from __future__ import annotations

import re

import pytest
import torch

import autopar
from autopar.core.errors import PlanError, RuntimeFailure
from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.testing.equivalence import assert_equivalent, gpt_case, parallel, reference


def _compile(plan, world=None, **kw):
    case = gpt_case()
    batch = case.make_batches(1)[0]
    return autopar.compile(
        case.build(), world or plan.world_size, example_inputs=batch, loss_fn=case.loss_fn,
        plan=plan, global_batch=plan.global_batch, **kw,
    )  # fmt: skip


def test_argument_errors_name_the_fix():
    with pytest.raises(PlanError, match=r"needs an autopar.Cluster.*plan=autopar.Plan.manual\("):
        autopar.compile(torch.nn.Linear(2, 2), 4, example_inputs=(torch.zeros(4, 2),), global_batch=4)
    with pytest.raises(PlanError, match="needs pp > 1"):
        _compile(autopar.Plan.manual(global_batch=8, schedule="interleaved", virtual_stages=2))
    with pytest.raises(PlanError, match="uses 2 ranks but the cluster has 4 devices"):
        _compile(autopar.Plan.manual(dp=2, global_batch=8), world=4)
    with pytest.raises(PlanError, match="global_batch=16 but the plan was made for 8"):
        case = gpt_case()
        autopar.compile(
            case.build(), 1, example_inputs=case.make_batches(1)[0], loss_fn=gpt_loss,
            plan=autopar.Plan.manual(global_batch=8), global_batch=16,
        )  # fmt: skip


def test_without_a_plan_the_planner_chooses_one():
    case = gpt_case()
    compiled = autopar.compile(
        case.build(), autopar.Cluster.local(ranks=1), example_inputs=case.make_batches(1)[0],
        loss_fn=case.loss_fn, global_batch=8,
    )  # fmt: skip
    assert compiled.plan.world_size == 1 and compiled.plan.predicted is not None
    assert compiled.step(case.make_batches(1)[0]) == pytest.approx(reference(case).losses[0], rel=1e-5)


def test_cluster_object_gives_the_device_count():
    cluster = autopar.Cluster.local(ranks=2)
    compiled = _compile(autopar.Plan.manual(dp=2, global_batch=8), world=cluster)
    assert compiled.plan.dp == 2 and "dp=2" in repr(compiled)


def test_one_rank_in_process_matches_eager_with_micro_batches_and_recompute():
    case = gpt_case()
    for plan in (
        autopar.Plan.manual(global_batch=8, micro_batch_size=2),
        autopar.Plan.manual(global_batch=8, recompute="full"),
    ):
        assert_equivalent(reference(case), parallel(case, plan), plan.summary())


def test_state_dict_round_trips_into_the_original_model():
    compiled = _compile(autopar.Plan.manual(global_batch=8, micro_batch_size=4))
    fresh = GPT(GPTConfig(hidden=16, layers=2, heads=4, vocab=64, seq=8))
    compiled.load_state_dict(fresh.state_dict())
    state = compiled.state_dict()
    assert list(state) == list(fresh.state_dict())  # tied lm_head.weight included
    for key, value in fresh.state_dict().items():
        assert torch.equal(state[key], value), key
    original = gpt_case().build()
    original.load_state_dict(state)  # strict: loadable into the original model


def test_modes_are_enforced():
    compiled = _compile(autopar.Plan.manual(global_batch=8), mode="inference")
    with pytest.raises(RuntimeFailure, match="mode='train'"):
        compiled.step(gpt_case().make_batches(1)[0])
    with pytest.raises(RuntimeFailure, match="mode='inference'"):
        _compile(autopar.Plan.manual(global_batch=8))(torch.zeros(8, 8, dtype=torch.long))


def _count(code: str, pattern: str) -> int:
    return len(re.findall(pattern, code))


def test_rank_code_shows_the_collectives_the_plan_implies():
    plan = autopar.Plan.manual(dp=2, tp=2, pp=2, global_batch=8, micro_batch_size=2)
    compiled = _compile(plan)  # no process group: every rank's program is still available
    m = plan.num_micro_batches
    sends = recvs = 0
    for rank in range(plan.world_size):
        code = compiled.rank_code(rank)
        stage = plan.coords(rank)["pp"]
        # Pipeline: m activations out and m gradients in on stage 0, the converse on stage 1.
        assert _count(code, r"dist\.send\(") == m
        assert _count(code, r"dist\.recv\(") == m
        sends += _count(code, r"dist\.send\(")
        recvs += _count(code, r"dist\.recv\(")
        # Data parallel: one DDP gradient all-reduce over this rank's dp group.
        dp_group = plan.groups("dp")[[rank in g for g in plan.groups("dp")].index(True)]
        assert _count(code, re.escape(f"dist.all_reduce(grads, group=dp{dp_group}")) == 1
        # Tied embedding: its gradient summed between the first and last stage.
        assert _count(code, r"dist\.all_reduce\(model\.tok_emb\.weight\.grad, group=tie") == 1
        # Tensor parallel (Megatron): per block one all-reduce after attention and one after the
        # MLP in forward, and their conjugates (copy_to_tp: all-reduce in backward) at block entry.
        blocks_here = 1  # 2 layers over 2 stages
        if stage == 0:  # + the vocab-parallel token and position embeddings
            assert _count(code, r"= autopar_copy_to_tp\(") == 2 * blocks_here
            assert _count(code, r"= autopar_all_reduce\(") == 2 * blocks_here + 2
        else:  # + the column-parallel lm_head's input and the vocab-parallel cross entropy
            assert _count(code, r"= autopar_copy_to_tp\(") == 2 * blocks_here + 1
            assert _count(code, r"= autopar_all_reduce\(") == 2 * blocks_here
            assert _count(code, r"= autopar_vocab_parallel_cross_entropy\(") == 1
    assert sends == recvs == plan.world_size * m


def test_rank_code_of_one_rank_plan_has_no_collectives():
    code = _compile(autopar.Plan.manual(global_batch=8, micro_batch_size=4)).rank_code(0)
    assert "dist." not in code and "autopar_all_reduce" not in code
    assert code.count("autograd.backward(") == 2  # two micro-batches
    with pytest.raises(PlanError, match="outside"):
        _compile(autopar.Plan.manual(global_batch=8)).rank_code(3)


def test_rank_code_of_an_interleaved_pipeline_sends_at_every_virtual_stage_boundary():
    plan = autopar.Plan.manual(
        pp=2, global_batch=8, micro_batch_size=2, schedule="interleaved", virtual_stages=2, layer_stages=None
    )
    case = gpt_case(layers=4)
    compiled = autopar.compile(
        case.build(),
        2,
        example_inputs=case.make_batches(1)[0],
        loss_fn=case.loss_fn,
        plan=plan,
        global_batch=8,
    )
    m = plan.num_micro_batches
    for rank in range(2):
        code = compiled.rank_code(rank)
        # Virtual stages 0..3; rank 0 runs 0 and 2, rank 1 runs 1 and 3; each boundary carries m
        # activations forward and m gradients back: 3m sends and 3m receives per rank.
        assert _count(code, r"dist\.send\(") == 3 * m
        assert _count(code, r"dist\.recv\(") == 3 * m
        assert f"class Stage{rank}:" in code and f"class Stage{rank + 2}:" in code


def _compile_repeatedly(times: int) -> list:
    """Rank function: compile plans of 4 ranks ``times`` times over and step once each; the gloo
    threads (I/O loops and workers) this process holds after each compile."""
    import os
    from pathlib import Path

    import torch.distributed as dist

    case = gpt_case()
    batch = case.make_batches(1)[0]
    plans = [
        autopar.Plan.manual(dp=2, tp=2, global_batch=case.global_batch),
        autopar.Plan.manual(dp=2, pp=2, global_batch=case.global_batch),
    ]
    counts, groups = [], []
    for i in range(times):
        compiled = autopar.compile(
            case.build(), 4, example_inputs=batch, loss_fn=case.loss_fn, plan=plans[i % 2],
            global_batch=case.global_batch,
        )  # fmt: skip
        compiled.step(batch)
        groups.append(compiled._groups.group("dp"))
        names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
        counts.append(sum(n.startswith(("gloo", "pt_gloo")) for n in names))
    dist.barrier()
    return counts, groups[0] is groups[-2]


@pytest.mark.multiproc
@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_recompiling_reuses_the_process_groups():
    """Compiling again in the same job (live re-planning, notebooks, benchmarks) reuses the mesh's
    process groups: each gloo group keeps threads that wake up while idle, and a benchmark that
    compiled ~100 plans in one launch ran 2x slower by its end before groups were reused."""
    from autopar.testing.dist import run_ranks

    for counts, same_dp_group in run_ranks(_compile_repeatedly, 4, args=(6,)):
        assert counts[1:] == [counts[1]] * 5, counts  # both plans' groups exist after two compiles
        assert same_dp_group

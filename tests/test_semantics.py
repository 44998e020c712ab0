"""Semantics one device defines and a split batch could silently change: BatchNorm statistics and
dropout masks.

Oracle: the single-device eager run (``autopar/testing/equivalence.py``: losses, full gradients
and the full state dict, buffers included, after each of 3 AdamW steps, fp32 rtol 1e-5).

* BatchNorm (``batchnorm="sync"``, the default): statistics over the whole global batch, summed
  over the dp group; running statistics updated once per step, as on one device; a plan with
  several micro-batches per replica is a PlanError naming both fixes; ``batchnorm="local"`` warns.
* Dropout: HF GPT-2 (exported graph) and SDPA's ``dropout_p`` draw the reference's masks.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

import autopar
from autopar import Plan
from autopar.core.errors import PlanError
from autopar.lower import rng
from autopar.solve import space
from autopar.testing import zoo
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import check_jobs, clone_case, gpt_case, run_jobs

B = 8

# ResNet's convolutions feed BatchNorm, whose output is invariant to their scale: a few weight
# gradients are analytically ~1e-7 and carry fp32 noise of a few 1e-8 even on one device (against
# fp64). AdamW's eps=1e-6 divides by |g| + eps and turns that noise into 5e-6 weight differences
# (with or without autopar); eps=1e-4 bounds the amplification (lr/eps = 10) below the tolerance.
RESNET = clone_case(zoo.case("resnet"), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-4))


def _resnet_example() -> tuple:
    return zoo.image_batches(B, 1)[0]


@pytest.mark.multiproc
def test_sync_batchnorm_equals_one_device_under_dp_and_mixed_meshes():
    # One micro-batch per replica: global batch statistics over dp; the pp and tp parts change
    # nothing (statistics are per channel; a channel-split BatchNorm syncs its own channels).
    four = [
        Plan.manual(dp=2, tp=2, global_batch=B),
        Plan.manual(dp=2, pp=2, global_batch=B, micro_batch_size=B // 2),
    ]
    check_jobs(run_ranks(run_jobs, 4, args=([(RESNET, four)],)), [(RESNET, four)])


@pytest.mark.multiproc
def test_two_ranks_batchnorm_and_dropout_draw_one_devices_numbers():
    jobs = [
        (RESNET, [Plan.manual(dp=2, global_batch=B)]),
        # HF GPT-2, dropout 0.1 everywhere (attention dropout is SDPA's dropout_p): exported graph.
        (
            zoo.case("gpt2-dropout"),
            [Plan.manual(dp=2, global_batch=B), Plan.manual(pp=2, global_batch=B, micro_batch_size=4)],
        ),
        # SDPA with dropout_p=0.1 (symbolic trace), heads split under tp.
        (gpt_case(dropout=0.1, fused_attention=True), [Plan.manual(tp=2, global_batch=B)]),
    ]
    check_jobs(run_ranks(run_jobs, 2, args=(jobs,)), jobs)


def _compile_resnet(plan: Plan, **kw) -> autopar.ParallelModule:
    # plan.world_size ranks and no process group: compiled (traced, checked), not started.
    return autopar.compile(
        zoo.build("resnet"),
        plan.world_size,
        example_inputs=_resnet_example(),
        loss_fn=zoo.classify_loss,
        plan=plan,
        global_batch=B,
        **kw,
    )


def test_micro_batches_under_sync_batchnorm_are_refused_naming_both_fixes():
    with pytest.raises(PlanError) as err:
        _compile_resnet(Plan.manual(dp=2, global_batch=B, micro_batch_size=2))
    text = str(err.value)
    assert "bn1" in text and "2 micro-batches" in text
    assert "micro_batch_size=4" in text and "batchnorm='local'" in text
    with pytest.raises(PlanError, match="micro_batch_size=8"):
        _compile_resnet(Plan.manual(pp=2, global_batch=B))  # pp's default: 2 micro-batches


def test_local_batchnorm_warns_that_the_maths_changes(caplog):
    with caplog.at_level(logging.WARNING, logger="autopar"):
        module = _compile_resnet(Plan.manual(dp=2, global_batch=B, micro_batch_size=2), batchnorm="local")
    assert module.batchnorm == "local"
    warned = [r.getMessage() for r in caplog.records if "batchnorm='local'" in r.getMessage()]
    assert warned and "layer1.0.bn1" in warned[0] and "statistics of 2 samples" in warned[0]
    with pytest.raises(PlanError, match="batchnorm='nope'"):
        _compile_resnet(Plan.manual(dp=2, global_batch=B), batchnorm="nope")


def test_eval_mode_batchnorm_needs_nothing():
    # Inference uses the running statistics: micro-batches are fine, nothing is said.
    module = autopar.compile(
        zoo.build("resnet"),
        2,
        example_inputs=_resnet_example()[:1],
        plan=Plan.manual(dp=2, global_batch=B, micro_batch_size=2),
        global_batch=B,
        mode="inference",
    )
    assert module.batchnorm == "sync"


def test_tracing_leaves_the_models_buffers_alone():
    # Shape propagation runs BatchNorm in train mode; the running statistics and the batch
    # counter must not move (the first step would start from a state one device never had).
    model = zoo.build("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autopar.trace(model, _resnet_example(), loss_fn=zoo.classify_loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_planner_keeps_one_micro_batch_per_replica_for_batch_statistics():
    spec = space.SpaceSpec(
        num_devices=4, devices_per_node=4, num_layers=4, heads=None, kv_heads=None, global_batch=256,
        one_micro_batch=True,
    )  # fmt: skip
    assert {mbs for mbs, _, _ in space.pipelines(spec, dp=2, pp=2)} == {128}  # above the 64 cap
    graph = autopar.trace(zoo.build("resnet"), _resnet_example(), loss_fn=zoo.classify_loss)
    assert any(n.meta.get("batch_statistics") for n in graph.nodes)


def test_attention_with_dropout_is_sdpa_without_it():
    # The explicit form the compiler and the reference share is SDPA's maths (p=0: no mask).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask[..., 0] = True
    ids = torch.arange(2)
    for kw in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask.float()}, {"scale": 0.3}):
        expected = F.scaled_dot_product_attention(q, k, v, **kw)
        got = rng.attention(q, k, v, ids, p=0.0, site=1, **kw)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sdpa_dropout_rewrite_is_announced(caplog):
    """SDPA's in-kernel dropout cannot draw one device's masks: compile replaces it with explicit
    ops and says so (naming where), since the scores are then materialised."""
    case = gpt_case(dropout=0.1, fused_attention=True)
    batch = case.make_batches(1)[0]
    with caplog.at_level(logging.WARNING, logger="autopar"):
        autopar.compile(
            case.build(),
            2,
            example_inputs=batch,
            loss_fn=case.loss_fn,
            plan=Plan.manual(dp=2, global_batch=B),
            global_batch=B,
        )
    warned = [r.getMessage() for r in caplog.records if "scaled_dot_product_attention" in r.getMessage()]
    assert warned and "layers.0" in warned[0] and "materialised" in warned[0]

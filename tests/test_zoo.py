"""Soundness beyond decoder transformers: every zoo model under every plan equals one device.

The zoo (:mod:`autopar.testing.zoo`): a ResNet with BatchNorm, a ViT, HF T5 and BART called with
``labels=`` (decoder inputs built by in-place writes), an LSTM language model, a plain MLP of
unequal widths, an ``nn.Sequential`` CNN, HF GPT-2 with tied embeddings and dropout on, and a model
returning a dict with the loss computed outside. Each runs 3 AdamW steps under dp=2, tp=2, pp=2,
dp=2 x pp=2 (not the HF models: they trace slowly) and dp=2 x tp=2 on real gloo processes; losses,
full gradients and updated parameters (buffers included) must equal the single-device run (fp32,
rtol 1e-5).
"""

from __future__ import annotations

import pytest

from autopar.testing import zoo
from autopar.testing.dist import run_ranks
from autopar.testing.equivalence import assert_equivalent, reference, run_plans

pytest.importorskip("transformers")

_REFERENCES: dict = {}


def _reference(name: str):
    if name not in _REFERENCES:
        _REFERENCES[name] = reference(zoo.case(name))
    return _REFERENCES[name]


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n in zoo.CASES for k in zoo.plans_for(n)])
def test_zoo_model_equals_one_device(name: str, kind: str) -> None:
    case = zoo.case(name)
    plan = zoo.plan(name, kind, case.global_batch)
    trajectories = run_ranks(run_plans, plan.world_size, args=(case, [plan]), timeout_s=60)
    assert_equivalent(_reference(name), trajectories[0][0], f"{name} under {plan.summary()}")
    for rank in range(1, plan.world_size):
        assert trajectories[rank][0].losses == trajectories[0][0].losses, f"rank {rank} reports other losses"

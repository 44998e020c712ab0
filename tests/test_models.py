"""Model zoo: presets, ``gpt:`` shape strings, ``file.py:factory`` and their errors.

Oracles: the parameter counts published for each preset (Megatron-LM SC'21 Table 1, GPT-3 and
Llama 3 papers) and the built model itself (closed-form count == ``sum(p.numel())``).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from autopar.core.errors import ModelSpecError
from autopar.models import PRESETS, BuiltModel, GPTConfig, build_model, count_params, list_models

REQUIRED = [
    "gpt3-175b",
    "gpt3-1.3b",
    "gpt3-2.7b",
    "gpt3-6.7b",
    "gpt3-13b",
    "llama3-8b",
    "llama3-70b",
    "llama3-405b",
    "gpt2-small",
    "tiny",
    "megatron-1.7b",
    "megatron-3.6b",
    "megatron-7.5b",
    "megatron-18.4b",
    "megatron-39.1b",
    "megatron-76.1b",
    "megatron-145.6b",
    "megatron-310.1b",
    "megatron-529.6b",
    "megatron-1t",
]


def test_list_models_has_every_required_preset_and_is_json():
    models = list_models()
    assert set(REQUIRED) <= set(models)
    json.dumps(models)
    assert models["gpt3-175b"]["hidden"] == 12288 and models["gpt3-175b"]["layers"] == 96


# Megatron's Table 1 sizes are rounded to 0.1B: 1.65B prints as 1.7.
MEGATRON_TABLE1_B = {
    "megatron-1.7b": 1.7,
    "megatron-3.6b": 3.6,
    "megatron-7.5b": 7.5,
    "megatron-18.4b": 18.4,
    "megatron-39.1b": 39.1,
    "megatron-76.1b": 76.1,
    "megatron-145.6b": 145.6,
    "megatron-310.1b": 310.1,
    "megatron-529.6b": 529.6,
    "megatron-1t": 1008.0,
}


@pytest.mark.parametrize("name", sorted(MEGATRON_TABLE1_B))
def test_megatron_presets_match_table_1(name):
    count_b = count_params(GPTConfig(**PRESETS[name].config)) / 1e9
    assert abs(count_b - MEGATRON_TABLE1_B[name]) <= 0.05 + 1e-3 * MEGATRON_TABLE1_B[name]


@pytest.mark.parametrize(
    "name, published_b, rel",
    [
        ("gpt3-175b", 174.6, 0.005),  # Megatron SC'21 Table 2
        ("gpt3-6.7b", 6.7, 0.01),
        ("gpt3-2.7b", 2.7, 0.02),  # 2.65B, printed as 2.7B
        ("gpt3-1.3b", 1.3, 0.015),
        ("gpt3-13b", 13.0, 0.02),  # the paper's d_model 5140 vs our 5120 (a multiple of 40 heads)
        ("llama3-8b", 8.03, 0.005),  # Hugging Face model cards
        ("llama3-70b", 70.6, 0.005),
        ("llama3-405b", 405.9, 0.005),
        ("gpt2-small", 0.1244, 0.005),
    ],
)
def test_preset_parameter_counts_match_the_published_sizes(name, published_b, rel):
    assert count_params(GPTConfig(**PRESETS[name].config)) / 1e9 == pytest.approx(published_b, rel=rel)


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "llama3-8b", "megatron-1.7b"])
def test_closed_form_count_equals_the_built_model(name):
    built = build_model(name)
    unique = {id(p): p for p in built.model.parameters()}
    assert sum(p.numel() for p in unique.values()) == count_params(built.config)
    assert all(p.device.type == "meta" for p in unique.values())


def test_gpt_spec_string_builds_that_shape():
    built = build_model(
        "gpt:hidden=64,layers=3,heads=4,vocab=100,seq=12,ffn=96,kv_heads=2,norm=rmsnorm,act=swiglu",
        batch=5,
    )
    cfg = built.config
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.ffn, cfg.norm, cfg.act) == (
        64,
        3,
        4,
        2,
        96,
        "rmsnorm",
        "swiglu",
    )
    assert len(built.model.layers) == 3
    assert built.model.layers[0].attn.k_proj.out_features == 2 * 16
    tokens, targets = built.example_inputs
    assert tokens.shape == targets.shape == (5, 12) and tokens.device.type == "meta"
    assert built.make_inputs(7)[0].shape == (7, 12)


def test_presets_accept_overrides_and_aliases():
    built = build_model("gpt3-175b:layers=2,dropout=0")
    assert built.config.layers == 2 and built.config.hidden == 12288 and built.config.dropout == 0.0
    assert build_model("gpt:175b", dropout=0.0).config.layers == 96
    assert build_model("tiny", fused_attention=True).config.fused_attention


def test_dtype_defaults_bf16_on_meta_fp32_on_cpu():
    assert next(build_model("tiny").model.parameters()).dtype == torch.bfloat16
    assert next(build_model("tiny", device="cpu").model.parameters()).dtype == torch.float32
    assert next(build_model("tiny", dtype="fp16").model.parameters()).dtype == torch.float16


def test_cpu_model_unpacks_and_trains():
    model, example_inputs, loss_fn = build_model("tiny", device="cpu", batch=2)
    tokens, targets = example_inputs
    loss = loss_fn(model(tokens), targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(
        torch.log(torch.tensor(128.0)).item(), rel=0.1
    )


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("gpt:hidden=64,layer=2,heads=4,vocab=10,seq=8", "unknown key 'layer'"),
        ("gpt:hidden=64,layers=2", "missing heads, vocab, seq"),
        ("gpt:hidden=abc,layers=2,heads=4,vocab=10,seq=8", "hidden='abc' is not a number"),
        ("gpt:hidden=64,layers=2,heads=5,vocab=10,seq=8", "not divisible by heads=5"),
        ("gpt:hidden=64,layers=2,heads=4,vocab=10,seq=8,norm=batch", "norm='batch'"),
        ("gpt3-175b:layerz=2", "unknown key 'layerz'"),
        ("gpt:42b", "unknown GPT size '42b'"),
    ],
)
def test_bad_gpt_specs_name_the_problem(spec, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        build_model(spec)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ModelSpecError) as info:
        build_model("gpt4-huge")
    assert "gpt4-huge" in str(info.value)
    for name in ("gpt3-175b", "llama3-70b", "megatron-1t", "tiny"):
        assert name in str(info.value)


def test_bad_build_arguments():
    with pytest.raises(ModelSpecError, match="batch=0"):
        build_model("tiny", batch=0)
    with pytest.raises(ModelSpecError, match="seq=99"):
        build_model("tiny", seq=99)
    with pytest.raises(ModelSpecError, match="dtype='int3'"):
        build_model("tiny", dtype="int3")
    with pytest.raises(ModelSpecError, match="unknown override"):
        build_model("tiny", depth=3)


# -- file.py:factory -----------------------------------------------------------------------------

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

    def just_model():
        return Tiny()

    def with_inputs(device="cpu", batch=2):
        x = torch.randn(batch, 4, device=device)
        y = torch.randint(0, 3, (batch,), device=device)
        return Tiny().to(device), (x, y), nn.functional.cross_entropy

    def broken():
        raise RuntimeError("boom")

    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def factory_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


def test_factory_returning_a_model(factory_file):
    built = build_model(f"{factory_file}:just_model")
    assert isinstance(built, BuiltModel) and type(built.model).__name__ == "Tiny"
    assert built.example_inputs is None and built.loss_fn is None


def test_factory_returning_model_inputs_and_loss_traces(factory_file):
    import autopar

    built = build_model(f"{factory_file}:with_inputs", device="cpu", batch=3)
    assert built.example_inputs[0].shape == (3, 4)
    assert built.make_inputs(5)[0].shape == (5, 4)
    graph = autopar.trace(built.model, built.example_inputs, loss_fn=built.loss_fn)
    assert [n.op_kind for n in graph.nodes if n.op_kind in ("linear", "loss")] == ["linear", "loss"]


def test_factory_errors_name_the_path_and_the_factory(factory_file, tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ModelSpecError, match="nope.py' does not exist"):
        build_model(f"{missing}:build")
    with pytest.raises(ModelSpecError, match="has no callable 'build'.*just_model"):
        build_model(f"{factory_file}:build")
    with pytest.raises(ModelSpecError, match="has no callable 'NOT_CALLABLE'"):
        build_model(f"{factory_file}:NOT_CALLABLE")
    with pytest.raises(ModelSpecError, match="raised RuntimeError: boom"):
        build_model(f"{factory_file}:broken")
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    with pytest.raises(ModelSpecError, match="failed to import: SyntaxError"):
        build_model(f"{bad}:build")

"""HuggingFace GPT-2 and Llama (small configs, random init, nothing downloaded) trace with their loss.

Symbolic tracing cannot handle them (data-dependent masking utilities), so ``tracer="auto"`` falls
back to ``torch.export``. Oracle: the eager loss of the same model on the same real CPU tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import autopar  # noqa: E402

transformers = pytest.importorskip("transformers")


def lm_loss(out, labels):
    """Next-token cross entropy on a HuggingFace ``CausalLMOutput``."""
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _ids(vocab: int, batch: int = 2, seq: int = 16):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _gpt2():
    cfg = transformers.GPT2Config(
        n_embd=64,
        n_layer=3,
        n_head=4,
        vocab_size=128,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg), "transformer.h.*"


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg), "model.layers.*"


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hf_model_traces_with_its_loss(make):
    torch.manual_seed(0)
    model, block_key = make()
    ids = _ids(model.config.vocab_size)
    graph = autopar.trace(model, (ids, ids), loss_fn=lm_loss)
    assert graph.tracer == "export"
    torch.testing.assert_close(graph.gm(ids, ids), lm_loss(model(ids), ids))
    # Identical decoder layers are one block type; parameters (tied embeddings once) all accounted.
    assert {k: v.count for k, v in graph.block_types.items()} == {block_key: 3}
    unique = {id(p): p for p in model.parameters()}
    assert graph.num_params == sum(p.numel() for p in unique.values())
    assert sum(n.param_bytes for n in graph.nodes) == graph.param_bytes
    kinds = {n.op_kind for n in graph.nodes}
    assert {"embedding", "linear", "loss"} <= kinds
    assert "attention" in kinds or {"matmul", "softmax"} <= kinds
    assert "norm" in kinds or "reduction" in kinds  # Llama's RMSNorm is decomposed into pow/mean/rsqrt
    # Per-layer Linear FLOPs against the closed form for each architecture (T = b*s tokens).
    linear_flops = sum(n.flops_fwd for n in graph.nodes if n.block == 1 and n.op_kind == "linear")
    assert linear_flops == expected_linear_flops(model.config, tokens=ids.numel())
    layer = graph.totals_by_block()[1]
    assert layer["flops_bwd"] == pytest.approx(2 * layer["flops_fwd"], rel=0.05)
    assert graph.saved_bytes > 0
    assert any("modeling_" in n.source for n in graph.nodes), "source lines point into transformers"


def expected_linear_flops(cfg, tokens: int) -> int:
    if cfg.model_type == "gpt2":  # Conv1D (addmm) with biases: qkv 3h, proj h, fc 4h, proj h
        h = cfg.n_embd
        return 2 * tokens * 12 * h * h + tokens * (3 * h + h + 4 * h + h)
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return 2 * tokens * (2 * h * h + 2 * h * kv + 3 * h * ffn)  # q, o; k, v; gate, up, down


def test_hf_model_returning_its_own_loss():
    """loss_fn=None: labels go to the model and its output's ``loss`` is the graph output."""
    torch.manual_seed(0)
    model, _ = _gpt2()

    class WithLabels(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, labels):
            return self.lm(input_ids=input_ids, labels=labels)

    ids = _ids(model.config.vocab_size)
    wrapped = WithLabels(model)
    graph = autopar.trace(wrapped, (ids, ids))
    torch.testing.assert_close(graph.gm(ids, ids), wrapped(ids, ids).loss)
    assert graph.inputs == ["input_ids", "labels"]

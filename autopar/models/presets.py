"""Named model shapes: ``autopar models`` lists them; ``build_model("gpt3-175b")`` builds one.

Every shape cites where it comes from. Vocabularies of the GPT-3 and Megatron presets are 51200
(GPT-2's 50257 padded to a multiple of 1024, as Megatron-LM does, and as the issue's Megatron
formulas assume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    description: str
    source: str
    config: dict = field(default_factory=dict)
    """Keyword arguments of :class:`~autopar.models.gpt.GPTConfig`."""


_GPT3 = "Brown et al. 2020, 'Language Models are Few-Shot Learners', Table 2.1"
_MEGATRON = (
    "Narayanan et al. SC'21, 'Efficient Large-Scale Language Model Training on GPU Clusters "
    "Using Megatron-LM', Table 1 (s=2048, V=51200)"
)
_LLAMA3 = "Llama Team 2024, 'The Llama 3 Herd of Models', Table 3; Hugging Face config.json (vocab 128256)"

_GPT_STYLE = {"vocab": 51200, "seq": 2048, "dropout": 0.1}

PRESETS: dict[str, Preset] = {}


def _add(name: str, description: str, source: str, **config: Any) -> None:
    PRESETS[name] = Preset(name=name, description=description, source=source, config=config)


# GPT-3 (Table 2.1). 1.3B lists 24 heads of 128 (3072 != d_model 2048) and 13B d_model 5140 (not a
# multiple of 40 heads): we use 16 heads and d_model 5120, as Megatron-LM and most reproductions do.
_add("gpt3-1.3b", "GPT-3 XL 1.3B", _GPT3, hidden=2048, layers=24, heads=16, **_GPT_STYLE)
_add("gpt3-2.7b", "GPT-3 2.7B", _GPT3, hidden=2560, layers=32, heads=32, **_GPT_STYLE)
_add("gpt3-6.7b", "GPT-3 6.7B", _GPT3, hidden=4096, layers=32, heads=32, **_GPT_STYLE)
_add("gpt3-13b", "GPT-3 13B", _GPT3, hidden=5120, layers=40, heads=40, **_GPT_STYLE)
_add("gpt3-175b", "GPT-3 175B", _GPT3, hidden=12288, layers=96, heads=96, **_GPT_STYLE)

# Megatron-LM SC'21 Table 1 (params_b, heads, hidden, layers), the weak-scaling GPT family.
for _params, _heads, _hidden, _layers, _label in (
    (1.7, 24, 2304, 24, "1.7b"),
    (3.6, 32, 3072, 30, "3.6b"),
    (7.5, 32, 4096, 36, "7.5b"),
    (18.4, 48, 6144, 40, "18.4b"),
    (39.1, 64, 8192, 48, "39.1b"),
    (76.1, 80, 10240, 60, "76.1b"),
    (145.6, 96, 12288, 80, "145.6b"),
    (310.1, 128, 16384, 96, "310.1b"),
    (529.6, 128, 20480, 105, "529.6b"),
    (1008.0, 160, 25600, 128, "1t"),
):
    _add(
        f"megatron-{_label}",
        f"Megatron-LM GPT {_params}B (SC'21 Table 1)",
        _MEGATRON,
        hidden=_hidden,
        layers=_layers,
        heads=_heads,
        **_GPT_STYLE,
    )

_LLAMA_STYLE = {
    "vocab": 128256,
    "seq": 8192,
    "kv_heads": 8,
    "norm": "rmsnorm",
    "act": "swiglu",
    "bias": False,
    "tie_embeddings": False,
    "fused_attention": True,
}
_add("llama3-8b", "Llama 3 8B", _LLAMA3, hidden=4096, layers=32, heads=32, ffn=14336, **_LLAMA_STYLE)
_add("llama3-70b", "Llama 3 70B", _LLAMA3, hidden=8192, layers=80, heads=64, ffn=28672, **_LLAMA_STYLE)
_add("llama3-405b", "Llama 3 405B", _LLAMA3, hidden=16384, layers=126, heads=128, ffn=53248, **_LLAMA_STYLE)

# Mixture of experts. Mixtral 8x7B: Jiang et al. 2024, 'Mixtral of Experts' (arXiv:2401.04088),
# Table 1 (dim 4096, 32 layers, 32 heads, 8 kv heads, hidden_dim 14336, vocab 32000, 8 experts, top-2);
# its context is 32768 tokens, the preset traces at 4096 (a common training length).
_MOE_STYLE = {k: v for k, v in _LLAMA_STYLE.items() if k not in ("vocab", "seq", "kv_heads")}
_MIXTRAL = "Jiang et al. 2024, 'Mixtral of Experts', arXiv:2401.04088, Table 1"
_add(
    "mixtral-8x7b", "Mixtral 8x7B (46.7B parameters, 12.9B active)", _MIXTRAL,
    hidden=4096, layers=32, heads=32, kv_heads=8, vocab=32000, seq=4096, ffn=14336,
    experts=8, top_k=2, **_MOE_STYLE,
)  # fmt: skip
# Mixtral 8x22B: Mistral AI, Hugging Face mistralai/Mixtral-8x22B-v0.1 config.json (hidden_size 6144,
# 56 layers, 48 heads, 8 kv heads, intermediate_size 16384, vocab 32768, 8 experts, top-2); the same
# shape as Megatron-MoE-ModelZoo's model_configs/benchmarking/Mixtral-8x22B.yaml. Traced at 4096.
_MIXTRAL_8X22B = "Hugging Face mistralai/Mixtral-8x22B-v0.1 config.json (Mistral AI 2024)"
_add(
    "mixtral-8x22b", "Mixtral 8x22B (141B parameters, 39B active)", _MIXTRAL_8X22B,
    hidden=6144, layers=56, heads=48, kv_heads=8, vocab=32768, seq=4096, ffn=16384,
    experts=8, top_k=2, **_MOE_STYLE,
)  # fmt: skip
# Qwen1.5-MoE-A2.7B, Hugging Face Qwen/Qwen1.5-MoE-A2.7B config.json: hidden_size 2048, 24 layers,
# 16 heads (16 kv), vocab 151936, 60 experts of moe_intermediate_size 1408, 4 per token, and a
# shared expert of 5632 = 4 x 1408 (4 shared experts here). The built-in layer renormalises the top-k
# weights and has no sigmoid gate on the shared expert (Qwen's norm_topk_prob=false and
# shared_expert_gate): the same shapes and costs, not the same function.
_QWEN_MOE = "Hugging Face Qwen/Qwen1.5-MoE-A2.7B config.json (Qwen team 2024)"
_add(
    "qwen-moe-a2.7b", "Qwen1.5-MoE-A2.7B-style: 60 experts, top-4, 4 shared experts", _QWEN_MOE,
    hidden=2048, layers=24, heads=16, kv_heads=16, vocab=151936, seq=4096, ffn=1408, experts=60, top_k=4,
    shared_experts=4, **_MOE_STYLE,
)  # fmt: skip

# Qwen3-30B-A3B (Qwen team 2025). Shape from Hugging Face configs of the Qwen3-MoE 30B-A3B architecture:
# hidden_size 2048, num_hidden_layers 48, num_attention_heads 32, num_key_value_heads 4, head_dim 128
# (so q projects 2048 -> 4096), vocab_size 151936, num_experts 128, num_experts_per_tok 8,
# moe_intermediate_size 768, no shared expert (shared_expert_intermediate_size 0), norm_topk_prob true
# (the built-in layer's renormalised top-k), rms_norm_eps 1e-6, tie_word_embeddings false,
# use_qk_norm true, silu (SwiGLU) experts, no attention bias, mlp_only_layers empty: read in
# https://huggingface.co/RTP-LLM/Qwen3-Coder-30B-A3B-Instruct-RTPurbo/blob/main/config.json (a copy of
# Qwen3-Coder-30B-A3B, the same architecture) and in
# https://gitcode.com/Ascend/MindSpeed-RL/blob/master/configs/model/qwen3_30b_a3b.yaml (num_layers 48,
# hidden_size 2048, num_attention_heads 32, num_query_groups 4, kv_channels 128, qk_layernorm,
# num_experts 128, moe_router_topk 8, moe_ffn_hidden_size 768, padded_vocab_size 151936,
# untie_embeddings_and_output_weights, moe_aux_loss_coeff 0.001). Qwen/Qwen3-30B-A3B's own config.json
# was not in the reference store, so these numbers are not read from it. Totals: 30.5B parameters,
# 3.3B activated (the model card, as quoted by apxml.com/models/qwen3-30b-a3b). count_params gives
# 30,532,122,624 (30.5B); less the 120 routed experts a token does not use in each layer,
# 3,353,032,704 are active per token (3.35B counting the whole router and both embeddings; the card
# says 3.3B and does not say what it counts).
# Every layer is MoE (mlp_only_layers empty), so ffn=768 is the experts' width, as in qwen-moe-a2.7b.
# Not modelled (same shapes and costs, not the same function): the rotary base (10000 here; 1e6 in
# MindSpeed-RL's rotary_base) and Qwen3's global-batch load-balancing loss (per sequence here).
# Its context is 40960 tokens (MindSpeed-RL's max_position_embeddings); the preset traces at 4096.
_QWEN3_MOE = (
    "Qwen3-30B-A3B (Qwen team 2025): Hugging Face Qwen3-MoE 30B-A3B config.json "
    "(via RTP-LLM/Qwen3-Coder-30B-A3B-Instruct-RTPurbo) and MindSpeed-RL configs/model/qwen3_30b_a3b.yaml"
)
_add(
    "qwen3-moe-30b-a3b", "Qwen3-30B-A3B: head_dim 128, QK-norm, 128 experts top-8 (30.5B, 3.3B active)",
    _QWEN3_MOE,
    hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, qk_norm=True, vocab=151936, seq=4096,
    ffn=768, experts=128, top_k=8, aux_coef=0.001, **_MOE_STYLE,
)  # fmt: skip

_add(
    "gpt2-small",
    "GPT-2 small 124M",
    "Radford et al. 2019, 'Language Models are Unsupervised Multitask Learners', Table 2; HF gpt2 config",
    hidden=768,
    layers=12,
    heads=12,
    vocab=50257,
    seq=1024,
    dropout=0.1,
)
_add(
    "tiny",
    "a 2-layer GPT for tests and demos",
    "autopar",
    hidden=64,
    layers=2,
    heads=4,
    vocab=128,
    seq=16,
)

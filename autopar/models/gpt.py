"""The built-in GPT family: one decoder-only transformer, configured by shape.

Written so that ``torch.fx.symbolic_trace`` sees every op (no data-dependent control flow) and so
that the per-op tensor-parallel rules find the Megatron structure by themselves: attention is
``qkv projections -> view into heads -> scores -> softmax -> dropout -> @v -> merge heads -> proj``,
the MLP is ``fc1 (-> gate) -> act -> fc2``. Head counts appear as integer view arguments, which is
exactly what the lowering localises when heads are split across tensor-parallel ranks.

GPT-3 style: learned position embeddings, LayerNorm, GELU, FFN = 4h (Brown et al. 2020).
Llama style: RMSNorm, SwiGLU, rotary position embeddings, grouped-query attention (kv_heads).
Qwen3 style: a head width ``head_dim`` apart from ``hidden // heads`` and RMSNorm on each q/k head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.moe import MoE, MoEConfig

ACTIVATIONS = ("gelu", "swiglu", "gelu_tanh")
"""The MLP activations the built-in GPT offers (``GPTConfig.act``)."""


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a decoder-only transformer."""

    hidden: int
    """Model width h."""
    layers: int
    """Number of transformer layers l."""
    heads: int
    """Attention heads a; ``hidden`` must be a multiple unless ``head_dim`` is given."""
    vocab: int
    """Vocabulary size V."""
    seq: int
    """Maximum sequence length s (sizes the position table / rotary cache)."""
    ffn: int | None = None
    """MLP inner width; default 4h for GELU, the Llama rule (8h/3 rounded up to 256) for SwiGLU."""
    kv_heads: int | None = None
    """Key/value heads for grouped-query attention; default = heads."""
    head_dim: int | None = None
    """Width d of one attention head; None: ``hidden // heads`` (GPT-3, Llama). Given, the head
    width is decoupled from the model width: q and o project ``hidden <-> heads * d``, k and v
    ``hidden -> kv_heads * d`` (Qwen3: d=128 with hidden 2048 and 32 heads, so q is 2048 -> 4096)."""
    qk_norm: bool = False
    """RMSNorm over the head width on every head of q and k, each with a learned weight of size
    ``head_dim`` shared by its heads, applied after the projections and before the rotary embedding
    (Qwen3's ``q_norm``/``k_norm``). Always RMSNorm, whatever ``norm`` says."""
    norm: str = "layernorm"
    """``layernorm`` or ``rmsnorm``."""
    act: str = "gelu"
    """``gelu``, ``swiglu``, or ``gelu_tanh``: GELU's tanh approximation written as arithmetic, the
    form of GPT-2's code, Hugging Face's ``NewGELUActivation`` and Megatron-LM 2019's ``gelu_impl``
    (``0.5 x (1 + tanh(0.79788 x (1 + 0.044715 x^2)))``): traced as nine elementwise ops, which an
    eager run launches as nine kernels."""
    dropout: float = 0.0
    """Dropout probability on attention probabilities and residual branches (Megatron's places)."""
    fused_attention: bool | None = None
    """Use ``scaled_dot_product_attention`` (scores not materialised; costed as a flash kernel), what
    users run today; ``False`` gives the explicit softmax form (2021-era comparisons, e.g. SC'21).
    None (the default): fused unless ``dropout > 0``. SDPA's attention dropout is drawn inside the
    kernel from the device generator, which autopar cannot reproduce across tensor-parallel shards
    or pipeline stages, so a model with dropout gets the explicit form, whose dropout autopar draws
    from counters (docs/compiler.md); pass ``True`` to force SDPA (then autopar warns that its
    dropout stream differs from one device's)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    bias: bool = True
    """Biases in Linear layers (GPT-3: yes, Llama: no)."""
    experts: int = 0
    """Routed experts E of a mixture-of-experts MLP in every layer (0: the dense MLP)."""
    top_k: int = 2
    """Experts per token k (MoE only)."""
    shared_experts: int = 0
    """Always-on shared experts S (MoE only; DeepSeek-MoE / Qwen-MoE)."""
    capacity_factor: float | None = None
    """Expert capacity factor C (MoE only); None: no token dropping."""
    moe_ffn: int | None = None
    """Inner width of each expert; default ``ffn_resolved``."""
    aux_coef: float = 0.01
    """Weight of the load-balancing loss in the training loss (Switch Transformer's alpha = 1e-2)."""

    @property
    def attention_fused(self) -> bool:
        """Whether attention runs as SDPA (``fused_attention``, resolved; see there)."""
        return self.dropout == 0 if self.fused_attention is None else self.fused_attention

    def __post_init__(self) -> None:
        from autopar.core.errors import ModelSpecError

        for name in ("hidden", "layers", "heads", "vocab", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelSpecError(f"GPT {name}={value!r}: must be a positive integer")
        self._check_head_dim()
        if self.heads % self.kv_heads_resolved:
            raise ModelSpecError(
                f"GPT heads={self.heads} is not a multiple of kv_heads={self.kv_heads}; "
                "grouped-query attention needs heads = kv_heads * group"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ModelSpecError(f"GPT norm={self.norm!r}: choose layernorm or rmsnorm")
        if self.act not in ACTIVATIONS:
            raise ModelSpecError(f"GPT act={self.act!r}: choose one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelSpecError(f"GPT dropout={self.dropout}: must be in [0, 1)")
        if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 0:
            raise ModelSpecError(f"GPT experts={self.experts!r}: must be an integer >= 0 (0: dense MLP)")
        if self.experts:
            self.moe_config()  # validates top_k, shared_experts, capacity_factor, moe_ffn

    def _check_head_dim(self) -> None:
        from autopar.core.errors import ModelSpecError

        hd = self.head_dim
        if hd is not None and (isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0):
            raise ModelSpecError(
                f"GPT head_dim={hd!r}: must be a positive integer, or None for hidden // heads"
            )
        if hd is None and self.hidden % self.heads:
            raise ModelSpecError(
                f"GPT hidden={self.hidden} is not divisible by heads={self.heads}; "
                "choose heads that divide the hidden size, or give head_dim explicitly"
            )
        if self.rotary and self.head_dim_resolved % 2:
            raise ModelSpecError(
                f"GPT head width {self.head_dim_resolved} is odd; rotary embeddings (norm=rmsnorm) "
                "rotate pairs of features: choose an even head_dim"
            )
        if not isinstance(self.qk_norm, bool):
            raise ModelSpecError(f"GPT qk_norm={self.qk_norm!r}: must be True or False")

    def moe_config(self) -> MoEConfig:
        """The MoE layer's shape (only meaningful when ``experts > 0``)."""
        return MoEConfig(
            hidden=self.hidden,
            ffn=self.moe_ffn or self.ffn_resolved,
            experts=self.experts,
            top_k=self.top_k,
            shared_experts=self.shared_experts,
            capacity_factor=self.capacity_factor,
        )

    @property
    def kv_heads_resolved(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim_resolved(self) -> int:
        """Width of one attention head: ``head_dim``, or ``hidden // heads`` when None."""
        return self.head_dim or self.hidden // self.heads

    @property
    def ffn_resolved(self) -> int:
        if self.ffn:
            return self.ffn
        if self.act == "swiglu":
            return 256 * math.ceil(8 * self.hidden / 3 / 256)
        return 4 * self.hidden

    @property
    def rotary(self) -> bool:
        """Llama-style models (RMSNorm) use rotary embeddings; GPT-style learned positions."""
        return self.norm == "rmsnorm"

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(cfg: GPTConfig, device: torch.device | str | None) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden, device=device)
    return nn.LayerNorm(cfg.hidden, device=device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        h, hd = cfg.hidden, cfg.head_dim_resolved
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads_resolved, hd
        self.q_proj = nn.Linear(h, cfg.heads * hd, bias=cfg.bias, device=device)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=cfg.bias, device=device)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=cfg.bias, device=device)
        self.o_proj = nn.Linear(cfg.heads * hd, h, bias=cfg.bias, device=device)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(hd, device=device)
            self.k_norm = RMSNorm(hd, device=device)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.dropout_p = cfg.dropout
        self.fused = cfg.attention_fused
        self.rotary = cfg.rotary
        self.scale = 1.0 / math.sqrt(hd)
        if self.rotary:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Indexing, not unpacking: fx unpacks a traced shape by disassembling the caller's bytecode
        # (5 ms a layer, 0.5 s for GPT-3 175B).
        b, t = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        if self.qk_norm:  # per head, over its width: [b, t, heads, d] normalised along d
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            # Computed from t rather than sliced from a cached table: slicing a buffer by a traced
            # length is not expressible under symbolic tracing.
            freqs = torch.outer(torch.arange(t, device=x.device).float(), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().type_as(q), emb.sin().type_as(q)  # keep fp16/bf16 graphs in dtype
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:
            group = self.heads // self.kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if self.fused:
            p = self.dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            causal = torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
            probs = self.attn_dropout(torch.softmax(scores, dim=-1))
            y = probs @ v
        y = y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.o_proj(y)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation as GPT-2-era code writes it (sqrt(2/pi) = 0.7978845608028654)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        h, f = cfg.hidden, cfg.ffn_resolved
        self.swiglu = cfg.act == "swiglu"
        self.act = gelu_tanh if cfg.act == "gelu_tanh" else F.gelu
        self.fc1 = nn.Linear(h, f, bias=cfg.bias, device=device)
        if self.swiglu:
            self.gate = nn.Linear(h, f, bias=cfg.bias, device=device)
        self.fc2 = nn.Linear(f, h, bias=cfg.bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One transformer layer (pre-norm): the repeated block the planner solves once. With
    ``experts > 0`` the MLP is a :class:`~autopar.models.moe.MoE` and the block returns
    ``(x, aux)``, the layer's load-balancing loss per sequence."""

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.ln_1 = _norm(cfg, device)
        self.attn = Attention(cfg, device)
        self.drop_1 = nn.Dropout(cfg.dropout)
        self.ln_2 = _norm(cfg, device)
        self.moe = cfg.experts > 0
        self.mlp = MoE(cfg.moe_config(), device) if self.moe else MLP(cfg, device)
        self.drop_2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop_1(self.attn(self.ln_1(x)))
        if self.moe:
            y, aux = self.mlp(self.ln_2(x))
            return x + self.drop_2(y), aux
        return x + self.drop_2(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Decoder-only transformer. ``forward(tokens)`` returns logits ``[b, t, vocab]``.

    The loss is separate (``gpt_loss``) so that the model is an ordinary ``nn.Module`` and
    ``autopar.trace`` / ``autopar.compile`` get it through their ``loss_fn`` argument.

    Mixture of experts (``experts > 0``), in training mode: ``forward`` returns ``(logits, aux)``
    with ``aux = aux_coef * sum over layers`` of each sequence's load-balancing loss (``[b]``), and
    ``gpt_loss`` adds ``aux.mean()``; the aux loss crosses pipeline stages as an ordinary activation.
    In eval mode it returns the logits only.
    """

    def __init__(self, cfg: GPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden, device=device)
        if not cfg.rotary:
            self.pos_emb = nn.Embedding(cfg.seq, cfg.hidden, device=device)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, device) for _ in range(cfg.layers))
        self.ln_f = _norm(cfg, device)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if device is None or torch.device(device).type != "meta":
            self.apply(_init_weights)

    @property
    def cfg(self) -> GPTConfig:
        """Alias of ``config``."""
        return self.config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens)
        if not self.config.rotary:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.pos_emb(positions)
        x = self.emb_drop(x)
        aux = None
        for layer in self.layers:
            if self.config.experts:
                x, layer_aux = layer(x)
                aux = layer_aux if aux is None else aux + layer_aux
            else:
                x = layer(x)
        logits = self.lm_head(self.ln_f(x))
        if aux is not None and self.training:
            return logits, aux * self.config.aux_coef
        return logits


def gpt_loss(logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all positions (plus the mean of a mixture-of-experts
    model's weighted load-balancing loss, when ``logits`` is ``(logits, aux)``)."""
    aux = None
    if isinstance(logits, tuple):
        logits, aux = logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss if aux is None else loss + aux.mean()


def _init_weights(module: nn.Module) -> None:
    # GPT-2's scheme: N(0, 0.02) weights, zero biases.
    if isinstance(module, MoE):
        module.reset_parameters()
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)

"""A mixture-of-experts layer (router, top-k gating, SwiGLU experts, optional shared experts).

``MoE(cfg)(x)`` maps ``x: [b, t, h]`` to ``(y: [b, t, h], aux: [b])``:

* router: ``logits = x @ W_r^T`` (Linear h -> E, no bias), ``p = softmax(logits)``; each token takes
  its ``k`` most probable experts and their probabilities renormalised over the k (Mixtral's gating);
* experts: SwiGLU MLPs ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` with weights stored stacked,
  ``w1, w3: [E, h, f]``, ``w2: [E, f, h]``, so expert parallelism shards them along dim 0;
* shared experts (DeepSeek-MoE / Qwen-MoE): ``S`` always-on SwiGLU experts of width ``f``, kept as
  one SwiGLU of width ``S * f`` (the same function) added to the routed output;
* ``aux``: the Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` of each sequence (``f_e``:
  the fraction of the sequence's ``t * k`` routing slots sent to expert ``e``, before any dropping;
  ``P_e``: the mean router probability of ``e`` over its tokens). Like GShard, the loss is
  computed per *group* of tokens; the group is one sequence, so the mean over sequences does not
  depend on how a batch is split over ranks or micro-batches;
* capacity: with ``capacity_factor=C`` each expert takes at most ``ceil(C * t * k / E)`` slots of a
  sequence; slots are taken in token order (token ``i``'s ``j``-th choice is slot ``i * k + j``) and
  the ones beyond capacity are dropped (they contribute zero; the residual carries the token).
  Capacity is per sequence too (GShard's per-group capacity), so dropping is the same whatever the
  split. ``C=None``: nothing is dropped.

The layer is one region of the traced graph: the tracer keeps it as a leaf module (op kind
``"moe"``), the lowering swaps in the expert-parallel version (:mod:`autopar.lower.expert`). Its
eager forward gathers each expert's tokens (data-dependent sizes); on meta/fake tensors (shape
propagation) it runs the same ops on a balanced split of the slots, the routing the cost model
assumes, so shapes and saved activations come out without data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Shape of one mixture-of-experts layer."""

    hidden: int
    """Model width h."""
    ffn: int
    """Inner width f of each expert (and of each shared expert)."""
    experts: int
    """Routed experts E."""
    top_k: int = 2
    """Experts per token k."""
    shared_experts: int = 0
    """Always-on shared experts S (0: none)."""
    capacity_factor: float | None = None
    """C: each expert takes at most ceil(C * t * k / E) slots per sequence; None: no dropping."""

    def __post_init__(self) -> None:
        from autopar.core.errors import ModelSpecError

        for name in ("hidden", "ffn", "experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelSpecError(f"MoE {name}={value!r}: must be a positive integer")
        if self.top_k > self.experts:
            raise ModelSpecError(
                f"MoE top_k={self.top_k} exceeds experts={self.experts}; each token picks k distinct "
                "experts: choose top_k <= experts"
            )
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise ModelSpecError(f"MoE shared_experts={self.shared_experts!r}: must be an integer >= 0")
        c = self.capacity_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
            raise ModelSpecError(
                f"MoE capacity_factor={c!r}: must be a positive number, or None for no dropping"
            )

    def capacity(self, tokens: int) -> int | None:
        """Slots an expert takes from a sequence of ``tokens`` tokens (None: unlimited)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.experts)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``(silu(x @ w1) * (x @ w3)) @ w2`` with weights ``[h, f], [h, f], [f, h]``."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def is_shape_only(x: torch.Tensor) -> bool:
    """Whether ``x`` has no data (meta or fake tensor): shape propagation, not a real run."""
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type == "meta" or is_fake(x)


def keep_mask(choices: torch.Tensor, experts: int, capacity: int | None) -> torch.Tensor | None:
    """``[b, t * k]`` bool: which routing slots fit their expert's capacity (slots taken in order
    within each sequence); None when nothing is dropped."""
    if capacity is None:
        return None
    one_hot = F.one_hot(choices, experts)  # [b, t*k, E]
    position = (one_hot.cumsum(1) * one_hot).sum(-1) - 1  # 0-based arrival order at its expert
    return position < capacity


def balance_loss(probs: torch.Tensor, choices: torch.Tensor, experts: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss per sequence, ``[b]``: ``E * sum_e f_e * P_e`` with
    ``probs: [b, t, E]`` and ``choices: [b, t * k]``."""
    fraction = F.one_hot(choices, experts).float().mean(1)  # [b, E], no gradient (counts)
    return experts * (fraction.to(probs.dtype) * probs.mean(1)).sum(-1)


class MoE(nn.Module):
    """The mixture-of-experts layer; see the module docstring. Returns ``(y, aux)``."""

    autopar_region = "moe"
    """Traced as one leaf region of op kind ``moe`` (:func:`autopar.tracing.opkinds.is_moe_region`)."""

    def __init__(self, cfg: MoEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = cfg
        h, f, e = cfg.hidden, cfg.ffn, cfg.experts
        self.router = nn.Linear(h, e, bias=False, device=device)
        self.w1 = nn.Parameter(torch.empty(e, h, f, device=device))
        self.w3 = nn.Parameter(torch.empty(e, h, f, device=device))
        self.w2 = nn.Parameter(torch.empty(e, f, h, device=device))
        if cfg.shared_experts:
            width = cfg.shared_experts * f
            self.shared_w1 = nn.Parameter(torch.empty(h, width, device=device))
            self.shared_w3 = nn.Parameter(torch.empty(h, width, device=device))
            self.shared_w2 = nn.Parameter(torch.empty(width, h, device=device))
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``x: [b, t, h]`` -> (gates ``[b*t, k]``, choices ``[b, t*k]``, keep mask or None, aux ``[b]``)."""
        b, t = x.shape[0], x.shape[1]
        cfg = self.config
        probs = torch.softmax(self.router(x), dim=-1)  # [b, t, E]
        top_p, top_i = probs.topk(cfg.top_k, dim=-1)
        gates = (top_p / top_p.sum(-1, keepdim=True)).reshape(b * t, cfg.top_k)
        choices = top_i.reshape(b, t * cfg.top_k)
        keep = keep_mask(choices, cfg.experts, cfg.capacity(t))
        return gates, choices, keep, balance_loss(probs, choices, cfg.experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h = x.shape[0], x.shape[1], x.shape[2]
        gates, choices, keep, aux = self.route(x)
        flat = x.reshape(b * t, h)
        if is_shape_only(x):
            slots = self.balanced_experts(flat, choices)
        else:
            slots = self.routed_experts(flat, choices, keep)
        y = (slots.view(b * t, self.config.top_k, h) * gates.unsqueeze(-1)).sum(1)
        if self.config.shared_experts:
            y = y + self.shared(flat)
        return y.view(b, t, h), aux

    def shared(self, flat: torch.Tensor) -> torch.Tensor:
        return swiglu(flat, self.shared_w1, self.shared_w3, self.shared_w2)

    def routed_experts(
        self, flat: torch.Tensor, choices: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Every routing slot's expert output ``[b*t*k, h]`` (zero for a dropped slot)."""
        k = self.config.top_k
        expert = choices.reshape(-1)
        kept = torch.ones_like(expert, dtype=torch.bool) if keep is None else keep.reshape(-1)
        picked, outs = [], []
        for e in range(self.config.experts):
            slot = ((expert == e) & kept).nonzero().squeeze(1)
            picked.append(slot)
            outs.append(swiglu(flat[slot // k], self.w1[e], self.w3[e], self.w2[e]))
        out = flat.new_zeros(expert.shape[0], flat.shape[1])
        return out.index_copy(0, torch.cat(picked), torch.cat(outs))

    def balanced_experts(self, flat: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """Shape-only stand-in for :meth:`routed_experts`: the slots split evenly over the experts
        (the routing the cost model assumes), every expert's GEMMs run once on its share."""
        k, e = self.config.top_k, self.config.experts
        slots = flat.repeat_interleave(k, dim=0)  # [b*t*k, h], slot i*k+j is token i
        n = slots.shape[0]
        per = math.ceil(n / e)
        padded = F.pad(slots, (0, 0, 0, per * e - n)).view(e, per, flat.shape[1])
        out = torch.bmm(F.silu(torch.bmm(padded, self.w1)) * torch.bmm(padded, self.w3), self.w2)
        return out.reshape(per * e, flat.shape[1])[:n]


__all__ = ["MoE", "MoEConfig", "balance_loss", "is_shape_only", "keep_mask", "swiglu"]

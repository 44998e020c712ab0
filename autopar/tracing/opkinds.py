"""THE op table: every base op name once, with its cost kind, its sharding family and its FLOPs rule.

``symbolic_trace`` graphs hold ``call_module`` (``nn.Linear``), Python functions
(``torch.softmax``, ``operator.add``) and methods (``view``); ``export`` graphs hold ATen
overloads (``aten.linear.default``). Both reduce to a base name (``linear``, ``softmax``, ``add``)
that :data:`OPS` maps to an :class:`OpInfo`:

* ``kind``: an :data:`autopar.core.ir.OP_KINDS` entry, what the cost model reads (a name not in
  the table is ``"other"``: no FLOPs, bytes as measured);
* ``family``: the sharding rule family (:attr:`autopar.sharding.ops.OpCall.kind`, see
  :mod:`autopar.sharding.rules`), None when no sharding rule knows the op (it runs replicated);
  :mod:`autopar.sharding.ops` derives its name sets (``POINTWISE``, ``REDUCTION``, ...) from here;
* ``transcendental``: an elementwise op costing 8 FLOPs per element instead of 1;
* ``linear_unary``: a pointwise op linear in its single operand (a partial sum stays partial).

FLOPs (a multiply-add counts 2):

* linear ``[.., k] x [n, k]^T``: ``2·m·n·k`` (+ ``m·n`` for a bias); matmul ``[.., m, k] x [.., k, n]``:
  ``2·batch·m·n·k``; fused attention: ``4·b·a·s_q·s_k·d`` (both GEMMs, causal masking not discounted,
  as in Megatron's formula; a causal kernel is timed over the tiles it executes, from the node's
  ``meta["causal"]``: :func:`cost_models.step.causal_fraction`). Backward = 2 x forward (input and
  weight gradients).
* elementwise: 1 per output element (8 for transcendental ones: exp, gelu, silu, ...);
  softmax 5, norm 8, loss 6 per input element; reduction 1 per input element. Backward = 2 x forward.
* embedding, dropout, views: no FLOPs in forward (dropout: 1 per element); embedding backward
  accumulates one add per output element.

Decisions where the cost and sharding tables used to disagree (before they became this one table):

* ``sign``, ``square``, ``isub``, ``itruediv``: elementwise (1 FLOP per element, not
  transcendental), pointwise sharding; the cost side used to count them as ``other`` (0 FLOPs).
* ``max``, ``min``, ``norm`` (``torch.norm``): reductions, 1 FLOP per input element. The binary
  ``torch.max(a, b)`` form costs the same (1 per element); its sharding stays ``other``
  (:func:`autopar.sharding.ops.parse` sees a tensor where the dim should be).
* ``cat``/``concat``/``concatenate``/``stack``/``repeat_interleave``: view-like (data movement, no
  arithmetic); their bytes are measured (they never alias their input), so the cost is unchanged.
* ``reshape_as``, ``swapaxes``: views; ``stride``, ``sym_size``, ``sym_numel``, ``sym_stride``:
  shape queries, views like ``size``.
* ``rand_like``/``randn_like``/``randint_like``/``bernoulli`` and ``new_zeros``/``new_ones``/
  ``new_empty``/``new_full``/``new_tensor``: elementwise (1 FLOP per element), as ``ones_like``.
* ``conv1d``/``conv2d``/``conv3d``/``convolution``: cost kind ``linear`` (a GEMM) but no gemm
  dims yet, so 0 FLOPs, as the ``nn.Conv*`` leaf modules the cost side sees (kind ``other``);
  pooling ops: ``reduction`` (one FLOP per input element); ``batch_norm``/``group_norm``: ``norm``.
* Cost-only names (``baddbmm``, ``native_layer_norm``, ``nll_loss``, the fused attention kernels,
  ``native_dropout``, ...) keep ``family=None``: the sharding rules do not know them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OpInfo:
    """One base op name's entry in :data:`OPS` (see the module docstring)."""

    name: str
    kind: str
    """Cost kind, an :data:`autopar.core.ir.OP_KINDS` entry."""
    family: str | None
    """Sharding rule family (an :attr:`autopar.sharding.ops.OpCall.kind`); None: no rule."""
    transcendental: bool = False
    linear_unary: bool = False


OPS: dict[str, OpInfo] = {}
"""Base op name -> its one entry: cost kind, sharding family, transcendental and linear flags."""

# Sharding families whose cost kind is fixed (checked by the tests): the family implies the kind.
FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "pointwise": ("elementwise", "view"),
    "like": ("elementwise",),
    "random_like": ("elementwise",),
    "new": ("elementwise",),
    "triu": ("elementwise",),
    "reshape": ("view",),
    "expand": ("view",),
    "permute": ("view",),
    "split": ("view",),
    "getitem": ("view",),
    "select": ("view",),
    "slice": ("view",),
    "cat": ("view",),
    "repeat_interleave": ("view",),
    "shape": ("view",),
    "reduction": ("reduction",),
    "linear": ("linear",),
    "addmm": ("linear",),
    "matmul": ("matmul",),
    "sdpa": ("attention",),
    "embedding": ("embedding",),
    "norm": ("norm",),
    "batch_norm": ("norm",),
    "group_norm": ("norm",),
    "conv": ("linear",),
    "pool": ("reduction",),
    "softmax": ("softmax",),
    "dropout": ("dropout",),
    "cross_entropy": ("loss",),
    "pointwise_loss": ("loss",),
}
"""Sharding family -> the cost kinds its ops may have."""


def _register(
    kind: str,
    family: str | None,
    names: str,
    *,
    transcendental: bool = False,
    linear_unary: bool = False,
) -> None:
    for name in names.split():
        if name in OPS:
            raise ValueError(f"op {name!r} is registered twice")
        OPS[name] = OpInfo(name, kind, family, transcendental, linear_unary)


# GEMMs and attention
_register("linear", "linear", "linear")
_register("linear", "addmm", "addmm")
_register("matmul", "matmul", "matmul bmm mm")
_register("matmul", None, "baddbmm")
_register("attention", "sdpa", "scaled_dot_product_attention")
_register(
    "attention",
    None,
    "_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_cudnn_attention",
)
# lookups, norms, softmax, dropout, losses
_register("embedding", "embedding", "embedding")
_register("norm", "norm", "layer_norm rms_norm")
_register("norm", None, "native_layer_norm _fused_rms_norm")
_register("norm", "batch_norm", "batch_norm")
_register("norm", "group_norm", "group_norm")
# convolutions: a GEMM over (channels x kernel) per output position; the cost side has no rule
# for them yet (no gemm dims: 0 FLOPs, as for the nn.Conv* leaf modules it sees)
_register("linear", "conv", "conv1d conv2d conv3d convolution")
# pooling: a reduction over each window, channels independent
_register(
    "reduction",
    "pool",
    "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices "
    "max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
    "adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
    "adaptive_max_pool3d",
)
_register("softmax", "softmax", "softmax log_softmax _softmax _log_softmax")
_register("dropout", "dropout", "dropout")
_register("dropout", None, "native_dropout feature_dropout alpha_dropout")
_register("loss", "cross_entropy", "cross_entropy cross_entropy_loss")
_register("loss", "pointwise_loss", "mse_loss l1_loss")
_register(
    "loss",
    None,
    "nll_loss nll_loss_nd nll_loss2d smooth_l1_loss binary_cross_entropy "
    "binary_cross_entropy_with_logits kl_div",
)
# views and data movement (no arithmetic)
_register(
    "view", "reshape", "view reshape _unsafe_view flatten unflatten squeeze unsqueeze view_as reshape_as"
)
_register("view", "expand", "expand expand_as")
_register("view", "permute", "transpose swapaxes t permute")
_register("view", "split", "split split_with_sizes chunk unbind")
_register("view", "getitem", "getitem")
_register("view", "select", "select")
_register("view", "slice", "slice narrow")
_register("view", "cat", "cat concat concatenate stack")
_register("view", "repeat_interleave", "repeat_interleave")
_register("view", "pointwise", "contiguous detach alias", linear_unary=True)
_register(
    "view",
    "shape",
    "size dim numel stride sym_size sym_numel sym_stride _assert_tensor_metadata",
)
_register("view", None, "getattr")
# reductions
_register(
    "reduction",
    "reduction",
    "sum mean amax amin max min var std logsumexp prod argmax argmin all any norm",
)
_register("reduction", None, "var_mean")
# elementwise
_register("elementwise", "pointwise", "neg pos", linear_unary=True)
_register(
    "elementwise",
    "pointwise",
    "float half bfloat16 double to type_as clone copy _to_copy",
    linear_unary=True,
)
_register(
    "elementwise",
    "pointwise",
    "add sub mul div truediv floordiv reciprocal masked_fill where clamp clamp_min clamp_max abs "
    "rsub radd iadd imul isub itruediv eq ne lt gt le ge logical_not logical_and logical_or "
    "bitwise_not invert and_ or_ xor mod remainder maximum minimum lerp hardtanh leaky_relu relu "
    "sign square",
)
_register(
    "elementwise",
    "pointwise",
    "pow rsqrt sqrt exp log log1p tanh sigmoid gelu silu erf cos sin softplus mish elu selu celu",
    transcendental=True,
)
_register("elementwise", "triu", "triu tril")
_register("elementwise", "like", "ones_like zeros_like full_like empty_like")
_register("elementwise", "random_like", "rand_like randn_like randint_like bernoulli")
_register("elementwise", "new", "new_zeros new_ones new_empty new_full new_tensor")
_register("elementwise", None, "fill")


def names_of_family(family: str) -> frozenset[str]:
    """Every base name whose sharding family is ``family``."""
    return frozenset(name for name, info in OPS.items() if info.family == family)


_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (nn.Embedding, "embedding"),
    (nn.LayerNorm, "norm"),
    (nn.GroupNorm, "norm"),
    (nn.modules.batchnorm._BatchNorm, "norm"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "softmax"),
    (nn.modules.loss._Loss, "loss"),
    (nn.Identity, "view"),
    (nn.Flatten, "view"),
    (nn.GELU, "elementwise"),
    (nn.ReLU, "elementwise"),
    (nn.SiLU, "elementwise"),
    (nn.Tanh, "elementwise"),
    (nn.Sigmoid, "elementwise"),
)
if hasattr(nn, "RMSNorm"):
    _MODULE_KINDS += ((nn.RMSNorm, "norm"),)

_MODULE_BASE = {nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}


MOE_REGION_TYPES = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock")
"""Class names of third-party mixture-of-experts layers recognised as one ``"moe"`` region
(HuggingFace); autopar's own layer says so with the class attribute ``autopar_region = "moe"``."""


def is_moe_region(module: nn.Module | None) -> bool:
    """Whether ``module`` is a mixture-of-experts layer traced as one leaf region (op kind ``moe``)."""
    if module is None:
        return False
    return getattr(module, "autopar_region", None) == "moe" or type(module).__name__ in MOE_REGION_TYPES


def moe_meta(module: nn.Module, tokens: int) -> dict:
    """``{"experts", "top_k", "hidden", "ffn", "shared", "capacity_factor", "tokens", "gated"}`` of a
    mixture-of-experts region over ``tokens`` tokens (``OpNode.meta["moe"]``, what the estimator
    reads). ``shared`` counts shared experts of width ``ffn`` (a wider shared expert counts as
    its width / ffn, rounded up); ``gated``: SwiGLU experts (three GEMMs each)."""
    cfg = getattr(module, "config", None)
    if getattr(module, "autopar_region", None) == "moe" and cfg is not None:
        e, k, h, f = cfg.experts, cfg.top_k, cfg.hidden, cfg.ffn
        shared, capacity = cfg.shared_experts, cfg.capacity_factor
    else:  # HuggingFace: stacked experts gate_up_proj [E, 2f, h], down_proj [E, h, f]
        experts = module.experts
        e, two_f, h = experts.gate_up_proj.shape
        f, k, capacity = two_f // 2, module.gate.top_k, None
        block = getattr(module, "shared_expert", None)
        shared = math.ceil(block.gate_proj.out_features / f) if block is not None else 0
    return {
        "experts": int(e), "top_k": int(k), "hidden": int(h), "ffn": int(f), "shared": int(shared),
        "capacity_factor": capacity, "tokens": int(tokens), "gated": True,
    }  # fmt: skip


def moe_flops(meta: dict) -> tuple[float, float]:
    """(forward, backward) FLOPs of a mixture-of-experts region under balanced routing: the router
    GEMM ``2·T·h·E``, each token's ``k`` experts and the ``S`` shared ones at ``3 · 2·h·f`` each
    (SwiGLU: gate, up and down projections), the gating and combine ``~(E + 2k)·T·h`` elementwise;
    backward = 2 x forward (input and weight gradients). Dropped tokens are not discounted."""
    t, h, f, e, k = meta["tokens"], meta["hidden"], meta["ffn"], meta["experts"], meta["top_k"]
    gemms = 3 if meta.get("gated", True) else 2
    router = 2.0 * t * h * e
    experts = (k + meta["shared"]) * gemms * 2.0 * t * h * f
    combine = 2.0 * k * t * h + 8.0 * t * e
    fwd = router + experts + combine
    return fwd, 2.0 * fwd


def base_name(node: torch.fx.Node, module: nn.Module | None = None) -> str:
    """``linear`` for ``aten.linear.default``, ``F.linear``, ``nn.Linear``; ``view`` for ``x.view``."""
    target = node.target
    if node.op == "call_module":
        return _MODULE_BASE.get(type(module), type(module).__name__.lower())
    if node.op == "call_method":
        return str(target).rstrip("_") if str(target) != "__getitem__" else "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1].rstrip("_")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target).split(".")[-1]
    name = getattr(target, "__name__", str(target))
    if target in (operator.getitem,):
        return "getitem"
    return name.rstrip("_")


def target_repr(node: torch.fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module":
        return f"{type(module).__module__}.{type(module).__qualname__}"
    if node.op in ("call_method", "get_attr", "placeholder", "output"):
        return str(node.target)
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    if mod in ("_operator", "operator", "builtins"):
        return f"operator.{name}" if mod != "builtins" else name
    return f"{mod}.{name}" if mod else name


def op_kind(node: torch.fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "placeholder":
        return "placeholder"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "param"
    if node.op == "call_module":
        if is_moe_region(module):
            return "moe"
        for cls, kind in _MODULE_KINDS:
            if isinstance(module, cls):
                return kind
        return "other"
    info = OPS.get(base_name(node))
    return info.kind if info is not None else "other"


def _numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def gemm_dims(
    kind: str,
    in_shapes: list,
    out_shape: Sequence[int] | None,
    weight_shape: Sequence[int] | None = None,
) -> tuple[int, int, int, int] | None:
    """(batch, m, n, k) of a matmul-like op."""
    if kind == "linear" and in_shapes and weight_shape is not None and len(weight_shape) == 2:
        n, k = weight_shape
        # m = all output elements but the last dim (addmm's first input is the bias, not x)
        m = _numel(out_shape[:-1]) if out_shape else _numel(in_shapes[0][:-1])
        return (1, m, n, k)
    if kind == "matmul" and len(in_shapes) >= 2 and out_shape is not None:
        a, b = in_shapes[-2], in_shapes[-1]
        if len(a) < 1 or len(b) < 1:
            return None
        k = a[-1]
        m = a[-2] if len(a) >= 2 else 1
        n = b[-1] if len(b) >= 2 else 1
        batch = _numel(out_shape) // max(m * n, 1)
        return (batch, m, n, k)
    if kind == "attention" and len(in_shapes) >= 3 and len(in_shapes[0]) >= 2 and len(in_shapes[1]) >= 2:
        # fused attention (SDPA): its score product q @ k^T, (batch*heads, s_q, s_k, head_dim); the
        # estimator costs the fused kernel at this GEMM's efficiency (without dims it was dropped)
        q, kk = in_shapes[0], in_shapes[1]
        return (_numel(q[:-2]), q[-2], kk[-2], q[-1])
    return None


def flops(
    kind: str,
    name: str,
    in_shapes: list,
    out_shape: Sequence[int] | None,
    gemm: tuple[int, int, int, int] | None,
    extra: dict,
) -> tuple[float, float]:
    """(forward, backward) FLOPs; see the module docstring for the rules."""
    out_n = _numel(out_shape)
    in_n = _numel(in_shapes[0]) if in_shapes else 0
    if kind == "moe" and "moe" in extra:
        return moe_flops(extra["moe"])
    if kind in ("linear", "matmul") and gemm is not None:
        batch, m, n, k = gemm
        fwd = 2.0 * batch * m * n * k + (m * n if extra.get("bias") else 0)
        return fwd, 2.0 * fwd
    if kind == "attention" and len(in_shapes) >= 3:
        q, kk, v = in_shapes[:3]
        b_heads = _numel(q[:-2])
        fwd = 2.0 * b_heads * q[-2] * kk[-2] * q[-1] + 2.0 * b_heads * q[-2] * kk[-2] * v[-1]
        return fwd, 2.0 * fwd
    per_element = {"softmax": 5, "norm": 8, "loss": 6, "reduction": 1, "dropout": 1}
    if kind in per_element:
        fwd = float(per_element[kind] * max(in_n, out_n))
        return fwd, (fwd if kind == "dropout" else 2.0 * fwd)
    if kind == "embedding":
        return 0.0, float(out_n)
    if kind == "elementwise":
        info = OPS.get(name)
        fwd = float(out_n * (8 if info is not None and info.transcendental else 1))
        return fwd, 2.0 * fwd
    return 0.0, 0.0

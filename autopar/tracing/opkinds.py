"""Op kind, FLOPs and gemm dims of one fx node, for both tracers' vocabularies.

``symbolic_trace`` graphs hold ``call_module`` (``nn.Linear``), Python functions
(``torch.softmax``, ``operator.add``) and methods (``view``); ``export`` graphs hold ATen
overloads (``aten.linear.default``). Both reduce to a base name (``linear``, ``softmax``, ``add``)
that the tables below map to an :data:`autopar.core.ir.OP_KINDS` entry.

FLOPs (a multiply-add counts 2):

* linear ``[.., k] x [n, k]^T``: ``2·m·n·k`` (+ ``m·n`` for a bias); matmul ``[.., m, k] x [.., k, n]``:
  ``2·batch·m·n·k``; fused attention: ``4·b·a·s_q·s_k·d`` (both GEMMs, causal masking not discounted,
  as in Megatron's formula). Backward = 2 x forward (input and weight gradients).
* elementwise: 1 per output element (8 for transcendental ones: exp, gelu, silu, ...);
  softmax 5, norm 8, loss 6 per input element; reduction 1 per input element. Backward = 2 x forward.
* embedding, dropout, views: no FLOPs in forward (dropout: 1 per element); embedding backward
  accumulates one add per output element.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

_KIND_BY_NAME: dict[str, str] = {}


def _register(kind: str, names: str) -> None:
    for name in names.split():
        _KIND_BY_NAME[name] = kind


_register("linear", "linear addmm")
_register("matmul", "matmul bmm mm baddbmm")
_register(
    "attention",
    "scaled_dot_product_attention _scaled_dot_product_flash_attention "
    "_scaled_dot_product_efficient_attention _scaled_dot_product_flash_attention_for_cpu "
    "_scaled_dot_product_cudnn_attention",
)
_register("embedding", "embedding")
_register("norm", "layer_norm native_layer_norm rms_norm _fused_rms_norm group_norm batch_norm")
_register("softmax", "softmax log_softmax _softmax _log_softmax")
_register("dropout", "dropout native_dropout feature_dropout alpha_dropout")
_register(
    "loss",
    "cross_entropy cross_entropy_loss nll_loss nll_loss_nd nll_loss2d mse_loss l1_loss "
    "smooth_l1_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div",
)
_register(
    "view",
    "view reshape transpose permute split split_with_sizes chunk getitem contiguous expand "
    "expand_as unsqueeze squeeze flatten unflatten t _unsafe_view slice select narrow unbind "
    "view_as alias detach getattr size dim numel _assert_tensor_metadata",
)
_register("reduction", "sum mean amax amin var std var_mean logsumexp prod argmax argmin all any")
_register(
    "elementwise",
    "add sub mul div truediv floordiv neg pos pow rsqrt sqrt exp log log1p tanh sigmoid relu gelu "
    "silu erf reciprocal masked_fill where clamp clamp_min clamp_max abs cos sin float half "
    "bfloat16 double to type_as clone copy _to_copy triu tril ones_like zeros_like full_like "
    "empty_like rsub radd iadd imul fill eq ne lt gt le ge logical_not logical_and logical_or "
    "bitwise_not invert and_ or_ xor mod remainder maximum minimum lerp hardtanh leaky_relu "
    "softplus mish elu selu celu",
)

_TRANSCENDENTAL = set(
    [
        "exp",
        "log",
        "log1p",
        "tanh",
        "sigmoid",
        "gelu",
        "silu",
        "erf",
        "rsqrt",
        "sqrt",
        "pow",
        "cos",
        "sin",
        "softplus",
        "mish",
        "elu",
        "selu",
        "celu",
    ]
)

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
        for cls, kind in _MODULE_KINDS:
            if isinstance(module, cls):
                return kind
        return "other"
    return _KIND_BY_NAME.get(base_name(node), "other")


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def gemm_dims(kind: str, in_shapes: list, out_shape, weight_shape=None) -> tuple[int, int, int, int] | None:
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
    return None


def flops(kind: str, name: str, in_shapes: list, out_shape, gemm, extra: dict) -> tuple[float, float]:
    """(forward, backward) FLOPs; see the module docstring for the rules."""
    out_n = _numel(out_shape)
    in_n = _numel(in_shapes[0]) if in_shapes else 0
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
        fwd = float(out_n * (8 if name in _TRANSCENDENTAL else 1))
        return fwd, 2.0 * fwd
    return 0.0, 0.0

"""A canonical view of one fx node for the sharding rules, for both tracer vocabularies.

``x.view(b, t, 4, 8)`` (symbolic trace), ``torch.reshape(x, s)`` and ``aten.view.default(x, [2, 8,
4, 8])`` (export) all become ``OpCall(kind="reshape", args={"x": x, "shape": [...]})``. A rule reads
only ``OpCall``; the lowering reads ``OpCall.args`` to rewrite shape arguments.

``kind`` is the rule family (see :mod:`autopar.sharding.rules`); ``name`` the base op name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from autopar.tracing.opkinds import base_name

Node = torch.fx.Node

# ------------------------------------------------------------------------------------ tables
POINTWISE = set(
    [
        "add",
        "sub",
        "mul",
        "div",
        "truediv",
        "floordiv",
        "neg",
        "pos",
        "pow",
        "rsqrt",
        "sqrt",
        "exp",
        "log",
        "log1p",
        "tanh",
        "sigmoid",
        "relu",
        "gelu",
        "silu",
        "erf",
        "reciprocal",
        "masked_fill",
        "where",
        "clamp",
        "clamp_min",
        "clamp_max",
        "abs",
        "cos",
        "sin",
        "float",
        "half",
        "bfloat16",
        "double",
        "to",
        "type_as",
        "clone",
        "copy",
        "_to_copy",
        "contiguous",
        "detach",
        "alias",
        "rsub",
        "radd",
        "iadd",
        "imul",
        "isub",
        "itruediv",
        "eq",
        "ne",
        "lt",
        "gt",
        "le",
        "ge",
        "logical_not",
        "logical_and",
        "logical_or",
        "bitwise_not",
        "invert",
        "and_",
        "or_",
        "xor",
        "mod",
        "remainder",
        "maximum",
        "minimum",
        "lerp",
        "hardtanh",
        "leaky_relu",
        "softplus",
        "mish",
        "elu",
        "selu",
        "celu",
        "sign",
        "square",
    ]
)
# Ops that are linear in their (single) partial-sum operand: P in -> P out.
LINEAR_UNARY = set(
    [
        "neg",
        "pos",
        "clone",
        "copy",
        "contiguous",
        "detach",
        "alias",
        "float",
        "half",
        "bfloat16",
        "double",
        "to",
        "_to_copy",
        "type_as",
    ]
)
RESHAPE = set(
    [
        "view",
        "reshape",
        "_unsafe_view",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "view_as",
        "reshape_as",
    ]
)
PERMUTE = set(["transpose", "swapaxes", "t", "permute"])
SPLIT = set(["chunk", "split", "split_with_sizes", "unbind"])
REDUCTION = set(
    [
        "sum",
        "mean",
        "amax",
        "amin",
        "max",
        "min",
        "var",
        "std",
        "logsumexp",
        "prod",
        "argmax",
        "argmin",
        "all",
        "any",
        "norm",
    ]
)
LIKE = set(["ones_like", "zeros_like", "empty_like", "full_like"])
RANDOM_LIKE = set(["rand_like", "randn_like", "randint_like", "bernoulli"])
NEW = set(["new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"])
SHAPE_METHODS = set(
    ["size", "dim", "numel", "sym_size", "sym_numel", "sym_stride", "stride", "_assert_tensor_metadata"]
)
SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


def is_rng_dropout(node: Node) -> bool:
    """The runtime's counter-based dropout (``autopar.lower.rng.dropout``), matched by name."""
    t = node.target
    return (
        node.op == "call_function"
        and getattr(t, "__name__", "") == "dropout"
        and getattr(t, "__module__", "") == "autopar.lower.rng"
    )


# ------------------------------------------------------------------------------------ meta
def tensor_meta(node: Node):
    """TensorMetadata-like (``.shape``, ``.dtype``, ``.stride``) or a tuple of them, or None."""
    tm = node.meta.get("tensor_meta")
    if tm is not None:
        return tm
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return tuple(val)
    return None


def is_multi(tm) -> bool:
    """Whether a ``tensor_meta`` value describes several tensors (TensorMetadata is a NamedTuple)."""
    return isinstance(tm, (tuple, list)) and not isinstance(tm, TensorMetadata)


def is_tensor(node: Node) -> bool:
    tm = tensor_meta(node)
    if tm is None:
        return False
    if is_multi(tm):
        return bool(tm) and all(isinstance(t, (TensorMetadata, torch.Tensor)) for t in tm)
    return True


def shape(node: Node) -> tuple[int, ...]:
    """Shape of a tensor node (the first element's for a tuple of tensors)."""
    tm = tensor_meta(node)
    if is_multi(tm):
        tm = tm[0]
    return tuple(int(s) for s in tm.shape)


def itemsize(node: Node) -> int:
    tm = tensor_meta(node)
    if is_multi(tm):
        tm = tm[0]
    return torch.empty((), dtype=tm.dtype).element_size()


def numel_bytes(node: Node) -> int:
    n = 1
    for s in shape(node):
        n *= s
    return n * itemsize(node)


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return path[len("model.") :] if path.startswith("model.") else path


def source_line(node: Node) -> str:
    frames = [ln.strip() for ln in (node.stack_trace or "").splitlines() if ln.strip().startswith("File")]
    return frames[-1] if frames else "unknown source"


def describe(node: Node) -> str:
    """``op 'view' (node view_1) in module 'layers.0.attn' at File "gpt.py", line 133``."""
    return (
        f"op '{base_name(node) if node.op != 'call_module' else node.target}' (node {node.name}) "
        f"in module '{module_path(node) or '<root>'}' at {source_line(node)}"
    )


# ------------------------------------------------------------------------------------ OpCall
@dataclass
class OpCall:
    node: Node
    kind: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    inputs: list[Node] = field(default_factory=list)
    """Tensor-valued input nodes (distinct, first-use order); strategies give one placement each."""

    @property
    def out_shape(self) -> tuple[int, ...]:
        return shape(self.node)

    @property
    def ndim(self) -> int:
        return len(self.out_shape)


def _arg(node: Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _shape_list(node: Node, start: int) -> list:
    rest = list(node.args[start:])
    if not rest:
        size = node.kwargs.get("size", node.kwargs.get("shape"))
        return list(size) if isinstance(size, (list, tuple)) else [size]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    return rest


def _dims(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(d) for d in value]


_REDUCTION_CODES = {0: "none", 1: "mean", 2: "sum"}


def _is_aten(node: Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload)


def _parse_call(node: Node, name: str) -> tuple[str, dict]:  # noqa: C901 - one table
    a0 = _arg(node, 0, "input")
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        return ("expand" if name == "expand" else "reshape"), {"x": a0, "shape": _shape_list(node, 1)}
    if name in RESHAPE:
        return "reshape", {"x": a0}
    if name in ("transpose", "swapaxes"):
        return "permute", {"x": a0, "swap": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}
    if name == "t":
        return "permute", {"x": a0, "swap": (0, 1)}
    if name == "permute":
        return "permute", {"x": a0, "dims": _shape_list(node, 1)}
    if name == "expand_as":
        return "expand", {"x": a0, "shape": None}
    if name == "getitem":
        return "getitem", {"x": a0, "index": node.args[1]}
    if name == "select":
        return "select", {"x": a0, "dim": _arg(node, 1, "dim"), "index": _arg(node, 2, "index")}
    if name in ("slice", "narrow"):
        return "slice", {"x": a0, "dim": _arg(node, 1, "dim", 0)}
    if name in SPLIT:
        default_dim = 0
        dim = _arg(node, 2, "dim", default_dim) if name != "unbind" else _arg(node, 1, "dim", 0)
        return "split", {"x": a0, "dim": dim, "unbind": name == "unbind"}
    if name in ("cat", "concat", "concatenate", "stack"):
        return "cat", {
            "xs": list(_arg(node, 0, "tensors")),
            "dim": _arg(node, 1, "dim", 0),
            "stack": name == "stack",
        }
    if name == "repeat_interleave":
        return "repeat_interleave", {
            "x": a0,
            "repeats": _arg(node, 1, "repeats"),
            "dim": _arg(node, 2, "dim"),
        }
    if name in ("triu", "tril"):
        return "triu", {"x": a0}
    if name == "linear":
        return "linear", {"x": a0, "w": _arg(node, 1, "weight"), "b": _arg(node, 2, "bias")}
    if name == "addmm":
        return "addmm", {"b": a0, "x": _arg(node, 1, "mat1"), "w": _arg(node, 2, "mat2")}
    if name in ("matmul", "mm", "bmm"):
        return "matmul", {"a": a0, "b": _arg(node, 1, "other", _arg(node, 1, "mat2"))}
    if name == "embedding":
        if _is_aten(node):  # aten.embedding(weight, indices, padding_idx)
            pad = _arg(node, 2, "padding_idx", -1)
            return "embedding", {
                "idx": node.args[1],
                "w": node.args[0],
                "padding_idx": None if pad == -1 else pad,
            }
        return "embedding", {
            "idx": a0,
            "w": _arg(node, 1, "weight"),
            "padding_idx": _arg(node, 2, "padding_idx"),
        }
    if name in ("layer_norm", "rms_norm"):
        ns = _arg(node, 1, "normalized_shape")
        return "norm", {"x": a0, "normalized": len(ns) if isinstance(ns, (list, tuple, torch.Size)) else 1}
    if name in ("softmax", "log_softmax", "_softmax", "_log_softmax"):
        return "softmax", {"x": a0, "dim": _arg(node, 1, "dim")}
    if name == "dropout":
        return "dropout", {"x": a0}
    if name == "scaled_dot_product_attention":
        return "sdpa", {
            "q": a0,
            "k": _arg(node, 1, "key"),
            "v": _arg(node, 2, "value"),
            "mask": _arg(node, 3, "attn_mask"),
        }
    if name in REDUCTION:
        dims = _arg(node, 1, "dim")
        if isinstance(dims, Node):
            return "other", {}
        keepdim = _arg(node, 2, "keepdim", False)
        return "reduction", {"x": a0, "dims": _dims(dims), "keepdim": bool(keepdim)}
    if name in ("cross_entropy", "cross_entropy_loss"):
        return "cross_entropy", _cross_entropy_args(node)
    if name in ("mse_loss", "l1_loss"):
        if _is_aten(node):  # aten.mse_loss(input, target, reduction: int)
            red = _REDUCTION_CODES[_arg(node, 2, "reduction", 1)]
        else:  # F.mse_loss(input, target, size_average, reduce, reduction)
            red = _arg(node, 4, "reduction", "mean")
        return "pointwise_loss", {"x": a0, "target": _arg(node, 1, "target"), "reduction": red}
    if name in LIKE or name in RANDOM_LIKE:
        return "like", {"x": a0, "random": name in RANDOM_LIKE}
    if name in NEW:
        return "new", {"x": a0}
    if name in POINTWISE:
        return "pointwise", {"linear_unary": name in LINEAR_UNARY, "dtype_donor": name == "type_as"}
    return "other", {}


def _cross_entropy_args(node: Node) -> dict:
    if _is_aten(node):
        return {
            "x": node.args[0],
            "target": _arg(node, 1, "target"),
            "weight": _arg(node, 2, "weight"),
            "reduction": _REDUCTION_CODES[_arg(node, 3, "reduction", 1)],
            "ignore_index": _arg(node, 4, "ignore_index", -100),
            "label_smoothing": _arg(node, 5, "label_smoothing", 0.0),
        }
    return {
        "x": node.args[0],
        "target": _arg(node, 1, "target"),
        "weight": _arg(node, 2, "weight"),
        "reduction": node.kwargs.get("reduction", "mean") if len(node.args) < 7 else node.args[6],
        "ignore_index": _arg(node, 4, "ignore_index", -100),
        "label_smoothing": _arg(node, 7, "label_smoothing", 0.0),
    }


def _input_nodes(node: Node) -> list[Node]:
    return [n for n in node.all_input_nodes if is_tensor(n)]


def parse(node: Node, params: dict) -> OpCall:
    """The canonical view of ``node`` (``params``: canonical parameter names)."""
    if node.op == "placeholder":
        return OpCall(node, "placeholder", "placeholder")
    if node.op == "output":
        return OpCall(node, "output", "output", inputs=_input_nodes(node))
    if node.op == "get_attr":
        kind = "param" if str(node.target) in params else ("buffer" if is_tensor(node) else "attr")
        return OpCall(node, kind, "get_attr")
    if node.op == "call_module":
        return OpCall(node, "other", str(node.target), inputs=_input_nodes(node))
    name = base_name(node)
    if node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRS:
        return OpCall(node, "shape", str(node.args[1]), {"x": node.args[0], "attr": node.args[1]})
    if name in SHAPE_METHODS:
        return OpCall(node, "shape", name, {"x": node.args[0], "dim": _arg(node, 1, "dim")})
    if is_rng_dropout(node):
        return OpCall(node, "rng_dropout", "dropout", {"x": node.args[0]}, _input_nodes(node))
    if name == "getitem" and isinstance(node.args[0], Node) and not is_tensor(node.args[0]):
        return OpCall(node, "scalar", "getitem")
    if name == "getitem" and is_multi(tensor_meta(node.args[0])):
        return OpCall(node, "tuple_getitem", "getitem", {"x": node.args[0]}, _input_nodes(node))
    if not is_tensor(node):
        return OpCall(node, "scalar", name)
    kind, args = _parse_call(node, name)
    inputs = _input_nodes(node)
    if kind != "other" and not inputs:
        kind = "factory"
    return OpCall(node, kind, name, args, inputs)

"""A canonical view of one fx node for the sharding rules, for both tracer vocabularies.

``x.view(b, t, 4, 8)`` (symbolic trace), ``torch.reshape(x, s)`` and ``aten.view.default(x, [2, 8,
4, 8])`` (export) all become ``OpCall(kind="reshape", args={"x": x, "shape": [...]})``. A rule reads
only ``OpCall``; the lowering reads ``OpCall.args`` to rewrite shape arguments.

``kind`` is the rule family (see :mod:`autopar.sharding.rules`); ``name`` the base op name. Which
family a base name belongs to is registered once, next to its cost kind, in the one op table
:data:`autopar.tracing.opkinds.OPS`; the name sets below are derived from it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from autopar.tracing.opkinds import OPS, base_name, names_of_family

Node = torch.fx.Node

# ------------------------------------------------------------------------------------ tables
# Derived from the one op table (:data:`autopar.tracing.opkinds.OPS`): a name's sharding family is
# registered there, next to its cost kind.
POINTWISE = set(names_of_family("pointwise"))
# Ops that are linear in their (single) partial-sum operand: P in -> P out.
LINEAR_UNARY = {name for name, info in OPS.items() if info.linear_unary}
RESHAPE = set(names_of_family("reshape"))
PERMUTE = set(names_of_family("permute"))
SPLIT = set(names_of_family("split"))
REDUCTION = set(names_of_family("reduction"))
LIKE = set(names_of_family("like"))
RANDOM_LIKE = set(names_of_family("random_like"))
NEW = set(names_of_family("new"))
SHAPE_METHODS = set(names_of_family("shape"))
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
def tensor_meta(node: Node) -> Any:
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


def is_multi(tm: Any) -> bool:
    """Whether a ``tensor_meta`` value describes several tensors (TensorMetadata is a NamedTuple)."""
    return isinstance(tm, (tuple, list)) and not isinstance(tm, TensorMetadata)


def _is_leaf_tensor(t: Any) -> bool:
    return isinstance(t, (TensorMetadata, torch.Tensor))


def leaves(tm: Any) -> list[Any]:
    """The leaves of a (possibly nested) output: ``nn.LSTM`` gives ``(out, (h, c))``."""
    if is_multi(tm):
        return [leaf for t in tm for leaf in leaves(t)]
    return [tm]


def is_tensor(node: Node) -> bool:
    """Whether ``node``'s value is a tensor or a (nested) tuple of tensors (``None`` entries
    allowed): such a value has a placement, and ``getitem`` on it is placed by a rule."""
    tm = tensor_meta(node)
    if tm is None:
        return False
    if is_multi(tm):
        found = leaves(tm)
        return any(_is_leaf_tensor(t) for t in found) and all(t is None or _is_leaf_tensor(t) for t in found)
    return True


def first_meta(tm: Any) -> Any:
    """The first tensor's metadata of a (nested) output; ``tm`` itself for a single tensor."""
    return next(t for t in leaves(tm) if _is_leaf_tensor(t)) if is_multi(tm) else tm


def shape(node: Node) -> tuple[int, ...]:
    """Shape of a tensor node (the first tensor's for a tuple of tensors)."""
    return tuple(int(s) for s in first_meta(tensor_meta(node)).shape)


def itemsize(node: Node) -> int:
    return torch.empty((), dtype=first_meta(tensor_meta(node)).dtype).element_size()


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


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
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


def _dims(value: int | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(d) for d in value]


_REDUCTION_CODES = {0: "none", 1: "mean", 2: "sum"}


def _is_aten(node: Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload)


def _parse_call(node: Node, name: str) -> tuple[str, dict]:  # noqa: C901 - one table
    """(rule family, canonical args) of a call, by the family :data:`OPS` registers for ``name``."""
    info = OPS.get(name)
    family = info.family if info is not None else None
    a0 = _arg(node, 0, "input")
    if family == "reshape":
        if name in ("view", "reshape", "_unsafe_view"):
            return "reshape", {"x": a0, "shape": _shape_list(node, 1)}
        return "reshape", {"x": a0}
    if family == "expand":
        return "expand", {"x": a0, "shape": _shape_list(node, 1) if name == "expand" else None}
    if family == "permute":
        if name == "t":
            return "permute", {"x": a0, "swap": (0, 1)}
        if name == "permute":
            return "permute", {"x": a0, "dims": _shape_list(node, 1)}
        return "permute", {"x": a0, "swap": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}
    if family == "getitem":
        return "getitem", {"x": a0, "index": node.args[1]}
    if family == "select":
        return "select", {"x": a0, "dim": _arg(node, 1, "dim"), "index": _arg(node, 2, "index")}
    if family == "slice":
        return "slice", {"x": a0, "dim": _arg(node, 1, "dim", 0)}
    if family == "split":
        dim = _arg(node, 2, "dim", 0) if name != "unbind" else _arg(node, 1, "dim", 0)
        return "split", {"x": a0, "dim": dim, "unbind": name == "unbind"}
    if family == "cat":
        return "cat", {
            "xs": list(_arg(node, 0, "tensors")),
            "dim": _arg(node, 1, "dim", 0),
            "stack": name == "stack",
        }
    if family == "repeat_interleave":
        return "repeat_interleave", {
            "x": a0,
            "repeats": _arg(node, 1, "repeats"),
            "dim": _arg(node, 2, "dim"),
        }
    if family == "triu":
        return "triu", {"x": a0}
    if family == "linear":
        return "linear", {"x": a0, "w": _arg(node, 1, "weight"), "b": _arg(node, 2, "bias")}
    if family == "addmm":
        return "addmm", {"b": a0, "x": _arg(node, 1, "mat1"), "w": _arg(node, 2, "mat2")}
    if family == "matmul":
        return "matmul", {"a": a0, "b": _arg(node, 1, "other", _arg(node, 1, "mat2"))}
    if family == "embedding":
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
    if family == "conv":
        return _conv_args(node, name)
    if family == "pool":
        return "pool", {
            "x": a0,
            "spatial": int(re.search(r"(\d)d", name).group(1)),
            "linear": "avg" in name,
        }
    if family == "batch_norm" and not _is_aten(node):  # F.batch_norm order; aten's differs
        return "batch_norm", {
            "x": a0,
            "running_mean": _arg(node, 1, "running_mean"),
            "running_var": _arg(node, 2, "running_var"),
            "w": _arg(node, 3, "weight"),
            "b": _arg(node, 4, "bias"),
            "training": _arg(node, 5, "training", False),
        }
    if family == "group_norm" and not _is_aten(node):
        return "group_norm", {
            "x": a0,
            "groups": _arg(node, 1, "num_groups"),
            "w": _arg(node, 2, "weight"),
            "b": _arg(node, 3, "bias"),
        }
    if family == "norm":
        ns = _arg(node, 1, "normalized_shape")
        return "norm", {"x": a0, "normalized": len(ns) if isinstance(ns, (list, tuple, torch.Size)) else 1}
    if family == "softmax":
        return "softmax", {"x": a0, "dim": _arg(node, 1, "dim")}
    if family == "dropout":
        return "dropout", {"x": a0}
    if family == "sdpa":
        return "sdpa", {
            "q": a0,
            "k": _arg(node, 1, "key"),
            "v": _arg(node, 2, "value"),
            "mask": _arg(node, 3, "attn_mask"),
        }
    if family == "reduction":
        dims = _arg(node, 1, "dim")
        if isinstance(dims, Node):
            return "other", {}
        keepdim = _arg(node, 2, "keepdim", False)
        return "reduction", {"x": a0, "dims": _dims(dims), "keepdim": bool(keepdim)}
    if family == "cross_entropy":
        return "cross_entropy", _cross_entropy_args(node)
    if family == "pointwise_loss":
        if _is_aten(node):  # aten.mse_loss(input, target, reduction: int)
            red = _REDUCTION_CODES[_arg(node, 2, "reduction", 1)]
        else:  # F.mse_loss(input, target, size_average, reduce, reduction)
            red = _arg(node, 4, "reduction", "mean")
        return "pointwise_loss", {"x": a0, "target": _arg(node, 1, "target"), "reduction": red}
    if family in ("like", "random_like"):
        return "like", {"x": a0, "random": family == "random_like"}
    if family == "new":
        return "new", {"x": a0}
    if family == "pointwise":
        return "pointwise", {"linear_unary": info.linear_unary, "dtype_donor": name == "type_as"}
    return "other", {}


def _conv_args(node: Node, name: str) -> tuple[str, dict]:
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)`` and ``aten.convolution(x, w, b,
    stride, padding, dilation, transposed, output_padding, groups)``; ``groups_at`` says where the
    rewrite finds the groups argument (an index into ``node.args`` or a keyword)."""
    if name == "convolution":
        if _arg(node, 6, "transposed", False):
            return "other", {}
        at: int | str = 8 if len(node.args) > 8 else "groups"
    else:
        at = 6 if len(node.args) > 6 else "groups"
    groups = node.args[at] if isinstance(at, int) else node.kwargs.get("groups", 1)
    return "conv", {
        "x": _arg(node, 0, "input"),
        "w": _arg(node, 1, "weight"),
        "b": _arg(node, 2, "bias"),
        "groups": groups,
        "groups_at": at,
    }


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

"""fx graph (with meta from :func:`~autopar.tracing.fx.fx_trace`) -> :class:`~autopar.core.ir.OpGraph`.

Per node: op kind, shapes and dtypes, FLOPs forward/backward, bytes read/written, parameters read
(each unique parameter's bytes counted once, at the first node that reads it, tied aliases mapped
to the first name in ``model.named_parameters()``), saved activation bytes (measured during the
propagation), gemm dims, module path, source line and block.

Bytes read/written are the sizes of the tensor inputs (parameters included) and outputs; views
that alias their input move nothing and count 0.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from autopar.core.ir import BlockType, OpGraph, OpNode
from autopar.tracing import hf_moe, opkinds
from autopar.tracing.blocks import node_module_path, node_module_type, strip_prefix
from autopar.tracing.fx import fx_trace, is_user_file
from autopar.tracing.wrap import MODEL_PREFIX

log = logging.getLogger(__name__)


def _dtype_str(dtype: torch.dtype | str | None) -> str:
    return str(dtype).replace("torch.", "")


def _first_meta(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return meta
    if isinstance(meta, (tuple, list)):
        for m in meta:
            found = _first_meta(m)
            if found is not None:
                return found
        return None
    return meta


def _nbytes(meta: Any) -> float:
    if meta is None:
        return 0.0
    if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
        return sum(_nbytes(m) for m in meta)
    if not hasattr(meta, "shape"):
        return 0.0
    return float(math.prod(meta.shape) * _itemsize(meta.dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return (
        torch.empty((), dtype=dtype, device="meta").element_size()
        if dtype not in _ITEMSIZE
        else _ITEMSIZE[dtype]
    )


_ITEMSIZE = {
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.float64: 8,
    torch.int64: 8,
    torch.int32: 4,
    torch.bool: 1,
    torch.uint8: 1,
    torch.int8: 1,
}


def source_of(stack_trace: str | None) -> str:
    """``file.py:line`` of the innermost user frame of an fx stack trace ('' if none)."""
    if not stack_trace:
        return ""
    found = ""
    for line in stack_trace.splitlines():
        line = line.strip()
        if not line.startswith('File "'):
            continue
        filename, _, rest = line[6:].partition('", line ')
        if is_user_file(filename):
            lineno = rest.split(",", 1)[0]
            found = f"{_short_path(filename)}:{lineno}"
    return found


def _short_path(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


class _ParamIndex:
    """Graph attribute names -> canonical parameter names of the original model."""

    def __init__(self, model: nn.Module):
        canonical_by_id: dict[int, str] = {}
        self.canonical: dict[str, str] = {}
        self.info: dict[str, dict] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first = canonical_by_id.setdefault(id(p), name)
            self.canonical[name] = first
            if first == name:
                nbytes = p.numel() * p.element_size()
                self.info[name] = {
                    "shape": list(p.shape),
                    "dtype": _dtype_str(p.dtype),
                    "bytes": nbytes,
                    "aliases": [],
                }
            else:
                self.info[first]["aliases"].append(name)
        self.seen: set[str] = set()

    def lookup(self, graph_name: str) -> str | None:
        return self.canonical.get(strip_prefix(graph_name))

    def first_use_bytes(self, names: list[str]) -> float:
        total = 0.0
        for name in names:
            if name not in self.seen:
                self.seen.add(name)
                total += self.info[name]["bytes"]
        return total


def _module_params(module: nn.Module, qualname: str, index: _ParamIndex) -> list[str]:
    # Leaf modules (nn.Linear, ...) have no children: read _parameters directly; named_parameters()
    # costs ~0.25 ms a call, 0.6 s over GPT-3 175B's 1 350 module calls.
    if module._modules:
        items = list(module.named_parameters(remove_duplicate=False))
    else:
        items = [(k, p) for k, p in module._parameters.items() if p is not None]
    names = []
    for rel, _ in items:
        name = index.lookup(f"{qualname}.{rel}")
        if name is not None and name not in names:
            names.append(name)
    return names


ALIAS_NO_OPS = frozenset({"float", "half", "bfloat16", "double", "to", "type_as"})
"""Conversions that return their input itself when it already has the asked dtype and device (no
kernel runs; the propagated output aliases the input)."""

READS_FIRST_ONLY = frozenset({"type_as", "expand_as", "view_as", "reshape_as"})
"""Ops whose second tensor is read for its dtype or shape only, never its data."""

READS_NOTHING = opkinds.names_of_family("like") | opkinds.names_of_family("new")
"""Ops that only write: ``zeros_like(x)`` and ``x.new_zeros(...)`` take x's dtype and device."""


def _moves_nothing(node: torch.fx.Node, module: nn.Module | None, kind: str, name: str) -> bool:
    """Whether ``node`` runs no kernel: a view (its output shares its input's storage, a tuple's
    element included), a conversion to the dtype its input already has, or a dropout that returns
    its input (``p = 0``, or evaluation) without writing into it."""
    if not node.meta.get("aliases_input", kind == "view"):
        return False
    if kind == "view" or name in ALIAS_NO_OPS:
        return True
    if kind == "dropout":
        positional = node.args[3] if node.op == "call_function" and len(node.args) > 3 else False
        inplace = bool(getattr(module, "inplace", False) or node.kwargs.get("inplace", positional))
        return not (inplace or str(node.target).endswith("_"))
    return False


def _read_tensors(name: str, tensor_in: list) -> list:
    """The inputs whose data ``name`` reads (of the tensor inputs it is given)."""
    if name in READS_NOTHING:
        return []
    if name in READS_FIRST_ONLY:
        return tensor_in[:1]
    return tensor_in


def _analyse_node(node: torch.fx.Node, gm: torch.fx.GraphModule, index: _ParamIndex) -> OpNode:
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    kind = opkinds.op_kind(node, module)
    name = opkinds.base_name(node, module) if node.op not in ("placeholder", "output", "get_attr") else kind
    inputs = node.all_input_nodes
    in_metas = [_first_meta(i.meta.get("tensor_meta")) for i in inputs]
    tensor_in = [(i, m) for i, m in zip(inputs, in_metas) if m is not None and hasattr(m, "shape")]
    out_meta = node.meta.get("tensor_meta")
    first_out = _first_meta(out_meta)

    param_names: list[str] = []
    if node.op == "get_attr":
        p = index.lookup(str(node.target))
        param_names = [p] if p else []
    elif module is not None:
        param_names = _module_params(module, str(node.target), index)
    else:
        for i in inputs:
            p = index.lookup(str(i.target)) if i.op == "get_attr" else None
            if p and p not in param_names:
                param_names.append(p)
    module_param_metas = [index.info[p] for p in param_names] if module is not None else []

    in_shapes = [tuple(m.shape) for _, m in tensor_in]
    weight_shape = None
    if kind == "linear":
        if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            weight_shape = tuple(module.weight.shape)
        elif len(in_shapes) >= 2:
            weight_shape = in_shapes[1] if name == "linear" else tuple(reversed(in_shapes[-1]))
    gemm = opkinds.gemm_dims(
        kind, in_shapes, tuple(first_out.shape) if first_out is not None else None, weight_shape
    )
    has_bias = kind == "linear" and (
        (module is not None and getattr(module, "bias", None) is not None)
        or (module is None and len(in_shapes) >= 3)
    )
    out_shape = tuple(first_out.shape) if first_out is not None and hasattr(first_out, "shape") else None
    extra: dict = {"bias": has_bias}
    if kind == "moe" and in_shapes:
        extra["moe"] = opkinds.moe_meta(module, math.prod(in_shapes[0][:-1]))
    fwd, bwd = opkinds.flops(kind, name, in_shapes, out_shape, gemm, extra)
    bwd = _backward_flops(kind, fwd, bwd, tensor_in, first_out, bool(param_names))

    moved_nothing = _moves_nothing(node, module, kind, name)
    bytes_read = 0.0 if moved_nothing else sum(_nbytes(m) for _, m in _read_tensors(name, tensor_in))
    bytes_read += sum(p["bytes"] for p in module_param_metas)
    bytes_written = 0.0 if moved_nothing else _nbytes(out_meta)
    if node.op in ("placeholder", "get_attr", "output"):
        bytes_read = bytes_written = 0.0

    block = node.meta.get("autopar_block")
    meta = _op_meta(node, module, name)
    if "moe" in extra:
        meta["moe"] = extra["moe"]
    return OpNode(
        name=node.name,
        op_kind=kind,
        target=opkinds.target_repr(node, module),
        inputs=[i.name for i in inputs],
        input_shapes=in_shapes,
        input_dtypes=[_dtype_str(m.dtype) for _, m in tensor_in],
        output_shape=out_shape,
        output_dtype=_dtype_str(first_out.dtype)
        if first_out is not None and hasattr(first_out, "dtype")
        else None,
        flops_fwd=fwd,
        flops_bwd=bwd,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        param_names=param_names,
        param_bytes=index.first_use_bytes(param_names) if node.op != "get_attr" else 0.0,
        saved_bytes=float(node.meta.get("saved_bytes", 0)),
        gemm=gemm,
        module_path=node_module_path(node),
        source=source_of(node.meta.get("stack_trace")),
        block=block[1] if block else None,
        block_type=block[0] if block else None,
        meta=meta,
    )


def _backward_flops(
    kind: str, fwd: float, bwd: float, tensor_in: list[tuple[Any, Any]], out_meta: Any, reads_params: bool
) -> float:
    """Zero when nothing upstream needs a gradient; a GEMM pays one GEMM per input needing one."""
    needs = [bool(getattr(m, "requires_grad", False)) for _, m in tensor_in]
    if kind in ("linear", "matmul") and fwd:
        if kind == "linear":
            activation_grad = needs[0] if needs else False
            return fwd * (int(activation_grad) + int(reads_params or any(needs[1:])))
        return fwd * sum(int(x) for x in needs[:2])
    if out_meta is None or not getattr(out_meta, "requires_grad", False):
        return 0.0
    return bwd


def uses_batch_statistics(node: torch.fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` is a BatchNorm normalising with the statistics of its batch (train mode, or
    no running statistics): its result depends on how the batch is split (the planner keeps one
    micro-batch per replica for such models; see autopar/lower/batchnorm.py)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or module.running_mean is None
    if hf_moe.is_balance_loss(node):
        return True  # HuggingFace's MoE load-balancing loss (autopar/lower/moe_aux.py)
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    if name not in ("batch_norm", "batch_norm.default"):
        return False
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return training is True


def _op_meta(node: torch.fx.Node, module: nn.Module | None, name: str) -> dict:
    meta: dict = {"op": node.op, "base": name}
    if module_type := node_module_type(node, module):
        meta["module_type"] = module_type
    if module is not None:
        for attr in ("p", "eps", "in_features", "out_features", "num_embeddings", "embedding_dim"):
            if hasattr(module, attr):
                meta[attr] = getattr(module, attr)
    if node.meta.get("replicated_from"):
        meta["replicated_from"] = node.meta["replicated_from"]
    if uses_batch_statistics(node, module):
        meta["batch_statistics"] = True
    if name in ("softmax", "log_softmax", "_softmax"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        meta["dim"] = dim
    if name in IS_CAUSAL_ARG and _is_causal(node, IS_CAUSAL_ARG[name]):
        meta["causal"] = True
    return meta


IS_CAUSAL_ARG = {
    "scaled_dot_product_attention": 5,
    "_scaled_dot_product_flash_attention": 4,
    "_scaled_dot_product_flash_attention_for_cpu": 4,
    "_scaled_dot_product_efficient_attention": 6,
    "_scaled_dot_product_cudnn_attention": 6,
}
"""Fused attention ops -> the position of their ``is_causal`` argument (when not given by keyword)."""


def _is_causal(node: torch.fx.Node, position: int) -> bool:
    if "is_causal" in node.kwargs:
        return node.kwargs["is_causal"] is True
    return len(node.args) > position and node.args[position] is True


def _block_tables(blocks: list[dict]) -> tuple[dict[str, BlockType], list[tuple[str, int]]]:
    block_types: dict[str, BlockType] = {}
    block_order: list[tuple[str, int]] = []
    for order, inst in enumerate(blocks):
        key = inst["type_key"]
        bt = block_types.get(key)
        if bt is None:
            bt = block_types[key] = BlockType(key=key, count=0, instances=[], node_names=[])
        bt.count += 1
        bt.instances.append(order)
        bt.node_names.append(list(inst["nodes"]))
        block_order.append((key, inst["index_in_type"]))
    return block_types, block_order


def _notes(
    nodes: list[OpNode], tracer: str, model: nn.Module | None = None, hf_moe: dict | None = None
) -> list[str]:
    notes = []
    hf_moe = hf_moe or {}
    if hf_moe.get("regions"):
        notes.append(
            f"HuggingFace mixture-of-experts blocks kept as one 'moe' region each ({len(hf_moe['regions'])}: "
            f"{', '.join(strip_prefix(p) for p in hf_moe['regions'][:4])}{' ...' if len(hf_moe['regions']) > 4 else ''}): "
            "traced through the custom op autopar::hf_moe_region, run by autopar.tracing.hf_moe.HFMoERegion "
            "(the block's routing and parameter names), split by expert parallelism when ep > 1"
        )
    if any(n.meta.get("base") == "hf_balance_loss" for n in nodes):
        notes.append(
            "HuggingFace's MoE load-balancing loss (output_router_logits=True) is one op, "
            "autopar::hf_balance_loss: a statistic of the whole batch, summed over data-parallel "
            "replicas so the loss equals one device's; plans keep one micro-batch per replica "
            "(autopar/lower/moe_aux.py)"
        )
    inlined = sorted(
        {type(m).__name__ for m in (model.modules() if model is not None else ()) if opkinds.is_moe_region(m)}
    )
    skipped = hf_moe.get("skipped", {})
    if skipped or (inlined and not any(n.op_kind == "moe" for n in nodes)):
        why = "; ".join(f"{strip_prefix(p)} ({r})" for p, r in list(skipped.items())[:3])
        notes.append(
            f"mixture-of-experts blocks ({', '.join(inlined)}) were traced by {tracer} as their individual "
            "ops, not as one 'moe' region: their routing is costed as the ops it ran on the example "
            "(data-dependent) and expert parallelism (ep > 1) cannot split them" + (f"; {why}" if why else "")
        )
        log.warning("%s", notes[-1])
    if any(n.op_kind == "attention" for n in nodes):
        notes.append(
            "fused attention (scaled_dot_product_attention): the s x s attention scores, softmax output "
            "and dropout mask are not saved for backward (the kernel recomputes them from q, k, v and a "
            "per-row logsumexp), so saved activations per layer are about 5*a*s^2*b bytes smaller than "
            "with materialised scores (Korthikanti et al. 2022, Eq. 1 vs. its flash-attention note)"
        )
    others = sorted(
        {
            n.target
            for n in nodes
            if n.op_kind == "other"
            and n.meta.get("op") == "call_module"
            and not n.target.endswith("GuardsFn")
        }
    )
    if others:
        notes.append(f"leaf modules without a cost rule (FLOPs counted as 0): {', '.join(others)}")
    notes.append(
        "saved activations measured with saved-tensor hooks on meta/fake tensors; dropout measured as "
        "native_dropout (1-byte bool mask, as on CUDA)"
    )
    if tracer == "export":
        notes.append("traced with torch.export (ATen-level nodes)")
    return notes


def analyse(gm: torch.fx.GraphModule, model: nn.Module) -> OpGraph:
    """The :class:`OpGraph` of a graph module made by :func:`fx_trace` for ``model``."""
    info = gm.meta.get("autopar", {})
    index = _ParamIndex(model)
    nodes = [_analyse_node(n, gm, index) for n in gm.graph.nodes]
    block_types, block_order = _block_tables(info.get("blocks", []))
    placeholders = [n.name for n in nodes if n.op_kind == "placeholder"]
    first_in = next((n for n in nodes if n.op_kind == "placeholder" and n.output_shape), None)
    graph = OpGraph(
        nodes=nodes,
        params=index.info,
        block_types=block_types,
        block_order=block_order,
        inputs=placeholders,
        batch_size=int(first_in.output_shape[0]) if first_in and first_in.output_shape else 0,
        tracer=info.get("tracer", "symbolic_trace"),
        gm=gm,
        notes=_notes(nodes, info.get("tracer", ""), model, info.get("hf_moe")),
    )
    return graph


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    loss_fn: Callable | None = None,
    num_targets: int | None = None,
    tracer: str = "auto",
    leaf_modules: Iterable = (),
) -> OpGraph:
    """Trace ``model`` with its loss and analyse it into an :class:`~autopar.core.ir.OpGraph`.

    Arguments as :func:`autopar.tracing.fx_trace`: ``example_inputs = (model inputs..., targets...)``;
    with ``loss_fn`` the last ``num_targets`` (default 1) inputs are the targets of
    ``loss_fn(model(*inputs), *targets)``, without it the model returns its own loss. Parameter
    names in the result are the original model's (no ``model.`` prefix). Shapes come from meta or
    fake tensors: nothing is allocated, so a model built on ``meta`` traces at any size.
    """
    t0 = time.perf_counter()
    gm = fx_trace(
        model,
        example_inputs,
        loss_fn=loss_fn,
        num_targets=num_targets,
        tracer=tracer,
        leaf_modules=leaf_modules,
    )
    graph = analyse(gm, model)
    log.info(
        "traced %s: %d nodes, %d block types, %.2fs",
        type(model).__name__,
        len(graph),
        len(graph.block_types),
        time.perf_counter() - t0,
    )
    return graph


__all__ = ["MODEL_PREFIX", "analyse", "source_of", "trace"]

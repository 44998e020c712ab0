"""Pipeline units of an fx graph: the repeated blocks (transformer layer i, solved once per block
type) or, in a model without indexed modules, its top-level children. This is the one definition
of the candidate pipeline-stage boundaries: the planner counts and costs these units
(``OpGraph.block_order``) and the compiler cuts at them (``gm.meta["autopar"]["blocks"]``,
:mod:`autopar.lower.segments`), so the two cannot disagree.

A node belongs to the block instance named by the *outermost* module-path prefix that ends in an
integer (``layers.3.attn.q_proj`` -> instance ``layers.3``, key ``layers.*``; parameters of export
graphs, which have no module stack, by their own name). Two instances are the same block type when
their node sequences are structurally identical: same ops and targets, same relative module paths
and parameter shapes, same wiring (arguments pointing to the same positions inside the instance,
or to outside values in the same order) and same constants. Instances of one key with different
structures get distinct types ``key``, ``key#1``, ... (largest group first). Instances of every
indexed list count, in execution order: ResNet's ``layer1.0, layer1.1, layer2.0, layer2.1`` are
four units, T5's ``encoder.block.*`` then ``decoder.block.*`` are one run of units.

A model with no indexed module (a plain MLP ``fc1..fc5``, an LSTM LM ``emb, lstm, head``) has its
top-level children as units, in execution order, each its own type (``fc1``, ``lstm``): a leaf
module such as ``nn.LSTM`` is one unit, never cut inside. Nodes outside every unit (the model's own
forward code, the loss) are the stem (before the first unit), glue (with the unit before) and the
head (after the last unit).

Structure plus equal outside inputs implies equal shapes, which is what lets the propagation and
the analysis run one instance and replicate it (see :mod:`autopar.tracing.propagate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate

from autopar.tracing.wrap import MODEL_PREFIX


@dataclass
class BlockInstance:
    prefix: str
    """Module path of the instance, e.g. ``layers.3``."""
    key: str
    """Module path with the index replaced by ``*``, e.g. ``layers.*``."""
    nodes: list[torch.fx.Node] = field(default_factory=list)
    type_key: str = ""
    """Block type after structural comparison (``key`` or ``key#1`` ...)."""
    index_in_type: int = 0
    order: int = 0
    """Position in execution order among all instances."""

    def as_dict(self) -> dict:
        """Plain data (node names, not nodes) for ``gm.meta``: survives copies of the graph module."""
        return {
            "prefix": self.prefix,
            "type_key": self.type_key,
            "index_in_type": self.index_in_type,
            "nodes": [n.name for n in self.nodes],
        }


def strip_prefix(qualname: str) -> str:
    return qualname[len(MODEL_PREFIX) :] if qualname.startswith(MODEL_PREFIX) else qualname


def node_module_path(node: torch.fx.Node) -> str:
    """Innermost module path (without the wrapper prefix) that issued ``node``."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return strip_prefix(str(list(stack.values())[-1][0]))
    if node.op == "get_attr":
        name = strip_prefix(str(node.target))
        return name.rsplit(".", 1)[0] if "." in name else ""
    if node.op == "call_module":
        return strip_prefix(str(node.target))
    return ""


def node_module_type(node: torch.fx.Node, module: nn.Module | None = None) -> str:
    """Class name of the innermost module that issued ``node`` (``""`` when none recorded)."""
    if module is not None:
        return type(module).__name__
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    name = getattr(kind, "__name__", None) or str(kind)
    return name.rstrip("'>").rsplit(".", 1)[-1]


def _raw_module_path(node: torch.fx.Node) -> str:
    """Like :func:`node_module_path`, with the wrapper prefix kept (it tells the model's modules
    from the loss module's)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    if node.op == "get_attr":
        name = str(node.target)
        return name.rsplit(".", 1)[0] if "." in name else ""
    if node.op == "call_module":
        return str(node.target)
    return ""


def _child_prefix(root: str) -> Callable[[torch.fx.Node], tuple[str, str] | None]:
    """The child of module ``root`` (``"model."`` = the user's model) that issued a node, as
    (prefix, key): each child is its own key."""

    def prefix_of(node: torch.fx.Node) -> tuple[str, str] | None:
        path = _raw_module_path(node)
        if not path.startswith(root):
            return None
        child = strip_prefix(root + path[len(root) :].split(".", 1)[0])
        return (child, child)

    return prefix_of


def _child_units(gm: torch.fx.GraphModule) -> list[BlockInstance]:
    """Top-level children in execution order; through a single child (a wrapper around the real
    model) to its children."""
    found = _instances(gm, _child_prefix(MODEL_PREFIX))
    while len(found) == 1:
        inner = _instances(gm, _child_prefix(MODEL_PREFIX + found[0].prefix + "."))
        if len(inner) < 2:
            break
        found = inner
    return found


def _indexed_prefix(node: torch.fx.Node) -> tuple[str, str] | None:
    return _block_prefix(node_module_path(node))


def _block_prefix(path: str) -> tuple[str, str] | None:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), ".".join([*parts[:i], "*"])
    return None


def _target_repr(node: torch.fx.Node, prefix: str, gm: torch.fx.GraphModule) -> tuple:
    if node.op in ("call_module", "get_attr"):
        rel = strip_prefix(str(node.target))
        rel = rel[len(prefix) :] if rel.startswith(prefix) else "~" + rel
        obj = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if obj is not None:
            params = obj.named_parameters() if obj._modules else obj._parameters.items()
            shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in params if p is not None)
            return (rel, type(obj).__name__, obj.extra_repr(), shapes)
        try:
            attr = _fetch(gm, str(node.target))
        except AttributeError:
            return (rel,)
        if isinstance(attr, nn.Parameter):
            return (rel, tuple(attr.shape), attr.dtype)
        # Buffers and constants lifted by export (lifted_tensor_3) are numbered graph-wide: compare by
        # shape and dtype only.
        return (tuple(attr.shape), attr.dtype) if isinstance(attr, torch.Tensor) else (type(attr).__name__,)
    target = node.target
    return (getattr(target, "__qualname__", None) or str(target),)


def _fetch(gm: torch.nn.Module, qualname: str) -> Any:
    obj = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _signature(inst: BlockInstance, gm: torch.fx.GraphModule) -> tuple:
    pos = {n: i for i, n in enumerate(inst.nodes)}
    external: dict[torch.fx.Node, int] = {}

    def arg_sig(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            if a in pos:
                return ("n", pos[a])
            return ("x", external.setdefault(a, len(external)))
        if isinstance(a, (int, float, str, bool, type(None), torch.dtype, torch.device, slice)):
            return a
        return type(a).__name__

    sig = []
    for n in inst.nodes:
        path = node_module_path(n)
        rel_path = path[len(inst.prefix) :]
        args = map_aggregate(n.args, arg_sig)
        kwargs = map_aggregate(n.kwargs, arg_sig)
        sig.append((n.op, _target_repr(n, inst.prefix, gm), rel_path, repr(args), repr(kwargs)))
    return tuple(sig)


def find_blocks(gm: torch.fx.GraphModule) -> list[BlockInstance]:
    """The pipeline units (see the module docstring) in execution order, with ``type_key`` and
    ``index_in_type`` filled in.

    Also sets ``node.meta["autopar_block"] = (type_key, order)`` on every node of an instance.
    """
    ordered = _instances(gm, _indexed_prefix) or _child_units(gm)
    _assign_types(ordered, gm)
    for order, inst in enumerate(ordered):
        inst.order = order
        for node in inst.nodes:
            node.meta["autopar_block"] = (inst.type_key, order)
    return ordered


def _instances(
    gm: torch.fx.GraphModule, prefix_of: Callable[[torch.fx.Node], tuple[str, str] | None]
) -> list[BlockInstance]:
    instances: dict[str, BlockInstance] = {}
    first_compute: dict[str, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        if node.op in ("placeholder", "output"):
            continue
        found = prefix_of(node)
        if found is None:
            continue
        prefix, key = found
        inst = instances.setdefault(prefix, BlockInstance(prefix=prefix, key=key))
        inst.nodes.append(node)
        if node.op != "get_attr":
            first_compute.setdefault(prefix, i)
    # Parameters only (a child whose weight another module reads, like a tied head) are no unit.
    return sorted(
        (b for b in instances.values() if b.prefix in first_compute), key=lambda b: first_compute[b.prefix]
    )


def _assign_types(ordered: list[BlockInstance], gm: torch.fx.GraphModule) -> None:
    groups: dict[str, dict[tuple, list[BlockInstance]]] = {}
    for inst in ordered:
        groups.setdefault(inst.key, {}).setdefault(_signature(inst, gm), []).append(inst)
    for key, by_sig in groups.items():
        ranked = sorted(by_sig.values(), key=lambda g: (-len(g), g[0].prefix))
        for rank, members in enumerate(ranked):
            type_key = key if rank == 0 else f"{key}#{rank}"
            for j, inst in enumerate(members):
                inst.type_key, inst.index_in_type = type_key, j


def replication_templates(blocks: list[BlockInstance]) -> dict[str, tuple[list, list, list[list]]]:
    """Per block type with >= 4 instances: (template nodes, check nodes, later instances' nodes).

    The propagation runs instances 0, 1 and 2 of a type; when instance 2 equals instance 1 node by
    node (shapes and saved bytes), instances 3.. copy instance 1's results instead of running.
    """
    by_type: dict[str, list[BlockInstance]] = {}
    for inst in blocks:
        by_type.setdefault(inst.type_key, []).append(inst)
    out = {}
    for type_key, members in by_type.items():
        if len(members) >= 4:
            out[type_key] = (members[1].nodes, members[2].nodes, [m.nodes for m in members[3:]])
    return out

"""Cut a model-with-loss fx graph into segments: the stem, one segment per pipeline unit, the head.

The units are the tracer's (:mod:`autopar.tracing.blocks`, stored on ``gm.meta["autopar"]["blocks"]``
and on every node as ``node.meta["autopar_block"]``): the repeated blocks of any indexed module
list in execution order (``layers.3``; ResNet's ``layer1.0 .. layer2.1``; T5's encoder blocks then
its decoder blocks) or, without any, the model's top-level children (``fc1 .. fc5``; ``emb, lstm,
head``). The planner counts and costs the same list (``OpGraph.block_order``), so a plan that names
``L`` layers cuts here into ``L`` units. Segment ids: ``0`` = stem (everything before the first
unit), ``1..L`` = unit ``i-1`` and the glue after it, ``L+1`` = head (everything after the last
unit, the loss included). Pipeline stages are contiguous runs of segments
(:mod:`autopar.lower.stages`), the stem with the first unit's stage and the head with the last
one, as ``Plan.stage_of_layers`` says.

Nodes that depend only on graph inputs (position ids, masks, rotary tables; no parameters, no
randomness, no mutation) are *rematerialised*: copied into every segment that reads them, so
pipeline stages exchange only activations and every stage receives the graph inputs themselves.
In-place ops and what they write (HF T5/BART build their decoder inputs with ``new_zeros``,
``copy_`` into a slice, ``masked_fill_``) are never copied nor dropped: a copy would miss the write.

The cut uses ``torch.fx.passes.split_module`` with the segment map as its callback (policy as data).
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from autopar.core.errors import PlanError
from autopar.tracing.blocks import find_blocks
from autopar.tracing.wrap import MODEL_PREFIX


@dataclass(frozen=True)
class Units:
    """The pipeline units of a graph, in execution order (module paths without the wrapper prefix)."""

    prefixes: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.prefixes)

    def describe(self) -> str:
        """``emb, lstm, head`` (the first and last few when there are many)."""
        names = list(self.prefixes)
        return ", ".join(names if len(names) <= 8 else [*names[:3], "...", *names[-3:]])


def _clean(path: object) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", str(path)).replace("L['self'].", "")


def module_paths(node: torch.fx.Node) -> list[str]:
    """Module paths of ``node``, outermost first (``['model', 'model.layers.0', ...]``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean(value[0] if isinstance(value, tuple) else value) for value in stack.values()]


def find_units(gm: torch.fx.GraphModule) -> Units | None:
    """The units the tracer stored on ``gm`` (derived the tracer's way for a graph that was not
    made by :func:`autopar.tracing.fx_trace`); None when the graph has none."""
    info = gm.meta.get("autopar")
    if info is not None and "blocks" in info:
        prefixes = tuple(b["prefix"] for b in info["blocks"])
    else:
        prefixes = tuple(b.prefix for b in find_blocks(gm))
    return Units(prefixes) if prefixes else None


def _unit_of(node: torch.fx.Node, units: Units, by_path: Mapping[str, int]) -> int | None:
    block = node.meta.get("autopar_block")
    if block is not None and 0 <= block[1] < units.count:
        return int(block[1])
    # Nodes a lowering pass added without the tracer's tag: by module path.
    for path in module_paths(node):
        for cand in (path, path.removeprefix(MODEL_PREFIX)):
            if cand in by_path:
                return by_path[cand]
    return None


def assign_segments(gm: torch.fx.GraphModule, units: Units | None) -> dict[torch.fx.Node, int]:
    """Segment of every non-placeholder node (see the module docstring)."""
    nodes = [n for n in gm.graph.nodes if n.op.startswith("call_")]
    if units is None:
        return dict.fromkeys(nodes, 0)
    by_path = {p: i for i, p in enumerate(units.prefixes)}
    seg: dict[torch.fx.Node, int | None] = {}
    for node in nodes:
        u = _unit_of(node, units, by_path)
        seg[node] = None if u is None else u + 1
    last_unit_node = max((i for i, n in enumerate(nodes) if seg[n] is not None), default=-1)
    for i, node in enumerate(nodes):
        if seg[node] is None:
            # Between units: with the unit before; before the first: the stem; after the last: the head.
            seg[node] = units.count + 1 if i > last_unit_node else _previous_unit(nodes, seg, i)
    _fix_order(gm, seg)
    return seg


def _previous_unit(nodes: list[torch.fx.Node], seg: Mapping[torch.fx.Node, int | None], i: int) -> int:
    for j in range(i - 1, -1, -1):
        if seg[nodes[j]] is not None:
            return seg[nodes[j]]
    return 0


_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}  # fmt: skip


def is_mutation(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs: ``operator.setitem`` and the in-place
    operators, methods and ops named ``..._`` (``masked_fill_``, ``copy_``), ATen ops whose schema
    is mutable (``aten.index_put_``)."""
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if target in _INPLACE_OPERATORS:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    name = str(name).split(".")[0]
    return name.endswith("_") and not name.startswith("_") and not name.endswith("__")


_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "getitem", "__getitem__", "slice", "select", "narrow",
    "transpose", "permute", "t", "expand", "expand_as", "unsqueeze", "squeeze", "flatten",
    "unflatten", "as_strided", "split", "chunk", "unbind", "diagonal", "movedim", "swapaxes",
    "detach", "contiguous", "alias", "unfold", "split_with_sizes", "_unsafe_view",
}  # fmt: skip


def _aliases_first_input(node: torch.fx.Node) -> bool:
    """Whether ``node``'s output may share storage with its first input (a view, or an in-place
    op returning what it wrote)."""
    if is_mutation(node):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.returns) and schema.returns[0].alias_info is not None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return str(name) in _VIEW_NAMES


def mutated_values(node: torch.fx.Node) -> list[torch.fx.Node]:
    """What mutation ``node`` writes: its first argument and, through views of views, the value
    that argument views (a slice of a ``new_zeros`` writes the ``new_zeros``)."""
    out = []
    cur = node.args[0] if node.args else None
    while isinstance(cur, torch.fx.Node):
        out.append(cur)
        if not (cur.op.startswith("call_") and cur.args and _aliases_first_input(cur)):
            break
        cur = cur.args[0]
    return out


def _fix_order(gm: torch.fx.GraphModule, seg: dict[torch.fx.Node, int]) -> None:
    """Make every node's segment >= its inputs' (a hoisted or shared node must not create a cycle),
    and a node that reads a mutated value after the write >= the write's segment (it must see it)."""
    written: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node not in seg:
            continue
        inputs = [seg[a] for a in node.all_input_nodes if a in seg]
        inputs += [written[a] for a in node.all_input_nodes if a in written]
        if inputs and max(inputs) > seg[node]:
            seg[node] = max(inputs)
        if is_mutation(node):
            for value in mutated_values(node):
                written[value] = max(written.get(value, 0), seg[node])


def protected_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Mutations and the values they write: never rematerialised, never erased."""
    out: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if is_mutation(node):
            out.add(node)
            out.update(mutated_values(node))
    return out


def _is_input_only(node: torch.fx.Node, gm: torch.fx.GraphModule, cache: dict, protected: set) -> bool:
    if node in cache:
        return cache[node]
    if node in protected and node.op != "placeholder":
        result = False
    elif node.op == "placeholder":
        result = True
    elif node.op == "get_attr":
        attr = _get_attr(gm, node.target)
        result = isinstance(attr, torch.Tensor) and not isinstance(attr, torch.nn.Parameter)
    elif node.op == "call_module":
        mod = gm.get_submodule(node.target)
        result = not any(True for _ in mod.parameters()) and "dropout" not in type(mod).__name__.lower()
        result = result and all(_is_input_only(a, gm, cache, protected) for a in node.all_input_nodes)
    elif node.op in ("call_function", "call_method"):
        result = not _is_random(node.target) and all(
            _is_input_only(a, gm, cache, protected) for a in node.all_input_nodes
        )
    else:
        result = False
    cache[node] = result
    return result


_RANDOM_OPS = {
    "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "rand", "randn", "randint",
    "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "normal", "uniform",
    "multinomial", "exponential", "poisson", "geometric", "cauchy", "log_normal",
}  # fmt: skip


def _is_random(target: object) -> bool:
    name = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    return name.rstrip("_").lower() in _RANDOM_OPS


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def rematerialise_inputs(gm: torch.fx.GraphModule, seg: dict[torch.fx.Node, int]) -> None:
    """Copy input-only nodes into each segment that reads them (in place, updates ``seg``)."""
    cache: dict = {}
    protected = protected_nodes(gm)
    # Users before producers: a clone's inputs are then cloned into its segment in turn.
    for node in reversed(list(gm.graph.nodes)):
        if node not in seg or node.op == "get_attr" or not _is_input_only(node, gm, cache, protected):
            continue
        by_segment: dict[int, list[torch.fx.Node]] = {}
        for user in node.users:
            s = seg.get(user, max(seg.values()) + 1)  # the output node: last segment
            by_segment.setdefault(min(s, max(seg.values())), []).append(user)
        home = seg[node]
        for s, users in by_segment.items():
            if s == home:
                continue
            first = min(users, key=_order(gm))
            with gm.graph.inserting_before(first):
                clone = gm.graph.node_copy(node, lambda a: a)
            clone.meta = dict(node.meta)
            seg[clone] = s
            cache[clone] = True
            for user in users:
                user.replace_input_with(node, clone)
        if not node.users:
            gm.graph.erase_node(node)
            del seg[node]
    gm.graph.lint()
    gm.recompile()


def _order(gm: torch.fx.GraphModule) -> Callable[[torch.fx.Node], int]:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def copy_mutated_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Graph inputs the model writes into (``labels.masked_fill_(...)``) are read through a copy
    made once: every pipeline stage receives the graph inputs as they came, so a stage after the
    write would read the unwritten input; the copy is an activation, sent with the write in it.
    Returns the inputs copied."""
    targets = {v for n in gm.graph.nodes if is_mutation(n) for v in mutated_values(n)}
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in targets]
    if not inputs:
        return []
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node in inputs:
        with gm.graph.inserting_after(last):
            copy = gm.graph.call_method("clone", (node,))
        copy.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
        node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
    gm.recompile()
    return [str(n.target) for n in inputs]


def split_segments(gm: torch.fx.GraphModule, units: Units | None) -> tuple[torch.fx.GraphModule, int]:
    """``split_module`` of ``gm`` into segment submodules ``submod_<segment>``; returns it and the
    number of segments."""
    copy_mutated_inputs(gm)
    seg = assign_segments(gm, units)
    rematerialise_inputs(gm, seg)
    counts = Counter(seg.values())
    split = split_module(gm, gm, lambda n: seg[n], keep_original_order=True)
    # Exported graphs return a flat list that their pytree codegen rebuilds into the model's
    # output structure; the split graph has plain codegen, so keep the spec for the last stage.
    info = getattr(gm.graph._codegen, "pytree_info", None)
    split.meta["out_spec"] = getattr(info, "out_spec", None)
    return split, (max(counts) + 1 if counts else 1)


def stage_of_segments(num_segments: int, units: Units | None, layer_stages: list[int]) -> list[int]:
    """Stage of each segment: stem with the first unit, head with the last."""
    if units is None:
        if max(layer_stages, default=0) > 0:
            raise PlanError(
                "pipeline parallelism cuts between modules, and the traced graph has none to cut "
                "between (no indexed module list, no child modules); use pp=1"
            )
        return [0] * num_segments
    if any(b < a for a, b in zip(layer_stages, layer_stages[1:])):
        raise PlanError(f"layer_stages={layer_stages} is not non-decreasing; stages must be contiguous")
    out = [layer_stages[0]] + list(layer_stages) + [layer_stages[-1]]
    return out[:num_segments] + [layer_stages[-1]] * (num_segments - len(out))

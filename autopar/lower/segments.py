"""Cut a model-with-loss fx graph into segments: the stem, one segment per repeated block, the head.

Blocks are the repeated modules ``<prefix>.<i>`` (``model.layers.3``, ``model.transformer.h.3``),
found from ``node.meta["nn_module_stack"]``: the indexed module list with the most entries. Segment
ids: ``0`` = stem (everything before the first block), ``1..L`` = block ``i-1``, ``L+1`` = head
(everything after the last block, the loss included). Pipeline stages are contiguous runs of
segments (:mod:`autopar.lower.stages`), the stem with the first block's stage and the head with
the last one, as ``Plan.stage_of_layers`` says.

Nodes that depend only on graph inputs (position ids, masks, rotary tables; no parameters, no
randomness) are *rematerialised*: copied into every segment that reads them, so pipeline stages
exchange only activations and every stage receives the graph inputs themselves.

The cut uses ``torch.fx.passes.split_module`` with the segment map as its callback (policy as data).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from autopar.core.errors import PlanError

_INDEXED = re.compile(r"(?P<prefix>.+)\.(?P<index>\d+)")


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a graph: ``<prefix>.0`` .. ``<prefix>.<count-1>``."""

    prefix: str
    count: int


def _clean(path: object) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", str(path)).replace("L['self'].", "")


def module_paths(node: torch.fx.Node) -> list[str]:
    """Module paths of ``node``, outermost first (``['model', 'model.layers.0', ...]``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean(value[0] if isinstance(value, tuple) else value) for value in stack.values()]


def find_blocks(gm: torch.fx.GraphModule) -> Blocks | None:
    """The module list with the most indexed children of one module type seen in the graph, or None."""
    seen: dict[str, dict[int, set]] = {}
    for node in gm.graph.nodes:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            path, kind = (value[0], value[1]) if isinstance(value, tuple) else (value, None)
            m = _INDEXED.fullmatch(_clean(path))
            if m:
                seen.setdefault(m["prefix"], {}).setdefault(int(m["index"]), set()).add(str(kind))
    candidates = []
    for prefix, by_index in seen.items():
        kinds = set().union(*by_index.values())
        if set(by_index) == set(range(len(by_index))) and len(kinds) == 1:
            candidates.append((len(by_index), -len(prefix), prefix))
    if not candidates:
        return None
    count, _, prefix = max(candidates)
    return Blocks(prefix=prefix, count=count)


def _block_index(node: torch.fx.Node, blocks: Blocks) -> int | None:
    lead = blocks.prefix + "."
    for path in module_paths(node):
        if path.startswith(lead):
            head = path[len(lead) :].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def assign_segments(gm: torch.fx.GraphModule, blocks: Blocks | None) -> dict[torch.fx.Node, int]:
    """Segment of every non-placeholder node (see the module docstring)."""
    nodes = [n for n in gm.graph.nodes if n.op.startswith("call_")]
    if blocks is None:
        return dict.fromkeys(nodes, 0)
    seg: dict[torch.fx.Node, int] = {}
    current = 0
    for node in nodes:
        b = _block_index(node, blocks)
        if b is not None:
            current = b + 1
            seg[node] = current
        else:
            seg[node] = current if current == 0 else None  # decided below
    last_block_node = max((i for i, n in enumerate(nodes) if seg[n] not in (None, 0)), default=-1)
    for i, node in enumerate(nodes):
        if seg[node] is None:
            # Between blocks: with the block before; after the last block: the head.
            seg[node] = blocks.count + 1 if i > last_block_node else _previous_block(nodes, seg, i)
    _fix_order(gm, seg)
    return seg


def _previous_block(nodes: list[torch.fx.Node], seg: Mapping[torch.fx.Node, int | None], i: int) -> int:
    for j in range(i - 1, -1, -1):
        if seg[nodes[j]] is not None:
            return seg[nodes[j]]
    return 0


def _fix_order(gm: torch.fx.GraphModule, seg: dict[torch.fx.Node, int]) -> None:
    """Make every node's segment >= its inputs' (a hoisted or shared node must not create a cycle)."""
    for node in gm.graph.nodes:
        if node not in seg:
            continue
        inputs = [seg[a] for a in node.all_input_nodes if a in seg]
        if inputs and max(inputs) > seg[node]:
            seg[node] = max(inputs)


def _is_input_only(node: torch.fx.Node, gm: torch.fx.GraphModule, cache: dict) -> bool:
    if node in cache:
        return cache[node]
    if node.op == "placeholder":
        result = True
    elif node.op == "get_attr":
        attr = _get_attr(gm, node.target)
        result = isinstance(attr, torch.Tensor) and not isinstance(attr, torch.nn.Parameter)
    elif node.op == "call_module":
        mod = gm.get_submodule(node.target)
        result = not any(True for _ in mod.parameters()) and "dropout" not in type(mod).__name__.lower()
        result = result and all(_is_input_only(a, gm, cache) for a in node.all_input_nodes)
    elif node.op in ("call_function", "call_method"):
        result = not _is_random(node.target) and all(
            _is_input_only(a, gm, cache) for a in node.all_input_nodes
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
    # Users before producers: a clone's inputs are then cloned into its segment in turn.
    for node in reversed(list(gm.graph.nodes)):
        if node not in seg or node.op == "get_attr" or not _is_input_only(node, gm, cache):
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


def split_segments(gm: torch.fx.GraphModule, blocks: Blocks | None) -> tuple[torch.fx.GraphModule, int]:
    """``split_module`` of ``gm`` into segment submodules ``submod_<segment>``; returns it and the
    number of segments."""
    seg = assign_segments(gm, blocks)
    rematerialise_inputs(gm, seg)
    counts = Counter(seg.values())
    split = split_module(gm, gm, lambda n: seg[n], keep_original_order=True)
    # Exported graphs return a flat list that their pytree codegen rebuilds into the model's
    # output structure; the split graph has plain codegen, so keep the spec for the last stage.
    info = getattr(gm.graph._codegen, "pytree_info", None)
    split.meta["out_spec"] = getattr(info, "out_spec", None)
    return split, (max(counts) + 1 if counts else 1)


def stage_of_segments(num_segments: int, blocks: Blocks | None, layer_stages: list[int]) -> list[int]:
    """Stage of each segment: stem with the first block, head with the last."""
    if blocks is None:
        if max(layer_stages, default=0) > 0:
            raise PlanError(
                "pipeline parallelism needs repeated blocks (a ModuleList like `layers.<i>`) to cut "
                "at, and none was found in the traced graph; use pp=1"
            )
        return [0] * num_segments
    if any(b < a for a, b in zip(layer_stages, layer_stages[1:])):
        raise PlanError(f"layer_stages={layer_stages} is not non-decreasing; stages must be contiguous")
    out = [layer_stages[0]] + list(layer_stages) + [layer_stages[-1]]
    return out[:num_segments] + [layer_stages[-1]] * (num_segments - len(out))

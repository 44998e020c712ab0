"""Activation recompute of block segments: ``full`` and ``selective``.

* ``full``: every block segment (``submod_<i>`` of a block) runs under non-reentrant
  ``torch.utils.checkpoint``; backward keeps the segment's inputs only and re-runs the whole block.
* ``selective`` (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", sec. 4.2): inside each block segment, the **attention-score region** is outlined into a
  submodule (``score_region_<k>``) that runs under the same checkpoint; everything else in the block
  saves its activations as usual. The region is defined exactly as the estimator defines it
  (``autopar/estimator/blocks.py``, ``_score_region``): from an activation-activation matmul (op
  kind ``matmul`` in :mod:`autopar.tracing.opkinds`: ``q @ k^T``) to the next matmul it feeds
  (``probs @ v``), both included, plus every node on a path between them (scaling, the causal
  mask built from the scores' shape, masking, softmax, attention dropout). Its inputs (``q``,
  ``k^T``, ``v``, the sample ids of the counter-based dropout) are kept; what the region's ops save
  besides them (the scores, the softmax output, the dropout mask, the dropped probabilities) is
  dropped and recomputed in backward. The recompute is exact: dropout masks are a pure function
  of the sample ids (:mod:`autopar.lower.rng`).

A block with fused attention (``scaled_dot_product_attention``, op kind ``attention``) has no
such region: the kernel does not keep the scores, and the estimator drops nothing for it either,
so ``selective`` keeps that block as ``none`` does (logged once per segment), as costed.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn
from torch.fx.passes.tools_common import legalize_graph

from autopar.tracing.opkinds import op_kind

log = logging.getLogger(__name__)

REGION_PREFIX = "score_region_"
"""Name of an outlined attention-score region inside a block segment (``score_region_0``, ...)."""


class Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing (its inputs are all it keeps)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


# ------------------------------------------------------------------------------------ region
def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    return op_kind(node, module)


def _descendants(start: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = {start}, [start]
    while stack:
        for user in stack.pop().users:
            if user.op != "output" and user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _ancestors(start: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = {start}, [start]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg.op not in ("placeholder", "get_attr") and arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def score_regions(gm: torch.fx.GraphModule) -> list[set[torch.fx.Node]]:
    """The attention-score regions of a block segment (module docstring), in graph order.

    Each is closed under paths (a node between two region nodes is in the region), so it can be
    outlined into one call."""
    matmuls = [n for n in gm.graph.nodes if n.op.startswith("call_") and _kind(gm, n) == "matmul"]
    used: set[torch.fx.Node] = set()
    regions = []
    for first in matmuls:
        if first in used:
            continue
        down = _descendants(first)
        second = next((m for m in matmuls if m in down and m is not first), None)
        if second is None:
            continue
        used |= {first, second}
        regions.append((down & _ancestors(second)) | {first, second})
    return regions


def _outline(gm: torch.fx.GraphModule, region: set[torch.fx.Node], name: str) -> None:
    """Replace ``region`` in ``gm`` by one call of a checkpointed submodule ``name``."""
    order = [n for n in gm.graph.nodes if n in region]
    inputs: list[torch.fx.Node] = []
    for n in order:
        inputs += [a for a in n.all_input_nodes if a not in region and a not in inputs]
    outputs = [n for n in order if any(u not in region for u in n.users)]
    sub = torch.fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for n in order:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    gm.add_submodule(name, Checkpointed(torch.fx.GraphModule(gm, sub, class_name=name)))
    with gm.graph.inserting_before(order[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    values = []
    for i, out in enumerate(outputs):
        value = call
        if len(outputs) > 1:
            with gm.graph.inserting_after(call):
                value = gm.graph.call_function(operator.getitem, (call, i))
        out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in region)
        values.append(value)
    for n in reversed(order):
        gm.graph.erase_node(n)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(position[u] < position[v] for v in values for u in v.users):
        legalize_graph(gm)  # a user of the region's output sat between its nodes in graph order


def apply_selective(gm: torch.fx.GraphModule, label: str) -> int:
    """Outline and checkpoint every attention-score region of one block segment in place; returns
    how many there were."""
    regions = score_regions(gm)
    if not regions:
        log.info(
            "recompute=selective: %s has no attention-score region (fused or no attention); it "
            "keeps its activations, as the estimator costs it",
            label,
        )
        return 0
    for k, region in enumerate(regions):
        _outline(gm, region, f"{REGION_PREFIX}{k}")
    gm.graph.lint()
    gm.recompile()
    return len(regions)


def region_modules(gm: nn.Module) -> dict[str, torch.fx.GraphModule]:
    """The outlined regions of a block segment by name (for the rank-code listing)."""
    return {
        name: mod.inner
        for name, mod in gm.named_children()
        if name.startswith(REGION_PREFIX) and isinstance(mod, Checkpointed)
    }

"""Pipeline stage modules built from the segment split (:mod:`autopar.lower.segments`).

A stage is a contiguous run of segments. Its module is an fx ``GraphModule`` that calls the
segment submodules (``submod_<segment>``) in order, with the signature the pipeline needs::

    stage 0:      forward(*model_inputs, **side)  -> activations for stage 1
    stage s:      forward(*activations, **side)   -> activations for stage s+1
    last stage:   forward(*activations, **side)   -> the graph output (the loss)

``side`` holds every graph input (tokens, targets, sample ids) by the model's argument name (the
placeholder's ``target``: fx renames a placeholder ``input`` to ``input_1``, the argument stays
``input``); each stage takes the ones it reads, so targets go straight to the last stage and
nothing but activations crosses stages. A value made on stage ``a`` and read on stage ``b > a + 1``
is passed through the stages in between (an encoder's output to every decoder stage).

Every tensor crossing stages is contiguous: p2p sends need it (a permuted attention bias would
fail in gloo), forward (the outputs) and backward (the gradients of the received inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from autopar.core.errors import PlanError

SIDE_PREFIX = "autopar_in_"
"""Graph inputs may be passed as ``autopar_in_<name>=``: a pipeline schedule's ``step()`` has
keyword arguments of its own (``target``, ``losses``) that a graph input could be named like."""


@dataclass
class StageSpec:
    """Plain-data description of one stage."""

    index: int
    num_stages: int
    segments: list[int]
    input_names: list[str]
    """Positional inputs: the model inputs on stage 0, received activations otherwise."""
    side_names: list[str]
    """Graph inputs this stage reads by keyword."""
    output_names: list[str] = field(default_factory=list)
    """Activations sent to the next stage (empty on the last stage: it returns the graph output)."""

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (it is sent to the previous stage)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _received(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return _ContiguousGrad.apply(x)
    return x


def _to_send(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.contiguous()
    if isinstance(out, tuple):
        return tuple(_to_send(x) for x in out)
    return out


class StageModule(nn.Module):
    """Runs one stage: positional activations plus the graph inputs it needs by keyword."""

    def __init__(self, gm: torch.fx.GraphModule, spec: StageSpec, out_spec: TreeSpec | None = None):
        super().__init__()
        self.gm = gm
        self.spec = spec
        self.out_spec = out_spec
        """pytree spec of the graph output (exported graphs); None = return as is."""
        self.flat_output = False
        """Return the last stage's output as a flat tuple of tensors (for a pipeline schedule, which
        merges micro-batch outputs tensor by tensor); :meth:`unflatten` restores the structure."""

    def forward(self, *args: Any, **side: Any) -> Any:
        side = {k.removeprefix(SIDE_PREFIX): v for k, v in side.items()}
        missing = [k for k in self.spec.side_names if k not in side]
        if missing:
            raise TypeError(f"stage {self.spec.index} needs the graph inputs {missing}")
        if not self.spec.is_first:
            args = tuple(_received(a) for a in args)
        out = self.gm(*args, **{k: side[k] for k in self.spec.side_names})
        if not self.spec.is_last:
            return _to_send(out)
        if self.flat_output:
            return tuple(tree_flatten(out)[0]) if self.out_spec is None else tuple(out)
        if self.out_spec is not None:
            out = tree_unflatten(list(out), self.out_spec)
        return out

    def unflatten(self, flat: tuple) -> Any:
        """The output structure of a flat output (see ``flat_output``)."""
        if self.out_spec is not None:
            return tree_unflatten(list(flat), self.out_spec)
        return flat[0] if len(flat) == 1 else flat


def _segment_of(node: torch.fx.Node) -> int | None:
    if node.op == "call_module" and str(node.target).startswith("submod_"):
        return int(str(node.target).rsplit("_", 1)[1])
    if node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        return _segment_of(node.args[0])
    return None


def _node_stages(split: torch.fx.GraphModule, stage_of_segment: list[int], last: int) -> dict:
    stage: dict[torch.fx.Node, int] = {}
    for node in split.graph.nodes:
        if node.op == "output":
            stage[node] = last
        elif node.op.startswith("call_"):
            seg = _segment_of(node)
            if seg is None:
                raise PlanError(f"cannot place top-level node {node.name} ({node.target}) on a stage")
            stage[node] = stage_of_segment[seg]
    return stage


def build_stage(
    split: torch.fx.GraphModule,
    stage_of_segment: list[int],
    num_stages: int,
    index: int,
    model_input_names: list[str],
) -> StageModule:
    """The module of stage ``index`` (see the module docstring)."""
    stage = _node_stages(split, stage_of_segment, num_stages - 1)
    nodes = list(split.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]

    def crossing(s: int) -> list[torch.fx.Node]:
        """Values made before stage s and read on stage s or later."""
        return [
            n
            for n in nodes
            if n in stage
            and n.op != "output"
            and stage[n] < s
            and any(stage.get(u, -1) >= s for u in n.users)
        ]

    mine = [n for n in nodes if stage.get(n) == index]
    reads = {a for n in mine for a in n.all_input_nodes}
    if index == 0:
        inputs = [p for p in placeholders if str(p.target) in model_input_names]
    else:
        inputs = crossing(index)
    side = [p for p in placeholders if p in reads and p not in inputs]
    outputs = crossing(index + 1) if index < num_stages - 1 else []

    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in inputs + side:
        # Activations from the previous stage read as what they are: recv_<producer>.
        env[n] = g.placeholder(f"recv_{n.name}" if index > 0 and n in inputs else str(n.target))
        env[n].meta = dict(n.meta)
    for n in nodes:
        if (
            n.op == "get_attr"
            and any(stage.get(u) == index for u in n.users)
            or stage.get(n) == index
            and n.op != "output"
        ):
            env[n] = g.node_copy(n, env.__getitem__)
    if index == num_stages - 1:
        out = next(n for n in nodes if n.op == "output")
        g.output(torch.fx.graph.map_arg(out.args[0], env.__getitem__))
    else:
        missing = [n.name for n in outputs if n not in env]
        if missing:
            raise PlanError(f"stage {index} cannot forward {missing}: made on a later stage")
        values = tuple(env[n] for n in outputs)
        g.output(values[0] if len(values) == 1 else values)
    gm = torch.fx.GraphModule(split, g, class_name=f"Stage{index}")
    segments = sorted({s for n in mine if (s := _segment_of(n)) is not None})
    spec = StageSpec(
        index=index,
        num_stages=num_stages,
        segments=segments,
        input_names=[env[n].name for n in inputs],
        side_names=[str(n.target) for n in side],
        output_names=[n.name for n in outputs],
    )
    out_spec = split.meta.get("out_spec") if spec.is_last else None
    return StageModule(gm, spec, out_spec)

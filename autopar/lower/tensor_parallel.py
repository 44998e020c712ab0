"""``lower_tensor_parallel``: a plan's tensor-parallel placements -> one rank's fx program.

    lowered = lower_tensor_parallel(gm, plan, tp_rank=r, tp_group=group)   # group=None: dry
    loss = lowered.gm(tokens, targets)          # same signature as gm; collectives inside
    lowered.shards["model.layers.0.attn.q_proj.weight"]
        # ShardSpec(full_name='model.layers.0.attn.q_proj.weight', dim=0, num_shards=2, index=r)
    print(lowered.code)                         # the program, collectives visible

The returned module owns its parameters (fresh tensors: this rank's slices of the originals),
keeps every node's ``meta`` (``nn_module_stack`` included, so a pipeline splitter can assign nodes
to stages by module path; inserted collectives take their producer's) and holds the process group
in its attribute ``autopar_tp`` (:class:`~autopar.lower.collectives.TPContext`), never in a module
global. ``tensor_meta``/``val`` still describe the full tensors of the traced graph; every tensor
node also gets ``meta["autopar_placement"]`` (``"S(1)"``) and ``meta["autopar_local_shape"]``.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.distributed import ProcessGroup

from autopar.core.errors import PlanError
from autopar.core.plan import NodePlacement, Placement, Plan, Shard
from autopar.lower import collectives as C
from autopar.lower import parallel_ops as O
from autopar.lower.choose import Choice, choose, predict_collectives
from autopar.lower.rewrite import Rewriter
from autopar.sharding.fallback import (
    ReplicatedOp,
    cannot_parallelise,
    replicated_ops,
    sharded_param_share,
    total_param_elements,
)
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.layout import collective_volume as _volume
from autopar.sharding.layout import planned_collectives
from autopar.sharding.megatron import megatron_placements
from autopar.sharding.normalize import canonical_names

log = logging.getLogger(__name__)

_PRETTY = {
    **C.COLLECTIVES,
    "autopar_vocab_embedding": O.autopar_vocab_embedding,
    "autopar_vocab_parallel_cross_entropy": O.autopar_vocab_parallel_cross_entropy,
    "autopar_partial_bias": O.autopar_partial_bias,
    "autopar_dropout": O.autopar_dropout,
    "autopar_global_shape": O.autopar_global_shape,
    "autopar_global_size": O.autopar_global_size,
    "autopar_local_shape": O.autopar_local_shape,
}


def _register_names() -> None:
    """Generated code calls ``autopar_all_reduce(...)`` rather than ``autopar_lower_collectives_...``."""
    try:
        from torch.fx.graph import _register_custom_builtin
    except ImportError:  # private fx API; without it the names are merely longer
        return
    for name, fn in _PRETTY.items():
        _register_custom_builtin(name, f"from {fn.__module__} import {name}", fn)


_register_names()

COLLECTIVE_NAMES = (*C.COLLECTIVES, "autopar_vocab_parallel_cross_entropy")
"""Names whose calls communicate (the cross entropy does three all-reduces inside)."""


@dataclass(frozen=True)
class ShardSpec:
    """Where a rank's local parameter comes from: ``full[..., index-th of num_shards along dim, ...]``."""

    full_name: str
    dim: int | None
    """Sharded dim of the full parameter; None = the local parameter is the full one (replicated)."""
    num_shards: int
    index: int

    def slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor."""
        if self.dim is None:
            return full
        size = full.shape[self.dim] // self.num_shards
        return full.narrow(self.dim, self.index * size, size)

    @staticmethod
    def unshard(specs_and_locals: list[tuple[ShardSpec, torch.Tensor]]) -> torch.Tensor:
        """The full tensor from every rank's (spec, local tensor) of one parameter."""
        specs = sorted(specs_and_locals, key=lambda x: x[0].index)
        first = specs[0][0]
        if first.dim is None:
            return specs[0][1]
        return torch.cat([t for _, t in specs], dim=first.dim)


@dataclass
class LoweredModule:
    """One tensor-parallel rank's program."""

    gm: torch.fx.GraphModule
    shards: dict[str, ShardSpec]
    """Local parameter name (in ``gm``) -> where it comes from in the full model."""
    code: str
    aliases: dict[str, str] = field(default_factory=dict)
    """Other names of tied parameters -> the name used in ``gm`` and ``shards``."""
    placements: dict[str, NodePlacement] = field(default_factory=dict)
    """The placements lowered (the plan's, or the default ones when the plan had none)."""
    notes: list[str] = field(default_factory=list)
    predicted_collectives: Counter = field(default_factory=Counter)
    """Collective calls per name that the placements imply (before any code is generated)."""
    buffer_shards: dict[str, ShardSpec] = field(default_factory=dict)
    """Buffers placed like parameters (BatchNorm running statistics): local name -> origin."""
    replicated_ops: list[ReplicatedOp] = field(default_factory=list)
    """Ops run replicated for lack of a sharding rule (:func:`autopar.sharding.fallback.replicated_ops`)."""
    sharded_param_share: float = 1.0
    """Share of the model's parameter elements this layout shards."""

    def collectives(self) -> Counter:
        """How many times each communicating function is called in the program."""
        counts: Counter = Counter()
        for node in self.gm.graph.nodes:
            name = getattr(node.target, "__name__", "")
            if node.op == "call_function" and name in COLLECTIVE_NAMES:
                counts[name] += 1
        return counts


def _set_attr(root: nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    mod = root
    for atom in path:
        mod = getattr(mod, atom)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(last, value)
    elif isinstance(value, torch.Tensor):
        persistent = last not in getattr(mod, "_non_persistent_buffers_set", set())
        mod.register_buffer(last, value, persistent=persistent)
    else:
        setattr(mod, last, value)


def _build_module(
    sg: ShardingGraph,
    graph: torch.fx.Graph,
    params: dict[str, Placement],
    tp: int,
    rank: int,
    ctx: C.TPContext,
) -> tuple[torch.fx.GraphModule, dict[str, ShardSpec], dict[str, ShardSpec]]:
    sg.gm.autopar_tp = ctx  # _copy_attr below copies it onto the new module
    gm = torch.fx.GraphModule(sg.gm, graph, type(sg.source).__name__)
    del sg.gm.autopar_tp
    shards: dict[str, ShardSpec] = {}
    buffer_shards: dict[str, ShardSpec] = {}
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "get_attr" and target in sg.params:
            p = params.get(target)
            dim = p.dim if isinstance(p, Shard) else None
            spec = ShardSpec(target, dim, tp if dim is not None else 1, rank if dim is not None else 0)
            full = sg.params[target]
            local = spec.slice(full.detach()).clone()
            _set_attr(gm, target, nn.Parameter(local, requires_grad=full.requires_grad))
            shards[target] = spec
        elif node.op == "get_attr" and target in sg.state_buffers:
            p = params.get(target)
            dim = p.dim if isinstance(p, Shard) else None
            spec = ShardSpec(target, dim, tp if dim is not None else 1, rank if dim is not None else 0)
            _set_attr(gm, target, spec.slice(sg.state_buffers[target].detach()).clone())
            buffer_shards[target] = spec
        elif node.op == "get_attr" and target in sg.norm.buffers:
            _set_attr(gm, target, sg.norm.buffers[target].detach().clone())
        elif node.op == "call_module":
            _set_attr(gm, target, copy.deepcopy(sg.gm.get_submodule(target)))
    for name, _ in gm.named_parameters():  # parameters of kept call_module submodules
        shards.setdefault(name, ShardSpec(name, None, 1, 0))
    _keep_buffer_persistence(sg.source, gm)
    return gm, shards, buffer_shards


def _keep_buffer_persistence(source: nn.Module, gm: nn.Module) -> None:
    for mod_name, mod in source.named_modules():
        for buf in getattr(mod, "_non_persistent_buffers_set", ()):
            target = f"{mod_name}.{buf}" if mod_name else buf
            try:
                owner = gm.get_submodule(target.rsplit(".", 1)[0]) if "." in target else gm
            except AttributeError:
                continue
            if buf in getattr(owner, "_buffers", {}):
                owner._non_persistent_buffers_set.add(buf)


def _unchanged(gm: torch.fx.GraphModule) -> LoweredModule:
    _, aliases = canonical_names(gm)
    shards = {name: ShardSpec(name, None, 1, 0) for name, _ in gm.named_parameters()}
    return LoweredModule(gm=gm, shards=shards, code=gm.code, aliases=aliases)


def lower_tensor_parallel(
    gm: torch.fx.GraphModule, plan: Plan, tp_rank: int, tp_group: ProcessGroup | None
) -> LoweredModule:
    """Rank ``tp_rank``'s program for ``plan``'s tensor-parallel placements (see module docstring).

    ``gm`` is the traced model-with-loss graph (``autopar.tracing.fx_trace``). With ``plan.tp == 1``
    it is returned unchanged. Empty ``plan.placements`` means the default
    :func:`~autopar.sharding.megatron_placements` (with ``plan.sequence_parallel``). ``tp_group``
    None gives a dry lowering (for ``rank_code``) whose collectives raise if run.
    """
    tp = plan.tp
    if tp == 1:
        return _unchanged(gm)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank={tp_rank} is outside the tensor-parallel group of size {tp}")
    if tp_group is not None:
        import torch.distributed as dist

        size = dist.get_world_size(tp_group)
        if size != tp:
            raise PlanError(
                f"the tensor-parallel process group has {size} ranks but the plan says tp={tp}; "
                "pass the group of this rank's tp axis (autopar.runtime.groups)"
            )
    sg = ShardingGraph(gm, tp)
    placements = plan.placements or megatron_placements(sg, tp, plan.sequence_parallel)
    choices, params = choose(sg, placements)
    fallbacks, share = replicated_ops(sg, params), sharded_param_share(sg, params)
    check_coverage(sg, fallbacks, share, warn=tp_rank == 0)
    rw = Rewriter(sg, choices, params, tp_rank)
    graph = rw.run()
    graph.lint()
    ctx = C.TPContext(tp_group, tp_rank, tp)
    new_gm, shards, buffer_shards = _build_module(sg, graph, params, tp, tp_rank, ctx)
    new_gm.meta = dict(getattr(gm, "meta", {}) or {})
    log.debug("lowered tp rank %d/%d: %d nodes", tp_rank, tp, len(graph.nodes))
    return LoweredModule(
        gm=new_gm,
        shards=shards,
        code=new_gm.code,
        aliases=dict(sg.norm.aliases),
        placements=placements,
        notes=rw.notes,
        predicted_collectives=predict_collectives(sg, choices, params),
        buffer_shards=buffer_shards,
        replicated_ops=fallbacks,
        sharded_param_share=share,
    )


ALMOST_NOTHING = 0.05
"""Below this share of parameter elements sharded, tp buys (almost) nothing: said so loudly."""


def check_coverage(sg: ShardingGraph, fallbacks: list[ReplicatedOp], share: float, warn: bool = True) -> None:
    """Never silent: warn naming every op replicated for lack of a rule; refuse a layout that
    shards no parameter at all (tp would only add communication), suggesting dp or pp."""
    if total_param_elements(sg) and share == 0.0:
        raise PlanError(cannot_parallelise(sg, fallbacks))
    if not warn:
        return
    if fallbacks:
        lines = "\n  ".join(str(f) for f in fallbacks)
        log.warning("tp=%d runs %d op(s) replicated (no sharding rule):\n  %s", sg.tp, len(fallbacks), lines)
    if total_param_elements(sg) and share < ALMOST_NOTHING:
        why = ", ".join(f"{f.op} ('{f.module}')" for f in fallbacks[:6]) or "no rule shards its weights"
        log.warning(
            "this model cannot be tensor-parallelised: tp=%d shards only %.2f %% of its parameter "
            "elements (%s); dp or pp would use the devices better",
            sg.tp,
            100 * share,
            why,
        )


def collective_volume(gm: torch.fx.GraphModule, plan: Plan) -> Counter:
    """Bytes per ``(collective, phase)`` that ``plan``'s tensor-parallel program moves per micro-batch
    (:func:`~autopar.sharding.layout.planned_collectives`; no rewrite). What the estimator's
    tensor-parallel accounting must equal (``tests/test_layout_agreement.py``)."""
    if plan.tp == 1:
        return Counter()
    sg = ShardingGraph(gm, plan.tp)
    placements = plan.placements or megatron_placements(sg, plan.tp, plan.sequence_parallel)
    choices, params = choose(sg, placements)
    return _volume(planned_collectives(sg, choices, params))


def chosen_strategies(gm: torch.fx.GraphModule, plan: Plan) -> dict[str, Choice]:
    """Node name -> the strategy and visible placement the lowering would use (no rewrite)."""
    sg = ShardingGraph(gm, plan.tp)
    placements = plan.placements or megatron_placements(sg, plan.tp, plan.sequence_parallel)
    choices, _ = choose(sg, placements)
    return {n.name: c for n, c in choices.items()}

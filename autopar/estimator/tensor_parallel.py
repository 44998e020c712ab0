"""Tensor-parallel facts of each graph node: the Megatron default derived from the graph, or the
plan's own placements (see :mod:`autopar.estimator`, step 2)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch.fx

from autopar.core.ir import OpGraph, OpNode
from autopar.core.plan import NodePlacement, Partial, Placement, Plan, Shard
from autopar.sharding import Normalized, ShardingGraph, Strategy, functionalize, megatron_placements
from autopar.sharding.fallback import replicated_ops, sharded_param_share
from autopar.sharding.layout import choose, planned_collectives
from autopar.sharding.reshard import BACKWARD_OF
from autopar.tracing.collapse import first_blocks_module
from autopar.tracing.wrap import MODEL_PREFIX
from cost_models import CommWork

T = TypeVar("T")

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "bool": 1, "int64": 8, "int32": 4}
"""Bytes per element of the dtypes a traced graph records (others count as 4)."""


# ------------------------------------------------------------------------------ sharding
@dataclass
class NodeShard:
    """Tensor-parallel facts of one node."""

    split: bool = False
    """Its work is split over tp (output S, or a row-parallel Linear)."""
    role: str = ""
    """``column``, ``row``, ``vocab_embedding``, ``vocab_loss`` or ''."""
    param_div: float = 1.0
    """How many ways the node's sharded parameters are split (tp, or 1 when none is)."""
    param_divs: dict[str, float] = field(default_factory=dict)
    """Per parameter (the OpGraph's names) where it differs from ``param_div``: the replicated bias
    of a row-parallel Linear."""
    saved_split: bool | None = None
    """Whether what it saves for backward is split; None = same as ``split`` (a column-parallel
    Linear saves its replicated input)."""

    def div_of(self, param: str) -> float:
        """How many ways parameter ``param`` (read by this node) is split."""
        return self.param_divs.get(param, self.param_div)

    @property
    def saves_split(self) -> bool:
        return self.split if self.saved_split is None else self.saved_split


@dataclass
class TPLayout:
    """The tensor-parallel layout of a whole graph: per node its :class:`NodeShard` and collectives."""

    shard: dict[str, NodeShard] = field(default_factory=dict)
    comms: dict[str, list[CommWork]] = field(default_factory=lambda: defaultdict(list))
    """Per node name: the collectives issued right after it (forward) or for it (backward)."""


def tensor_bytes(shape: Sequence[int] | None, dtype: object) -> float:
    """Bytes of a tensor of ``shape`` and ``dtype`` (0 for an unknown shape)."""
    if shape is None:
        return 0.0
    return float(math.prod(shape) * DTYPE_BYTES.get(str(dtype), 4))


def out_bytes(n: OpNode) -> float:
    """Bytes of ``n``'s output at the graph's batch size."""
    return tensor_bytes(n.output_shape, n.output_dtype)


def cached(graph: OpGraph, key: tuple, make: Callable[[], T]) -> T:
    """Memoise a graph-derived value on the graph itself. The planner costs thousands of plans of
    one graph; everything that depends only on (graph, tp, sp, micro-batch) is derived once."""
    cache = graph.__dict__.setdefault("_estimator_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def layout_comms(graph: OpGraph, tp: int, sp: bool) -> dict[str, list[CommWork]] | None:
    """Per node name, the collectives of the layout the lowering runs by default: the sharding rules'
    placements (:func:`~autopar.sharding.megatron_placements`) and the reshardings they imply
    (:func:`~autopar.sharding.layout.planned_collectives`), derived once on the stem, the first
    instance of each block type and the head, then copied to every later instance. None when the
    graph has no fx module (a hand-built OpGraph): the walk's own accounting is used then."""
    return cached(graph, ("layout_comms", tp, sp), lambda: _derive_layout_comms(graph, tp, sp))


@dataclass(frozen=True)
class TPCoverage:
    """What the default layout at one ``tp`` shards, and what it leaves replicated for lack of a rule."""

    param_share: float
    """Share of the parameter elements sharded: 0.0 means tp buys nothing (the lowering refuses it)."""
    replicated: tuple[str, ...]
    """One line per op run replicated for lack of a rule (:class:`~autopar.sharding.fallback.ReplicatedOp`)."""


def tp_coverage(graph: OpGraph, tp: int) -> TPCoverage | None:
    """The default layout's coverage at ``tp`` (what the lowering will run), so the planner offers
    only a ``tp`` that shards something and says what stays replicated. Derived on the stem, the
    first instance of each block type and the head (later instances are placed like the first).
    None when the graph has no fx module (a hand-built OpGraph)."""

    def derive() -> TPCoverage | None:
        norm = _normalized(graph, collapsed=True)
        if norm is None:
            return None
        sg = ShardingGraph(norm.gm, tp, normalized=norm)
        _, params = choose(sg, megatron_placements(sg, tp, False))
        ops = replicated_ops(sg, params)
        return TPCoverage(sharded_param_share(sg, params), tuple(str(o) for o in ops))

    return cached(graph, ("tp_coverage", tp), derive)


def _normalized(graph: OpGraph, *, collapsed: bool) -> Normalized | None:
    """The functionalised fx module the layout is derived on (tp-independent, so derived once per
    graph): the collapsed one (stem, first block instances, head) for the default placements, the
    whole graph for a plan's own placements (which may differ between instances)."""

    def make() -> Normalized | None:
        gm = first_blocks_module(graph) if collapsed else graph.gm
        return None if gm is None else functionalize(gm)

    return cached(graph, ("normalized", collapsed), make)


def _block_uniform(graph: OpGraph, placements: dict[str, NodePlacement]) -> bool:
    """Whether every later instance of a block is placed like the first (what the planner's
    placements are, by :func:`autopar.solve.intra_op.expand_placements`)."""

    def key(p: NodePlacement | None) -> tuple | None:
        return None if p is None else (p.output, p.collective, list(p.params.values()))

    for bt in graph.block_types.values():
        first = bt.node_names[0] if bt.node_names else []
        for names in bt.node_names[1:]:
            if any(key(placements.get(n)) != key(placements.get(t)) for n, t in zip(names, first)):
                return False
    return True


def _derive_layout_comms(
    graph: OpGraph, tp: int, sp: bool, placements: dict[str, NodePlacement] | None = None
) -> dict[str, list[CommWork]] | None:
    collapsed = placements is None or _block_uniform(graph, placements)
    norm = _normalized(graph, collapsed=collapsed)
    if norm is None:
        return None
    sg = ShardingGraph(norm.gm, tp, normalized=norm)
    if placements is None:
        placements = megatron_placements(sg, tp, sp)
    elif collapsed:  # the first instances stand for the rest: their placements are the same
        kept = {n.name for n in sg.nodes}
        placements = {k: v for k, v in placements.items() if k in kept}
    choices, params = choose(sg, placements)
    out: dict[str, list[CommWork]] = defaultdict(list)
    for j, c in enumerate(planned_collectives(sg, choices, params)):
        name = f"{c.at}:{c.kind}:{c.phase}:{j}"
        out[c.at].append(CommWork(name=name, collective=c.kind, nbytes=float(c.nbytes), phase=c.phase))
    if collapsed:
        _copy_to_instances(graph, out)
    return out


def _copy_to_instances(graph: OpGraph, comms: dict[str, list[CommWork]]) -> None:
    """Later block instances get the collectives of their twin in the first instance."""
    for bt in graph.block_types.values():
        first = bt.node_names[0] if bt.node_names else []
        for names in bt.node_names[1:]:
            for name, twin in zip(names, first):
                if twin in comms and name not in comms:
                    comms[name] = [
                        dataclasses.replace(w, name=w.name.replace(twin, name, 1)) for w in comms[twin]
                    ]


def megatron_tp(graph: OpGraph, tp: int, sp: bool) -> TPLayout:
    """The default tensor-parallel layout, costed as the lowering runs it: per node the strategy the
    sharding rules choose (:func:`~autopar.sharding.megatron_placements` then
    :func:`~autopar.sharding.layout.choose`, the one derivation the lowering also uses) and the
    collectives it implies (:func:`layout_comms`). A hand-built OpGraph (no fx module) has no layout
    to derive; the Megatron walk over its op kinds (:func:`megatron_walk`) stands in then, and
    serves the tests as an independent oracle."""

    def derive() -> TPLayout:
        shards = _layout_shards(graph, tp, sp)
        if shards is None:
            return megatron_walk(graph, tp, sp)
        return TPLayout(shard=shards, comms=layout_comms(graph, tp, sp) or defaultdict(list))

    return cached(graph, ("megatron_tp", tp, sp), derive)


def _layout_shards(graph: OpGraph, tp: int, sp: bool) -> dict[str, NodeShard] | None:
    """Per node, the :class:`NodeShard` of the strategy the default layout gives it, derived on the
    stem, the first instance of each block type and the head, copied to later instances. Nodes the
    layout does not place (views of metadata, getattr) follow their inputs."""
    norm = _normalized(graph, collapsed=True)
    if norm is None:
        return None
    sg = ShardingGraph(norm.gm, tp, normalized=norm)
    choices, params = choose(sg, megatron_placements(sg, tp, sp))
    pdiv = {name: float(tp) if isinstance(p, Shard) else 1.0 for name, p in params.items()}
    placed: dict[str, NodeShard] = {}
    sharded_out: dict[str, bool] = {}
    for node, c in choices.items():
        st = c.strategy
        sharded_params = any(isinstance(p, Shard) for _, p in st.params)
        role = st.name if st.name in ("column", "row") else ""  # the GEMM split the rules chose
        placed[node.name] = NodeShard(
            split=st.compute_fraction < 1.0,
            role=role,
            param_div=tp if sharded_params else 1.0,
            saved_split=_saves_split(sg, node, st),
        )
        sharded_out[node.name] = isinstance(c.final, Shard)
    twin = _twins(graph)
    out: dict[str, NodeShard] = {}
    for n in graph.nodes:
        key = twin.get(n.name, n.name)
        if key in placed:
            out[n.name] = placed[key]
            sharded_out[n.name] = sharded_out[key]
        else:  # unplaced (metadata views): follows its inputs, as it aliases them
            split = any(sharded_out.get(i, False) for i in n.inputs)
            out[n.name] = NodeShard(split=split)
            sharded_out[n.name] = split
        if n.param_names:  # each parameter as the layout places it (a traced HF model reads its
            # parameters through get_attr nodes of their own), a later instance by its twin's
            twin_params = graph[key].param_names if key != n.name else n.param_names
            divs = {p: pdiv.get(_canonical(sg, q), 1.0) for p, q in zip(n.param_names, twin_params)}
            out[n.name] = dataclasses.replace(out[n.name], param_divs=divs)
    return out


def _canonical(sg: ShardingGraph, name: str) -> str:
    """The layout's name of an OpGraph parameter: the traced wrapper's prefix, tied aliases resolved."""
    full = MODEL_PREFIX + name
    return sg.norm.aliases.get(full, full)


def _param_divs(params: Iterable[tuple[str, Placement]], tp: int) -> dict[str, float]:
    """Per parameter (the model's own name), tp when sharded, else 1."""
    return {name.removeprefix(MODEL_PREFIX): float(tp) if isinstance(p, Shard) else 1.0 for name, p in params}


def _saves_split(sg: ShardingGraph, node: torch.fx.Node, st: Strategy) -> bool:
    """Whether what ``node`` saves for backward (its activation inputs) is split: some activation
    input is required sharded (a column-parallel Linear saves its replicated input; parameters do
    not count, they are not activations)."""
    acts = [p for i, p in zip(sg.calls[node].inputs, st.inputs) if p is not None and not sg.is_param(i)]
    return any(isinstance(p, Shard) for p in acts)


def _twins(graph: OpGraph) -> dict[str, str]:
    """Node of a later block instance -> its twin in the first instance."""
    out: dict[str, str] = {}
    for bt in graph.block_types.values():
        first = bt.node_names[0] if bt.node_names else []
        for names in bt.node_names[1:]:
            out.update(zip(names, first))
    return out


def megatron_walk(graph: OpGraph, tp: int, sp: bool) -> TPLayout:
    """Megatron's layout by a walk over op kinds (column Linear after replicated input, row Linear
    after split input, vocabulary-parallel embedding and loss): the estimator's stand-in for a
    hand-built OpGraph without an fx module, and a test oracle for :func:`megatron_tp`."""
    out = TPLayout()
    split: dict[str, bool] = {}
    column_inputs_seen: set[str] = set()
    pair = ("all_gather", "reduce_scatter") if sp else ("all_reduce", "all_reduce")
    for n in graph.nodes:
        ins = [split.get(i, False) for i in n.inputs]
        s = NodeShard()
        if n.op_kind == "linear":
            if any(ins):
                s = NodeShard(split=True, role="row", param_div=tp)
                split[n.name] = False
                out.comms[n.name].append(
                    CommWork(name=f"{n.name}:{pair[1]}", collective=pair[1], nbytes=out_bytes(n))
                )
                if sp:  # backward: all-gather the output gradient
                    out.comms[n.name].append(
                        CommWork(
                            name=f"{n.name}:ag_bwd",
                            collective="all_gather",
                            nbytes=out_bytes(n),
                            phase="bwd",
                        )
                    )
            else:
                s = NodeShard(split=True, role="column", param_div=tp, saved_split=False)
                split[n.name] = True
                src = n.inputs[0] if n.inputs else n.name
                if src not in column_inputs_seen:
                    column_inputs_seen.add(src)
                    nbytes = tensor_bytes(n.input_shapes[0], n.input_dtypes[0]) if n.input_shapes else 0.0
                    if sp:
                        out.comms[n.name].append(
                            CommWork(name=f"{n.name}:ag", collective="all_gather", nbytes=nbytes)
                        )
                    out.comms[n.name].append(
                        CommWork(
                            name=f"{n.name}:{pair[1]}_bwd", collective=pair[1], nbytes=nbytes, phase="bwd"
                        )
                    )
        elif n.op_kind == "embedding" and any(i in graph.inputs for i in n.inputs):
            s = NodeShard(split=False, role="vocab_embedding", param_div=tp)
            split[n.name] = False
            coll = "reduce_scatter" if sp else "all_reduce"
            out.comms[n.name].append(CommWork(name=f"{n.name}:{coll}", collective=coll, nbytes=out_bytes(n)))
        elif n.op_kind == "loss" and any(ins):
            s = NodeShard(split=True, role="vocab_loss")
            split[n.name] = False
            tokens = math.prod(n.input_shapes[0][:-1]) if n.input_shapes else 0
            out.comms[n.name].append(
                CommWork(name=f"{n.name}:stats", collective="all_reduce", nbytes=4.0 * tokens, count=3)
            )
        else:
            s = NodeShard(split=any(ins))
            split[n.name] = any(ins)
        out.shard[n.name] = s
    return out


def tp_from_placements(graph: OpGraph, plan: Plan) -> TPLayout:
    """Sharding read from ``plan.placements`` (nodes not listed are replicated). The collectives are
    the layout's (:func:`~autopar.sharding.layout.planned_collectives` of these placements, what the
    lowering runs); a graph without an fx module falls back to the placements' own accounting."""
    out = TPLayout()
    tp = plan.tp
    layout = _derive_layout_comms(graph, tp, plan.sequence_parallel, plan.placements)
    if layout is not None:
        out.comms = layout
    for n in graph.nodes:
        pl = plan.placements.get(n.name)
        if pl is None:
            out.shard[n.name] = NodeShard()
            continue
        split = isinstance(pl.output, (Shard, Partial)) or any(
            isinstance(p, Shard) for p in pl.params.values()
        )
        sharded_params = any(isinstance(p, Shard) for p in pl.params.values())
        role = _linear_role(graph, n, pl.params) if n.op_kind == "linear" else ""
        out.shard[n.name] = NodeShard(
            split=split,
            role=role,
            param_div=tp if sharded_params else 1.0,
            param_divs=_param_divs(pl.params.items(), tp),
            saved_split=False if role == "column" else None,
        )
        if layout is not None:
            continue
        if pl.comms:
            out.comms[n.name].extend(_planned_comms(n.name, pl.comms))
        elif pl.collective:
            out.comms[n.name].append(
                CommWork(name=f"{n.name}:{pl.collective}", collective=pl.collective, nbytes=out_bytes(n))
            )
            back = BACKWARD_OF.get(pl.collective)
            if back:
                out.comms[n.name].append(
                    CommWork(name=f"{n.name}:{back}_bwd", collective=back, nbytes=out_bytes(n), phase="bwd")
                )
    return out


def _planned_comms(name: str, comms: list[dict]) -> list[CommWork]:
    """The planner's own accounting (``NodePlacement.comms``): variants such as ``all_reduce_max``
    cost as their base collective; a local ``split`` costs nothing."""
    out = []
    for j, c in enumerate(comms):
        kind = "all_reduce" if c["kind"].startswith("all_reduce") else c["kind"]
        if kind == "split" or not c["bytes"]:
            continue
        out.append(
            CommWork(name=f"{name}:{kind}:{j}", collective=kind, nbytes=float(c["bytes"]), phase=c["phase"])
        )
    return out


def _linear_role(graph: OpGraph, n: OpNode, params: dict) -> str:
    """``column`` when the weight is split by output features (dim 0), ``row`` by input features."""
    for name in n.param_names:
        shape = graph.params.get(name, {}).get("shape", [])
        # Placements name parameters as the model does or as the traced wrapper does (``model.``).
        p = params.get(name, params.get(MODEL_PREFIX + name))
        if len(shape) == 2 and isinstance(p, Shard):
            return "column" if p.dim in (0, -2) else "row"
    return ""

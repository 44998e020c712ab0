"""The per-layer sharding table: which op is split how along ``tp`` and which collectives the
lowering inserts before it (resharding an input) and after it (resolving its result).

The strategies are the lowering's own (:func:`autopar.sharding.layout.choose`), run on the graph with
later block instances removed (:mod:`autopar.tracing.collapse`): the stem, one instance of each
block type and the head.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from autopar.core.ir import OpGraph, OpNode
from autopar.core.plan import NodePlacement, Partial, Plan, Shard
from autopar.report.table import Table

if TYPE_CHECKING:
    from torch.fx import GraphModule

log = logging.getLogger(__name__)

SHOWN_KINDS = ("linear", "embedding", "matmul", "attention", "softmax", "norm", "loss")
"""Op kinds listed; others (views, elementwise) appear only when a collective comes with them."""
COMMUNICATING = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all")
HEADER = [
    "region",
    "module",
    "op",
    "output shape",
    "parameters",
    "output",
    "split",
    "collective before",
    "collective after",
]


def placements_for(
    plan: Plan, graph: OpGraph | None
) -> tuple[dict[str, NodePlacement], str, GraphModule | None]:
    """(placements, source, graph module): the plan's own placements, else the Megatron default
    derived by the sharding rules, on the collapsed graph."""
    if plan.tp == 1:
        return {}, "tp=1: every op runs whole on its rank", None
    if graph is None or graph.gm is None:
        return {}, "the traced model is not available", None
    from autopar.sharding import megatron_placements
    from autopar.tracing.collapse import first_blocks_module

    gm = first_blocks_module(graph)
    if plan.placements:  # of every block instance: keep those of the nodes the collapsed graph has
        names = {n.name for n in gm.graph.nodes}
        kept = {k: v for k, v in plan.placements.items() if k in names}
        return kept, "the plan's placements", gm
    return megatron_placements(gm, plan.tp, plan.sequence_parallel), "the Megatron default (derived)", gm


def collectives(gm: GraphModule, tp: int, placements: dict) -> tuple[dict[str, list[tuple]], dict[str, str]]:
    """Per node name: the collectives on its inputs (``before``: ``(kind, producer, shared_with)``)
    and on its result (``after``), as the lowering inserts them. The lowering converts a producer
    to a placement once for all its consumers, so later consumers name the first (``shared_with``)."""
    from autopar.sharding import ShardingGraph
    from autopar.sharding.layout import choose
    from autopar.sharding.reshard import reshard_kind

    sg = ShardingGraph(gm, tp)
    choices, _ = choose(sg, placements)
    before: dict[str, list[tuple]] = {}
    after: dict[str, str] = {}
    first_user: dict[tuple, str] = {}
    for node, choice in choices.items():
        kind = reshard_kind(choice.strategy.output, choice.final)
        if kind in COMMUNICATING:
            after[node.name] = kind
        for inp, req in zip(sg.calls[node].inputs, choice.strategy.inputs):
            if req is None or inp not in choices:
                continue
            kind = reshard_kind(choices[inp].final, req)
            if kind not in COMMUNICATING:
                continue
            key = (inp.name, str(req))
            before.setdefault(node.name, []).append((kind, inp.name, first_user.get(key)))
            first_user.setdefault(key, node.name)
    return before, after


def _before_text(graph: OpGraph | None, items: list[tuple]) -> str:
    out = []
    for kind, producer, shared in items:
        if shared is None:
            out.append(f"{kind} of {_short(graph, producer)}")
        else:
            out.append(f"(same {kind} as {_short(graph, shared).rsplit('.', 1)[-1]})")
    return "; ".join(out)


def _role(node: OpNode, pl: NodePlacement, sequence_parallel: bool, inputs: list) -> str:
    weights = {k: v for k, v in pl.params.items() if k.endswith("weight") or len(pl.params) == 1}
    w = next(iter(weights.values()), None)
    if node.op_kind == "embedding" and isinstance(w, Shard):
        return "table rows split (vocab-parallel)" if w.dim == 0 else "table columns split"
    if node.op_kind == "linear" and isinstance(w, Shard):
        return "column-parallel" if w.dim == 0 else "row-parallel"
    if node.op_kind == "loss" and any(isinstance(p, Shard) for p in inputs):
        return "vocab-parallel (statistics all-reduced inside)"
    if isinstance(pl.output, Partial):
        return "partial sums"
    if isinstance(pl.output, Shard):
        shape, d = node.output_shape or (), pl.output.dim
        if node.op_kind in ("matmul", "softmax", "attention", "dropout") and len(shape) == 4 and d == 1:
            return "heads split"
        if sequence_parallel and len(shape) == 3 and d == 1:
            return "sequence-parallel"
        return f"split on dim {d}"
    return "replicated"


def _params_text(pl: NodePlacement) -> str:
    return ", ".join(f"{name.rsplit('.', 1)[-1]} {p}" for name, p in pl.params.items()) or "-"


def _regions(graph: OpGraph | None) -> list[tuple[str, list]]:
    """(label, nodes): the stem, the first instance of each block type, the head."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    start = min((index[n.name] for n in graph.nodes if n.block is not None), default=len(graph.nodes))
    first: dict[str, int] = {}
    for n in graph.nodes:
        if n.block is not None and n.block_type not in first:
            first[n.block_type] = n.block
    out = [("stem", [n for n in graph.nodes if n.block is None and index[n.name] < start])]
    for key, block in first.items():
        bt = graph.block_types.get(key)
        out.append(
            (f"{key} x{bt.count if bt is not None else 1}", [n for n in graph.nodes if n.block == block])
        )
    out.append(("head", [n for n in graph.nodes if n.block is None and index[n.name] >= start]))
    return [(label, nodes) for label, nodes in out if nodes]


def _short(graph: OpGraph | None, name: str) -> str:
    """A node's module path, for naming producers in the collective columns."""
    try:
        return graph[name].module_path or name
    except KeyError:
        return name


def sharding_table(plan: Plan, graph: OpGraph | None) -> Table:
    """The table (rows of strings); a note instead of rows when it cannot be derived."""
    table = Table("Tensor-parallel sharding per layer", list(HEADER))
    if graph is None:
        table.note = "needs the model (give --model, or plan with `autopar plan --out`)"
        return table
    try:
        placements, source, gm = placements_for(plan, graph)
        before, after = collectives(gm, plan.tp, placements) if placements else ({}, {})
    except Exception as e:  # noqa: BLE001 - a report degrades to a note, the log keeps the detail
        log.warning("sharding table: %s", e, exc_info=True)
        table.note = f"shardings unavailable: {type(e).__name__}: {e}"
        return table
    sp = "on" if plan.sequence_parallel else "off"
    table.note = f"tp={plan.tp}, sequence parallel {sp}; source: {source}"
    for label, nodes in _regions(graph) if placements else []:
        for n in nodes:
            pl = placements.get(n.name)
            if pl is None or not (n.op_kind in SHOWN_KINDS or n.name in before or n.name in after):
                continue
            shape = "x".join(str(d) for d in n.output_shape) if n.output_shape else "-"
            op = n.op_kind if n.op_kind != "other" else n.target.rsplit(".", 1)[-1]
            ins = [placements[i].output for i in n.inputs if i in placements]
            pre = _before_text(graph, before.get(n.name, []))
            table.rows.append(
                [
                    label,
                    n.module_path or n.name,
                    op,
                    shape,
                    _params_text(pl),
                    str(pl.output),
                    _role(n, pl, plan.sequence_parallel, ins),
                    pre,
                    after.get(n.name, pl.collective or ""),
                ]
            )
            label = ""
    return table

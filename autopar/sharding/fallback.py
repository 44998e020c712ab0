"""What a tensor-parallel layout leaves replicated for lack of a rule, and how much it shards.

Soundness by construction: a node whose op no rule knows (``kind == "other"``: an ``nn.LSTM``, a
custom leaf module, an unknown function) has only the all-replicated strategy, so the layout
gathers its inputs and runs it whole on every rank — correct, but it buys nothing. Those nodes
are never silent: :func:`replicated_ops` lists each one with where it comes from and what it
costs, the lowering logs them (``logging.getLogger("autopar")``) and refuses a ``tp > 1`` layout
that shards no parameter at all. Experts stored as one 3-D parameter ``[E, in, out]`` and read
per token (``w[expert_ids]`` then a batched matmul, HF Mixtral/Qwen2-MoE ``batched_mm``) have
no tensor-parallel rule either; they are named as such::

    sg = ShardingGraph(gm, tp=2)
    choices, params = layout.choose(sg, megatron_placements(sg, 2))
    for op in replicated_ops(sg, params):   # op.op, op.module, op.source, op.flops_share, ...
        print(op)
    sharded_param_share(sg, params)         # 0.97: share of parameter elements the layout shards

FLOPs shares are forward FLOPs: the op table's rule (:func:`autopar.tracing.opkinds.flops`) for
ops it knows; for a parametric op it does not know (a convolution, an LSTM) ``2 x weight elements
x output positions`` (every weight used once per output position: exact for convolutions and
for LSTMs over ``[batch, time]``). An OpGraph's own FLOPs (``{name: flops_fwd}``) may be passed
instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx

from autopar.core.plan import Placement, Shard
from autopar.sharding.graph import ShardingGraph
from autopar.sharding.ops import module_path, shape
from autopar.sharding.rules import conv_channel_dim, replicate_reason
from autopar.tracing import opkinds
from autopar.tracing.hf_moe import HFMoERegion, is_balance_loss

Node = torch.fx.Node
EXPERT_REASON = "expert grouped matmul: replicated, expert parallelism is not built"
HF_MOE_REASON = (
    "HuggingFace MoE block: whole on every tp rank (its experts split over ep only; the concatenated "
    "gate_up_proj has no tensor-parallel split)"
)
BALANCE_REASON = (
    "HuggingFace MoE load-balancing loss: whole on every tp rank (the router logits it reads are "
    "whole there); its statistics are summed over dp (autopar/lower/moe_aux.py)"
)
_INDEXING = ("getitem", "select", "slice", "other", "reshape", "permute", "index_select", "gather")
_GEMMS = ("linear", "matmul", "addmm")


@dataclass(frozen=True)
class ReplicatedOp:
    """One op the layout runs replicated because no sharding rule covers it."""

    op: str
    """``LSTM``, ``conv_transpose2d``, ``expert grouped matmul``..."""
    node: str
    module: str
    """Module path (``layers.0.lstm``), ``<root>`` for a top-level call."""
    source: str | None
    """``File "model.py", line 12, in forward`` when the node has a stack trace."""
    reason: str
    flops_share: float | None
    """Share of the model's forward FLOPs this op runs (None: no FLOPs known anywhere)."""
    param_share: float
    """Share of the model's parameter elements this op reads, left replicated."""

    def __str__(self) -> str:
        flops = f"{100 * self.flops_share:.1f} % of FLOPs, " if self.flops_share is not None else ""
        at = f" at {self.source}" if self.source else ""
        return (
            f"{self.op} (node {self.node}) in module '{self.module}'{at}: {self.reason} "
            f"({flops}{100 * self.param_share:.1f} % of parameter elements replicated)"
        )


# ------------------------------------------------------------------------------------ params
def _numel(t: torch.Tensor) -> int:
    return int(t.numel())


def total_param_elements(sg: ShardingGraph) -> int:
    return sum(_numel(p) for p in sg.params.values())


def sharded_param_share(sg: ShardingGraph, params: dict[str, Placement]) -> float:
    """Share of the model's parameter elements the layout shards (``params``: canonical name ->
    placement, from :func:`autopar.sharding.layout.choose`); 0.0 for a model without parameters."""
    total = total_param_elements(sg)
    sharded = sum(_numel(p) for name, p in sg.params.items() if isinstance(params.get(name), Shard))
    return sharded / total if total else 0.0


def _params_read(sg: ShardingGraph, node: Node) -> list[str]:
    """Canonical names of the parameters ``node`` reads (a kept leaf module's own included)."""
    if node.op == "call_module":
        mod = sg.gm.get_submodule(str(node.target))
        names = [f"{node.target}.{n}" for n, _ in mod.named_parameters()]
        return [sg.norm.aliases.get(n, n) for n in names if sg.norm.aliases.get(n, n) in sg.params]
    return [str(i.target) for i in node.all_input_nodes if sg.is_param(i)]


# ------------------------------------------------------------------------------------ flops
def node_flops(sg: ShardingGraph, node: Node) -> float:
    """Forward FLOPs of one node of the normalised graph (see the module docstring)."""
    call = sg.calls[node]
    if call.kind in ("placeholder", "output", "param", "buffer", "attr", "scalar", "shape"):
        return 0.0
    if not node.meta.get("tensor_meta") and "val" not in node.meta:
        return 0.0
    try:
        out = shape(node)
    except (AttributeError, StopIteration, TypeError):
        return 0.0
    weights = _params_read(sg, node)
    info = opkinds.OPS.get(call.name)
    if info is not None and info.kind != "other" and call.kind != "conv":
        ins = [shape(i) for i in call.inputs]
        wshape = shape(call.args["w"]) if call.kind == "linear" else None
        if call.kind == "addmm":
            wshape = tuple(reversed(shape(call.args["w"])))
        gemm = opkinds.gemm_dims(info.kind, ins, out, wshape if info.kind == "linear" else None)
        return opkinds.flops(info.kind, call.name, ins, out, gemm, {"bias": bool(call.args.get("b"))})[0]
    if not weights or not out:
        return 0.0
    # A parametric op without a cost rule: every weight element once per output position.
    channels = out[conv_channel_dim(call)] if call.kind == "conv" else out[-1]
    positions = math.prod(out) // max(channels, 1)
    return 2.0 * sum(_numel(sg.params[w]) for w in weights if sg.params[w].dim() > 1) * positions


# ------------------------------------------------------------------------------------ report
def _expert_params(sg: ShardingGraph, params: dict[str, Placement]) -> set[str]:
    return {n for n, p in sg.params.items() if p.dim() == 3 and not isinstance(params.get(n), Shard)}


def _expert_gemms(sg: ShardingGraph, experts: set[str], chain: set[Node]) -> Iterator[tuple[Node, str]]:
    """(GEMM node, expert parameter) for each matmul reading a 3-D parameter through indexing;
    ``chain`` collects the indexing nodes between them (part of the same grouped matmul)."""
    for node in sg.nodes:
        if not sg.is_param(node) or str(node.target) not in experts:
            continue
        frontier, seen = [node], set()
        for _ in range(4):  # param -> index by expert ids -> (view) -> GEMM
            nxt = []
            for n in frontier:
                for u in n.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    kind = sg.calls[u].kind
                    if kind in _GEMMS:
                        chain.update(n for n in seen if n is not u and sg.calls[n].kind not in _GEMMS)
                        yield u, str(node.target)
                    elif kind in _INDEXING or sg.calls[u].name in _INDEXING:
                        nxt.append(u)
            frontier = nxt


def _sharded(sg: ShardingGraph, params: dict[str, Placement], node: Node) -> bool:
    return any(isinstance(params.get(n), Shard) for n in _params_read(sg, node))


def _source(node: Node) -> str | None:
    frames = [ln.strip() for ln in (node.stack_trace or "").splitlines() if ln.strip().startswith("File")]
    return frames[-1] if frames else None


def _op_name(sg: ShardingGraph, node: Node) -> str:
    if node.op == "call_module":
        return type(sg.gm.get_submodule(str(node.target))).__name__
    return sg.calls[node].name


def replicated_ops(
    sg: ShardingGraph, params: dict[str, Placement], flops: dict[str, float] | None = None
) -> list[ReplicatedOp]:
    """The ops the layout runs replicated for lack of a rule, in graph order (module docstring).

    ``params`` is the layout's parameter placements; ``flops`` optionally each node's forward
    FLOPs by name (an OpGraph's ``flops_fwd``), else :func:`node_flops`.
    """
    per_node = {n.name: (flops or {}).get(n.name, node_flops(sg, n)) for n in sg.nodes}
    total_flops = sum(per_node.values())
    total_params = total_param_elements(sg) or 1
    counted: set[str] = set()

    def entry(node: Node, op: str, reason: str, names: list[str]) -> ReplicatedOp:
        fresh = [n for n in names if n not in counted and not isinstance(params.get(n), Shard)]
        counted.update(fresh)
        share = sum(_numel(sg.params[n]) for n in fresh) / total_params
        f = per_node[node.name] / total_flops if total_flops else None
        return ReplicatedOp(op, node.name, module_path(node) or "<root>", _source(node), reason, f, share)

    out: dict[str, ReplicatedOp] = {}
    chain: set[Node] = set()
    experts = dict(_expert_gemms(sg, _expert_params(sg, params), chain))
    for node in sg.nodes:
        call = sg.calls[node]
        if node in chain and node not in experts:
            continue
        if node in experts:
            out[node.name] = entry(node, "expert grouped matmul", EXPERT_REASON, [experts[node]])
        elif node.op == "call_module" and opkinds.is_moe_region(sg.gm.get_submodule(str(node.target))):
            region = sg.gm.get_submodule(str(node.target))
            if sg.tp > 1 and isinstance(region, HFMoERegion):  # split over ep only (lower/expert.py)
                out[node.name] = entry(node, region.config.block, HF_MOE_REASON, _params_read(sg, node))
            continue  # its tp (and ep) split is the expert lowering's: autopar/lower/expert.py
        elif is_balance_loss(node):
            out[node.name] = entry(node, "hf_balance_loss", BALANCE_REASON, [])
        elif call.kind == "other" and (call.inputs or node.op == "call_module"):
            op = _op_name(sg, node)
            reason = f"no tensor-parallel sharding rule for {op}: run whole on every rank, inputs gathered"
            out[node.name] = entry(node, op, reason, _params_read(sg, node))
        elif replicate_reason(call, sg.tp) and not _sharded(sg, params, node):
            out[node.name] = entry(node, call.name, replicate_reason(call, sg.tp), _params_read(sg, node))
    return list(out.values())


def cannot_parallelise(sg: ShardingGraph, ops: list[ReplicatedOp]) -> str:
    """``this model cannot be tensor-parallelised: <why>`` (the message for a layout sharding nothing)."""
    names = ", ".join(f"{o.op} ('{o.module}')" for o in ops[:6]) + (" ..." if len(ops) > 6 else "")
    why = f"ops without a tensor-parallel rule: {names}" if ops else "no op's rule can shard its weights"
    return (
        f"this model cannot be tensor-parallelised: tp={sg.tp} shards no parameter ({why}); "
        "use data parallelism (dp) or pipeline parallelism (pp) instead"
    )

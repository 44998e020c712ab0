"""Expert parallelism: the lowering of mixture-of-experts regions (op kind ``moe``).

Placement (``plan.ep`` folds into dp, as Megatron-Core's expert-model-parallel and DeepSpeed-MoE's
expert-parallel groups do). Each dp group, in dp order, splits into dp/ep replicas of ``ep``
consecutive ranks. Example ``dp=4, ep=2``: ep groups ``[[0,1],[2,3]]``, expert-data-parallel (edp)
groups ``[[0,2],[1,3]]``. In every MoE layer, ep rank ``i`` holds experts ``[i*E/ep, (i+1)*E/ep)``
(``w1, w3, w2`` sliced along dim 0); the router and shared experts are replicated like every
non-expert parameter. With ``tp > 1`` each expert is also split Megatron-style inside its ep rank:
``w1, w3`` by columns (dim 2), ``w2`` by rows (dim 1), the shared experts likewise.

One layer's forward on an ep rank (its own tokens, replicated over tp)::

    gates, choices, keep, aux = route(x)                     # router replicated: no communication
    rows = copy_to_tp(x)                                     # (tp > 1) backward: all_reduce over tp
    counts = bincount(kept slots by expert)                  # [E]
    all_to_all_single(recv_counts, counts, ep)               # how many rows each rank will send
    recv = all_to_all_single(rows sorted by expert, ep)      # dispatch        (backward: reverse)
    out = local experts' SwiGLU(recv)                        # (tp > 1) partial sums over the width
    back = all_to_all_single(out, ep)                        # combine         (backward: reverse)
    y = sum_k copy_to_tp(gate_k) * back[slot] (+ shared)     # (tp > 1) gates' backward: all_reduce
    y = all_reduce(y, tp)                                    # (tp > 1) one T x h sum, forward only

Under tp the expert outputs stay partial sums through the combine (it is linear) and are summed
once, over the rank's own ``T`` tokens: per layer and micro-batch one all-reduce of ``T h``
forward, and in backward one of ``T h`` (the input gradient, routed and shared experts together)
and one of ``T k`` (the gates' gradient: ``<back, dy>`` of a partial ``back`` is partial; summed, the
router's gradient is the single-device one). ``cost_models.moe.tp_all_reduce_calls`` charges
exactly these.

Every routing decision (top-k, capacity, the aux loss) is made on the rank that owns the token,
by the same function as the single-device layer (per sequence: see :mod:`autopar.models.moe`), so
the result equals one device's; only where the expert GEMMs run changes.

Gradients. The all-to-all's backward is the reverse all-to-all, so an expert's gradient arrives at
its owner summed over its ep group's tokens. The runtime then sums it over the edp group and divides
by dp (the loss is the mean over dp replicas); data-parallel engines skip expert parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from autopar.core.errors import PlanError, RuntimeFailure
from autopar.core.ir import OpGraph
from autopar.core.plan import Plan
from autopar.core.plan_rules import check_ep, check_moe_knobs
from autopar.lower.collectives import TPContext, autopar_all_reduce, autopar_copy_to_tp
from autopar.models.moe import MoE, swiglu
from autopar.tracing import hf_moe, opkinds
from autopar.tracing.hf_moe import HFMoERegion

log = logging.getLogger(__name__)

EXPERT_PARAMS = {"w1": 0, "w3": 0, "w2": 0}
"""Routed-expert parameters (stacked ``[E, ...]``) and the dim expert parallelism splits."""
TP_DIMS = {"w1": 2, "w3": 2, "w2": 1, "shared_w1": 1, "shared_w3": 1, "shared_w2": 0}
"""The dim tensor parallelism splits inside an expert (column-parallel w1/w3, row-parallel w2)."""


class EPContext:
    """This rank's expert-parallel group: ``group`` (None for a dry lowering), ``rank``, ``world_size``."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size

    def require_group(self) -> dist.ProcessGroup | None:
        if self.group is None and self.world_size > 1:
            raise RuntimeFailure(
                "the expert all-to-all needs the ep process group, but this module was lowered dry "
                "(for rank_code); lower it again with the process groups to run it"
            )
        return self.group

    def __deepcopy__(self, memo: dict) -> EPContext:
        return self

    def __reduce__(self) -> tuple[type[EPContext], tuple[None, int, int]]:
        return (EPContext, (None, self.rank, self.world_size))

    def __repr__(self) -> str:
        return f"EPContext(rank={self.rank}, world_size={self.world_size}, dry={self.group is None})"


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ep: EPContext) -> torch.Tensor:
    if ep.world_size == 1:
        return x.clone()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=ep.require_group())
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, ep):  # type: ignore[override]
        ctx.splits, ctx.ep = (out_splits, in_splits), ep
        return _all_to_all(x, out_splits, in_splits, ep)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.ep), None, None, None


def autopar_all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], ep: EPContext
) -> torch.Tensor:
    """``all_to_all_single`` over the ep group: send ``in_splits[r]`` rows of ``x`` to rank ``r``,
    receive ``out_splits[r]`` from it (forward); the reverse exchange of the gradient (backward)."""
    return _AllToAll.apply(x, out_splits, in_splits, ep)


@dataclass(frozen=True)
class ExpertShard:
    """How a local expert-region parameter relates to the full one (``None``: not split that way)."""

    ep_dim: int | None
    ep_shards: int
    ep_index: int
    tp_dim: int | None
    tp_shards: int
    tp_index: int


def _slice(t: torch.Tensor, dim: int | None, shards: int, index: int) -> torch.Tensor:
    if dim is None or shards == 1:
        return t
    return t.chunk(shards, dim=dim)[index]


def local_experts(experts: int, ep: EPContext, where: str) -> tuple[int, int]:
    """(experts this ep rank holds, the first one's index): a contiguous ``experts / ep`` block."""
    if experts % ep.world_size:
        raise PlanError(
            f"ep={ep.world_size} does not divide the {experts} experts of {where}; choose an ep that "
            "divides the expert count"
        )
    count = experts // ep.world_size
    return count, ep.rank * count


class ExpertParallelMoE(nn.Module):
    """One rank's part of a MoE layer under ``ep`` x ``tp``: the router and this rank's slices of
    the experts; forward as :class:`autopar.models.moe.MoE` with the all-to-all dispatch/combine
    described in the module docstring. Returns ``(y, aux)`` like the layer it replaces."""

    autopar_region = "moe"

    def __init__(self, moe: MoE, ep: EPContext, tp: TPContext):
        super().__init__()
        cfg = moe.config
        self.config, self.ep, self.tp = cfg, ep, tp
        if cfg.ffn % tp.world_size:
            raise PlanError(
                f"tp={tp.world_size} does not divide the expert width ffn={cfg.ffn}; choose a tp that "
                "divides it"
            )
        self.local_experts, self.first_expert = local_experts(cfg.experts, ep, "a MoE layer")
        self.router = moe.router
        self.shards: dict[str, ExpertShard] = {}
        for name, p in moe.named_parameters():
            if name.startswith("router."):
                continue
            ep_dim = EXPERT_PARAMS.get(name)
            shard = ExpertShard(
                ep_dim, ep.world_size if ep_dim is not None else 1, ep.rank if ep_dim is not None else 0,
                TP_DIMS.get(name), tp.world_size, tp.rank,
            )  # fmt: skip
            local = _slice(_slice(p.detach(), shard.ep_dim, shard.ep_shards, shard.ep_index), shard.tp_dim,
                           shard.tp_shards, shard.tp_index)  # fmt: skip
            setattr(self, name, nn.Parameter(local.clone(), requires_grad=p.requires_grad))
            self.shards[name] = shard

    # -- forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h = x.shape[0], x.shape[1], x.shape[2]
        gates, choices, keep, aux = MoE.route(self, x)  # the single-device routing, unchanged
        flat = x.reshape(b * t, h)
        split = self.tp.world_size > 1
        rows = autopar_copy_to_tp(flat, self.tp) if split else flat  # experts' input (backward: sum)
        slots = self.routed_experts(rows, choices, keep)  # partial sums over tp when split
        g = autopar_copy_to_tp(gates, self.tp) if split else gates  # its gradient is partial: summed
        y = (slots.view(b * t, self.config.top_k, h) * g.unsqueeze(-1)).sum(1)
        if self.config.shared_experts:
            y = y + swiglu(rows, self.shared_w1, self.shared_w3, self.shared_w2)
        if split:
            y = autopar_all_reduce(y, self.tp)  # routed and shared partial sums, once
        return y.view(b, t, h), aux

    def routed_experts(
        self, flat: torch.Tensor, choices: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Every routing slot's expert output ``[b*t*k, h]`` (zero when dropped), computed by the
        rank that holds the expert."""
        k, e, el = self.config.top_k, self.config.experts, self.local_experts
        expert = choices.reshape(-1)
        kept = (
            torch.arange(expert.shape[0], device=expert.device)
            if keep is None
            else keep.reshape(-1).nonzero().squeeze(1)
        )
        order = torch.argsort(expert[kept], stable=True)  # by expert, token order within one
        slot = kept[order]
        counts = torch.bincount(expert[slot], minlength=e)
        recv_counts = _all_to_all(counts, [el] * self.ep.world_size, [el] * self.ep.world_size, self.ep)
        send_splits = counts.view(-1, el).sum(1).tolist()
        recv_splits = recv_counts.view(-1, el).sum(1).tolist()
        recv = autopar_all_to_all(flat[slot // k], recv_splits, send_splits, self.ep)  # dispatch
        out = self.local_expert_outputs(recv, recv_counts.view(-1, el))
        back = autopar_all_to_all(out, send_splits, recv_splits, self.ep)  # combine
        return flat.new_zeros(expert.shape[0], flat.shape[1]).index_copy(0, slot, back)

    def local_expert_outputs(self, recv: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on the rows received (``counts[src, local expert]`` rows each, src-major)."""
        owner = torch.repeat_interleave(
            torch.arange(self.local_experts, device=counts.device).repeat(counts.shape[0]), counts.reshape(-1)
        )
        picked, outs = [], []
        for le in range(self.local_experts):
            idx = (owner == le).nonzero().squeeze(1)
            picked.append(idx)
            outs.append(swiglu(recv[idx], self.w1[le], self.w3[le], self.w2[le]))
        return recv.new_zeros(recv.shape).index_copy(0, torch.cat(picked), torch.cat(outs))

    # -- listing
    def describe(self, name: str, ep_ranks: Sequence[int], tp_ranks: Sequence[int]) -> list[str]:
        """Pseudo-code of this rank's part of the layer, collectives visible (for ``rank_code``)."""
        cfg, el = self.config, self.local_experts
        experts = f"experts {self.first_expert}..{self.first_expert + el - 1} of {cfg.experts}"
        tp = len(tp_ranks) > 1
        if len(ep_ranks) == 1:  # tp only: no exchange
            lines = [f"# {name}: MoE, all {cfg.experts} experts, tp-split", "y, aux = moe(x)"]
            return lines + [f"y = dist.all_reduce(y_partial, group=tp{list(tp_ranks)})"] if tp else lines
        lines = [
            f"# {name}: MoE, {experts} (ep rank {self.ep.rank} of {list(ep_ranks)}), top-{cfg.top_k}, "
            f"capacity {'none' if cfg.capacity_factor is None else f'{cfg.capacity_factor} per sequence'}",
            "gates, choices, keep, aux = route(x)            # router replicated",
        ]
        if tp:
            lines.append(f"rows = copy_to_tp(x)  # backward: dist.all_reduce over tp{list(tp_ranks)}")
        lines += [
            f"dist.all_to_all_single(recv_counts, counts, group=ep{list(ep_ranks)})  # rows per expert",
            f"recv = dist.all_to_all_single(rows[slots by expert], group=ep{list(ep_ranks)})  # dispatch; backward: reverse",
            f"out = swiglu(recv, w1[{el}], w3[{el}], w2[{el}])  # local experts"
            + (", tp-split: partial sums" if tp else ""),
            f"back = dist.all_to_all_single(out, group=ep{list(ep_ranks)})  # combine; backward: reverse",
        ]
        shared = " + shared experts" if cfg.shared_experts else ""
        if not tp:
            return lines + ["y = sum_k gates * back[slot]" + shared]
        return lines + [
            f"y = sum_k copy_to_tp(gates) * back[slot]{shared}  # gates' backward: dist.all_reduce over tp{list(tp_ranks)}",
            f"y = dist.all_reduce(y_partial, group=tp{list(tp_ranks)})",
        ]


class HFExpertParallelMoE(ExpertParallelMoE):
    """One rank's part of a HuggingFace sparse MoE block (:class:`autopar.tracing.hf_moe.HFMoERegion`:
    Mixtral, Qwen2-MoE) under ``ep``, under the block's own parameter names so state dicts load
    unchanged: the router ``gate.weight`` and Qwen2-MoE's ``shared_expert`` / ``shared_expert_gate``
    replicated, this rank's experts ``experts.gate_up_proj`` / ``experts.down_proj`` (dim 0).
    Routing and the expert function are the block's (:mod:`autopar.tracing.hf_moe`), dispatch and
    combine :class:`ExpertParallelMoE`'s. With ``tp > 1`` the block runs whole on every tp rank
    (experts split over ep only: the concatenated ``gate_up_proj`` does not split along one dim).
    Returns the block's output, and its router logits over this rank's tokens when the model
    outputs them (``output_router_logits``: read by the load-balancing loss, lower/moe_aux.py)."""

    def __init__(self, region: HFMoERegion, ep: EPContext):
        nn.Module.__init__(self)
        spec = region.config
        self.config, self.ep, self.tp = spec, ep, TPContext(None, 0, 1)
        self.local_experts, self.first_expert = local_experts(spec.experts, ep, spec.block)
        self.gate = region.gate
        if spec.shared_ffn:
            self.shared_expert, self.shared_expert_gate = region.shared_expert, region.shared_expert_gate
        self.experts = nn.Module()
        self.shards: dict[str, ExpertShard] = {}
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(region.experts, name)
            local = _slice(full.detach(), 0, ep.world_size, ep.rank).clone()
            self.experts.register_parameter(name, nn.Parameter(local, requires_grad=full.requires_grad))
            self.shards[f"experts.{name}"] = ExpertShard(0, ep.world_size, ep.rank, None, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        spec = self.config
        flat = x.reshape(-1, spec.hidden)
        weights, index, logits = hf_moe.route(flat, self.gate.weight, spec)
        slots = self.routed_experts(flat, index.reshape(1, -1), None)  # slot i*k+j: token i's j-th
        y = (slots.view(-1, spec.top_k, spec.hidden) * weights.unsqueeze(-1)).sum(1).to(flat.dtype)
        if spec.shared_ffn:
            s = self.shared_expert
            shared = [
                s.gate_proj.weight,
                s.up_proj.weight,
                s.down_proj.weight,
                self.shared_expert_gate.weight,
            ]
            y = y + hf_moe.shared_output(flat, shared, spec)
        return (y.view(x.shape), logits) if spec.router_logits else y.view(x.shape)

    def describe(self, name: str, ep_ranks: Sequence[int], tp_ranks: Sequence[int]) -> list[str]:
        lines = super().describe(name, ep_ranks, list(tp_ranks)[:1])  # whole on every tp rank
        el = self.local_experts
        lines[0] = lines[0].replace("MoE,", f"{self.config.block},", 1)
        return [
            ln.replace(
                f"swiglu(recv, w1[{el}], w3[{el}], w2[{el}])",
                f"experts(recv, gate_up_proj[{el}], down_proj[{el}])",
            ).replace(" + shared experts", " + sigmoid(shared_expert_gate(x)) * shared_expert(x)")
            for ln in lines
        ]

    def local_expert_outputs(self, recv: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts (the block's function) on the rows received, ``counts[src, local expert]``."""
        owner = torch.repeat_interleave(
            torch.arange(self.local_experts, device=counts.device).repeat(counts.shape[0]), counts.reshape(-1)
        )
        out = recv.new_zeros(recv.shape)
        for le in range(self.local_experts):
            idx = (owner == le).nonzero().squeeze(1)
            rows = hf_moe.expert(
                recv[idx], self.experts.gate_up_proj[le], self.experts.down_proj[le], self.config
            )
            out = out.index_copy(0, idx, rows)
        return out


# ------------------------------------------------------------------------------ the lowering
def moe_modules(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """Qualified name -> module of every MoE region called in ``gm`` (in graph order)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if opkinds.is_moe_region(module):
                out[str(node.target)] = module
    return out


def _canonical(module: nn.Module, name: str) -> MoE:
    if isinstance(module, (MoE, ExpertParallelMoE)) and hasattr(module, "w1"):
        return module  # type: ignore[return-value]
    raise PlanError(
        f"the MoE region {name} ({type(module).__name__}) has no expert-parallel lowering yet; run it "
        "with ep=1 and tp=1 (it runs as one op on every rank)"
    )


def lower_experts(
    gm: torch.fx.GraphModule, plan: Plan, ep: EPContext, tp: TPContext
) -> dict[str, ExpertShard]:
    """Swap every MoE region of ``gm`` (in place) for this rank's :class:`ExpertParallelMoE`;
    returns the shard of each region parameter by graph name (``model.layers.0.mlp.w1``).
    Nothing changes when ``ep == tp == 1``."""
    regions = moe_modules(gm)
    if plan.ep > 1 and not regions:
        raise PlanError(
            f"ep={plan.ep} but the traced model has no mixture-of-experts region to split (autopar's "
            "MoE layer, traced with symbolic_trace; HuggingFace MoE blocks traced by torch.export are "
            "inlined ops, not yet a region); use ep=1"
        )
    if not regions or (plan.ep == 1 and plan.tp == 1):
        return {}
    check_moe_knobs(ep=plan.ep, zero=plan.zero_stage, sp=plan.sequence_parallel)  # what is built
    check_ep(plan.ep, plan.dp, [m.config.experts for m in regions.values() if hasattr(m, "config")])
    shards: dict[str, ExpertShard] = {}
    for name, module in regions.items():
        if isinstance(module, HFMoERegion):  # HuggingFace block: split over ep only
            if plan.ep == 1:
                log.info("%s (%s) runs whole on every tp rank (ep=1)", name, module.config.block)
                continue
            lowered: ExpertParallelMoE = HFExpertParallelMoE(module, ep)
            parent, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, lowered)
            shards.update({f"{name}.{p}": s for p, s in lowered.shards.items()})
            continue
        lowered = ExpertParallelMoE(_canonical(module, name), ep, tp)
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, lowered)
        shards.update({f"{name}.{p}": s for p, s in lowered.shards.items()})
    gm.recompile()
    return shards


def ep_context(plan: Plan, rank: int, group: dist.ProcessGroup | None) -> EPContext:
    return EPContext(group, plan.ep_index(rank), plan.ep)


# ------------------------------------------------------------------------------ the volume
def moe_layers(graph: OpGraph) -> list[dict]:
    """``OpNode.meta["moe"]`` of every MoE region of ``graph``, each with its ``block`` index and
    ``dtype_bytes`` (of its input) added."""
    out = []
    for node in graph.nodes:
        if node.op_kind == "moe" and "moe" in node.meta:
            item = (
                4
                if not node.input_dtypes
                else torch.empty((), dtype=getattr(torch, node.input_dtypes[0])).element_size()
            )
            out.append({**node.meta["moe"], "block": node.block, "dtype_bytes": item})
    return out


def all_to_all_volume(graph: OpGraph, plan: Plan, *, train: bool = True, rank: int = 0) -> dict:
    """The expert all-to-alls of one step on ``rank`` under ``plan``, balanced routing, nothing dropped.

    Per MoE layer on the rank's pipeline stage and per micro-batch: the count exchange (``E`` int64
    per rank), the dispatch and the combine (``T·k·h`` elements each, ``T`` the micro-batch's
    tokens), and in training the two reverse exchanges of backward. Returns ``{"count", "bytes",
    "sent_bytes", "per_layer", "layers"}``: ``count`` all-to-all calls, ``bytes`` their input buffers
    summed, ``sent_bytes`` the part that leaves the rank (a fraction ``(ep-1)/ep`` of the rows under
    balanced routing), ``per_layer`` the calls of one layer and micro-batch. Zero when ``ep == 1``.
    """
    layers = moe_layers(graph)
    stage = plan.coords(rank).get("pp", 0)
    if plan.pp > 1 and layers:
        blocks = sorted({m["block"] for m in layers if m["block"] is not None})
        stages = plan.stage_of_layers(len(blocks)) if blocks else []
        of_block = dict(zip(blocks, stages))
        layers = [m for m in layers if of_block.get(m["block"], 0) % plan.pp == stage]
    if plan.ep == 1 or not layers:
        return {"count": 0, "bytes": 0, "sent_bytes": 0.0, "per_layer": [], "layers": len(layers)}
    per_layer = []
    total_bytes, sent = 0, 0.0
    for m in layers:
        rows = m["tokens"] * m["top_k"]
        data = rows * m["hidden"] * m["dtype_bytes"]
        calls = [("counts", m["experts"] * 8), ("dispatch", data), ("combine", data)]
        if train:
            calls += [("combine_backward", data), ("dispatch_backward", data)]
        per_layer = calls
        total_bytes += sum(b for _, b in calls)
        sent += sum(b for _, b in calls) * (plan.ep - 1) / plan.ep
    m_count = plan.num_micro_batches
    return {
        "count": len(per_layer) * len(layers) * m_count,
        "bytes": total_bytes * m_count,
        "sent_bytes": sent * m_count,
        "per_layer": per_layer,
        "layers": len(layers),
    }


__all__ = [
    "EPContext",
    "ExpertParallelMoE",
    "ExpertShard",
    "HFExpertParallelMoE",
    "all_to_all_volume",
    "autopar_all_to_all",
    "ep_context",
    "lower_experts",
    "moe_layers",
    "moe_modules",
]

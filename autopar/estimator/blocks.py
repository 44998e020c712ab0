"""One block (a transformer layer, the stem, the head) -> :class:`cost_models.BlockWork` for one
device and one micro-batch: fused memory-bound ops, merged sibling GEMMs, measured activations per
recompute mode, collectives (see :mod:`autopar.estimator`, steps 3-4)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from autopar.core.ir import OpGraph, OpNode
from autopar.estimator import moe
from autopar.estimator.tensor_parallel import (
    DTYPE_BYTES,
    NodeShard,
    TPLayout,
    cached,
    out_bytes,
    tensor_bytes,
)
from cost_models import BlockWork, Calibration, CommWork, OpWork

_MEMORY_KINDS = {
    "elementwise",
    "norm",
    "softmax",
    "dropout",
    "view",
    "reduction",
    "loss",
    "embedding",
    "other",
}


# ------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Scale:
    """Graph-measured quantities -> one device's micro-batch."""

    batch: float
    """micro_batch_size / graph.batch_size."""
    tp: int
    sp: bool
    graph_batch: int
    act: float = 1.0
    """Activation dtype conversion (1.0 unless a fp32 graph is costed in 16-bit mixed precision)."""
    ep: int = 1
    """Expert-parallel degree (mixture-of-experts nodes: :mod:`autopar.estimator.moe`)."""

    def div(self, s: NodeShard) -> float:
        """How many ways a node's activations are split: tp when split, or replicated under SP."""
        return self.tp if (s.split or self.sp) else 1

    def bytes(self, nbytes: float, s: NodeShard) -> float:
        """``nbytes`` measured on the graph -> one device's micro-batch."""
        return nbytes * self.batch * self.act / self.div(s)

    def saved(self, nbytes: float, s: NodeShard) -> float:
        """Saved-for-backward ``nbytes`` -> one device's micro-batch (split when what is saved is)."""
        split = s.saves_split or self.sp
        return nbytes * self.batch * self.act / (self.tp if split else 1)


def _gemm_dims(n: OpNode, s: NodeShard, sc: Scale) -> tuple[float, float, float, float]:
    b, m, nn_, k = (float(x) for x in n.gemm)
    if sc.batch != 1.0:
        if sc.graph_batch and b % sc.graph_batch == 0:
            b *= sc.batch
        else:
            m *= sc.batch
    if s.split and sc.tp > 1:
        if s.role == "column":
            nn_ /= sc.tp
        elif s.role == "row":
            k /= sc.tp
        elif b >= sc.tp:
            b /= sc.tp
        else:
            m /= sc.tp
    return b, m, nn_, k


def _grads(n: OpNode) -> tuple[bool, bool]:
    """(input_grad, weight_grad) of a GEMM node from its backward FLOPs (0, 1 or 2 GEMMs)."""
    if not n.flops_fwd or not n.flops_bwd:
        return False, False
    if n.flops_bwd > 1.5 * n.flops_fwd:
        return True, True
    return (False, True) if n.op_kind == "linear" else (True, False)


@dataclass
class BlockContext:
    """One block (or the stem / head) being turned into a BlockWork."""

    graph: OpGraph
    nodes: list[OpNode]
    tp: TPLayout
    sc: Scale
    calib: Calibration
    consumers: dict[str, list[OpNode]]
    region: set[str] = field(default_factory=set)
    """The attention-score region (selective recompute)."""
    measured: Mapping[str, Sequence[float]] = field(default_factory=dict)
    """Profiled (forward, backward) seconds per node name, at the graph's batch, unsharded."""

    @property
    def names(self) -> set[str]:
        return {n.name for n in self.nodes}


def _readers(ctx: BlockContext, name: str, full_bytes: float, inside: set[str]) -> list[OpNode] | None:
    """Consumers reading ``name`` in full, looking through zero-byte views and ops that run no
    kernel (a ``p = 0`` dropout returns its input); None = read outside."""
    found: list[OpNode] = []
    for c in ctx.consumers.get(name, []):
        if c.name not in inside:
            return None
        if c.bytes_read == 0 and (c.op_kind == "view" or c.bytes_written == 0):
            if out_bytes(c) < 0.5 * full_bytes:
                continue  # a shape-only use, e.g. ones_like(scores[0, 0])
            sub = _readers(ctx, c.name, full_bytes, inside)
            if sub is None:
                return None
            found += sub
        else:
            found.append(c)
    return found


def _fused_away(ctx: BlockContext) -> set[str]:
    """Memory-op outputs a fused kernel never writes: one full reader, memory-bound, not saving it."""
    inside = ctx.names
    gone = set()
    for n in ctx.nodes:
        if n.op_kind not in _MEMORY_KINDS or n.op_kind == "softmax" or not (n.bytes_written > 0):
            continue  # softmax saves its output for backward
        size = out_bytes(n)
        rs = _readers(ctx, n.name, size, inside)
        if rs is None or len(rs) != 1:
            continue
        c = rs[0]
        saves_input = c.op_kind != "softmax" and c.saved_bytes >= 0.9 * size  # softmax saves its output
        if c.op_kind in _MEMORY_KINDS and not saves_input:
            gone.add(n.name)
    return gone


def is_norm_op(n: OpNode) -> bool:
    """Whether ``n`` runs inside a normalisation module (``RMSNorm``, ``LlamaRMSNorm``, ``LayerNorm``...)."""
    return bool(n.module_path) and "norm" in str(n.meta.get("module_type", "")).lower()


def _norm_internal(ctx: BlockContext) -> set[str]:
    """Outputs a fused normalisation kernel never writes: those of a norm module's ops read only
    inside the same module instance (``calib.fused_norms``)."""
    members: dict[str, set[str]] = defaultdict(set)
    for n in ctx.nodes:
        if is_norm_op(n):
            members[n.module_path].add(n.name)
    gone = set()
    for n in ctx.nodes:
        if n.op_kind not in _MEMORY_KINDS or not is_norm_op(n) or not (n.bytes_written > 0):
            continue
        inside = members[n.module_path]
        readers = _readers(ctx, n.name, out_bytes(n), inside)
        if readers and all(r.op_kind in _MEMORY_KINDS for r in readers):
            gone.add(n.name)
    return gone


def _memory_ops(ctx: BlockContext) -> list[OpWork]:
    """Memory-bound ops; chains fused into one kernel when ``calib.fuse_elementwise``, a
    normalisation module's ops into one when ``calib.fused_norms``."""
    by_name = {n.name: n for n in ctx.nodes}
    gone = _fused_away(ctx) if ctx.calib.fuse_elementwise else set()
    if ctx.calib.fused_norms:
        gone |= _norm_internal(ctx)
    group_of: dict[str, str] = {}
    traffic: dict[str, float] = defaultdict(float)
    read_by: dict[str, set[str]] = defaultdict(set)  # a fused norm's inputs already read
    for n in ctx.nodes:
        nbytes = _node_bytes(n)
        if n.op_kind not in _MEMORY_KINDS or nbytes <= 0:
            continue
        fused_inputs = [i for i in n.inputs if i in gone]
        nbytes -= sum(out_bytes(by_name[i]) for i in fused_inputs)
        if n.name in gone:
            nbytes -= out_bytes(n)
        root = group_of.get(fused_inputs[0], n.name) if fused_inputs else n.name
        group_of[n.name] = root
        if ctx.calib.fused_norms and is_norm_op(n):  # one kernel reads each input once
            outside = [i for i in dict.fromkeys(n.inputs) if i not in gone]
            nbytes -= sum(_out_bytes_of(ctx, i) for i in outside if i in read_by[root])
            read_by[root].update(outside)
        traffic[root] += ctx.sc.bytes(max(nbytes, 0.0), ctx.tp.shard[n.name])
    return [
        OpWork(name=root, op_class="memory", bytes_fwd=b, selective_recompute=root in ctx.region)
        for root, b in traffic.items()
    ]


def _out_bytes_of(ctx: BlockContext, name: str) -> float:
    """Bytes of the tensor named ``name`` (made in this block or before it; 0 if not in the graph)."""
    try:
        return out_bytes(ctx.graph[name])
    except KeyError:
        return 0.0


def _node_bytes(n: OpNode) -> float:
    if n.op_kind == "embedding":  # a lookup reads the rows it gathers, not the whole table
        return 2.0 * out_bytes(n)
    if n.op_kind == "dropout":  # it also writes the mask it saves
        return n.bytes_read + n.bytes_written + n.saved_bytes
    return n.bytes_read + n.bytes_written


def _gemm_ops(ctx: BlockContext) -> list[OpWork]:
    """GEMM-like ops; Linears reading the same tensor with the same k become one GEMM."""
    merged: dict[tuple, list] = {}
    out = []
    for n in ctx.nodes:
        if n.gemm is None or n.op_kind not in ("linear", "matmul", "attention"):
            continue
        s = ctx.tp.shard[n.name]
        b, m, nn_, k = _gemm_dims(n, s, ctx.sc)
        ig, wg = _grads(n)
        if n.op_kind == "attention":  # fused kernel: compute-bound at the score GEMM's efficiency
            div = ctx.sc.batch / ctx.sc.div(s)
            out.append(
                OpWork(
                    name=n.name,
                    op_class="roofline",
                    flops_fwd=n.flops_fwd * div,
                    flops_bwd=n.flops_bwd * div,
                    bytes_fwd=(n.bytes_read + n.bytes_written) * div * ctx.sc.act,
                    attention_gemm=(b, m, k),
                    causal=bool(n.meta.get("causal", False)),
                    selective_recompute=n.name in ctx.region,
                )
            )
            continue
        fuse = ctx.calib.fuse_sibling_gemms and n.op_kind == "linear" and n.inputs
        key = (n.inputs[0], b, m, k, ig, wg, s.role) if fuse else (n.name,)
        if key in merged:
            merged[key][2] += nn_
            continue
        elem = DTYPE_BYTES.get(str(n.output_dtype), 2) * ctx.sc.act
        merged[key] = [n, (b, m, k), nn_, ig, wg, elem]
    for n, (b, m, k), nn_, ig, wg, elem in merged.values():
        out.append(
            OpWork(
                name=n.name,
                op_class="gemm",
                gemm=(b, m, nn_, k),
                flops_fwd=2 * b * m * nn_ * k,
                elem_bytes=elem,
                input_grad=ig,
                weight_grad=wg,
                selective_recompute=n.name in ctx.region,
            )
        )
    return out


def _score_region(ctx: BlockContext) -> set[str]:
    """Nodes from each activation-activation matmul (scores) to the next one it feeds (context)."""
    names = ctx.names
    matmuls = [n for n in ctx.nodes if n.op_kind == "matmul"]
    region: set[str] = set()
    used: set[str] = set()
    for first in matmuls:
        if first.name in used:
            continue
        down = _descendants(ctx, first.name, names)
        second = next((m for m in matmuls if m.name in down and m.name != first.name), None)
        if second is None:
            continue
        used |= {first.name, second.name}
        up = _ancestors(ctx, second.name, names)
        region |= (down & up) | {first.name, second.name}
    return region


def _descendants(ctx: BlockContext, start: str, names: set[str]) -> set[str]:
    seen, stack = {start}, [start]
    while stack:
        for c in ctx.consumers.get(stack.pop(), []):
            if c.name in names and c.name not in seen:
                seen.add(c.name)
                stack.append(c.name)
    return seen


def _ancestors(ctx: BlockContext, start: str, names: set[str]) -> set[str]:
    by_name = {n.name: n for n in ctx.nodes}
    seen, stack = {start}, [start]
    while stack:
        for i in by_name[stack.pop()].inputs:
            if i in names and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def saved_activation_bytes(ctx: BlockContext) -> dict[str, float]:
    """Activation bytes kept per micro-batch under each recompute mode (module docstring, step 4)."""
    by_name = cached(ctx.graph, ("by_name",), lambda: {n.name: n for n in ctx.graph.nodes})
    total = dropped = 0.0
    for n in ctx.nodes:
        if moe.is_moe(n):
            saved = moe.node_saved_bytes(n, batch=ctx.sc.batch, ep=ctx.sc.ep, tp=ctx.sc.tp, act=ctx.sc.act)
        else:
            saved = ctx.sc.saved(n.saved_bytes, ctx.tp.shard[n.name])
        total += saved
        if n.name in ctx.region:
            external = 0.0
            if n.op_kind == "matmul":  # q, k and v are the region's inputs: kept
                external = sum(
                    tensor_bytes(shape, dt)
                    for i, shape, dt in zip(n.inputs, n.input_shapes, n.input_dtypes)
                    if i not in ctx.region
                )
                external = ctx.sc.saved(external, ctx.tp.shard[n.name])
            dropped += max(0.0, saved - external)
    names = ctx.names
    inputs = {i for n in ctx.nodes for i in n.inputs if i not in names and i in by_name}
    layer_input = sum(ctx.sc.bytes(out_bytes(by_name[i]), NodeShard()) for i in inputs)
    return {"none": total, "selective": total - dropped, "full": min(layer_input, total)}


def _comms(ctx: BlockContext) -> list[CommWork]:
    out = []
    for n in ctx.nodes:
        if moe.is_moe(n):
            out += moe.node_comms(
                n,
                batch=ctx.sc.batch,
                ep=ctx.sc.ep,
                tp=ctx.sc.tp,
                act=ctx.sc.act,
                per_rank=ctx.calib.ep_dispatch_per_rank,
            )
            continue
        for c in ctx.tp.comms.get(n.name, ()):
            nbytes = c.nbytes * ctx.sc.batch * (ctx.sc.act if c.nbytes else 1.0)
            out.append(
                CommWork(name=c.name, collective=c.collective, nbytes=nbytes, phase=c.phase, count=c.count)
            )
    return out


def _param_count(ctx: BlockContext) -> float:
    """Parameters this device holds for the nodes (tied parameters count once per part)."""
    seen: set[str] = set()
    count = 0.0
    for n in ctx.nodes:
        if moe.is_moe(n):  # experts / (ep tp), shared experts / tp, the router whole
            if not seen.intersection(n.param_names):
                count += moe.node_params(ctx.graph, n, ep=ctx.sc.ep, tp=ctx.sc.tp)[0]
            seen.update(n.param_names)
            continue
        for p in n.param_names:
            if p in seen or p not in ctx.graph.params:
                continue
            seen.add(p)
            count += math.prod(ctx.graph.params[p]["shape"]) / ctx.tp.shard[n.name].div_of(p)
    return count


def block_work(ctx: BlockContext, name: str, recomputable: bool) -> BlockWork:
    """The :class:`cost_models.BlockWork` of ``ctx``'s nodes (``recomputable``: a repeated block,
    whose activations the recompute modes may drop)."""
    ctx.region = _score_region(ctx) if recomputable else set()
    saved = saved_activation_bytes(ctx)
    if not recomputable:
        saved = {"none": saved["none"]}
    return BlockWork(
        name=name,
        ops=tuple(_with_measured(ctx, _gemm_ops(ctx) + _memory_ops(ctx) + _moe_ops(ctx))),
        comms=tuple(_comms(ctx)),
        param_count=_param_count(ctx),
        saved_bytes=saved,
        recomputable=recomputable,
    )


def _moe_ops(ctx: BlockContext) -> list[OpWork]:
    """Router, experts and shared experts of the block's MoE regions (:mod:`autopar.estimator.moe`)."""
    out: list[OpWork] = []
    for n in ctx.nodes:
        if moe.is_moe(n) and n.name not in ctx.measured:  # a profiled region keeps its measured time
            out += moe.node_ops(n, batch=ctx.sc.batch, ep=ctx.sc.ep, tp=ctx.sc.tp, act=ctx.sc.act)
    return out


def _with_measured(ctx: BlockContext, ops: list[OpWork]) -> list[OpWork]:
    """Profiled times replace the roofline: scaled to the micro-batch and divided by the shards."""
    if not ctx.measured:
        return ops
    out, covered = [], set()
    for op in ops:
        if op.name in ctx.measured:
            covered.add(op.name)
            op = replace(op, **_measured_fields(ctx, op.name))
        out.append(op)
    for n in ctx.nodes:  # measured ops the roofline had nothing for (views, zero-byte ops)
        if n.name in ctx.measured and n.name not in covered:
            out.append(OpWork(name=n.name, op_class="memory", **_measured_fields(ctx, n.name)))
    return out


def _measured_fields(ctx: BlockContext, name: str) -> dict[str, float]:
    scale = ctx.sc.batch / ctx.sc.div(ctx.tp.shard[name])
    fwd, bwd = scaled_measured(ctx.measured[name], scale)
    return {"measured_fwd_s": fwd, "measured_bwd_s": bwd}


def scaled_measured(times: Sequence[float], scale: float) -> tuple[float, float]:
    """Profiled ``(forward, backward[, forward_fixed, backward_fixed])`` at the graph's batch ->
    one device's micro-batch: the fixed part (dispatch, autograd bookkeeping; measured by the
    profiled mode from two batch sizes) is paid per call, the rest scales with the work
    (``scale`` = micro-batch share / tensor-parallel split)."""
    fwd, bwd = times[0], times[1]
    f0, b0 = (times[2], times[3]) if len(times) >= 4 else (0.0, 0.0)
    return f0 + (fwd - f0) * scale, b0 + (bwd - b0) * scale

"""``estimate(graph, cluster, plan)``: the predicted step time and memory of a plan.

The glue between the analysed graph and :mod:`cost_models`: it turns an
:class:`~autopar.ir.OpGraph`, a :class:`~autopar.cluster.Cluster` and a
:class:`~autopar.plan.Plan` into per-device, per-micro-batch workloads (``cost_models.workload``)
and reads the answer back into a :class:`~autopar.plan.PredictedCost`.

Steps (each a small function below):

1. **Validate** the plan against the cluster and the graph (device count, head / FFN / vocab
   divisibility by ``tp``). Errors name the value, the rule and the fix.
2. **Tensor-parallel sharding.** With ``plan.placements`` empty, the Megatron default is derived from
   the graph, not hard-coded per model: walking the nodes in order with every tensor either
   replicated (R) or split over ``tp`` (S), a Linear reading an R tensor is *column-parallel*
   (output S, weight split by rows), a Linear reading an S tensor is *row-parallel* (weight split by
   columns, output all-reduced back to R); any other op outputs S if one of its inputs is S
   (attention heads follow the q/k/v split). The embedding whose indices are a graph input is
   vocab-parallel (output all-reduced), the LM head is column-parallel and the loss is
   vocab-parallel (three all-reduces of one fp32 number per token). Collectives per layer:
   forward, one all-reduce per row-parallel Linear; backward, one per distinct input of the
   column-parallel Linears (GPT: 2 + 2). With sequence parallelism the R tensors are split along
   the sequence instead, and each all-reduce becomes an all-gather / reduce-scatter pair.
3. **Workload per block type**: the first instance of each repeated block is costed once and
   multiplied by the number of instances on each stage. Memory-bound ops are fused the way
   Megatron's kernels (or torch.compile) fuse them (``Calibration.fuse_elementwise``): a tensor made
   by a memory-bound op and read in full by exactly one memory-bound op that does not save it is
   never written. Linears reading the same tensor (q, k, v) run as one GEMM (Megatron's fused QKV).
4. **Activation memory** comes from the graph's measured ``saved_bytes`` scaled to the micro-batch
   and divided by ``tp`` where the saved tensor is split. ``selective`` recompute drops what the
   attention-score region (from the first activation-activation matmul to the next one) saves
   besides its inputs; ``full`` keeps each layer's input only.
5. **Step time and memory** from :func:`cost_models.step_time` and :mod:`cost_models.memory`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

from autopar.errors import PlanError
from autopar.ir import OpGraph, OpNode
from autopar.plan import Partial, Plan, PredictedCost, Shard
from cost_models import (
    DEFAULT,
    BlockWork,
    Calibration,
    CommWork,
    DeviceRates,
    GroupSpec,
    LinkSpec,
    OpWork,
    StageWork,
    StepSpec,
    step_time,
)
from cost_models import memory as mem
from cost_models.compute import gemm_efficiency

log = logging.getLogger(__name__)

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
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "bool": 1, "int64": 8, "int32": 4}
_PEAK_KEY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# ------------------------------------------------------------------------------ sharding
@dataclass
class _Shard:
    """Tensor-parallel facts of one node."""

    split: bool = False
    """Its work is split over tp (output S, or a row-parallel Linear)."""
    role: str = ""
    """``column``, ``row``, ``vocab_embedding``, ``vocab_loss`` or ''."""
    param_div: float = 1.0
    saved_split: bool | None = None
    """Whether what it saves for backward is split; None = same as ``split`` (a column-parallel
    Linear saves its replicated input)."""

    @property
    def saves_split(self) -> bool:
        return self.split if self.saved_split is None else self.saved_split


@dataclass
class _TP:
    shard: dict[str, _Shard] = field(default_factory=dict)
    comms: dict[str, list[CommWork]] = field(default_factory=lambda: defaultdict(list))
    """Per node name: the collectives issued right after it (forward) or for it (backward)."""


def _tensor_bytes(shape, dtype) -> float:
    if shape is None:
        return 0.0
    return float(math.prod(shape) * _DTYPE_BYTES.get(str(dtype), 4))


def _out_bytes(n: OpNode) -> float:
    return _tensor_bytes(n.output_shape, n.output_dtype)


def _cached(graph: OpGraph, key: tuple, make):
    """Memoise a graph-derived value on the graph itself. The planner costs thousands of plans of
    one graph; everything that depends only on (graph, tp, sp, micro-batch) is derived once."""
    cache = graph.__dict__.setdefault("_estimator_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _megatron_tp(graph: OpGraph, tp: int, sp: bool) -> _TP:
    """The Megatron placement derived from the graph (see the module docstring, step 2)."""
    return _cached(graph, ("megatron_tp", tp, sp), lambda: _derive_megatron_tp(graph, tp, sp))


def _derive_megatron_tp(graph: OpGraph, tp: int, sp: bool) -> _TP:
    out = _TP()
    split: dict[str, bool] = {}
    column_inputs_seen: set[str] = set()
    pair = ("all_gather", "reduce_scatter") if sp else ("all_reduce", "all_reduce")
    for n in graph.nodes:
        ins = [split.get(i, False) for i in n.inputs]
        s = _Shard()
        if n.op_kind == "linear":
            if any(ins):
                s = _Shard(split=True, role="row", param_div=tp)
                split[n.name] = False
                out.comms[n.name].append(
                    CommWork(name=f"{n.name}:{pair[1]}", collective=pair[1], nbytes=_out_bytes(n))
                )
                if sp:  # backward: all-gather the output gradient
                    out.comms[n.name].append(
                        CommWork(
                            name=f"{n.name}:ag_bwd",
                            collective="all_gather",
                            nbytes=_out_bytes(n),
                            phase="bwd",
                        )
                    )
            else:
                s = _Shard(split=True, role="column", param_div=tp, saved_split=False)
                split[n.name] = True
                src = n.inputs[0] if n.inputs else n.name
                if src not in column_inputs_seen:
                    column_inputs_seen.add(src)
                    nbytes = _tensor_bytes(n.input_shapes[0], n.input_dtypes[0]) if n.input_shapes else 0.0
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
            s = _Shard(split=False, role="vocab_embedding", param_div=tp)
            split[n.name] = False
            coll = "reduce_scatter" if sp else "all_reduce"
            out.comms[n.name].append(CommWork(name=f"{n.name}:{coll}", collective=coll, nbytes=_out_bytes(n)))
        elif n.op_kind == "loss" and any(ins):
            s = _Shard(split=True, role="vocab_loss")
            split[n.name] = False
            tokens = math.prod(n.input_shapes[0][:-1]) if n.input_shapes else 0
            out.comms[n.name].append(
                CommWork(name=f"{n.name}:stats", collective="all_reduce", nbytes=4.0 * tokens, count=3)
            )
        else:
            s = _Shard(split=any(ins))
            split[n.name] = any(ins)
        out.shard[n.name] = s
    return out


def _tp_from_placements(graph: OpGraph, plan: Plan) -> _TP:
    """Sharding read from ``plan.placements`` (nodes not listed are replicated)."""
    out = _TP()
    tp = plan.tp
    for n in graph.nodes:
        pl = plan.placements.get(n.name)
        if pl is None:
            out.shard[n.name] = _Shard()
            continue
        split = isinstance(pl.output, (Shard, Partial)) or any(
            isinstance(p, Shard) for p in pl.params.values()
        )
        sharded_params = any(isinstance(p, Shard) for p in pl.params.values())
        out.shard[n.name] = _Shard(split=split, param_div=tp if sharded_params else 1.0)
        if pl.collective:
            out.comms[n.name].append(
                CommWork(name=f"{n.name}:{pl.collective}", collective=pl.collective, nbytes=_out_bytes(n))
            )
            back = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather"}.get(pl.collective)
            if back:
                out.comms[n.name].append(
                    CommWork(name=f"{n.name}:{back}_bwd", collective=back, nbytes=_out_bytes(n), phase="bwd")
                )
    return out


# ------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class _Scale:
    """Graph-measured quantities -> one device's micro-batch."""

    batch: float
    """micro_batch_size / graph.batch_size."""
    tp: int
    sp: bool
    graph_batch: int
    act: float = 1.0
    """Activation dtype conversion (1.0 unless a fp32 graph is costed in 16-bit mixed precision)."""

    def div(self, s: _Shard) -> float:
        """How many ways a node's activations are split: tp when split, or replicated under SP."""
        return self.tp if (s.split or self.sp) else 1

    def bytes(self, nbytes: float, s: _Shard) -> float:
        return nbytes * self.batch * self.act / self.div(s)

    def saved(self, nbytes: float, s: _Shard) -> float:
        split = s.saves_split or self.sp
        return nbytes * self.batch * self.act / (self.tp if split else 1)


def _gemm_dims(n: OpNode, s: _Shard, sc: _Scale) -> tuple[float, float, float, float]:
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
class _Ctx:
    """One block (or the stem / head) being turned into a BlockWork."""

    graph: OpGraph
    nodes: list[OpNode]
    tp: _TP
    sc: _Scale
    calib: Calibration
    consumers: dict[str, list[OpNode]]
    region: set[str] = field(default_factory=set)
    """The attention-score region (selective recompute)."""

    @property
    def names(self) -> set[str]:
        return {n.name for n in self.nodes}


def _readers(ctx: _Ctx, name: str, full_bytes: float, inside: set[str]) -> list[OpNode] | None:
    """Consumers reading ``name`` in full, looking through zero-byte views; None = read outside."""
    found: list[OpNode] = []
    for c in ctx.consumers.get(name, []):
        if c.name not in inside:
            return None
        if c.op_kind == "view" and c.bytes_read == 0:
            if _out_bytes(c) < 0.5 * full_bytes:
                continue  # a shape-only use, e.g. ones_like(scores[0, 0])
            sub = _readers(ctx, c.name, full_bytes, inside)
            if sub is None:
                return None
            found += sub
        else:
            found.append(c)
    return found


def _fused_away(ctx: _Ctx) -> set[str]:
    """Memory-op outputs a fused kernel never writes: one full reader, memory-bound, not saving it."""
    inside = ctx.names
    gone = set()
    for n in ctx.nodes:
        if n.op_kind not in _MEMORY_KINDS or n.op_kind == "softmax" or not (n.bytes_written > 0):
            continue  # softmax saves its output for backward
        size = _out_bytes(n)
        rs = _readers(ctx, n.name, size, inside)
        if rs is None or len(rs) != 1:
            continue
        c = rs[0]
        saves_input = c.op_kind != "softmax" and c.saved_bytes >= 0.9 * size  # softmax saves its output
        if c.op_kind in _MEMORY_KINDS and not saves_input:
            gone.add(n.name)
    return gone


def _memory_ops(ctx: _Ctx) -> list[OpWork]:
    """Memory-bound ops; chains fused into one kernel when ``calib.fuse_elementwise``."""
    by_name = {n.name: n for n in ctx.nodes}
    gone = _fused_away(ctx) if ctx.calib.fuse_elementwise else set()
    group_of: dict[str, str] = {}
    traffic: dict[str, float] = defaultdict(float)
    for n in ctx.nodes:
        nbytes = _node_bytes(n)
        if n.op_kind not in _MEMORY_KINDS or nbytes <= 0:
            continue
        fused_inputs = [i for i in n.inputs if i in gone]
        nbytes -= sum(_out_bytes(by_name[i]) for i in fused_inputs)
        if n.name in gone:
            nbytes -= _out_bytes(n)
        root = group_of.get(fused_inputs[0], n.name) if fused_inputs else n.name
        group_of[n.name] = root
        traffic[root] += ctx.sc.bytes(max(nbytes, 0.0), ctx.tp.shard[n.name])
    return [
        OpWork(name=root, op_class="memory", bytes_fwd=b, selective_recompute=root in ctx.region)
        for root, b in traffic.items()
    ]


def _node_bytes(n: OpNode) -> float:
    if n.op_kind == "embedding":  # a lookup reads the rows it gathers, not the whole table
        return 2.0 * _out_bytes(n)
    if n.op_kind == "dropout":  # it also writes the mask it saves
        return n.bytes_read + n.bytes_written + n.saved_bytes
    return n.bytes_read + n.bytes_written


def _gemm_ops(ctx: _Ctx) -> list[OpWork]:
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
                    efficiency=ctx.calib.fused_attention_efficiency
                    * gemm_efficiency(b, m, k, k, ctx.calib)
                    / ctx.calib.gemm_max_efficiency,
                    selective_recompute=n.name in ctx.region,
                )
            )
            continue
        fuse = ctx.calib.fuse_sibling_gemms and n.op_kind == "linear" and n.inputs
        key = (n.inputs[0], b, m, k, ig, wg, s.role) if fuse else (n.name,)
        if key in merged:
            merged[key][2] += nn_
            continue
        elem = _DTYPE_BYTES.get(str(n.output_dtype), 2) * ctx.sc.act
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


def _score_region(ctx: _Ctx) -> set[str]:
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


def _descendants(ctx: _Ctx, start: str, names: set[str]) -> set[str]:
    seen, stack = {start}, [start]
    while stack:
        for c in ctx.consumers.get(stack.pop(), []):
            if c.name in names and c.name not in seen:
                seen.add(c.name)
                stack.append(c.name)
    return seen


def _ancestors(ctx: _Ctx, start: str, names: set[str]) -> set[str]:
    by_name = {n.name: n for n in ctx.nodes}
    seen, stack = {start}, [start]
    while stack:
        for i in by_name[stack.pop()].inputs:
            if i in names and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _saved_bytes(ctx: _Ctx) -> dict[str, float]:
    """Activation bytes kept per micro-batch under each recompute mode (module docstring, step 4)."""
    by_name = {n.name: n for n in ctx.graph.nodes}
    total = dropped = 0.0
    for n in ctx.nodes:
        saved = ctx.sc.saved(n.saved_bytes, ctx.tp.shard[n.name])
        total += saved
        if n.name in ctx.region:
            external = 0.0
            if n.op_kind == "matmul":  # q, k and v are the region's inputs: kept
                external = sum(
                    _tensor_bytes(shape, dt)
                    for i, shape, dt in zip(n.inputs, n.input_shapes, n.input_dtypes)
                    if i not in ctx.region
                )
                external = ctx.sc.saved(external, ctx.tp.shard[n.name])
            dropped += max(0.0, saved - external)
    names = ctx.names
    inputs = {i for n in ctx.nodes for i in n.inputs if i not in names and i in by_name}
    layer_input = sum(ctx.sc.bytes(_out_bytes(by_name[i]), _Shard()) for i in inputs)
    return {"none": total, "selective": total - dropped, "full": min(layer_input, total)}


def _comms(ctx: _Ctx) -> list[CommWork]:
    out = []
    for n in ctx.nodes:
        for c in ctx.tp.comms.get(n.name, ()):
            nbytes = c.nbytes * ctx.sc.batch * (ctx.sc.act if c.nbytes else 1.0)
            out.append(
                CommWork(name=c.name, collective=c.collective, nbytes=nbytes, phase=c.phase, count=c.count)
            )
    return out


def _param_count(ctx: _Ctx) -> float:
    """Parameters this device holds for the nodes (tied parameters count once per part)."""
    seen: set[str] = set()
    count = 0.0
    for n in ctx.nodes:
        for p in n.param_names:
            if p in seen or p not in ctx.graph.params:
                continue
            seen.add(p)
            count += math.prod(ctx.graph.params[p]["shape"]) / ctx.tp.shard[n.name].param_div
    return count


def _block_work(ctx: _Ctx, name: str, recomputable: bool) -> BlockWork:
    ctx.region = _score_region(ctx) if recomputable else set()
    saved = _saved_bytes(ctx)
    if not recomputable:
        saved = {"none": saved["none"]}
    return BlockWork(
        name=name,
        ops=tuple(_gemm_ops(ctx) + _memory_ops(ctx)),
        comms=tuple(_comms(ctx)),
        param_count=_param_count(ctx),
        saved_bytes=saved,
        recomputable=recomputable,
    )


# ------------------------------------------------------------------------------ stages
@dataclass
class _Parts:
    """The graph cut into the stem, the repeated block instances (in order), glue and the head."""

    stem: list[OpNode]
    blocks: list[tuple[str, list[OpNode]]]
    """(block type, nodes) per instance in execution order."""
    after: dict[int, list[OpNode]]
    """Nodes outside any block that run after block instance i (the last entry: the head)."""


def _parts(graph: OpGraph) -> _Parts:
    return _cached(graph, ("parts",), lambda: _derive_parts(graph))


def _derive_parts(graph: OpGraph) -> _Parts:
    by_name = {n.name: n for n in graph.nodes}
    blocks = []
    for key, idx in graph.block_order:
        names = graph.block_types[key].node_names[idx]
        blocks.append((key, [by_name[x] for x in names]))
    owner: dict[str, int] = {}
    for i, (_, nodes) in enumerate(blocks):
        for n in nodes:
            owner[n.name] = i
    stem: list[OpNode] = []
    after: dict[int, list[OpNode]] = defaultdict(list)
    last = -1
    for n in graph.nodes:
        if n.name in owner:
            last = max(last, owner[n.name])
        elif n.op_kind not in ("placeholder", "output", "param") or n.param_names:
            (stem if last < 0 else after[last]).append(n)
    return _Parts(stem=stem, blocks=blocks, after=dict(after))


def _stage_works(
    graph: OpGraph, plan: Plan, tp: _TP, sc: _Scale, calib: Calibration, tp_key: tuple | None = None
) -> list[StageWork]:
    """``tp_key`` identifies a cacheable ``tp`` (the Megatron default); None disables caching."""
    parts = _parts(graph)
    consumers = _cached(graph, ("consumers",), lambda: _consumers(graph))

    def work(nodes: list[OpNode], name: str, recomputable: bool) -> BlockWork:
        def make() -> BlockWork:
            ctx = _Ctx(graph=graph, nodes=nodes, tp=tp, sc=sc, calib=calib, consumers=consumers)
            return _block_work(ctx, name, recomputable)

        if tp_key is None:
            return make()
        return _cached(graph, ("work", nodes[0].name, name, tp_key, sc, calib), make)

    pp = plan.pp
    if not parts.blocks:
        if pp > 1:
            raise PlanError(
                f"pp={pp} needs repeated blocks (transformer layers) to split into stages, and the "
                "traced graph has none; use pp=1"
            )
        return [StageWork(blocks=((work(parts.stem, "model", False), 1),))]
    stage_of = plan.stage_of_layers(len(parts.blocks))
    rank_of = [s % pp for s in stage_of]
    per_type: dict[str, BlockWork] = {}
    counts: list[dict[str, int]] = [defaultdict(int) for _ in range(pp)]
    extra: list[list[BlockWork]] = [[] for _ in range(pp)]
    for i, (key, nodes) in enumerate(parts.blocks):
        if key not in per_type:
            per_type[key] = work(nodes, key, True)
        counts[rank_of[i]][key] += 1
    if parts.stem:
        extra[rank_of[0]].append(work(parts.stem, "stem", False))
    for i, nodes in sorted(parts.after.items()):
        label = "head" if i == len(parts.blocks) - 1 else f"glue after block {i}"
        extra[rank_of[i]].append(work(nodes, label, False))
    first_nodes = parts.blocks[0][1]

    def p2p_make() -> float:
        return _p2p_bytes(graph, first_nodes, tp, sc, calib, consumers)

    p2p = p2p_make() if tp_key is None else _cached(graph, ("p2p", tp_key, sc, calib), p2p_make)
    return [
        StageWork(
            blocks=tuple((per_type[k], c) for k, c in counts[r].items()) + tuple((b, 1) for b in extra[r]),
            p2p_bytes=p2p,
        )
        for r in range(pp)
    ]


def _consumers(graph: OpGraph) -> dict[str, list[OpNode]]:
    consumers: dict[str, list[OpNode]] = defaultdict(list)
    for n in graph.nodes:
        for i in n.inputs:
            consumers[i].append(n)
    return consumers


def _p2p_bytes(graph, first_nodes, tp, sc, calib, consumers) -> float:
    return _saved_bytes(
        _Ctx(
            graph=graph,
            nodes=first_nodes,
            tp=tp,
            sc=_Scale(sc.batch, 1, False, sc.graph_batch, sc.act),
            calib=calib,
            consumers=consumers,
        )
    )["full"]


# ------------------------------------------------------------------------------ topology
def _link(link) -> LinkSpec:
    return LinkSpec(bandwidth_bytes_per_s=link.bandwidth_bytes_per_s, latency_s=link.latency_s)


def _group(plan: Plan, cluster, axis: str) -> GroupSpec:
    """The first ``axis`` group of the row-major mesh, placed on the cluster's nodes."""
    size = plan.degree(axis)
    names = [a.name for a in plan.mesh]
    stride = math.prod(a.size for a in plan.mesh[names.index(axis) + 1 :]) if axis in names else 1
    dpn = cluster.devices_per_node
    nodes = {(j * stride) // dpn for j in range(size)}
    per_node = math.ceil(size / len(nodes))
    return GroupSpec(
        size=size,
        ranks_per_node=per_node,
        intra=_link(cluster.intra_node),
        inter=_link(cluster.inter_node) if len(nodes) > 1 else None,
    )


def _compute_dtype(graph: OpGraph, device, dtype: str | None) -> tuple[str, float]:
    """(peak key, activation byte factor). A fp32 graph is costed in the device's 16-bit dtype."""
    if dtype is not None:
        key = dtype
    else:
        dts = [n.output_dtype for n in graph.nodes if n.op_kind in ("linear", "matmul", "attention")]
        graph_dt = max(set(dts), key=dts.count) if dts else "float32"
        key = _PEAK_KEY.get(graph_dt, "fp32")
        if key == "fp32" and device.preferred_dtype != "fp32":
            key = device.preferred_dtype
            log.info("fp32 graph costed as %s mixed precision on %s", key, device.name)
    graph_bytes = 4 if all(n.output_dtype in (None, "float32") for n in graph.nodes if n.gemm) else 2
    act = (2 if key in ("fp16", "bf16") else 4) / graph_bytes
    return key, act


# ------------------------------------------------------------------------------ validation
def _heads(graph: OpGraph) -> list[int]:
    """Head counts: dim 2 of the 4-D views that column-parallel Linears' outputs go through."""
    return _cached(graph, ("heads",), lambda: _derive_heads(graph))


def _derive_heads(graph: OpGraph) -> list[int]:
    out = []
    linear = {n.name for n in graph.nodes if n.op_kind == "linear"}
    for n in graph.nodes:
        if (
            n.op_kind == "view"
            and n.inputs
            and n.inputs[0] in linear
            and n.output_shape
            and len(n.output_shape) == 4
        ):
            out.append(n.output_shape[2])
    return sorted(set(out))


def _validate(graph: OpGraph, cluster, plan: Plan) -> None:
    if plan.world_size != cluster.num_devices:
        degrees = " x ".join(f"{a.name}={a.size}" for a in plan.mesh)
        raise PlanError(
            f"plan degrees {degrees} = {plan.world_size} devices, but cluster {cluster.name!r} has "
            f"{cluster.num_devices}; the product of the degrees must equal the device count"
        )
    tp = plan.tp
    if tp == 1 or plan.placements:
        return
    for h in _heads(graph):
        if h % tp:
            raise PlanError(
                f"tp={tp} does not divide the {h} attention heads; tensor parallelism splits heads "
                f"evenly: choose tp in {[d for d in range(1, h + 1) if h % d == 0]}"
            )
    for n in graph.nodes:
        if n.op_kind == "linear" and n.gemm and n.gemm[2] % tp:
            raise PlanError(
                f"tp={tp} does not divide the {n.gemm[2]} output features of {n.module_path or n.name}; "
                "choose a tp that divides every Linear's width (and the vocabulary)"
            )


# ------------------------------------------------------------------------------ memory
def _stage_memory(
    stages, plan: Plan, elem: float, calib: Calibration, kv: list[float]
) -> list[dict[str, float]]:
    precision = mem.Precision(param_bytes=elem, grad_bytes=elem, optimizer_bytes=12.0 if elem == 2 else 8.0)
    out = []
    for r, stage in enumerate(stages):
        buffers = 0.0
        if plan.mode == "train" and plan.dp > 1 and plan.zero_stage < 3:
            buffers += 2 * calib.dp_last_bucket_bytes  # DDP: the bucket being reduced + the next one
        if plan.zero_stage == 3 and plan.dp > 1:
            buffers += mem.zero3_gather_buffer_bytes(stage, elem)
        out.append(
            mem.stage_memory_bytes(
                stage,
                stage_index=r,
                pp=plan.pp,
                num_micro_batches=plan.num_micro_batches,
                schedule=plan.schedule,
                virtual_stages=plan.virtual_stages,
                recompute=plan.recompute,
                dp=plan.dp,
                zero_stage=plan.zero_stage,
                mode=plan.mode,
                precision=precision,
                comm_buffer_bytes=buffers,
                kv_cache=kv[r],
                reserved_bytes=calib.runtime_reserved_bytes,
            )
        )
    return out


def _kv_bytes(stage: StageWork, kv_per_block: dict[str, float]) -> float:
    return sum(kv_per_block.get(b.name, 0.0) * c for b, c in stage.blocks)


def _kv_per_block(graph: OpGraph, tp: _TP, sc: _Scale) -> dict[str, float]:
    """Keys and values a block caches: outputs of the Linears feeding an attention's k / v operand."""
    by_name = {n.name: n for n in graph.nodes}
    out: dict[str, float] = {}
    for key, bt in graph.block_types.items():
        nodes = [by_name[x] for x in bt.node_names[0]]
        found: set[str] = set()
        for n in nodes:
            operands = (
                n.inputs[1:3] if n.op_kind == "attention" else n.inputs[1:2] if n.op_kind == "matmul" else []
            )
            for src in operands:
                lin = _producing_linear(by_name, src)
                if lin is not None:
                    found.add(lin)
        out[key] = sum(sc.bytes(_out_bytes(by_name[x]), tp.shard[x]) for x in found)
    return out


def _producing_linear(by_name: dict[str, OpNode], name: str) -> str | None:
    for _ in range(32):  # through views, rotary and repeat_interleave back to the projection
        n = by_name.get(name)
        if n is None or n.op_kind in ("matmul", "attention", "placeholder"):
            return None
        if n.op_kind == "linear":
            return n.name
        if not n.inputs:
            return None
        name = n.inputs[0]
    return None


# ------------------------------------------------------------------------------ flops
def _flops(graph: OpGraph, plan: Plan, stages: list[StageWork]) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step over all devices."""
    scale = plan.global_batch / max(graph.batch_size, 1)
    fwd, bwd = _cached(graph, ("flops",), lambda: (graph.flops_fwd, graph.flops_bwd))
    if plan.mode != "train":
        return fwd * scale, fwd * scale
    model = (fwd + bwd) * scale
    rec = 0.0
    if plan.recompute != "none":
        by_name = graph._by_name
        if plan.recompute == "full":
            rec = _cached(graph, ("block_flops_fwd",), lambda: _block_flops_fwd(graph))
        if plan.recompute == "selective":
            per_block = {b.name: b for s in stages for b, _ in s.blocks if b.recomputable}
            for key, bt in graph.block_types.items():
                region = (
                    {op.name for op in per_block[key].ops if op.selective_recompute}
                    if key in per_block
                    else set()
                )
                nodes = bt.node_names[0]
                rec += bt.count * sum(
                    by_name[x].flops_fwd for x in nodes if x in region or _in_region(by_name[x], region)
                )
    return model, model + rec * scale


def _block_flops_fwd(graph: OpGraph) -> float:
    return sum(
        graph[x].flops_fwd for bt in graph.block_types.values() for names in bt.node_names for x in names
    )


def _in_region(n: OpNode, region: set[str]) -> bool:
    return n.name in region


# ------------------------------------------------------------------------------ entry point
@dataclass(kw_only=True)
class Workload:
    """Everything :func:`estimate` derives from the graph before timing it (reusable across
    calibrations: the fidelity fit times one workload under many constants)."""

    spec: StepSpec
    rates: DeviceRates
    stages: list[StageWork]
    memory_per_stage: list[dict[str, float]]
    model_flops_per_step: float
    hardware_flops_per_step: float
    dtype: str
    seq: int


def workload(
    graph: OpGraph,
    cluster,
    plan: Plan,
    *,
    calib: Calibration | None = None,
    dtype: str | None = None,
    kv_cache: bool = False,
) -> Workload:
    """Validate ``plan`` and turn graph + cluster + plan into the cost model's inputs."""
    calib = calib or DEFAULT
    device = cluster.device
    _validate(graph, cluster, plan)
    key, act = _compute_dtype(graph, device, dtype)
    sc = _Scale(
        batch=plan.micro_batch_size / max(graph.batch_size, 1),
        tp=plan.tp,
        sp=plan.sequence_parallel and plan.tp > 1,
        graph_batch=graph.batch_size,
        act=act,
    )
    tp = _tp_from_placements(graph, plan) if plan.placements else _megatron_tp(graph, plan.tp, sc.sp)
    tp_key = None if plan.placements else ("megatron", plan.tp, sc.sp)
    stages = _stage_works(graph, plan, tp, sc, calib, tp_key)
    pp_group = _group(plan, cluster, "pp")
    elem = 2.0 if key in ("fp16", "bf16", "fp8") else 4.0
    spec = StepSpec(
        stages=tuple(stages),
        num_micro_batches=plan.num_micro_batches,
        schedule=plan.schedule,
        virtual_stages=plan.virtual_stages,
        recompute=plan.recompute,
        mode=plan.mode,
        zero_stage=plan.zero_stage,
        groups={axis: _group(plan, cluster, axis) for axis in ("tp", "dp")},
        pp_link=pp_group.inter if pp_group.spans_nodes else pp_group.intra,
        pp_link_inter_node=pp_group.spans_nodes,
        tp=plan.tp,
        param_bytes=elem,
        grad_bytes=elem,
    )
    kv_block = _kv_per_block(graph, tp, sc) if (kv_cache and plan.mode != "train") else {}
    model_flops, hw_flops = _flops(graph, plan, stages)
    return Workload(
        spec=spec,
        rates=DeviceRates(peak_flops_per_s=device.peak_flops(key), hbm_bytes_per_s=device.hbm_bytes_per_s),
        stages=stages,
        memory_per_stage=_stage_memory(stages, plan, elem, calib, [_kv_bytes(s, kv_block) for s in stages]),
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hw_flops,
        dtype=key,
        seq=_seq_len(graph),
    )


def estimate(
    graph: OpGraph,
    cluster,
    plan: Plan,
    *,
    calib: Calibration | None = None,
    dtype: str | None = None,
    kv_cache: bool = False,
) -> PredictedCost:
    """Predicted step time, throughput and memory of ``plan`` for ``graph`` on ``cluster``.

    ``calib``: the cost-model constants (default :data:`cost_models.DEFAULT`). ``dtype``: the compute
    dtype key (``fp16``, ``bf16``, ``fp32``); by default the graph's, except that a fp32 graph is
    costed in the device's 16-bit dtype (mixed precision). ``kv_cache``: in inference mode, add the
    keys/values of every attention layer for the traced sequence length. Raises
    :class:`~autopar.errors.PlanError` for a plan that does not fit the cluster or the model.
    """
    calib = calib or DEFAULT
    w = workload(graph, cluster, plan, calib=calib, dtype=dtype, kv_cache=kv_cache)
    return predicted_cost(w, plan, cluster, calib)


def predicted_cost(w: Workload, plan: Plan, cluster, calib: Calibration) -> PredictedCost:
    """Time a :class:`Workload` under ``calib`` and fill a PredictedCost."""
    t = step_time(w.spec, w.rates, calib)
    totals = [sum(m.values()) for m in w.memory_per_stage]
    worst = max(range(len(totals)), key=totals.__getitem__)
    used, capacity = totals[worst], cluster.device.memory_bytes
    return PredictedCost(
        step_time_s=t.step_time_s,
        breakdown_s=dict(t.breakdown_s),
        tokens_per_s=plan.global_batch * w.seq / t.step_time_s,
        model_flops_per_step=w.model_flops_per_step,
        hardware_flops_per_step=w.hardware_flops_per_step,
        mfu=w.model_flops_per_step / (t.step_time_s * w.rates.peak_flops_per_s * cluster.num_devices),
        memory_bytes_per_device=used,
        memory_breakdown_bytes=dict(w.memory_per_stage[worst]),
        memory_capacity_bytes=capacity,
        fits=used <= capacity,
        extra={
            "dtype": w.dtype,
            "largest_memory_stage": worst,
            "memory_bytes_per_stage": totals,
            "overflow_bytes": max(0.0, used - capacity),
            "stage_time_per_micro_batch_s": [s.total_s + p for s, p in zip(t.stage_times, t.stage_p2p_s)],
            "tp_default": "placements" if plan.placements else "megatron",
        },
    )


def _seq_len(graph: OpGraph) -> int:
    for name in graph.inputs:
        n = graph[name]
        if n.output_shape and len(n.output_shape) >= 2:
            return int(n.output_shape[1])
    return 1

"""The graph cut into pipeline stages, placed on the topology, validated and sized in memory."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from autopar.cluster import Cluster, DeviceSpec
from autopar.core.errors import PlanError
from autopar.core.ir import OpGraph, OpNode
from autopar.core.plan import Plan
from autopar.core.plan_rules import check_tp_splits_heads, check_tp_splits_width, check_world_size
from autopar.estimator import moe
from autopar.estimator.blocks import BlockContext, Scale, block_work, saved_activation_bytes
from autopar.estimator.devices import common_preferred_dtype, link_spec
from autopar.estimator.tensor_parallel import TPLayout, cached, out_bytes
from cost_models import BlockWork, Calibration, GroupSpec, StageWork
from cost_models import memory as mem

log = logging.getLogger(__name__)

_PEAK_KEY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


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
    return cached(graph, ("parts",), lambda: _derive_parts(graph))


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


def stage_works(
    graph: OpGraph,
    plan: Plan,
    tp: TPLayout,
    sc: Scale,
    calib: Calibration,
    tp_key: tuple | None = None,
    measured: dict | None = None,
) -> list[StageWork]:
    """The work of each pipeline stage (one device, one micro-batch) under ``plan``.

    ``tp_key`` identifies a cacheable ``tp`` (the Megatron default); None disables caching.
    ``measured``: profiled (forward, backward) seconds per node name."""
    parts = _parts(graph)
    consumers = cached(graph, ("consumers",), lambda: _consumers(graph))

    def work(nodes: list[OpNode], name: str, recomputable: bool) -> BlockWork:
        def make() -> BlockWork:
            ctx = BlockContext(
                graph=graph,
                nodes=nodes,
                tp=tp,
                sc=sc,
                calib=calib,
                consumers=consumers,
                measured=measured or {},
            )
            return block_work(ctx, name, recomputable)

        if tp_key is None or measured:
            return make()
        return cached(graph, ("work", nodes[0].name, name, tp_key, sc, calib), make)

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

    p2p = p2p_make() if tp_key is None else cached(graph, ("p2p", tp_key, sc, calib), p2p_make)
    shared = [0.0] * pp
    if parts.stem and parts.after:  # a tied embedding / head on one stage is one tensor
        last = max(parts.after)
        if rank_of[0] == rank_of[last]:
            shared[rank_of[0]] = _shared_params(graph, parts.stem, parts.after[last], tp)
    return [
        StageWork(
            blocks=tuple((per_type[k], c) for k, c in counts[r].items()) + tuple((b, 1) for b in extra[r]),
            p2p_bytes=p2p,
            shared_param_count=shared[r],
        )
        for r in range(pp)
    ]


def _shared_params(graph: OpGraph, stem: list[OpNode], head: list[OpNode], tp: TPLayout) -> float:
    """Elements (per device) of the parameters both the stem and the head use."""
    first = {p: n for n in stem for p in n.param_names if p in graph.params}
    both = {p: first[p] for n in head for p in n.param_names if p in first}
    return sum(math.prod(graph.params[p]["shape"]) / tp.shard[n.name].div_of(p) for p, n in both.items())


def _consumers(graph: OpGraph) -> dict[str, list[OpNode]]:
    consumers: dict[str, list[OpNode]] = defaultdict(list)
    for n in graph.nodes:
        for i in n.inputs:
            consumers[i].append(n)
    return consumers


def _p2p_bytes(
    graph: OpGraph,
    first_nodes: list[OpNode],
    tp: TPLayout,
    sc: Scale,
    calib: Calibration,
    consumers: dict[str, list[OpNode]],
) -> float:
    return saved_activation_bytes(
        BlockContext(
            graph=graph,
            nodes=first_nodes,
            tp=tp,
            sc=Scale(sc.batch, 1, False, sc.graph_batch, sc.act),
            calib=calib,
            consumers=consumers,
        )
    )["full"]


# ------------------------------------------------------------------------------ topology
def axis_group(plan: Plan, cluster: Cluster, axis: str) -> GroupSpec:
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
        intra=link_spec(cluster.intra_node),
        inter=link_spec(cluster.inter_node) if len(nodes) > 1 else None,
    )


def compute_dtype(graph: OpGraph, kinds: Sequence[DeviceSpec], dtype: str | None) -> tuple[str, float]:
    """(peak key, activation byte factor). A fp32 graph is costed in the 16-bit dtype of the
    device kinds ``kinds`` (on several kinds: the one they all have a peak for); a 16-bit graph on a
    kind without that format (bf16 on a V100) is costed in the 16-bit format the kinds share."""
    graph_dt, graph_bytes = cached(graph, ("graph_dtype",), lambda: _graph_dtype(graph))
    if dtype is not None:
        key = dtype
    else:
        key = _PEAK_KEY.get(graph_dt, "fp32")
        preferred = kinds[0].preferred_dtype if len(kinds) == 1 else common_preferred_dtype(kinds)
        if key == "fp32" and preferred != "fp32":
            key = preferred
            log.info("fp32 graph costed as %s mixed precision on %s", key, "+".join(k.name for k in kinds))
        elif key in ("fp16", "bf16") and preferred in ("fp16", "bf16") and not _all_have(kinds, key):
            log.info("%s graph costed as %s on %s", key, preferred, "+".join(k.name for k in kinds))
            key = preferred
    act = (2 if key in ("fp16", "bf16") else 4) / graph_bytes
    return key, act


def _all_have(kinds: Sequence[DeviceSpec], key: str) -> bool:
    return all(key in k.peak_flops_per_s for k in kinds)


def _graph_dtype(graph: OpGraph) -> tuple[str, int]:
    """(the dtype most matmul-like nodes produce, 4 if every GEMM output is fp32 else 2)."""
    dts = [n.output_dtype for n in graph.nodes if n.op_kind in ("linear", "matmul", "attention")]
    graph_dt = max(set(dts), key=dts.count) if dts else "float32"
    graph_bytes = 4 if all(n.output_dtype in (None, "float32") for n in graph.nodes if n.gemm) else 2
    return graph_dt, graph_bytes


# ------------------------------------------------------------------------------ validation
def attention_heads(graph: OpGraph) -> list[int]:
    """Head counts: dim 2 of the 4-D views that column-parallel Linears' outputs go through."""
    return cached(graph, ("heads",), lambda: _derive_heads(graph, _linears(graph)))


def _linears(graph: OpGraph) -> set[str]:
    return {n.name for n in graph.nodes if n.op_kind == "linear"}


def kv_heads(graph: OpGraph) -> int | None:
    """Key/value head count (grouped-query attention): dim 2 of the 4-D views of the Linears that
    feed an attention's key or value operand (the smallest, if they differ); None when the graph
    has no such view (e.g. a fused QKV projection split after the Linear)."""
    return cached(graph, ("kv_heads",), lambda: _derive_kv_heads(graph))


def _derive_kv_heads(graph: OpGraph) -> int | None:
    by_name = {n.name: n for n in graph.nodes}
    heads = _derive_heads(graph, _kv_linears(by_name, graph.nodes))
    return min(heads) if heads else None


def _derive_heads(graph: OpGraph, linear: set[str]) -> list[int]:
    out = []
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


def validate_plan(graph: OpGraph, cluster: Cluster, plan: Plan) -> None:
    """The rules of :mod:`autopar.core.plan_rules` a plan must meet on ``cluster`` for ``graph``:
    its degrees use every device; ``tp`` divides the head counts and every Linear's width."""
    check_world_size(plan, cluster.num_devices, cluster.name)
    moe.check_plan(graph, plan)
    tp = plan.tp
    if tp == 1 or plan.placements:
        return
    check_tp_splits_heads(tp, attention_heads(graph))
    for width, where in cached(graph, ("linear_widths",), lambda: _linear_widths(graph)):
        check_tp_splits_width(tp, width, where)


def _linear_widths(graph: OpGraph) -> list[tuple[int, str]]:
    """(output features, where) of every Linear, each distinct pair once."""
    out = {}
    for n in graph.nodes:
        if n.op_kind == "linear" and n.gemm:
            out.setdefault((n.gemm[2], n.module_path or n.name), None)
    return list(out)


# ------------------------------------------------------------------------------ memory
def stage_memory(
    stages: Sequence[StageWork],
    plan: Plan,
    elem: float,
    calib: Calibration,
    kv: list[float],
    experts: moe.MoEMemory | None = None,
) -> list[dict[str, float]]:
    """Bytes per device of each stage by category (:func:`cost_models.memory.stage_memory_bytes`):
    ``elem`` bytes per parameter and gradient, ``kv`` the KV-cache bytes of each stage; ``experts``:
    the expert parameters and dispatch buffers of mixture-of-experts blocks
    (:func:`autopar.estimator.moe.memory_adjustment`)."""
    precision = mem.Precision(param_bytes=elem, grad_bytes=elem, optimizer_bytes=12.0 if elem == 2 else 8.0)
    out = []
    for r, stage in enumerate(stages):
        buffers = 0.0
        if plan.mode == "train" and plan.dp > 1 and plan.zero_stage < 3:
            buffers += 2 * calib.dp_last_bucket_bytes  # DDP: the bucket being reduced + the next one
        if plan.zero_stage == 3 and plan.dp > 1:
            buffers += mem.zero3_gather_buffer_bytes(stage, elem)
        by_kind = mem.stage_memory_bytes(
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
        adjust = moe.memory_adjustment(
            stage,
            experts,
            plan=plan,
            param_bytes=precision.param_bytes,
            grad_bytes=precision.grad_bytes,
            optimizer_bytes=precision.optimizer_bytes,
        )
        for key, value in adjust.items():
            by_kind[key] = by_kind.get(key, 0.0) + value
        out.append(by_kind)
    return out


def stage_kv_bytes(stage: StageWork, kv_per_block: dict[str, float]) -> float:
    """The KV-cache bytes of one stage from its blocks' (:func:`kv_bytes_per_block`)."""
    return sum(kv_per_block.get(b.name, 0.0) * c for b, c in stage.blocks)


def kv_bytes_per_block(graph: OpGraph, tp: TPLayout, sc: Scale) -> dict[str, float]:
    """Keys and values a block caches: outputs of the Linears feeding an attention's k / v operand."""
    by_name = {n.name: n for n in graph.nodes}
    out: dict[str, float] = {}
    for key, bt in graph.block_types.items():
        found = _kv_linears(by_name, [by_name[x] for x in bt.node_names[0]])
        out[key] = sum(sc.bytes(out_bytes(by_name[x]), tp.shard[x]) for x in found)
    return out


def _kv_linears(by_name: dict[str, OpNode], nodes: list[OpNode]) -> set[str]:
    """The Linears among ``by_name`` producing the key / value operands of the attentions in ``nodes``."""
    found: set[str] = set()
    for n in nodes:
        operands = (
            n.inputs[1:3] if n.op_kind == "attention" else n.inputs[1:2] if n.op_kind == "matmul" else []
        )
        for src in operands:
            lin = _producing_linear(by_name, src)
            if lin is not None:
                found.add(lin)
    return found


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
def step_flops(graph: OpGraph, plan: Plan, stages: list[StageWork]) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step over all devices."""
    scale = plan.global_batch / max(graph.batch_size, 1)
    fwd, bwd = cached(graph, ("flops",), lambda: (graph.flops_fwd, graph.flops_bwd))
    if plan.mode != "train":
        return fwd * scale, fwd * scale
    model = (fwd + bwd) * scale
    rec = 0.0
    if plan.recompute != "none":
        by_name = graph._by_name
        if plan.recompute == "full":
            rec = cached(graph, ("block_flops_fwd",), lambda: _block_flops_fwd(graph))
        if plan.recompute == "selective":
            per_block = {b.name: b for s in stages for b, _ in s.blocks if b.recomputable}
            for key, bt in graph.block_types.items():
                region = (
                    {op.name for op in per_block[key].ops if op.selective_recompute}
                    if key in per_block
                    else set()
                )
                nodes = bt.node_names[0]
                rec += bt.count * sum(by_name[x].flops_fwd for x in nodes if x in region)
    return model, model + rec * scale


def _block_flops_fwd(graph: OpGraph) -> float:
    return sum(
        graph[x].flops_fwd for bt in graph.block_types.values() for names in bt.node_names for x in names
    )

"""Which devices each pipeline stage runs on: device kinds, rates, memory capacity and groups.

On a homogeneous cluster every stage has the cluster's one device kind. On a heterogeneous cluster
(node groups of different kinds, :attr:`Cluster.node_groups`) stage ``s`` runs on the ranks whose
``pp`` coordinate is ``s`` (``plan.coords``); with ``pp`` outermost in the mesh (mesh order
``pp, dp, tp``) those are consecutive ranks, so with stages aligned to node groups each stage sits
on one kind. A stage whose ranks mix kinds runs at the pace of its slowest device and must fit in
its smallest memory, so it is costed with the lowest peak FLOP/s and memory bandwidth of its kinds
and the smallest memory capacity. Example: 1 node of a100-80g + 1 node of v100-32g, 8 each, mesh
``pp=2, dp=2, tp=4``: stage 0 = ranks 0-7 (A100: 312 TFLOP/s fp16, 80 GB), stage 1 = ranks 8-15
(V100: 125 TFLOP/s, 32 GB).

Tensor- and data-parallel groups of a heterogeneous cluster are placed per stage: for each axis,
the stage's group that spans the most nodes (the slowest; intra- and inter-node links are the
cluster's, shared by all groups).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autopar.cluster import Cluster, DeviceSpec, Link
from autopar.core.errors import PlanError
from autopar.core.plan import MeshAxis, Plan, rank_groups
from cost_models import DeviceRates, GroupSpec, LinkSpec


@dataclass(frozen=True)
class StageDevices:
    """The device kinds (with rank counts) that one pipeline stage runs on."""

    kinds: tuple
    """Distinct :class:`~autopar.cluster.hardware.DeviceSpec` of the stage's ranks, in rank order."""
    counts: tuple[int, ...]
    """Ranks of each kind."""

    @property
    def mixed(self) -> bool:
        return len(self.kinds) > 1

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.kinds]

    def rates(self, dtype_key: str) -> DeviceRates:
        """The slowest kind's rates: lowest peak for ``dtype_key`` and lowest memory bandwidth."""
        return DeviceRates(
            peak_flops_per_s=min(k.peak_flops(dtype_key) for k in self.kinds),
            hbm_bytes_per_s=min(k.hbm_bytes_per_s for k in self.kinds),
        )

    @property
    def capacity_bytes(self) -> float:
        return min(k.memory_bytes for k in self.kinds)

    def peak_flops_per_s(self, dtype_key: str) -> float:
        """Sum of the stage's devices' peaks (for MFU)."""
        return sum(k.peak_flops(dtype_key) * c for k, c in zip(self.kinds, self.counts))


def stage_devices(cluster: Cluster, plan: Plan) -> list[StageDevices]:
    """Device kinds of each pipeline stage (``plan.pp`` entries)."""
    pp = plan.pp
    if not cluster.is_heterogeneous:
        return [StageDevices((cluster.device,), (cluster.num_devices // pp,))] * pp
    groups = tuple((g.nodes, g.device) for g in cluster.node_groups)
    return list(_stage_devices(tuple(plan.mesh), cluster.devices_per_node, groups))


@functools.lru_cache(maxsize=256)
def _stage_devices(mesh: tuple[MeshAxis, ...], per_node: int, groups: tuple) -> tuple[StageDevices, ...]:
    kind_of_node = [device for nodes, device in groups for _ in range(nodes)]
    stage = _pp_coord(mesh)
    per_stage: list[Counter] = [Counter() for _ in range(max(stage) + 1)]
    for rank, s in enumerate(stage):
        per_stage[s][kind_of_node[rank // per_node]] += 1
    return tuple(StageDevices(tuple(c), tuple(c.values())) for c in per_stage)


def _pp_coord(mesh: tuple[MeshAxis, ...]) -> list[int]:
    """The ``pp`` coordinate of every rank (row-major mesh; 0 without a pp axis)."""
    world = math.prod(a.size for a in mesh)
    names = [a.name for a in mesh]
    if "pp" not in names:
        return [0] * world
    k = names.index("pp")
    stride = math.prod(a.size for a in mesh[k + 1 :])
    return [(r // stride) % mesh[k].size for r in range(world)]


def common_preferred_dtype(kinds: Sequence[DeviceSpec]) -> str:
    """The 16-bit dtype every kind has a peak for (each kind's preferred one first), else fp32."""
    prefs = [k.preferred_dtype for k in kinds]
    for key in dict.fromkeys([*prefs, "bf16", "fp16"]):
        if key != "fp32" and all(k.peak_flops_per_s.get(key, 0.0) > 0 for k in kinds):
            return key
    return "fp32"


def check_profiled(cluster: Cluster, op_times: Mapping[str, tuple[float, float]] | None) -> None:
    """Profiled op times are measured on one device kind: refuse them on a heterogeneous cluster."""
    if op_times and cluster.is_heterogeneous:
        kinds = ", ".join(k.name for k in cluster.device_kinds)
        raise PlanError(
            f"profiled op times were given for heterogeneous cluster {cluster.name!r} ({kinds}); a "
            "profile is measured on one device kind and cannot time the others: estimate without "
            "op_times (roofline), or profile and estimate each device kind's stages on its own cluster"
        )


def link_spec(link: Link) -> LinkSpec:
    """A cluster :class:`~autopar.cluster.Link` as the cost model's :class:`~cost_models.LinkSpec`."""
    return LinkSpec(bandwidth_bytes_per_s=link.bandwidth_bytes_per_s, latency_s=link.latency_s)


def stage_groups(cluster: Cluster, plan: Plan) -> tuple[dict[str, GroupSpec], ...]:
    """Per stage, its ``tp`` and ``dp`` groups: the one spanning the most nodes of each axis."""
    intra, inter = link_spec(cluster.intra_node), link_spec(cluster.inter_node)
    return _stage_groups(tuple(plan.mesh), cluster.devices_per_node, intra, inter)


@functools.lru_cache(maxsize=256)
def _stage_groups(
    mesh: tuple[MeshAxis, ...], per_node: int, intra: LinkSpec, inter: LinkSpec
) -> tuple[dict[str, GroupSpec], ...]:
    stage = _pp_coord(mesh)
    out: list[dict[str, GroupSpec]] = [{} for _ in range(max(stage) + 1)]
    names = [a.name for a in mesh]
    for axis in ("tp", "dp"):
        groups = rank_groups(list(mesh), axis) if axis in names else [[r] for r in range(len(stage))]
        best: dict[int, tuple[int, list[int]]] = {}
        for group in groups:
            nodes = len({r // per_node for r in group})
            if stage[group[0]] not in best or nodes > best[stage[group[0]]][0]:
                best[stage[group[0]]] = (nodes, group)
        for s, (nodes, group) in best.items():
            out[s][axis] = GroupSpec(
                size=len(group),
                ranks_per_node=math.ceil(len(group) / nodes),
                intra=intra,
                inter=inter if nodes > 1 else None,
            )
    return tuple(out)

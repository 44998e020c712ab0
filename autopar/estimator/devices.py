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

import math
from collections import Counter
from dataclasses import dataclass

from autopar.errors import PlanError
from autopar.plan import Plan
from cost_models import DeviceRates, GroupSpec, LinkSpec


@dataclass(frozen=True)
class StageDevices:
    """The device kinds (with rank counts) that one pipeline stage runs on."""

    kinds: tuple
    """Distinct :class:`~autopar.hardware.DeviceSpec` of the stage's ranks, in rank order."""
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


def stage_devices(cluster, plan: Plan) -> list[StageDevices]:
    """Device kinds of each pipeline stage (``plan.pp`` entries)."""
    pp = plan.pp
    if not cluster.is_heterogeneous:
        return [StageDevices((cluster.device,), (cluster.num_devices // pp,))] * pp
    per_stage: list[Counter] = [Counter() for _ in range(pp)]
    for rank in range(plan.world_size):
        per_stage[plan.coords(rank).get("pp", 0)][cluster.device_of(rank)] += 1
    return [StageDevices(tuple(c), tuple(c.values())) for c in per_stage]


def common_preferred_dtype(kinds) -> str:
    """The 16-bit dtype every kind has a peak for (each kind's preferred one first), else fp32."""
    prefs = [k.preferred_dtype for k in kinds]
    for key in dict.fromkeys([*prefs, "bf16", "fp16"]):
        if key != "fp32" and all(k.peak_flops_per_s.get(key, 0.0) > 0 for k in kinds):
            return key
    return "fp32"


def check_profiled(cluster, op_times) -> None:
    if op_times and cluster.is_heterogeneous:
        kinds = ", ".join(k.name for k in cluster.device_kinds)
        raise PlanError(
            f"profiled op times were given for heterogeneous cluster {cluster.name!r} ({kinds}); a "
            "profile is measured on one device kind and cannot time the others: estimate without "
            "op_times (roofline), or profile and estimate each device kind's stages on its own cluster"
        )


def _link(link) -> LinkSpec:
    return LinkSpec(bandwidth_bytes_per_s=link.bandwidth_bytes_per_s, latency_s=link.latency_s)


def stage_groups(cluster, plan: Plan) -> tuple[dict[str, GroupSpec], ...]:
    """Per stage, its ``tp`` and ``dp`` groups: the one spanning the most nodes of each axis."""
    out: list[dict[str, GroupSpec]] = [{} for _ in range(plan.pp)]
    for axis in ("tp", "dp"):
        best: dict[int, tuple[int, list[int]]] = {}
        for group in plan.groups(axis):
            stage = plan.coords(group[0]).get("pp", 0)
            nodes = len({cluster.node_of(r) for r in group})
            if stage not in best or nodes > best[stage][0]:
                best[stage] = (nodes, group)
        for stage, (nodes, group) in best.items():
            out[stage][axis] = GroupSpec(
                size=len(group),
                ranks_per_node=math.ceil(len(group) / nodes),
                intra=_link(cluster.intra_node),
                inter=_link(cluster.inter_node) if nodes > 1 else None,
            )
    return tuple(out)

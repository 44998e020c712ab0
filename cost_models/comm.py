"""Collective and point-to-point time: latency-bandwidth (alpha-beta) models on a two-level topology.

A group of ``n`` ranks placed ``r`` per node over ``n / r`` nodes. Per-step latency ``a`` (the link's
hop latency) plus a fixed per-call latency ``a0``; bandwidth ``B`` is the link's per-GPU one-direction
bandwidth times an achievable-efficiency factor. ``D`` is the message size in bytes with the
conventions of ``torch.distributed``: all_reduce / broadcast / reduce: the tensor on each rank;
all_gather: the gathered output; reduce_scatter: the full input; all_to_all: what one rank sends in
total (its own share included); p2p: what is sent.

Ring algorithms (NCCL's default for large messages)::

    all_reduce       a0 + 2(n-1) a + 2 (n-1)/n D / B        bus factor 2(n-1)/n
    all_gather       a0 +  (n-1) a +   (n-1)/n D / B        bus factor (n-1)/n
    reduce_scatter   a0 +  (n-1) a +   (n-1)/n D / B
    broadcast/reduce a0 +  (n-1) a +           D / B        (pipelined chain)
    all_to_all       a0 +  (n-1) a + max(off-node share / B_inter, on-node share / B_intra)
    p2p              a0 +        a +           D / B

Tree all-reduce (NCCL double binary tree): ``a0 + 2 ceil(log2 n) a + 2 D / B``; ``auto`` takes the
faster of ring and tree, as NCCL's tuner does.

Placement: a group inside one node uses the intra-node link. A *flat* ring that spans nodes enters
and leaves each node once, so with ``Calibration.ring_node_nics`` (NCCL's channels, one NIC each)
its bandwidth is ``B = min(r B_nic, B_intra)`` (:func:`ring_bandwidth_bytes_per_s`; the tree uses
the same ``B``); without it, the per-GPU NIC ``B_nic`` (every step crosses a NIC: the SC'21 ZeRO-3
rows of Narayanan et al. Table 2, DeepSpeed 2021). A *hierarchical* all-reduce (intra-node
reduce-scatter, inter-node all-reduce of ``D / r`` across the ``n / r`` nodes, intra-node
all-gather, in series) is available by name; ``auto`` uses the flat ring or the tree.

A *hierarchical* all-to-all (Tutel's 2D / DeepSpeed-MoE's hierarchical all-to-all) first exchanges
inside each node, so that each rank holds what its node sends to the rank with the same local index
on every other node, then runs one inter-node all-to-all per local index::

    all_to_all (hierarchical)   2 a0 + (r-1) a_intra + (r-1)/r D / B_intra
                                     + (n/r - 1) a_inter + (n/r - 1)/(n/r) D / B_inter

It sends the same bytes across nodes as the flat one in fewer, larger messages (``n/r - 1`` instead
of ``n - r`` per rank), at the price of a second pass over NVLink; ``auto`` stays flat (NCCL's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_models.constants import DEFAULT, Calibration

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "p2p")
ALGORITHMS = ("auto", "ring", "tree", "hierarchical")


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """One topology level: per-GPU one-direction bandwidth and per-hop latency."""

    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0 or self.latency_s < 0:
            raise ValueError(
                f"LinkSpec(bandwidth_bytes_per_s={self.bandwidth_bytes_per_s}, latency_s="
                f"{self.latency_s}): bandwidth must be > 0 and latency >= 0"
            )


@dataclass(frozen=True, kw_only=True)
class GroupSpec:
    """A process group placed on the topology."""

    size: int
    """Ranks in the group."""
    ranks_per_node: int
    """Group ranks that share one node (``size`` when the group fits in a node)."""
    intra: LinkSpec
    """Link between two ranks of the same node."""
    inter: LinkSpec | None = None
    """Link between nodes (needed when the group spans nodes)."""

    def __post_init__(self) -> None:
        if self.size < 1 or not 1 <= self.ranks_per_node <= self.size:
            raise ValueError(
                f"GroupSpec(size={self.size}, ranks_per_node={self.ranks_per_node}): need "
                "size >= 1 and 1 <= ranks_per_node <= size"
            )
        if self.spans_nodes and self.inter is None:
            raise ValueError(f"group of {self.size} ranks spans {self.nodes} nodes but has no inter link")

    @property
    def nodes(self) -> int:
        return math.ceil(self.size / self.ranks_per_node)

    @property
    def spans_nodes(self) -> bool:
        return self.size > self.ranks_per_node


def _bandwidth(link: LinkSpec, inter: bool, calib: Calibration) -> float:
    eff = calib.inter_node_efficiency if inter else calib.intra_node_efficiency
    return link.bandwidth_bytes_per_s * eff


def _flat_link(group: GroupSpec) -> tuple[LinkSpec, bool]:
    if group.spans_nodes:
        return group.inter, True
    return group.intra, False


def ring_bandwidth_bytes_per_s(group: GroupSpec, calib: Calibration = DEFAULT) -> float:
    """Bus bandwidth of one rank of a ring (or tree) over ``group``.

    Inside a node: the intra-node link. Across nodes, with ``calib.ring_node_nics`` (NCCL): each
    node is entered and left once per ring, so a node's network traffic equals *one* rank's, and
    NCCL's channels spread it over the NICs of the group's ``r`` ranks on that node (one NIC per
    channel on a rail-optimised fabric): ``min(r * B_nic, B_intra)``, the intra-node ring still
    carrying every byte. Without it every ring step crosses a NIC: ``B_nic``."""
    link, is_inter = _flat_link(group)
    bw = _bandwidth(link, is_inter, calib)
    if is_inter and calib.ring_node_nics:
        bw = min(group.ranks_per_node * bw, _bandwidth(group.intra, False, calib))
    return bw


def _ring(kind: str, nbytes: float, group: GroupSpec, calib: Calibration) -> float:
    n = group.size
    link, _ = _flat_link(group)
    a, bw, a0 = link.latency_s, ring_bandwidth_bytes_per_s(group, calib), calib.collective_base_latency_s
    if kind == "all_reduce":
        return a0 + 2 * (n - 1) * a + 2 * (n - 1) / n * nbytes / bw
    if kind in ("all_gather", "reduce_scatter"):
        scale = calib.all_gather_time_scale if kind == "all_gather" else calib.reduce_scatter_time_scale
        return a0 + (n - 1) * a + scale * (n - 1) / n * nbytes / bw
    if kind in ("broadcast", "reduce"):
        return a0 + (n - 1) * a + nbytes / bw
    if kind == "all_to_all":
        return a0 + (n - 1) * a + _all_to_all_transfer_s(nbytes, group, calib)
    raise ValueError(f"no ring algorithm for {kind!r}")


def _all_to_all_transfer_s(nbytes: float, group: GroupSpec, calib: Calibration) -> float:
    n, r = group.size, group.ranks_per_node
    on_node = (r - 1) / n * nbytes
    off_node = (n - r) / n * nbytes
    t = on_node / _bandwidth(group.intra, False, calib)
    if off_node > 0:
        t = max(t, off_node / _bandwidth(group.inter, True, calib))
    return t


def _tree_all_reduce(nbytes: float, group: GroupSpec, calib: Calibration) -> float:
    n = group.size
    link, _ = _flat_link(group)
    steps = 2 * math.ceil(math.log2(n))
    return (
        calib.collective_base_latency_s
        + steps * link.latency_s
        + 2 * nbytes / ring_bandwidth_bytes_per_s(group, calib)
    )


def _hierarchical_all_reduce(nbytes: float, group: GroupSpec, calib: Calibration) -> float:
    r = group.ranks_per_node
    if not group.spans_nodes or r == 1:
        return _ring("all_reduce", nbytes, group, calib)
    intra = GroupSpec(size=r, ranks_per_node=r, intra=group.intra)
    inter = GroupSpec(size=group.nodes, ranks_per_node=1, intra=group.intra, inter=group.inter)
    return (
        _ring("reduce_scatter", nbytes, intra, calib)
        + _ring("all_reduce", nbytes / r, inter, calib)
        + _ring("all_gather", nbytes, intra, calib)
    )


def _hierarchical_all_to_all(nbytes: float, group: GroupSpec, calib: Calibration) -> float:
    r = group.ranks_per_node
    if not group.spans_nodes or r == 1:
        return _ring("all_to_all", nbytes, group, calib)
    intra = GroupSpec(size=r, ranks_per_node=r, intra=group.intra)
    inter = GroupSpec(size=group.nodes, ranks_per_node=1, intra=group.intra, inter=group.inter)
    return _ring("all_to_all", nbytes, intra, calib) + _ring("all_to_all", nbytes, inter, calib)


def p2p_time_s(nbytes: float, link: LinkSpec, *, inter: bool, calib: Calibration = DEFAULT) -> float:
    """One send/recv of ``nbytes`` over ``link``."""
    if nbytes <= 0:
        return 0.0
    return calib.collective_base_latency_s + link.latency_s + nbytes / _bandwidth(link, inter, calib)


def collective_time_s(
    kind: str,
    nbytes: float,
    group: GroupSpec,
    *,
    algorithm: str = "auto",
    calib: Calibration = DEFAULT,
) -> float:
    """Time of one collective of ``nbytes`` (see the module docstring for the conventions)."""
    if kind not in COLLECTIVES:
        raise ValueError(f"collective {kind!r} is unknown; known: {', '.join(COLLECTIVES)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown; known: {', '.join(ALGORITHMS)}")
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes}: must be >= 0")
    if kind == "p2p":
        link, is_inter = _flat_link(group)
        return p2p_time_s(nbytes, link, inter=is_inter, calib=calib)
    if group.size == 1 or nbytes == 0:
        return 0.0
    if kind == "all_reduce":
        if algorithm == "tree":
            return _tree_all_reduce(nbytes, group, calib)
        if algorithm == "hierarchical":
            return _hierarchical_all_reduce(nbytes, group, calib)
        ring = _ring(kind, nbytes, group, calib)
        return ring if algorithm == "ring" else min(ring, _tree_all_reduce(nbytes, group, calib))
    if kind == "all_to_all" and algorithm == "hierarchical":
        return _hierarchical_all_to_all(nbytes, group, calib)
    if algorithm in ("tree", "hierarchical"):
        raise ValueError(
            f"algorithm {algorithm!r} is only modelled for all_reduce (and hierarchical for all_to_all), not {kind}"
        )
    return _ring(kind, nbytes, group, calib)


def bus_bandwidth_bytes_per_s(kind: str, nbytes: float, time_s: float, n: int) -> float:
    """nccl-tests' bus bandwidth of a measured collective (for comparing with the model)."""
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}
    return nbytes * factor.get(kind, 1.0) / time_s

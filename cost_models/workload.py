"""Plain input records of the cost model: what one device does for one micro-batch.

Everything here is numbers: ``autopar.estimator`` fills these from an analysed graph and a plan,
:mod:`cost_models.transformer` fills them from closed forms, and a user can write them by hand.
All quantities are *per device* (already divided by the tensor-parallel shards) and *per
micro-batch*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OP_CLASSES = ("gemm", "memory", "roofline")
PHASES = ("fwd", "bwd")


@dataclass(frozen=True, kw_only=True)
class OpWork:
    """One op (or a fused chain of ops) on one device for one micro-batch."""

    name: str
    op_class: str
    """``gemm`` (tensor cores; needs ``gemm``), ``memory`` (bandwidth-bound kernel) or ``roofline``."""
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    bytes_fwd: float = 0.0
    """Forward memory traffic (memory / roofline ops; GEMM traffic is derived from ``gemm``)."""
    bytes_bwd: float | None = None
    """Backward traffic; None = ``bwd_bytes_factor * bytes_fwd``."""
    gemm: tuple[float, float, float, float] | None = None
    """``(batch, m, n, k)`` of a GEMM op."""
    elem_bytes: float = 2.0
    """Bytes per element of the GEMM operands."""
    weight_grad: bool = True
    """The backward computes a second-operand gradient (weight of a linear, or the other
    activation of an activation-activation matmul)."""
    input_grad: bool = True
    """The backward computes the first-operand gradient (False for the very first op)."""
    efficiency: float = 1.0
    """Fraction of peak FLOP/s a ``roofline`` op reaches (ignored for fused attention, see below)."""
    attention_gemm: tuple[float, float, float] | None = None
    """A fused (flash) attention kernel: ``(batch, m, k)`` of its score product. It runs at
    ``calib.fused_attention_efficiency`` times that GEMM's wave factor, taken from the calibration
    it is timed under (so one workload can be timed on several device kinds)."""
    causal: bool = False
    """A fused attention kernel under a causal mask (``is_causal=True``): flash kernels skip the score
    tiles above the diagonal (``Calibration.causal_attention_skip``)."""
    selective_recompute: bool = False
    """Recomputed under ``recompute='selective'`` (the attention-score region)."""
    count: float = 1.0
    """How many identical copies of this op run (e.g. per layer)."""
    measured_fwd_s: float | None = None
    """Profiled forward time on this device; replaces the roofline when given."""
    measured_bwd_s: float | None = None

    def __post_init__(self) -> None:
        if self.op_class not in OP_CLASSES:
            raise ValueError(f"OpWork {self.name!r}: op_class={self.op_class!r} not in {OP_CLASSES}")
        if self.op_class == "gemm" and self.gemm is None:
            raise ValueError(f"OpWork {self.name!r}: a gemm op needs gemm=(batch, m, n, k)")


@dataclass(frozen=True, kw_only=True)
class CommWork:
    """One collective on a mesh-axis group, per device and micro-batch."""

    name: str
    collective: str
    """A name from :data:`cost_models.comm.COLLECTIVES`."""
    nbytes: float
    """Message size (conventions in :mod:`cost_models.comm`)."""
    phase: str = "fwd"
    """``fwd`` (also re-run by recompute) or ``bwd``."""
    axis: str = "tp"
    """The mesh axis whose group runs it."""
    count: float = 1.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"CommWork {self.name!r}: phase={self.phase!r} not in {PHASES}")


@dataclass(frozen=True, kw_only=True)
class BlockWork:
    """A block of ops (one transformer layer, the stem, the head) on one device, one micro-batch."""

    name: str
    ops: tuple[OpWork, ...] = ()
    comms: tuple[CommWork, ...] = ()
    param_count: float = 0.0
    """Parameters this device holds for the block (after tensor-parallel sharding, before ZeRO)."""
    saved_bytes: dict[str, float] = field(default_factory=dict)
    """Activation bytes kept from forward to backward per recompute mode
    (``none``, ``selective``, ``full``)."""
    recomputable: bool = True
    """Whether ``recompute`` applies (transformer layers); the stem and head keep ``none``."""

    def saved(self, recompute: str) -> float:
        mode = recompute if self.recomputable else "none"
        if mode not in self.saved_bytes:
            raise KeyError(f"block {self.name!r} has no saved_bytes for recompute={mode!r}")
        return self.saved_bytes[mode]


@dataclass(frozen=True, kw_only=True)
class StageWork:
    """What one pipeline rank runs per micro-batch: its blocks (all its virtual chunks together)."""

    blocks: tuple[tuple[BlockWork, int], ...]
    """``(block, how many)`` pairs; identical blocks appear once with their count."""
    p2p_bytes: float = 0.0
    """Activation bytes this rank sends to the next stage per micro-batch and chunk (full tensor)."""

    shared_param_count: float = 0.0
    """Parameters two of the blocks both count that are one tensor on this rank (an embedding tied
    to the output head when the stem and the head share a stage): subtracted once."""

    @property
    def param_count(self) -> float:
        return sum(b.param_count * c for b, c in self.blocks) - self.shared_param_count

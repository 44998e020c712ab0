"""Mixture-of-experts layers: router and expert GEMMs, all-to-all, expert memory (numbers only).

One MoE layer over ``T`` tokens (one device's micro-batch) of width ``h``: a router GEMM ``h -> E``,
top-``k`` gating, ``E`` routed experts and ``S`` always-on shared experts, each a SwiGLU MLP of
inner width ``f`` (gated: 3 matrices ``h x f``; plain: 2). Expert parallelism ``ep`` shards the
experts over the ranks of an expert-parallel group (``L = E / ep`` local experts per rank); tokens
travel to their experts' ranks and back with all-to-all. Tensor parallelism ``tp`` splits each
expert's ``f`` (column-parallel gate/up, row-parallel down), as Megatron's MLP.

Routing. Balanced routing gives every expert ``n = ep T k / E`` tokens (the ``ep T`` tokens of the
group, ``k`` choices each), so a rank computes ``L n = T k`` token-expert pairs whatever ``ep``
is. The load-imbalance factor ``iota = max expert load / mean expert load`` (>= 1) is modelled as
one hot expert at ``iota n`` while the others stay at ``n``; the hot expert's rank then holds::

    rank_factor = (L - 1 + iota) / L = 1 + (iota - 1) ep / E

times the balanced work (``ep = E``: one expert per rank, the rank is as imbalanced as the expert;
``ep = 1``: every expert is local and the imbalance only reshapes the GEMMs). With a capacity
factor ``C`` no expert takes more than ``C n`` tokens, so ``iota`` is capped at ``C``.

Time per layer and micro-batch on the busiest rank::

    router       GEMM (T, E, h)
    experts      GEMMs (iota n, g f / tp, h) + (iota n, h, f / tp)  for the hot expert     [g = 2 gated]
                 (L - 1) x the same at n tokens                      for the others
    shared       GEMMs (T, g S f / tp, h) + (T, h, S f / tp)
    memory ops   gating softmax/top-k over T x E, permute + unpermute copies of the dispatched
                 tokens, the SwiGLU product, the weighted combine
    all-to-all   the per-expert token counts (E int64) and the dispatch and combine forward, the
                 transposes of the last two backward: 5 per layer in training (3 in inference), the
                 data ones of T k h e bytes per rank, (ep - 1) / ep of it leaving the rank; the hot
                 rank receives rank_factor times more (its time sets the pace)
    tp           forward: one all-reduce of T h e (the row-parallel down projections' partial sums,
                 routed and shared, added after the combine, which is linear); backward: one of
                 T h e (the input gradient of the column-parallel up projections) and one of
                 T k e (the gates' gradient, a partial sum over the width)

Memory per rank: expert parameters ``L g h f / tp`` per layer with their gradients and optimizer
state whole (the runtime builds no ZeRO with ``ep > 1``: :func:`expert_state_bytes`), router and
shared experts as dense parameters, and the dispatch buffers: the tokens sent and received,
``2 T k h e`` times the capacity (``C`` with a capacity factor, else ``rank_factor``), live during
one layer.

Expert gradients (``ep > 1``) are summed over the ``dp / ep`` expert-data-parallel ranks after the
backward, in one all-reduce not overlapped with it (:func:`expert_grad_sync_s`); the other
gradients are all-reduced over dp, overlapped with the backward, as for a dense model.

All-to-all time is :func:`cost_models.comm.collective_time_s` (``all_to_all``): flat (NCCL's
send/recv pairs: the on-node share over NVLink, the off-node share over the NIC, whichever takes
longer) or ``hierarchical`` (an intra-node exchange, then one inter-node exchange per local rank;
fewer, larger messages across nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cost_models.comm import GroupSpec, collective_time_s
from cost_models.constants import DEFAULT, Calibration
from cost_models.workload import CommWork, OpWork

ROUTINGS = ("uniform", "round_robin")
"""The routing patterns :func:`ranks_per_token` knows (:attr:`MoEShape.routing`)."""


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """One mixture-of-experts layer over one device's micro-batch."""

    experts: int
    """Routed experts E."""
    top_k: int
    """Experts per token k."""
    hidden: int
    """Model width h."""
    ffn: int
    """Inner width f of each expert (and of each shared expert)."""
    tokens: float
    """Tokens T of the micro-batch on one rank (before dispatch)."""
    shared: int = 0
    """Always-on shared experts S."""
    capacity_factor: float | None = None
    """C: an expert takes at most C times its balanced load; None: no dropping."""
    gated: bool = True
    """SwiGLU experts (gate, up, down: 3 matrices) rather than 2-matrix MLPs."""
    routing: str = "uniform"
    """How a token's ``k`` experts fall on ranks (:data:`ROUTINGS`): ``uniform``, any ``k`` distinct
    experts alike (a learned router); ``round_robin``, token ``t`` takes experts ``t k .. t k + k - 1``
    (mod ``E``), the fixed balanced gate benchmarks swap in to take imbalance out of a measurement."""

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "hidden", "ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEShape {name}={getattr(self, name)}: must be >= 1")
        if self.top_k > self.experts or self.shared < 0 or self.tokens < 0:
            raise ValueError(
                f"MoEShape(experts={self.experts}, top_k={self.top_k}, shared={self.shared}, "
                f"tokens={self.tokens}): need top_k <= experts, shared >= 0, tokens >= 0"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEShape capacity_factor={self.capacity_factor}: must be > 0 or None")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoEShape routing={self.routing!r}: choose one of {', '.join(ROUTINGS)}")

    @property
    def matrices(self) -> int:
        """Weight matrices per expert: 3 gated (SwiGLU), else 2."""
        return 3 if self.gated else 2

    def scaled(self, tokens: float) -> MoEShape:
        """The same layer over ``tokens`` tokens."""
        return replace(self, tokens=tokens)


def check_degrees(shape: MoEShape, ep: int, tp: int) -> None:
    """``ep`` divides the experts and ``tp`` the expert width (ValueError naming the fix)."""
    if ep < 1 or shape.experts % ep:
        ok = [d for d in range(1, shape.experts + 1) if shape.experts % d == 0]
        raise ValueError(f"ep={ep} does not divide the {shape.experts} experts; choose ep in {ok}")
    if tp < 1 or shape.ffn % tp:
        raise ValueError(f"tp={tp} does not divide the expert width ffn={shape.ffn}")


def effective_imbalance(shape: MoEShape, imbalance: float) -> float:
    """``iota`` capped by the capacity factor (tokens beyond capacity are dropped)."""
    if imbalance < 1:
        raise ValueError(f"imbalance={imbalance}: the max/mean expert load is >= 1")
    if shape.capacity_factor is not None:
        return max(1.0, min(imbalance, shape.capacity_factor))
    return imbalance


def rank_factor(shape: MoEShape, ep: int, imbalance: float = 1.0) -> float:
    """Load of the busiest rank over the balanced load: ``1 + (iota - 1) ep / E``."""
    return 1.0 + (effective_imbalance(shape, imbalance) - 1.0) * ep / shape.experts


def expert_tokens(shape: MoEShape, ep: int, imbalance: float = 1.0) -> tuple[float, float]:
    """(hot expert's tokens, every other local expert's tokens) on the busiest rank."""
    n = ep * shape.tokens * shape.top_k / shape.experts
    return effective_imbalance(shape, imbalance) * n, n


def received_tokens(shape: MoEShape, ep: int, imbalance: float = 1.0) -> float:
    """Token-expert pairs the busiest rank computes: ``T k rank_factor``."""
    return shape.tokens * shape.top_k * rank_factor(shape, ep, imbalance)


def ranks_per_token(shape: MoEShape, ep: int) -> float:
    """Distinct ranks a token's ``k`` experts live on, on average, with the ``E`` experts split
    into ``ep`` contiguous blocks of ``E / ep``:

    * ``uniform`` routing (any ``k`` distinct experts alike):
      ``ep (1 - C(E - E/ep, k) / C(E, k))`` (Qwen3-30B-A3B: E=128, k=8, ep=8 gives 5.34);
    * ``round_robin`` routing (token ``t`` takes experts ``t k + j mod E``): the blocks the run of
      ``k`` consecutive experts starting at ``t k mod E`` touches, averaged over the period
      ``E / gcd(E, k)`` of the starts (E=128, k=8, ep=8: every run sits in one block, 1.0)."""
    if ep <= 1:
        return 1.0
    per_rank = shape.experts / ep
    if shape.routing == "round_robin":
        e, k = shape.experts, shape.top_k
        starts = range(0, e * k // math.gcd(e, k), k)  # t k for t over one period, below lcm(E, k)
        touched = [len({((s + j) % e) // int(per_rank) for j in range(k)}) for s in starts]
        return sum(touched) / len(touched)
    miss = 1.0  # probability that none of the k experts is on a given rank
    for i in range(shape.top_k):
        miss *= max(shape.experts - per_rank - i, 0.0) / (shape.experts - i)
    return ep * (1.0 - miss)


# ------------------------------------------------------------------------------------ time
def _gemm(name: str, m: float, n: float, k: float, elem: float, count: float = 1.0) -> OpWork:
    return OpWork(
        name=name,
        op_class="gemm",
        gemm=(1.0, m, n, k),
        flops_fwd=2.0 * m * n * k,
        elem_bytes=elem,
        count=count,
    )


def moe_ops(
    shape: MoEShape, *, ep: int = 1, tp: int = 1, imbalance: float = 1.0, elem_bytes: float = 2.0
) -> list[OpWork]:
    """The layer's kernels on the busiest rank, one micro-batch (see the module docstring)."""
    check_degrees(shape, ep, tp)
    t, h, f, e = shape.tokens, shape.hidden, shape.ffn, elem_bytes
    g = shape.matrices - 1  # column-parallel matrices (gate and up fused into one GEMM)
    local = shape.experts // ep
    hot, rest = expert_tokens(shape, ep, imbalance)
    ops = [_gemm("moe.router", t, shape.experts, h, e)]
    if t <= 0:
        return ops
    ops += [_gemm("moe.expert_in.hot", hot, g * f / tp, h, e), _gemm("moe.expert_out.hot", hot, h, f / tp, e)]
    if local > 1 and rest > 0:
        ops += [
            _gemm("moe.expert_in", rest, g * f / tp, h, e, count=local - 1),
            _gemm("moe.expert_out", rest, h, f / tp, e, count=local - 1),
        ]
    if shape.shared:
        sf = shape.shared * f / tp
        ops += [_gemm("moe.shared_in", t, g * sf, h, e), _gemm("moe.shared_out", t, h, sf, e)]
    r = received_tokens(shape, ep, imbalance)
    gating = t * shape.experts * (2 * e + 4.0 + 4.0) + t * shape.top_k * 8.0  # logits, fp32 probs, top-k
    permute = 2 * 2 * r * h * e  # gather tokens into expert order and back: read + write each
    swiglu = r * (f / tp) * e * (3 if shape.gated else 2)
    combine = r * h * e + t * h * e
    ops.append(OpWork(name="moe.memory", op_class="memory", bytes_fwd=gating + permute + swiglu + combine))
    return ops


COUNT_BYTES = 8.0
"""Bytes of one per-expert token count exchanged before the dispatch (int64)."""


def all_to_all_calls(
    shape: MoEShape, *, mode: str = "train", elem_bytes: float = 2.0
) -> list[tuple[str, float]]:
    """The layer's all-to-alls per micro-batch as ``(name, bytes of one rank's input buffer)``:
    the per-expert token counts (``E`` int64), the dispatch and the combine (``T k h e`` each), and
    in training the transposes of the last two."""
    data = shape.tokens * shape.top_k * shape.hidden * elem_bytes
    calls = [("counts", shape.experts * COUNT_BYTES), ("dispatch", data), ("combine", data)]
    if mode == "train":
        calls += [("combine_backward", data), ("dispatch_backward", data)]
    return calls


def all_to_all_sent_bytes(nbytes: float, ep: int) -> float:
    """What leaves a rank in one all-to-all of ``nbytes`` (balanced): ``nbytes (ep - 1) / ep``."""
    return nbytes * (ep - 1) / ep


def moe_comms(
    shape: MoEShape,
    *,
    ep: int = 1,
    tp: int = 1,
    imbalance: float = 1.0,
    elem_bytes: float = 2.0,
    per_rank: bool = False,
) -> list[CommWork]:
    """The layer's collectives per micro-batch: all-to-alls on the ``ep`` axis (message: what the
    busiest rank exchanges, own share included; the hot rank receives ``rank_factor`` times the
    balanced rows) and the expert tensor-parallel all-reduces. ``per_rank``: a token travels once
    to each rank holding any of its experts (DeepEP's dispatch), not once per expert: the data
    all-to-alls carry :func:`ranks_per_token` / ``k`` of the rows."""
    out: list[CommWork] = []
    if ep > 1:
        factor = rank_factor(shape, ep, imbalance)
        if per_rank:
            factor *= ranks_per_token(shape, ep) / shape.top_k
        for name, nbytes in all_to_all_calls(shape, mode="train", elem_bytes=elem_bytes):
            phase = "bwd" if name.endswith("_backward") else "fwd"
            size = nbytes if name == "counts" else nbytes * factor
            out.append(
                CommWork(
                    name=f"moe.all_to_all.{name}",
                    collective="all_to_all",
                    nbytes=size,
                    phase=phase,
                    axis="ep",
                )
            )
    if tp > 1:
        for name, nbytes, phase in tp_all_reduce_calls(shape, elem_bytes=elem_bytes):
            out.append(
                CommWork(
                    name=f"moe.tp_all_reduce.{name}",
                    collective="all_reduce",
                    nbytes=nbytes,
                    phase=phase,
                    axis="tp",
                )
            )
    return out


def tp_all_reduce_calls(
    shape: MoEShape, *, mode: str = "train", elem_bytes: float = 2.0
) -> list[tuple[str, float, str]]:
    """The layer's tensor-parallel all-reduces per micro-batch (``tp > 1``) as ``(name, bytes,
    phase)``: the output (``T h e``, forward), and in training the input gradient (``T h e``) and
    the gates' gradient (``T k e``). They do not depend on the routing: the expert outputs are
    reduced after the combine, on the rank's own tokens."""
    t, h, e = shape.tokens, shape.hidden, elem_bytes
    calls = [("output", t * h * e, "fwd")]
    if mode == "train":
        calls += [("input_grad", t * h * e, "bwd"), ("gate_grad", t * shape.top_k * e, "bwd")]
    return calls


def expert_grad_sync_s(
    expert_params: float, group: GroupSpec | None, *, grad_bytes: float = 2.0, calib: Calibration = DEFAULT
) -> float:
    """The expert gradients' all-reduce over the expert-data-parallel ``group`` (``dp / ep`` ranks)
    after the backward, exposed (the runtime runs it once the backward is done: nothing to overlap
    with); 0 when the group has one rank (``dp == ep``: the gradient is only scaled)."""
    if group is None or group.size == 1 or expert_params <= 0:
        return 0.0
    return collective_time_s("all_reduce", expert_params * grad_bytes, group, calib=calib)


def all_to_all_time_s(
    nbytes: float, group: GroupSpec, *, algorithm: str = "auto", calib: Calibration = DEFAULT
) -> float:
    """One all-to-all of ``nbytes`` per rank on ``group`` (flat, or ``hierarchical``)."""
    return collective_time_s("all_to_all", nbytes, group, algorithm=algorithm, calib=calib)


# ---------------------------------------------------------------------------------- memory
def moe_param_counts(shape: MoEShape) -> dict[str, float]:
    """Parameter elements of one layer: ``router`` (E h), ``experts`` (E g h f), ``shared``."""
    per_expert = shape.matrices * shape.hidden * shape.ffn
    return {
        "router": float(shape.experts * shape.hidden),
        "experts": float(shape.experts * per_expert),
        "shared": float(shape.shared * per_expert),
    }


def params_per_rank(shape: MoEShape, *, ep: int = 1, tp: int = 1) -> dict[str, float]:
    """Elements one rank holds: experts / (ep tp), shared experts / tp, the router whole."""
    c = moe_param_counts(shape)
    return {"router": c["router"], "experts": c["experts"] / (ep * tp), "shared": c["shared"] / tp}


def expert_state_bytes(
    expert_params: float,
    *,
    dp: int,
    ep: int,
    zero_stage: int = 0,
    mode: str = "train",
    param_bytes: float = 2.0,
    grad_bytes: float = 2.0,
    optimizer_bytes: float = 12.0,
) -> dict[str, float]:
    """Parameters, gradients and optimizer state of ``expert_params`` elements held by one rank
    (already divided by ``ep``). With ``ep = 1`` the experts are ordinary parameters and ZeRO shards
    them over dp; with ``ep > 1`` the runtime builds no ZeRO (it would have to shard over the
    ``dp / ep`` ranks holding the same experts), so ``zero_stage > 0`` is a ValueError."""
    if dp % ep:
        raise ValueError(f"ep={ep} must divide dp={dp}")
    if ep > 1 and zero_stage > 0 and mode == "train":
        raise ValueError(
            f"zero_stage={zero_stage} with ep={ep}: ZeRO on expert-parallel experts is not built"
        )
    params = expert_params * param_bytes
    if mode != "train":
        return {"params": params, "grads": 0.0, "optimizer": 0.0}
    return {  # ep = 1 here whenever zero_stage > 0: ZeRO shards over the whole dp group
        "params": params / dp if zero_stage >= 3 else params,
        "grads": expert_params * grad_bytes / (dp if zero_stage >= 2 else 1),
        "optimizer": expert_params * optimizer_bytes / (dp if zero_stage >= 1 else 1),
    }


def dispatch_buffer_bytes(
    shape: MoEShape, *, ep: int = 1, imbalance: float = 1.0, elem_bytes: float = 2.0
) -> float:
    """Send and receive buffers of one layer's dispatch: ``2 x capacity x k x h`` with the capacity
    ``C T`` (capacity factor) or ``rank_factor T`` (dropless); 0 without expert parallelism."""
    if ep == 1:
        return 0.0
    cap = shape.capacity_factor if shape.capacity_factor is not None else rank_factor(shape, ep, imbalance)
    return 2.0 * cap * shape.tokens * shape.top_k * shape.hidden * elem_bytes


def activation_bytes(
    shape: MoEShape, *, ep: int = 1, tp: int = 1, imbalance: float = 1.0, elem_bytes: float = 2.0
) -> float:
    """Activations one layer keeps for backward on the busiest rank: its input and router
    probabilities, the dispatched tokens, the experts' inner activations (split over ``tp``) and
    their outputs, and the shared experts' (an estimate: the traced graph's measured bytes are the
    reference, this gives the ratio between degrees)."""
    t, h, f, e = shape.tokens, shape.hidden, shape.ffn, elem_bytes
    r = received_tokens(shape, ep, imbalance)
    inner = shape.matrices  # gate, up and the SwiGLU product (2 for a plain MLP)
    routed = r * h * e + r * inner * (f / tp) * e + r * h * e
    shared = t * inner * shape.shared * (f / tp) * e
    return t * h * e + t * shape.experts * 4.0 + routed + shared

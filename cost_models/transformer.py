"""Closed forms for GPT-style transformers: FLOPs, activation memory, and a per-layer workload.

These are the published formulas the graph-derived numbers are checked against, plus a workload
builder that lets the cost model run with no graph at all.

* Narayanan et al. 2021 (SC'21, arXiv 2104.04473), Appendix: hardware FLOPs of one iteration with
  full recompute ``F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))``; without recompute the layers' factor
  is 72 instead of 96 (forward 24, backward 48).
* Korthikanti et al. 2022 (arXiv 2205.05198), Eq. 1-6: activation bytes of one layer in 16-bit.
"""

from __future__ import annotations

from typing import Any

from cost_models.workload import BlockWork, CommWork, OpWork


def megatron_flops_per_iteration(*, batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Hardware FLOPs of one iteration with full recompute (Narayanan et al. 2021)."""
    b, s, ell, h, v = batch, seq, layers, hidden, vocab
    return 96.0 * b * s * ell * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * ell * h))


def model_flops_per_iteration(*, batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """FLOPs of one iteration without recompute (the MFU numerator): ``3/4`` of the layers' part."""
    b, s, ell, h, v = batch, seq, layers, hidden, vocab
    return 72.0 * b * s * ell * h * h * (1.0 + s / (6.0 * h)) + 6.0 * b * s * h * v


def korthikanti_activation_bytes(
    *, seq: int, batch: int, hidden: int, heads: int, tp: int = 1, sp: bool = False, recompute: str = "none"
) -> float:
    """Activation bytes one transformer layer keeps for backward (Korthikanti et al. 2022, 16-bit).

    ``none``: ``sbh(10 + 24/t + 5as/(ht))`` (t = 1: ``sbh(34 + 5as/h)``); with sequence parallelism
    ``sbh/t (34 + 5as/h)``; ``selective`` drops the ``5as/h`` term (their Eq. 6 with SP: ``34 sbh/t``;
    without SP: ``sbh(10 + 24/t)``); ``full`` keeps the layer input ``2sbh`` (``/t`` with SP).
    """
    s, b, h, a, t = seq, batch, hidden, heads, tp
    sbh = float(s * b * h)
    if recompute == "full":
        return 2.0 * sbh / (t if sp else 1)
    score = 0.0 if recompute == "selective" else 5.0 * a * s / h
    if sp:
        return sbh / t * (34.0 + score)
    return sbh * (10.0 + 24.0 / t + score / t)


def _gemm(name: str, batch: float, m: float, n: float, k: float, **kw: Any) -> OpWork:
    return OpWork(name=name, op_class="gemm", gemm=(batch, m, n, k), flops_fwd=2 * batch * m * n * k, **kw)


def _mem(name: str, nbytes: float, **kw: Any) -> OpWork:
    return OpWork(name=name, op_class="memory", bytes_fwd=nbytes, **kw)


def megatron_layer_work(
    *, seq: int, batch: int, hidden: int, heads: int, tp: int = 1, sp: bool = False, ffn: int | None = None
) -> BlockWork:
    """One Megatron GPT layer (fused kernels) on one tensor-parallel rank, for one micro-batch.

    GEMMs: QKV ``(sb, 3h/t, h)``, scores ``b a/t x (s, s, h/a)``, context ``b a/t x (s, h/a, s)``,
    projection ``(sb, h, h/t)``, MLP ``(sb, f/t, h)`` and ``(sb, h, f/t)``. Memory-bound fused kernels:
    two LayerNorms, scale-mask-softmax, attention dropout, bias-GeLU, two bias-dropout-adds.
    Collectives: 2 all-reduces forward and 2 backward of ``2 sbh`` bytes (with SP: all-gather +
    reduce-scatter pairs of the same size).
    """
    s, b, h, a, t = seq, batch, hidden, heads, tp
    f = ffn or 4 * h
    sbh, d = s * b * h, h // a
    rows = s * b
    seq_shard = t if sp else 1
    score_elems = b * (a / t) * s * s
    ops = (
        _mem("ln_1", 2 * 2 * sbh / seq_shard),
        _gemm("qkv", 1, rows, 3 * h / t, h),
        _gemm("scores", b * a / t, s, s, d, selective_recompute=True),
        _mem("scale_mask_softmax", 2 * 2 * score_elems, selective_recompute=True),
        _mem("attn_dropout", 5 * score_elems, selective_recompute=True),
        _gemm("context", b * a / t, s, d, s, selective_recompute=True),
        _gemm("proj", 1, rows, h, h / t),
        _mem("bias_dropout_add_1", (2 + 2 + 2 + 1) * sbh / seq_shard),
        _mem("ln_2", 2 * 2 * sbh / seq_shard),
        _gemm("fc1", 1, rows, f / t, h),
        _mem("bias_gelu", 2 * 2 * rows * f / t),
        _gemm("fc2", 1, rows, h, f / t),
        _mem("bias_dropout_add_2", (2 + 2 + 2 + 1) * sbh / seq_shard),
    )
    if sp:
        comms = tuple(
            CommWork(name=f"{kind}_{i}", collective=kind, nbytes=2 * sbh, phase=phase)
            for i, (kind, phase) in enumerate(
                [("all_gather", "fwd"), ("reduce_scatter", "fwd")] * 2
                + [("reduce_scatter", "bwd"), ("all_gather", "bwd")] * 2
            )
        )
    else:
        comms = tuple(
            CommWork(
                name=f"all_reduce_{phase}", collective="all_reduce", nbytes=2 * sbh, phase=phase, count=2
            )
            for phase in ("fwd", "bwd")
        )
    params = (4 * h * h + 2 * h * f + 3 * h + f) / t + 2 * h + 4 * h  # weights, biases, 2 LayerNorms
    saved = {
        mode: korthikanti_activation_bytes(seq=s, batch=b, hidden=h, heads=a, tp=t, sp=sp, recompute=mode)
        for mode in ("none", "selective", "full")
    }
    return BlockWork(name="layer", ops=ops, comms=comms, param_count=params, saved_bytes=saved)

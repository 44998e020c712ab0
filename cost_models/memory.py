"""Memory per device: model state, activations, pipeline in-flight micro-batches, buffers.

Model state for ``N`` parameters on a device, mixed-precision Adam (Rajbhandari et al. 2020,
"ZeRO", §3: 2 + 2 + 12 bytes per parameter)::

    params     = 2 N            (/ dp under ZeRO-3)
    grads      = 2 N            (/ dp under ZeRO-2 and 3)
    optimizer  = 12 N           (fp32 master copy + two fp32 moments; / dp under ZeRO-1, 2, 3)

Inference keeps the 16-bit parameters only.

Activations of stage ``s`` are ``sum over its blocks of saved_bytes[recompute]`` per micro-batch,
times the micro-batches in flight (Korthikanti et al. 2022, §4.2.3; Narayanan et al. 2021, §2.2):

    GPipe                m
    1F1B                 min(p - s, m)
    interleaved (v)      min(2 (p - s - 1) + (v - 1) p + 1, m v) chunks of 1/v of the stage
                         -> stage 0: p (1 + (p - 1) / (p v)) stage-micro-batches

Recompute ``full`` keeps only each layer's input; during the backward of a layer its activations
are rebuilt, so one layer's ``saved_bytes['none']`` (one micro-batch) comes on top (``transient``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_models.workload import StageWork


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per parameter of each copy (defaults: fp16/bf16 mixed precision with Adam)."""

    param_bytes: float = 2.0
    grad_bytes: float = 2.0
    optimizer_bytes: float = 12.0
    """fp32 master weights (4) + Adam's first and second moments (4 + 4)."""


def model_state_bytes(
    num_params: float,
    *,
    dp: int = 1,
    zero_stage: int = 0,
    mode: str = "train",
    precision: Precision = Precision(),
) -> dict[str, float]:
    """Parameters, gradients and optimizer state of ``num_params`` parameters on one device."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: must be 0, 1, 2 or 3")
    params = num_params * precision.param_bytes
    if mode != "train":
        return {"params": params, "grads": 0.0, "optimizer": 0.0}
    grads = num_params * precision.grad_bytes
    opt = num_params * precision.optimizer_bytes
    return {
        "params": params / dp if zero_stage >= 3 else params,
        "grads": grads / dp if zero_stage >= 2 else grads,
        "optimizer": opt / dp if zero_stage >= 1 else opt,
    }


def in_flight_micro_batches(schedule: str, pp: int, stage: int, m: int, virtual_stages: int = 1) -> float:
    """Micro-batches' worth of the stage's activations held at the peak (see the module docstring)."""
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} outside 0..{pp - 1}")
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b" or virtual_stages == 1:
        return float(min(pp - stage, m))
    if schedule == "interleaved":
        v = virtual_stages
        chunks = min(2 * (pp - stage - 1) + (v - 1) * pp + 1, m * v)
        return chunks / v
    raise ValueError(f"schedule {schedule!r} unknown; known: gpipe, 1f1b, interleaved")


def interleaved_factor(pp: int, virtual_stages: int) -> float:
    """Korthikanti et al.'s ``1 + (p - 1) / (p v)``: stage 0's memory under interleaving vs 1F1B."""
    return 1.0 + (pp - 1) / (pp * virtual_stages)


def activation_bytes(
    stage: StageWork,
    *,
    recompute: str,
    in_flight: float,
    mode: str = "train",
) -> dict[str, float]:
    """``saved`` (kept across in-flight micro-batches) and ``transient`` (one layer rebuilt)."""
    if mode != "train":
        # Forward only: nothing is kept for backward; the working set is one block's activations.
        working = max((b.saved("none") for b, _ in stage.blocks), default=0.0)
        return {"saved": 0.0, "transient": working}
    saved = sum(b.saved(recompute) * c for b, c in stage.blocks) * in_flight
    transient = 0.0
    if recompute != "none":
        transient = max(
            (b.saved("none") - b.saved(recompute) for b, _ in stage.blocks if b.recomputable), default=0.0
        )
    return {"saved": saved, "transient": transient}


def kv_cache_bytes(
    *, layers: int, batch: int, seq: int, kv_heads: int, head_dim: int, tp: int = 1, elem_bytes: float = 2.0
) -> float:
    """Keys and values of ``layers`` attention layers: ``2 * layers * batch * seq * kv_heads * head_dim``
    elements, kv heads split over ``tp`` (replicated when ``tp > kv_heads``)."""
    heads_per_rank = max(1, math.ceil(kv_heads / tp))
    return 2.0 * layers * batch * seq * heads_per_rank * head_dim * elem_bytes


def stage_memory_bytes(
    stage: StageWork,
    *,
    stage_index: int,
    pp: int,
    num_micro_batches: int,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    recompute: str = "none",
    dp: int = 1,
    zero_stage: int = 0,
    mode: str = "train",
    precision: Precision = Precision(),
    comm_buffer_bytes: float = 0.0,
    kv_cache: float = 0.0,
    reserved_bytes: float = 0.0,
) -> dict[str, float]:
    """Memory breakdown of one pipeline stage's device; ``sum(values())`` is the total."""
    state = model_state_bytes(stage.param_count, dp=dp, zero_stage=zero_stage, mode=mode, precision=precision)
    flight = in_flight_micro_batches(schedule, pp, stage_index, num_micro_batches, virtual_stages)
    acts = activation_bytes(stage, recompute=recompute, in_flight=flight, mode=mode)
    out = dict(state)
    out["activations"] = acts["saved"]
    out["activations_transient"] = acts["transient"]
    out["comm_buffers"] = comm_buffer_bytes
    if kv_cache:
        out["kv_cache"] = kv_cache
    if reserved_bytes:
        out["reserved"] = reserved_bytes
    return out


def zero3_gather_buffer_bytes(stage: StageWork, param_bytes: float = 2.0, prefetch: int = 2) -> float:
    """ZeRO-3 keeps the gathered parameters of the current block and ``prefetch - 1`` next ones."""
    largest = max((b.param_count for b, _ in stage.blocks), default=0.0)
    return prefetch * largest * param_bytes

"""Analytical cost models: numbers in, seconds and bytes out. Imports nothing from ``autopar``.

* :mod:`.compute`: roofline op time with size-dependent GEMM efficiency.
* :mod:`.comm`: alpha-beta collective and p2p time on a two-level topology.
* :mod:`.memory`: model state, activations, pipeline in-flight micro-batches.
* :mod:`.step`: step time of a whole plan with a breakdown; its parts are public too, for the
  planner's inter-op ILP, which rebuilds the step time stage by stage: :func:`stage_time`,
  :func:`stage_p2p_s` (blocking sends), :func:`dp_exposed_s` (exposed data-parallel sync) and
  :func:`optimizer_step_s`.
* :mod:`.transformer`: published closed forms (FLOPs, activation memory) and a layer workload.
* :mod:`.constants`: every constant with its source (:class:`Calibration`).
* :mod:`.hardware`: measured per-device-kind efficiencies and per-framework behaviour;
  ``calibration_for(kind, base, framework=...)`` (not re-exported: import from the module).

Public API: the names in ``__all__`` below (``from cost_models import ...``); the workload types
(:mod:`.workload`) are what ``autopar.estimator`` fills, :func:`step_time` and the memory functions
what it calls.
"""

from cost_models.comm import COLLECTIVES, GroupSpec, LinkSpec, collective_time_s, p2p_time_s
from cost_models.compute import DeviceRates, gemm_efficiency, gemm_time_s, memory_op_time_s
from cost_models.constants import DEFAULT, FITTED, Calibration
from cost_models.memory import (
    Precision,
    in_flight_micro_batches,
    interleaved_factor,
    kv_cache_bytes,
    model_state_bytes,
    stage_memory_bytes,
)
from cost_models.step import (
    BlockTime,
    StepSpec,
    StepTime,
    block_time,
    dp_exposed_s,
    op_time_s,
    optimizer_step_s,
    stage_p2p_s,
    stage_time,
    step_time,
)
from cost_models.workload import BlockWork, CommWork, OpWork, StageWork

__all__ = [
    "COLLECTIVES",
    "DEFAULT",
    "FITTED",
    "BlockTime",
    "BlockWork",
    "Calibration",
    "CommWork",
    "DeviceRates",
    "GroupSpec",
    "LinkSpec",
    "OpWork",
    "Precision",
    "StageWork",
    "StepSpec",
    "StepTime",
    "block_time",
    "collective_time_s",
    "dp_exposed_s",
    "gemm_efficiency",
    "gemm_time_s",
    "in_flight_micro_batches",
    "interleaved_factor",
    "kv_cache_bytes",
    "memory_op_time_s",
    "model_state_bytes",
    "op_time_s",
    "optimizer_step_s",
    "p2p_time_s",
    "stage_memory_bytes",
    "stage_p2p_s",
    "stage_time",
    "step_time",
]

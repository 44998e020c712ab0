"""Wrap a stage module with PyTorch's own engines: activation checkpointing, DDP and FSDP2.

* Recompute (``plan.recompute == "full"``): every block segment (``submod_<i>`` for a block) runs
  under ``torch.utils.checkpoint`` (non-reentrant), so only block inputs are kept for backward.
* Data parallel (``zero_stage == 0``): ``DistributedDataParallel`` on the dp group (bucketing and
  overlap of the gradient all-reduce come from DDP).
* ZeRO (``zero_stage >= 1``): FSDP2 ``fully_shard`` on the dp group, per block segment and then on
  the stage root. Stage 3 reshards parameters after forward; stages 1 and 2 keep them gathered
  between forward and backward (``reshard_after_forward=False``), which is ZeRO-2 (stage 1 runs
  as stage 2: same numerics, gradients reduce-scattered instead of all-reduced).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from autopar.lower.stages import StageModule


class Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def block_submodules(stage: StageModule, block_segments: set[int]) -> list[str]:
    """Attribute names (``submod_<i>``) of the block segments inside ``stage``."""
    return [
        f"submod_{s}" for s in stage.spec.segments if s in block_segments and hasattr(stage.gm, f"submod_{s}")
    ]


def apply_recompute(stage: StageModule, block_segments: set[int]) -> list[str]:
    """Checkpoint every block segment of ``stage`` in place; returns the wrapped names."""
    names = block_submodules(stage, block_segments)
    for name in names:
        setattr(stage.gm, name, Checkpointed(getattr(stage.gm, name)))
    return names


def apply_ddp(stage: nn.Module, dp_group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        stage,
        process_group=dp_group,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # buffers are deterministic (rotary tables): no per-step broadcast
    )


def apply_fsdp(
    stage: StageModule,
    dp_group: dist.ProcessGroup,
    device: torch.device,
    block_segments: set[int],
    zero_stage: int,
) -> nn.Module:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(dp_group, device_type=device.type, mesh_dim_names=("dp",))
    reshard = zero_stage >= 3
    for name in block_submodules(stage, block_segments):
        fully_shard(getattr(stage.gm, name), mesh=mesh, reshard_after_forward=reshard)
    fully_shard(stage, mesh=mesh, reshard_after_forward=reshard)
    return stage

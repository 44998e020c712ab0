"""Wrap a stage module with PyTorch's own engines: activation recompute, DDP, ZeRO-1 and FSDP2.

Each value of ``plan.recompute`` and ``plan.zero_stage`` has its own implementation
(:data:`RECOMPUTE_ENGINES`, :data:`ZERO_ENGINES`); none runs as another.

* Recompute (:mod:`autopar.runtime.recompute`): ``full`` checkpoints every block segment,
  ``selective`` checkpoints the attention-score region inside each block segment.
* ``zero_stage == 0``: ``DistributedDataParallel`` on the dp group (bucketed all-reduce of the
  gradients, overlapped with backward, on the last micro-batch).
* ``zero_stage == 1`` (optimizer state sharded): DDP as for stage 0, so every rank holds the full
  averaged gradients; :class:`ShardedOptimizer` gives each dp rank rows ``[r*c, (r+1)*c)`` of every
  parameter (``c = ceil(rows / dp)``, dim 0) with their optimizer state, steps them, then one
  ``all_gather_single`` per dtype restores the full parameters on every rank.
* ``zero_stage == 2`` (plus gradients sharded): FSDP2 ``fully_shard`` on the dp group per block
  segment and on the stage with ``reshard_after_forward=False``: parameters stay gathered from
  forward to backward, gradients are reduce-scattered, the optimizer steps the local shards.
* ``zero_stage == 3`` (plus parameters sharded): the same with ``reshard_after_forward=True``: each
  unit gathers its parameters before forward and again before backward.

Collectives against the cost model (``cost_models/step.py``: ``dp_exposed_s``, ``_zero3_time``):
stages 0, 2 and 3 issue the kinds the model charges. Stage 1 all-reduces the gradients (DDP) where
the model charges a reduce-scatter: twice the gradient bytes on the wire, so that every rank
keeps the full averaged gradients (``full_grads()``); the parameter all-gather after the step is
the one charged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopar.lower.stages import StageModule
from autopar.runtime.recompute import Checkpointed, apply_selective

RECOMPUTE_ENGINES = {
    "none": "activations kept",
    "selective": "attention-score region of each block checkpointed (recompute.apply_selective)",
    "full": "every block segment checkpointed (recompute.Checkpointed)",
}
"""What runs for each ``plan.recompute`` (the knob values the planner may choose)."""

ZERO_ENGINES = {
    0: "DDP all-reduce",
    1: "DDP all-reduce + ShardedOptimizer (optimizer state sharded, parameters all-gathered)",
    2: "FSDP2 reshard_after_forward=False (gradients and optimizer state sharded)",
    3: "FSDP2 reshard_after_forward=True (parameters, gradients and optimizer state sharded)",
}
"""What runs for each ``plan.zero_stage`` with ``dp > 1`` (with ``dp == 1`` there is nothing to
shard and every stage is plain training)."""


def block_submodules(stage: StageModule, block_segments: set[int]) -> list[str]:
    """Attribute names (``submod_<i>``) of the block segments inside ``stage``."""
    return [
        f"submod_{s}" for s in stage.spec.segments if s in block_segments and hasattr(stage.gm, f"submod_{s}")
    ]


def apply_recompute(stage: StageModule, block_segments: set[int], mode: str) -> list[str]:
    """Apply ``plan.recompute == mode`` to every block segment of ``stage`` in place; returns the
    names of the segments changed."""
    if mode not in RECOMPUTE_ENGINES:
        raise ValueError(f"recompute={mode!r}: choose one of {sorted(RECOMPUTE_ENGINES)}")
    if mode == "none":
        return []
    names = block_submodules(stage, block_segments)
    changed = []
    for name in names:
        segment = getattr(stage.gm, name)
        if mode == "full":
            setattr(stage.gm, name, Checkpointed(segment))
            changed.append(name)
        elif apply_selective(segment, f"stage {stage.spec.index} {name}"):
            changed.append(name)
    return changed


def apply_ddp(
    stage: nn.Module, dp_group: dist.ProcessGroup, device: torch.device, ignore: Iterable[str] = ()
) -> nn.Module:
    """DDP on the dp group; ``ignore``: parameter names (in ``stage``) DDP leaves alone (the routed
    experts under expert parallelism, reduced by :func:`sync_expert_grads`)."""
    from torch.nn.parallel import DistributedDataParallel

    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(stage, list(ignore))
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
    """FSDP2 for ZeRO-2 (``reshard_after_forward=False``) or ZeRO-3 (``True``)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if zero_stage not in (2, 3):
        raise ValueError(f"FSDP2 runs ZeRO-2 and ZeRO-3, not zero_stage={zero_stage}")
    mesh = DeviceMesh.from_group(dp_group, device_type=device.type, mesh_dim_names=("dp",))
    reshard = zero_stage == 3
    for name in block_submodules(stage, block_segments):
        fully_shard(getattr(stage.gm, name), mesh=mesh, reshard_after_forward=reshard)
    fully_shard(stage, mesh=mesh, reshard_after_forward=reshard)
    return stage


def apply_data_parallel(
    stage: StageModule,
    dp_group: dist.ProcessGroup,
    device: torch.device,
    block_segments: set[int],
    zero_stage: int,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """The gradient engine of ``zero_stage`` (:data:`ZERO_ENGINES`); ZeRO-1's optimizer side is
    :func:`build_optimizer`. ``ignore``: parameters whose gradients are not the dp group's to
    reduce (expert-parallel experts: :func:`sync_expert_grads`)."""
    if zero_stage not in ZERO_ENGINES:
        raise ValueError(f"zero_stage={zero_stage}: choose one of {sorted(ZERO_ENGINES)}")
    if zero_stage >= 2:
        if ignore:
            raise ValueError("FSDP (zero_stage >= 2) cannot leave expert-parallel parameters out")
        return apply_fsdp(stage, dp_group, device, block_segments, zero_stage)
    return apply_ddp(stage, dp_group, device, ignore)


def expert_params(slots: Iterable[Any]) -> list[torch.Tensor]:
    """The parameters of ``slots`` (:class:`~autopar.lower.program.ParamSlot`) split over experts."""
    return [slot.tensor() for slot in slots if slot.shard.is_expert]


def expert_names(stage: nn.Module, slots: Iterable[Any]) -> list[str]:
    """Names in ``stage`` of its expert-parallel parameters (what DDP must leave alone)."""
    ids = {id(p) for p in expert_params(slots)}
    return [name for name, p in stage.named_parameters() if id(p) in ids]


def sync_expert_grads(params: Iterable[torch.Tensor], edp_group: dist.ProcessGroup | None, dp: int) -> None:
    """Expert-parallel gradients: each arrives at its owner summed over its ep group's tokens (the
    all-to-all's backward); sum it over the ranks holding the same experts (``edp``, dp/ep of them)
    and divide by ``dp``, the mean the loss takes over data-parallel replicas."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if edp_group is not None:
        dist.all_reduce(flat, group=edp_group)
    flat /= dp
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------------------ ZeRO-1
def build_optimizer(
    factory: Callable[[list[nn.Parameter]], Any],
    params: list[nn.Parameter],
    zero_stage: int,
    dp_group: dist.ProcessGroup | None,
) -> Any:
    """The rank's optimizer: ``factory(params)``, or under ZeRO-1 with a dp group of more than one
    rank a :class:`ShardedOptimizer` whose inner optimizer is ``factory(shards)``."""
    if zero_stage == 1 and dp_group is not None and dist.get_world_size(dp_group) > 1:
        return ShardedOptimizer(factory, params, dp_group)
    return factory(params)


def _rows(p: torch.Tensor) -> torch.Tensor:
    return p.detach().reshape(1) if p.dim() == 0 else p.detach()


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """ZeRO-1's split of dim 0: rank ``r`` of ``world`` owns rows ``[lo, hi)``, ``c = ceil(rows /
    world)`` rows each, the last ranks fewer or none (``lo == hi``)."""
    c = math.ceil(rows / world)
    return min(rank * c, rows), min((rank + 1) * c, rows)


class ShardedOptimizer:
    """ZeRO-1: this dp rank's rows of every parameter, stepped by ``factory(shards)``.

    The shards are views of the parameters (no copy): rank ``r`` owns rows ``[r*c, (r+1)*c)`` of
    dim 0 with ``c = ceil(rows / n)`` (a rank past the last row owns nothing of that parameter).
    ``step()`` points each shard's ``.grad`` at its rows of the parameter's full, already averaged
    gradient (DDP), steps the inner optimizer (its state exists for the shards only), then one
    all-gather per dtype of the padded shards writes the full parameters back on every rank.

    The inner optimizer sees dim-0 slices of the parameters (same number of dims), which gives the
    unsharded result for any elementwise optimizer (SGD, Adam, AdamW, ...); one that mixes elements
    of a tensor (norm-based updates, factored second moments) would see its rows only.
    """

    def __init__(self, factory: Callable[[list[nn.Parameter]], Any], params: Iterable[nn.Parameter], group):
        self.group = group
        self.params = list(params)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shards: dict[int, nn.Parameter] = {}
        for i, p in enumerate(self.params):
            lo, hi = self._bounds(p)
            if hi > lo:
                self.shards[i] = nn.Parameter(_rows(p)[lo:hi], requires_grad=p.requires_grad)
        self.optimizer = factory(list(self.shards.values()))
        # per dtype and device: (parameter index, this rank's rows [lo, hi), zero padding up to c rows)
        self._kinds: dict[tuple, list[tuple[int, int, int, torch.Tensor | None]]] = {}
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, p in enumerate(self.params):
            rows = _rows(p)
            lo, hi = self._bounds(p)
            c = math.ceil(rows.shape[0] / self.world)
            missing = (c - (hi - lo)) * (rows[0].numel() if rows.shape[0] else 0)
            pad = torch.zeros(missing, dtype=p.dtype, device=p.device) if missing else None
            self._kinds.setdefault((p.dtype, p.device), []).append((i, lo, hi, pad))

    def _bounds(self, p: torch.Tensor) -> tuple[int, int]:
        return shard_rows(_rows(p).shape[0], self.world, self.rank)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state."""
        return self.optimizer.state_dict()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for i, shard in self.shards.items():
            g = self.params[i].grad
            lo, hi = self._bounds(self.params[i])
            shard.grad = None if g is None else _rows(g)[lo:hi]
        self.optimizer.step()
        self._gather()

    def _gather(self) -> None:
        """All-gather the updated rows: one padded flat buffer per dtype and device, packed with one
        ``cat`` and unpacked with one ``_foreach_copy_`` (per-tensor Python work is views only: with
        68 tensors, an op per tensor each way cost 8 ms on 2 ranks and 30 ms on 4 of a 2-core CPU)."""
        with torch.no_grad():
            for (dtype, device), members in self._kinds.items():
                pieces: list[torch.Tensor] = []
                for i, lo, hi, pad in members:
                    pieces.append(_rows(self.params[i])[lo:hi].reshape(-1))
                    if pad is not None:
                        pieces.append(pad)
                n = sum(x.numel() for x in pieces)
                if (
                    dtype,
                    device,
                ) not in self._buffers:  # kept: a fresh buffer faults its pages in every step
                    self._buffers[(dtype, device)] = (
                        torch.empty(n, dtype=dtype, device=device),
                        torch.empty(self.world, n, dtype=dtype, device=device),
                    )
                send, out = self._buffers[(dtype, device)]
                torch.cat(pieces, out=send)
                dist.all_gather_single(out.view(-1), send, group=self.group)
                dst, src, offset = [], [], 0
                for i, _lo, _hi, _pad in members:
                    rows = _rows(self.params[i])
                    size = math.ceil(rows.shape[0] / self.world) * (rows[0].numel() if rows.shape[0] else 0)
                    part = out[:, offset : offset + size]
                    if size * self.world == rows.numel():  # rows divide evenly: a (world, size) view
                        dst.append(rows.view(self.world, size))
                        src.append(part)
                    elif size:
                        rows.view(-1).copy_(part.reshape(-1)[: rows.numel()])
                    offset += size
                if dst:
                    torch._foreach_copy_(dst, src)

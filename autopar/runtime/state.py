"""Full (unsharded) parameters and gradients from the ranks' shards, and back.

Gathering a parameter undoes, in order: the FSDP shard over dp (``DTensor.full_tensor``), the
tensor-parallel shard (all-gather over tp, concatenated along the shard dim), and the pipeline
split (the stages' dicts are exchanged over the pp group). Every rank of a group calls in the
same slot order, which holds because the ranks of a group run the same program shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.lower.program import ParamSlot
from autopar.runtime.groups import ProcessGroups


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _unshard_tp(t: torch.Tensor, slot: ParamSlot, groups: ProcessGroups | None) -> torch.Tensor:
    if slot.shard.dim is None or slot.shard.num_shards == 1:
        return t
    if groups is None or groups.group("tp") is None:
        raise AssertionError(f"{slot.full_name} is tp-sharded but there is no tp group")
    parts = [torch.empty_like(t) for _ in range(slot.shard.num_shards)]
    dist.all_gather(parts, t.contiguous(), group=groups.group("tp"))
    return torch.cat(parts, dim=slot.shard.dim)


def gather_full(slots: list[ParamSlot], groups: ProcessGroups | None, *, grads: bool = False) -> dict:
    """``{full_name: full tensor}`` of every parameter (or gradient) of the model, on every rank."""
    mine: dict[str, torch.Tensor] = {}
    for slot in slots:
        p = slot.tensor()
        t = p.grad if grads else p
        if t is None:
            t = torch.zeros_like(p)
        if _is_dtensor(t):
            t = t.full_tensor()
        t = _unshard_tp(t.detach(), slot, groups)
        mine[slot.full_name] = t.detach().clone().cpu()
    if groups is None or groups.group("pp") is None:
        return mine
    everyone: list = [None] * groups.size("pp")
    dist.all_gather_object(everyone, mine, group=groups.group("pp"))
    out: dict[str, torch.Tensor] = {}
    for part in everyone:
        out.update(part)
    return out


def scatter_full(slots: list[ParamSlot], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every full tensor in ``full`` into its parameter (collective under FSDP)."""
    from torch.distributed.tensor import distribute_tensor

    for slot in slots:
        if slot.full_name not in full:
            raise KeyError(f"the state dict has no entry for parameter {slot.full_name}")
        value = full[slot.full_name]
        if slot.shard.dim is not None and slot.shard.num_shards > 1:
            value = value.chunk(slot.shard.num_shards, dim=slot.shard.dim)[slot.shard.index]
        p = slot.tensor()
        with torch.no_grad():
            if _is_dtensor(p):
                local = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements).to_local()
                p.to_local().copy_(local)
            else:
                if tuple(p.shape) != tuple(value.shape):
                    raise ValueError(
                        f"{slot.full_name}: state dict shape {tuple(value.shape)} does not match the "
                        f"rank's shard {tuple(p.shape)}"
                    )
                p.copy_(value.to(p.dtype))

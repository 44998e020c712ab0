"""Full (unsharded) parameters, gradients and optimizer state from the ranks' shards, and back.

Gathering a parameter undoes, in order: the FSDP shard over dp (``DTensor.full_tensor``), the
tensor-parallel shard (all-gather over tp, concatenated along the shard dim), and the pipeline
split (the stages' dicts are exchanged over the pp group). Every rank of a group calls in the
same slot order, which holds because the ranks of a group run the same program shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.core.errors import CheckpointError
from autopar.lower.program import ParamSlot
from autopar.runtime.engines import ShardedOptimizer, shard_rows
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


def _unshard_ep(t: torch.Tensor, slot: ParamSlot, groups: ProcessGroups | None) -> torch.Tensor:
    """Routed experts split over the ep group (autopar/lower/expert.py): all-gather along ep_dim."""
    if not slot.shard.is_expert:
        return t
    if groups is None or groups.group("ep") is None:
        raise AssertionError(f"{slot.full_name} is split over experts but there is no ep group")
    parts = [torch.empty_like(t) for _ in range(slot.shard.ep_shards)]
    dist.all_gather(parts, t.contiguous(), group=groups.group("ep"))
    return torch.cat(parts, dim=slot.shard.ep_dim)


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
        t = _unshard_ep(_unshard_tp(t.detach(), slot, groups), slot, groups)
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
        if slot.shard.is_expert:
            value = value.chunk(slot.shard.ep_shards, dim=slot.shard.ep_dim)[slot.shard.ep_index]
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


# ------------------------------------------------------------------------------------ optimizer
def _zero1_rows(optimizer: ShardedOptimizer) -> dict[int, dict[str, torch.Tensor]]:
    """ZeRO-1: the state of every parameter with its dp rows put back together, ``{id(param):
    {key: value}}`` (collective over dp). Row-shaped values are concatenated in dp-rank order;
    scalars (Adam's ``step``) are taken from the first rank that holds rows."""
    inner = optimizer.optimizer
    mine = {
        i: {k: v.detach().clone() for k, v in inner.state.get(s, {}).items()}
        for i, s in optimizer.shards.items()
    }
    parts: list = [None] * dist.get_world_size(optimizer.group)
    dist.all_gather_object(parts, mine, group=optimizer.group)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for i, p in enumerate(optimizer.params):
        pieces = [part[i] for part in parts if i in part and part[i]]
        if not pieces:
            continue
        state: dict[str, torch.Tensor] = {}
        for key, first in pieces[0].items():
            if isinstance(first, torch.Tensor) and first.dim() > 0:
                state[key] = torch.cat([piece[key] for piece in pieces]).reshape(p.shape)
            else:
                state[key] = first
        out[id(p)] = state
    return out


def gather_optimizer_full(
    optimizer: object, slots: list[ParamSlot], groups: ProcessGroups | None
) -> dict[str, dict[str, torch.Tensor]]:
    """``{full_name: {state key: full value}}`` of the optimizer state, on every rank (collective).

    A state tensor of the parameter's (local) shape is unsharded exactly like the parameter (FSDP,
    ZeRO-1 rows, tp, pp); a 0-dim one (``step``) is copied. Any other shape (a factored second
    moment) has no defined resharding and raises :class:`CheckpointError` naming it."""
    if isinstance(optimizer, ShardedOptimizer):
        state_of = _zero1_rows(optimizer)
    else:
        state_of = {id(p): s for p, s in optimizer.state.items()}
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for slot in slots:
        p = slot.tensor()
        state = state_of.get(id(p))
        if not state:
            continue
        full: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                full[key] = value.detach().clone().cpu() if isinstance(value, torch.Tensor) else value
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"optimizer state {key!r} of {slot.full_name} has shape {tuple(value.shape)}, neither the "
                    f"parameter's {tuple(p.shape)} nor a scalar; only elementwise optimizer state "
                    "(SGD momentum, Adam moments) can be gathered and re-sharded"
                )
            t = value.full_tensor() if _is_dtensor(value) else value
            full[key] = _unshard_ep(_unshard_tp(t.detach(), slot, groups), slot, groups).clone().cpu()
        mine[slot.full_name] = full
    if groups is None or groups.group("pp") is None:
        return mine
    everyone: list = [None] * groups.size("pp")
    dist.all_gather_object(everyone, mine, group=groups.group("pp"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for part in everyone:
        for name, state in part.items():
            out.setdefault(name, state)
    return out


def _local_value(value: torch.Tensor, slot: ParamSlot, p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full, parameter-shaped state tensor (tp chunk, then FSDP shard)."""
    from torch.distributed.tensor import distribute_tensor

    if slot.shard.is_expert:
        value = value.chunk(slot.shard.ep_shards, dim=slot.shard.ep_dim)[slot.shard.ep_index]
    if slot.shard.dim is not None and slot.shard.num_shards > 1:
        value = value.chunk(slot.shard.num_shards, dim=slot.shard.dim)[slot.shard.index]
    if _is_dtensor(p):
        return distribute_tensor(value.to(p.device).contiguous(), p.device_mesh, p.placements)
    return value.to(p.device).clone()


def scatter_optimizer_full(
    optimizer: object, slots: list[ParamSlot], full: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Set this rank's optimizer state from ``{full_name: {key: full value}}`` (collective under
    FSDP): the inverse of :func:`gather_optimizer_full`. Parameters without saved state (never
    stepped) are left without state, as in a fresh optimizer."""
    zero1 = optimizer.shards if isinstance(optimizer, ShardedOptimizer) else None
    index = {id(p): i for i, p in enumerate(optimizer.params)} if zero1 is not None else {}
    for slot in slots:
        saved = full.get(slot.full_name)
        if not saved:
            continue
        p = slot.tensor()
        state = {}
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[key] = _local_value(value, slot, p)
            else:
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        if zero1 is None:
            optimizer.state[p] = state
            continue
        i = index[id(p)]
        if i in zero1:  # else this dp rank owns no rows of this parameter
            optimizer.optimizer.state[zero1[i]] = _rows_of(state, p, optimizer)


def _rows_of(state: dict, p: torch.Tensor, optimizer: ShardedOptimizer) -> dict:
    """ZeRO-1: this dp rank's rows ``[lo, hi)`` (dim 0) of every parameter-shaped state tensor."""
    rows = p.shape[0] if p.dim() > 0 else 1
    lo, hi = shard_rows(rows, optimizer.world, optimizer.rank)
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value.reshape(rows, *value.shape[1:])[lo:hi].clone()
        out[key] = value
    return out

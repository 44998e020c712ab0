"""Placement rules of view-like ops: reshape, expand, permute, indexing, split, cat, repeat.

A shard survives a view when the sharded dim maps one-to-one onto an output dim whose elements
are the same contiguous block: see :func:`reshape_dim_map` and :func:`getitem_dim_map`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx

from autopar.core.plan import Placement, Shard
from autopar.sharding.ops import OpCall, shape
from autopar.sharding.strategy import Ctx, P, R, norm_dim, replicate, tensor_nodes


def reshape_dim_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> dict[int, int]:
    """Input dim -> output dim for dims that may carry a shard through a row-major reshape.

    Dims are grouped into runs with equal products; within a group only the outermost non-1 dim
    keeps its shard (its contiguous 1/tp block of the group's elements is the same block on both
    sides). Example: ``[b, t, 32] -> [b, t, 4, 8]`` maps ``{0: 0, 1: 1, 2: 2}``.
    """
    ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    outs = [(o, s) for o, s in enumerate(out_shape) if s != 1]
    mapping: dict[int, int] = {}
    i = o = 0
    while i < len(ins) and o < len(outs):
        gi, go = [ins[i]], [outs[o]]
        pi, po = ins[i][1], outs[o][1]
        while pi != po:
            if pi < po:
                i += 1
                if i >= len(ins):
                    return mapping
                gi.append(ins[i])
                pi *= ins[i][1]
            else:
                o += 1
                if o >= len(outs):
                    return mapping
                go.append(outs[o])
                po *= outs[o][1]
        mapping[gi[0][0]] = go[0][0]
        i += 1
        o += 1
    return mapping


def _donors(c: Ctx, x: torch.fx.Node | None, out: Placement) -> dict:
    """``view_as(x, other)`` / ``expand_as``: the result takes ``other``'s *local* shape, so
    ``other`` must be placed like the result (a partial sum has the full shape: like ``R``)."""
    return {n: (R if out == P else out) for n in c.call.inputs if n is not x}


def reshape(c: Ctx) -> None:
    x = c.call.args["x"]
    c.add("replicate", {x: R, **_donors(c, x, R)}, R)
    ins, outs = shape(x), c.call.out_shape
    for di, do in reshape_dim_map(ins, outs).items():
        if c.divisible(ins[di]) and c.divisible(outs[do]):
            c.add(f"shard({di}->{do})", {x: Shard(di), **_donors(c, x, Shard(do))}, Shard(do))
    c.add("partial", {x: P, **_donors(c, x, P)}, P)


def expand(c: Ctx) -> None:
    x = c.call.args["x"]
    c.add("replicate", {x: R, **_donors(c, x, R)}, R)
    ins, outs = shape(x), c.call.out_shape
    off = len(outs) - len(ins)
    for d in range(len(ins)):
        if ins[d] == outs[d + off] and c.divisible(ins[d]):
            c.add(f"shard({d})", {x: Shard(d), **_donors(c, x, Shard(d + off))}, Shard(d + off))
    c.add("partial", {x: P, **_donors(c, x, P)}, P)


def permutation(call: OpCall) -> list[int]:
    """Output dim o reads input dim perm[o]."""
    nd = call.ndim
    if "dims" in call.args:
        return [norm_dim(int(d), nd) for d in call.args["dims"]]
    d0, d1 = (norm_dim(int(d), nd) for d in call.args["swap"])
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def permute(c: Ctx) -> None:
    x = c.call.args["x"]
    replicate(c)
    ins = shape(x)
    for o, i in enumerate(permutation(c.call)):
        if c.divisible(ins[i]):
            c.add(f"shard({i}->{o})", {x: Shard(i)}, Shard(o))
    c.add("partial", {x: P}, P)


def getitem_dim_map(in_shape: Sequence[int], index: Any) -> tuple[dict[int, int], set[int]] | None:
    """(input dim -> output dim for fully kept dims, input dims indexed by an int), or None."""
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.fx.Node) or hasattr(i, "shape") or isinstance(i, (list, bool)) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(in_shape) - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
    mapping, ints, d_in, d_out = {}, set(), 0, 0
    for i in expanded:
        if i is None:
            d_out += 1
        elif isinstance(i, int):
            ints.add(d_in)
            d_in += 1
        elif isinstance(i, slice):
            full = (
                i.start in (None, 0) and i.step in (None, 1) and (i.stop is None or i.stop >= in_shape[d_in])
            )
            if full:
                mapping[d_in] = d_out
            d_in += 1
            d_out += 1
        else:
            return None
    return mapping, ints


def getitem(c: Ctx, value_irrelevant: bool) -> None:
    x = c.call.args["x"]
    replicate(c)
    ins = shape(x)
    found = getitem_dim_map(ins, c.call.args["index"])
    if found is None:
        return
    mapping, ints = found
    for di, do in mapping.items():
        if c.divisible(ins[di]):
            c.add(f"shard({di}->{do})", {x: Shard(di)}, Shard(do))
    c.add("partial", {x: P}, P)
    if value_irrelevant:  # only the shape is read downstream: indexing a shard gives the right shape
        for d in ints:
            if c.divisible(ins[d]):
                c.add(f"shape_only({d})", {x: Shard(d)}, R)


def select(c: Ctx, value_irrelevant: bool) -> None:
    x = c.call.args["x"]
    ins = shape(x)
    dim = norm_dim(int(c.call.args["dim"]), len(ins))
    replicate(c)
    drops = c.call.kind == "select"  # select removes the dim, slice/narrow keep it
    for d in range(len(ins)):
        if d != dim and c.divisible(ins[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d - 1 if drops and d > dim else d))
    c.add("partial", {x: P}, P)
    if value_irrelevant and c.divisible(ins[dim]) and c.call.kind == "select":
        c.add(f"shape_only({dim})", {x: Shard(dim)}, R)


def split(c: Ctx) -> None:
    x = c.call.args["x"]
    ins = shape(x)
    dim = norm_dim(int(c.call.args["dim"]), len(ins))
    unbind = c.call.args.get("unbind")
    replicate(c)
    for d in range(len(ins)):
        if d != dim and c.divisible(ins[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d - 1 if unbind and d > dim else d))
    c.add("partial", {x: P}, P)


def cat(c: Ctx) -> None:
    tensors = tensor_nodes(*c.call.args["xs"])
    # torch.cat skips 1-D empty tensors whatever the dims of the rest (HF caches start as one).
    empty = {n: None for n in tensors if shape(n) == (0,)}
    xs = [n for n in tensors if n not in empty]
    c.add("replicate", {**empty, **{n: R for n in xs}}, R)
    out = c.call.out_shape
    dim = norm_dim(int(c.call.args["dim"]), len(out))
    stack = c.call.args["stack"]
    for d in range(len(out)):
        if d == dim or not c.divisible(out[d]):
            continue
        di = d - 1 if stack and d > dim else d
        c.add(f"shard({d})", {**empty, **{n: Shard(di) for n in xs}}, Shard(d))
    c.add("partial", {**empty, **{n: P for n in xs}}, P)


def repeat_interleave(c: Ctx) -> None:
    x, repeats, dim = c.call.args["x"], c.call.args["repeats"], c.call.args["dim"]
    replicate(c)
    if not isinstance(repeats, int) or dim is None:
        return
    ins = shape(x)
    for d in range(len(ins)):
        if c.divisible(ins[d]):  # a contiguous block of the dim repeats into a contiguous block
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))
    c.add("partial", {x: P}, P)


def tuple_getitem(c: Ctx) -> None:
    x = c.call.args["x"]
    s = shape(c.call.node)
    replicate(c)
    for d in range(len(s)):
        if c.divisible(s[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))
    c.add("partial", {x: P}, P)

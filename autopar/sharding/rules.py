"""Placement rules per op kind: the legal tensor-parallel strategies of one node.

A :class:`Strategy` of a node says which placement each tensor input must have (parameters
included), which placement the op's own result then has, and which collectives the op performs
inside (vocabulary-parallel cross entropy). Moving a producer's placement to what a consumer
requires is a *resharding* (:mod:`autopar.sharding.reshard`), priced separately on the edge.

Placements are along the tensor-parallel axis of size ``tp``: ``Replicate()``, ``Shard(d)``
(``d`` non-negative here), ``Partial()``. The rules, by op family::

    pointwise    f(x, y) broadcasting        R,R->R   S(d),S(d')|R->S(d)   P+P->P  P*R->P (linear ops)
    reshape      view/reshape/flatten        S(i)->S(o) when i is the outermost non-1 dim of its
                                             reshape group and o that of the same group; P->P
    permute      transpose/permute           S(d)->S(perm(d)); P->P
    linear       x @ W.T + b                 column (R, W S(0), b S(0)) -> S(-1)
                                             row    (S(-1), W S(1), b R) -> P   (bias added on rank 0)
                                             batch  (S(d), W R) -> S(d);  (P, W R) -> P
    matmul       a @ b                       batch dims S->S; m: (S, R)->S; n: (R, S)->S; k: (S,S)->P
    embedding    W[idx]                      vocab (R, W S(0)) -> P (masked lookup); (R, W S(1)) -> S(-1)
    norm         layer_norm / rms_norm       S(d) for d not normalised, weights R
    softmax      over dim                    S(d) for d != dim
    dropout                                  R, S(d), P (mask drawn at full shape, see docs)
    reduction    sum / mean / amax ...       S(d) kept dims; sum/mean over a sharded dim -> P
    cross_entropy                            vocab-parallel: (S(1) logits, R target) -> R
                                             (3 all-reduces inside: max, sum of exp, target logit)
    conv         conv1d/2d/3d [N, C, *]      column (R, W S(0), b S(0)) -> S(1)
                                             row    (S(1), W S(1), b R) -> P   (bias added on rank 0)
                                             grouped (S(1), W S(0), b S(0)) -> S(1) when tp | groups
    pool         max/avg/adaptive pooling    S(d) for d not spatial; avg: P -> P
    batch_norm   per channel                 (S(1), W/b/running stats S(0)) -> S(1); no batch split
    group_norm   per sample, per group       S(0) -> S(0); S(1) -> S(1) when tp | groups

Every op also has the all-replicated strategy, so replicating is always legal. Ops without a rule
accept only that one; asking them for another placement raises :class:`PlanError` naming the op.
"""

from __future__ import annotations

import torch.fx

from autopar.core.plan import Shard
from autopar.sharding import view_rules as V
from autopar.sharding.ops import OpCall, shape
from autopar.sharding.strategy import Comm, Ctx, P, R, Strategy, norm_dim, replicate

__all__ = ["Comm", "Strategy", "call_strategies", "NO_PLACEMENT", "replicate_reason"]


# --------------------------------------------------------------------------------- pointwise
def _pointwise(c: Ctx) -> None:
    call = c.call
    out = call.out_shape
    donor = call.args.get("dtype_donor")
    tensors = [n for n in call.inputs]
    meta_only = {tensors[1]} if donor and len(tensors) > 1 else set()
    values = [n for n in tensors if n not in meta_only]
    base = {n: None for n in meta_only}
    c.add("replicate", {**base, **{n: R for n in values}}, R)
    for d in range(len(out)):
        if not c.divisible(out[d]):
            continue
        req = dict(base)
        for n in values:
            s = shape(n)
            k = d - (len(out) - len(s))
            req[n] = Shard(k) if k >= 0 and s[k] == out[d] else R
        if any(isinstance(p, Shard) for p in req.values()):
            c.add(f"shard({d})", req, Shard(d))
    _pointwise_partial(c, values, base)


def _pointwise_partial(c: Ctx, values: list, base: dict) -> None:
    call = c.call
    name = call.name
    scalars = [a for a in call.node.args if not isinstance(a, torch.fx.Node)]
    if call.args.get("linear_unary") and len(values) == 1:
        c.add("partial", {**base, values[0]: P}, P)
    elif name in ("add", "sub", "iadd", "isub") and len(values) == 2 and not call.node.kwargs.get("alpha"):
        c.add("partial", {values[0]: P, values[1]: P}, P)
    elif name in ("mul", "imul") and values:
        for i, n in enumerate(values):
            c.add(f"partial({i})", {m: (P if m is n else R) for m in values}, P)
    elif name in ("div", "truediv", "itruediv") and values and values[0] is call.node.args[0]:
        c.add("partial", {m: (P if m is values[0] else R) for m in values}, P)
    elif name == "neg" and len(values) == 1 and not scalars:
        c.add("partial", {values[0]: P}, P)


def _triu(c: Ctx) -> None:
    x = c.call.args["x"]
    replicate(c)
    s = shape(x)
    for d in range(len(s) - 2):
        if c.divisible(s[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))


# --------------------------------------------------------------------------------- matmuls
def _linear(c: Ctx) -> None:
    x, w, b = c.call.args["x"], c.call.args["w"], c.call.args.get("b")
    b = b if isinstance(b, torch.fx.Node) else None
    xs, (n_out, k) = shape(x), shape(w)
    last = len(c.call.out_shape) - 1
    replicate(c)
    if c.divisible(n_out):
        c.add("column", {x: R, w: Shard(0), **({b: Shard(0)} if b else {})}, Shard(last))
    if c.divisible(k):
        c.add(
            "row",
            {x: Shard(len(xs) - 1), w: Shard(1), **({b: R} if b else {})},
            P,
            exact_grad=[b] if b else [],
        )
    for d in range(len(xs) - 1):
        if c.divisible(xs[d]):
            c.add(f"batch({d})", {x: Shard(d), w: R, **({b: R} if b else {})}, Shard(d))
    c.add("partial", {x: P, w: R, **({b: R} if b else {})}, P, exact_grad=[b] if b else [])


def _addmm(c: Ctx) -> None:
    """``b + x @ w`` with ``w`` as ``[k, n]`` (HuggingFace Conv1D under export)."""
    b, x, w = c.call.args["b"], c.call.args["x"], c.call.args["w"]
    b = b if isinstance(b, torch.fx.Node) else None
    k, n_out = shape(w)
    bias_dims = len(shape(b)) if b is not None else 0
    replicate(c)
    if c.divisible(n_out):
        c.add("column", {x: R, w: Shard(1), **({b: Shard(bias_dims - 1)} if b else {})}, Shard(1))
    if c.divisible(k):
        c.add("row", {x: Shard(1), w: Shard(0), **({b: R} if b else {})}, P, exact_grad=[b] if b else [])
    if c.divisible(shape(x)[0]) and bias_dims < 2:
        c.add("batch(0)", {x: Shard(0), w: R, **({b: R} if b else {})}, Shard(0))
    c.add("partial", {x: P, w: R, **({b: R} if b else {})}, P, exact_grad=[b] if b else [])


def _matmul(c: Ctx) -> None:
    a, b = c.call.args["a"], c.call.args["b"]
    sa, sb, out = shape(a), shape(b), c.call.out_shape
    replicate(c)
    if len(sa) < 2 or len(sb) < 2:
        return
    no = len(out)
    for d in range(no - 2):  # batch dims, broadcast from the right
        if not c.divisible(out[d]):
            continue
        req = {}
        for n, s in ((a, sa), (b, sb)):
            k = d - (no - len(s))
            req[n] = Shard(k) if k >= 0 and s[k] == out[d] else R
        c.add(f"batch({d})", req, Shard(d))
    if c.divisible(sa[-2]):
        c.add("rows", {a: Shard(len(sa) - 2), b: R}, Shard(no - 2))
    if c.divisible(sb[-1]):
        c.add("cols", {a: R, b: Shard(len(sb) - 1)}, Shard(no - 1))
    if c.divisible(sa[-1]):
        c.add("contract", {a: Shard(len(sa) - 1), b: Shard(len(sb) - 2)}, P)
    if a is not b:
        c.add("partial(a)", {a: P, b: R}, P)
        c.add("partial(b)", {a: R, b: P}, P)


def _embedding(c: Ctx) -> None:
    idx, w = c.call.args["idx"], c.call.args["w"]
    vocab, hidden = shape(w)
    replicate(c)
    if c.divisible(vocab):
        c.add("vocab_parallel", {idx: R, w: Shard(0)}, P)
    if c.divisible(hidden):
        c.add("hidden_parallel", {idx: R, w: Shard(1)}, Shard(len(c.call.out_shape) - 1))
    for d, size in enumerate(shape(idx)):
        if c.divisible(size):
            c.add(f"batch({d})", {idx: Shard(d), w: R}, Shard(d))


def _optional(v: object) -> torch.fx.Node | None:
    return v if isinstance(v, torch.fx.Node) else None


def conv_channel_dim(call: OpCall) -> int:
    """Channel dim of a convolution's input and output: 1, or 0 for an unbatched input."""
    return len(shape(call.args["x"])) - (len(shape(call.args["w"])) - 2) - 1


def _conv(c: Ctx) -> None:
    """Output channels (column: weight dim 0, bias, output channels split), input channels
    (row: weight dim 1 split, partial sums; bias added once, on rank 0), whole groups (grouped and
    depthwise: input, weight and output split alike, each rank runs ``groups / tp`` groups)."""
    a = c.call.args
    x, w, b = a["x"], a["w"], _optional(a["b"])
    bias = {b: Shard(0)} if b else {}
    keep = {b: R} if b else {}
    ch, groups = conv_channel_dim(c.call), a["groups"]
    cout, cin = shape(w)[0], shape(x)[ch]
    replicate(c)
    if not isinstance(groups, int):
        return
    if groups == 1 and c.divisible(cout):
        c.add("column", {x: R, w: Shard(0), **bias}, Shard(ch))
    if groups == 1 and c.divisible(cin):
        c.add("row", {x: Shard(ch), w: Shard(1), **keep}, P, exact_grad=[b] if b else [])
    if groups > 1 and groups % c.tp == 0 and c.divisible(cout) and c.divisible(cin):
        c.add("grouped", {x: Shard(ch), w: Shard(0), **bias}, Shard(ch))
    if ch == 1 and c.divisible(shape(x)[0]):
        c.add("batch(0)", {x: Shard(0), w: R, **keep}, Shard(0))
    c.add("partial", {x: P, w: R, **keep}, P, exact_grad=[b] if b else [])


def _pool(c: Ctx) -> None:
    """Windows never cross channels or samples: every dim before the spatial ones keeps its shard;
    average pooling is linear (P -> P), max pooling is not."""
    x = c.call.args["x"]
    replicate(c)
    _keep_dims(c, x, set(range(len(shape(x)) - c.call.args["spatial"], len(shape(x)))))
    if c.call.args["linear"]:
        c.add("partial", {x: P}, P)


def _batch_norm(c: Ctx) -> None:
    """Statistics are per channel: a channel-split input normalises locally, its weight, bias and
    running statistics split alike. A batch split would change the statistics: no such strategy."""
    a = c.call.args
    x = a["x"]
    if len(shape(x)) < 2:
        return replicate(c)
    replicate(c)
    per_channel = [_optional(a[k]) for k in ("running_mean", "running_var", "w", "b")]
    if c.divisible(shape(x)[1]):
        c.add("channel", {x: Shard(1), **{n: Shard(0) for n in per_channel if n is not None}}, Shard(1))


def _group_norm(c: Ctx) -> None:
    """Per sample and per group: a batch split is local; a channel split is when each rank holds
    whole groups (``groups % tp == 0``), each running ``groups / tp`` of them."""
    a = c.call.args
    x, groups = a["x"], a["groups"]
    affine = [n for n in (_optional(a["w"]), _optional(a["b"])) if n is not None]
    replicate(c)
    if len(shape(x)) < 2:
        return
    if c.divisible(shape(x)[0]):
        c.add("batch(0)", {x: Shard(0), **{n: R for n in affine}}, Shard(0))
    if isinstance(groups, int) and groups % c.tp == 0 and c.divisible(shape(x)[1]):
        c.add("channel", {x: Shard(1), **{n: Shard(0) for n in affine}}, Shard(1))


def replicate_reason(call: OpCall, tp: int) -> str | None:
    """Why an op whose family has a rule still runs replicated (a case the rule leaves out), or None."""
    groups = call.args.get("groups")
    if tp == 1 or not isinstance(groups, int) or groups % tp == 0:
        return None
    if call.kind == "conv" and groups > 1:
        return f"grouped convolution (groups={groups}) does not split into tp={tp} whole groups"
    if call.kind == "group_norm":
        return f"group_norm with {groups} groups: a channel split would cut groups (batch split only)"
    return None


# --------------------------------------------------------------------------------- the rest
def _keep_dims(c: Ctx, x: torch.fx.Node, excluded: set[int], name: str = "shard") -> None:
    """S(d) -> S(d) for every dim ``d`` of ``x`` not in ``excluded``; other inputs replicated."""
    s = shape(x)
    for d in range(len(s)):
        if d not in excluded and c.divisible(s[d]):
            req = {n: R for n in c.call.inputs}
            req[x] = Shard(d)
            c.add(f"{name}({d})", req, Shard(d))


def _norm(c: Ctx) -> None:
    x = c.call.args["x"]
    nd = len(shape(x))
    replicate(c)
    _keep_dims(c, x, set(range(nd - c.call.args["normalized"], nd)))


def _softmax(c: Ctx) -> None:
    x, dim = c.call.args["x"], c.call.args["dim"]
    replicate(c)
    if isinstance(dim, int):
        _keep_dims(c, x, {norm_dim(dim, len(shape(x)))})


def _dropout(c: Ctx) -> None:
    x = c.call.args["x"]
    replicate(c)
    _keep_dims(c, x, set())
    c.add("partial", {x: P}, P)


def _rng_dropout(c: Ctx) -> None:
    x = c.call.args["x"]
    replicate(c)
    _keep_dims(c, x, {0})  # dim 0 is the sample dim the runtime's ids index


def _sdpa(c: Ctx) -> None:
    q, k, v, mask = (c.call.args[n] for n in ("q", "k", "v", "mask"))
    mask = mask if isinstance(mask, torch.fx.Node) else None
    replicate(c)
    sq = shape(q)
    for d in range(len(sq) - 2):  # batch and heads
        if not (c.divisible(sq[d]) and shape(k)[d] == sq[d] == shape(v)[d]):
            continue
        req = {q: Shard(d), k: Shard(d), v: Shard(d)}
        if mask is not None:
            sm = shape(mask)
            j = d - (len(sq) - len(sm))
            req[mask] = Shard(j) if j >= 0 and sm[j] == sq[d] else R
        c.add(f"shard({d})", req, Shard(d))


def _reduction(c: Ctx) -> None:
    x = c.call.args["x"]
    ins, out = shape(x), c.call.out_shape
    dims = c.call.args["dims"]
    reduced = set(range(len(ins))) if dims is None else {norm_dim(d, len(ins)) for d in dims}
    keep = len(out) == len(ins)
    replicate(c)
    for d in range(len(ins)):
        if d in reduced or not c.divisible(ins[d]):
            continue
        o = d if keep else d - sum(1 for r in reduced if r < d)
        c.add(f"shard({d})", {x: Shard(d)}, Shard(o))
    if c.call.name in ("sum", "mean"):
        for d in sorted(reduced):
            if c.divisible(ins[d]):
                c.add(f"reduce_shard({d})", {x: Shard(d)}, P)
        c.add("partial", {x: P}, P)


def _cross_entropy(c: Ctx) -> None:
    a = c.call.args
    x, target = a["x"], a["target"]
    replicate(c)
    sx = shape(x)
    if isinstance(a.get("weight"), torch.fx.Node) or a.get("label_smoothing"):
        return
    if len(sx) == 2 and c.divisible(sx[1]) and shape(target) == (sx[0],):
        row_bytes = sx[0] * 4
        comm = (
            Comm("all_reduce_max", row_bytes),
            Comm("all_reduce", row_bytes),
            Comm("all_reduce", row_bytes),
        )
        c.add("vocab_parallel", {x: Shard(1), target: R}, R, comm=comm)
    if c.divisible(sx[0]) and a["reduction"] in ("none", "sum"):
        c.add("batch(0)", {x: Shard(0), target: Shard(0)}, Shard(0) if a["reduction"] == "none" else P)


def _pointwise_loss(c: Ctx) -> None:
    x, target = c.call.args["x"], c.call.args["target"]
    replicate(c)
    if not isinstance(target, torch.fx.Node) or shape(x) != shape(target):
        return
    red = c.call.args["reduction"]
    for d, size in enumerate(shape(x)):
        if c.divisible(size):
            c.add(f"shard({d})", {x: Shard(d), target: Shard(d)}, Shard(d) if red == "none" else P)


def _like(c: Ctx) -> None:
    x = c.call.args["x"]
    others = {n: R for n in c.call.inputs if n is not x}
    c.add("replicate", {x: R, **others}, R)
    c.add("from_partial", {x: P, **others}, R)  # the shape of a partial sum is the full shape
    if c.call.args.get("random") or others:
        return
    for d, size in enumerate(shape(x)):
        if c.divisible(size):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))


def _new(c: Ctx) -> None:
    x = c.call.args["x"]
    c.add("replicate", {x: None, **{n: R for n in c.call.inputs if n is not x}}, R)


def _param(c: Ctx) -> None:
    c.add("replicate", {}, R)
    for d, size in enumerate(shape(c.call.node)):
        if c.divisible(size):
            c.add(f"shard({d})", {}, Shard(d))


def _output(c: Ctx) -> None:
    c.add("replicate", {n: R for n in c.call.inputs}, R)


_RULES = {
    "pointwise": _pointwise,
    "triu": _triu,
    "reshape": V.reshape,
    "expand": V.expand,
    "permute": V.permute,
    "split": V.split,
    "cat": V.cat,
    "repeat_interleave": V.repeat_interleave,
    "tuple_getitem": V.tuple_getitem,
    "linear": _linear,
    "addmm": _addmm,
    "matmul": _matmul,
    "embedding": _embedding,
    "conv": _conv,
    "pool": _pool,
    "batch_norm": _batch_norm,
    "group_norm": _group_norm,
    "norm": _norm,
    "softmax": _softmax,
    "dropout": _dropout,
    "rng_dropout": _rng_dropout,
    "sdpa": _sdpa,
    "reduction": _reduction,
    "cross_entropy": _cross_entropy,
    "pointwise_loss": _pointwise_loss,
    "like": _like,
    "new": _new,
    "param": _param,
    "output": _output,
}
NO_PLACEMENT = ("shape", "scalar", "attr")
"""Kinds whose result is not a tensor: no placement (shape queries, int arithmetic, flags)."""


def call_strategies(call: OpCall, tp: int, params: dict, value_irrelevant: bool = False) -> list[Strategy]:
    """All legal strategies of one parsed node (the first is always the all-replicated one)."""
    if call.kind in NO_PLACEMENT:
        return []
    c = Ctx(call, tp, params)
    if tp == 1:
        replicate(c)
        return c.out
    if call.kind in ("getitem", "select", "slice"):
        (V.getitem if call.kind == "getitem" else V.select)(c, value_irrelevant)
    elif call.kind in _RULES:
        _RULES[call.kind](c)
    else:  # placeholder, buffer, factory, other: replicated only
        replicate(c)
    return c.out

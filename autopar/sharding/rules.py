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

Every op also has the all-replicated strategy, so replicating is always legal. Ops without a rule
accept only that one; asking them for another placement raises :class:`PlanError` naming the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from autopar.plan import Partial, Placement, Replicate, Shard
from autopar.sharding.ops import OpCall, is_tensor, shape

R = Replicate()
P = Partial()


@dataclass(frozen=True)
class Comm:
    """One collective in the forward pass: ``kind`` and the bytes of the full (unsharded) tensor."""

    kind: str
    bytes: int


@dataclass(frozen=True)
class Strategy:
    """One legal way to run a node under tensor parallelism."""

    name: str
    inputs: tuple[Placement | None, ...]
    """Required placement of each tensor input (``OpCall.inputs`` order); None = only metadata read."""
    output: Placement
    """Placement of the op's own result (before any collective the plan adds after it)."""
    params: tuple[tuple[str, Placement], ...] = ()
    """Placement of each parameter input, by canonical parameter name."""
    comm: tuple[Comm, ...] = ()
    """Collectives the op performs inside (not the resharding of its inputs or output)."""
    exact_grad: frozenset[int] = field(default_factory=frozenset)
    """Replicated inputs whose gradient is already complete on every rank although the output is
    sharded (the rank-0 bias of a row-parallel linear); others get an all-reduce in backward."""
    compute_fraction: float = 1.0
    """Share of the op's FLOPs each rank runs."""

    @property
    def param_placements(self) -> dict[str, Placement]:
        return dict(self.params)

    @property
    def collective_bytes(self) -> int:
        return sum(c.bytes for c in self.comm)

    def grad_needs_all_reduce(self, i: int) -> bool:
        """Whether input ``i``'s gradient is a partial sum (replicated input, sharded computation)."""
        return self.inputs[i] == R and self.output != R and i not in self.exact_grad

    def __str__(self) -> str:
        ins = ", ".join("-" if p is None else str(p) for p in self.inputs)
        return f"{self.name}({ins}) -> {self.output}"


# --------------------------------------------------------------------------------- helpers
class _Ctx:
    """Builds strategies for one call: maps input nodes to required placements."""

    def __init__(self, call: OpCall, tp: int, params: dict):
        self.call, self.tp, self.params = call, tp, params
        self.out: list[Strategy] = []

    def divisible(self, size: int) -> bool:
        return size >= self.tp and size % self.tp == 0

    def add(self, name: str, req: dict, output: Placement, *, comm=(), exact_grad=(), frac=None) -> None:
        inputs = tuple(req.get(n, R) if n in req else R for n in self.call.inputs)
        for n in req:
            if n is not None and n not in self.call.inputs and isinstance(n, torch.fx.Node) and is_tensor(n):
                raise AssertionError(f"rule {name} names {n} which is not an input of {self.call.node}")
        params = tuple(
            (str(n.target), p)
            for n, p in zip(self.call.inputs, inputs)
            if n.op == "get_attr" and str(n.target) in self.params
        )
        if any(isinstance(p, Partial) for _, p in params):
            return  # a parameter is a whole tensor or a slice of one, never a pending sum
        exact = frozenset(self.call.inputs.index(n) for n in exact_grad if n in self.call.inputs)
        if frac is None:
            sharded = output != R or any(p not in (R, None) for p in inputs)
            frac = 1.0 / self.tp if sharded else 1.0
        s = Strategy(name, inputs, output, params, tuple(comm), exact, frac)
        if s not in self.out:
            self.out.append(s)


def _nodes(*values) -> list[torch.fx.Node]:
    return [v for v in values if isinstance(v, torch.fx.Node) and is_tensor(v)]


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _replicate(c: _Ctx) -> None:
    c.add("replicate", {n: R for n in c.call.inputs}, R)


# --------------------------------------------------------------------------------- pointwise
def _pointwise(c: _Ctx) -> None:
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


def _pointwise_partial(c: _Ctx, values: list, base: dict) -> None:
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


def _triu(c: _Ctx) -> None:
    x = c.call.args["x"]
    _replicate(c)
    s = shape(x)
    for d in range(len(s) - 2):
        if c.divisible(s[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))


# --------------------------------------------------------------------------------- views
def reshape_dim_map(in_shape, out_shape) -> dict[int, int]:
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


def _reshape(c: _Ctx) -> None:
    x = c.call.args["x"]
    others = {n: None for n in c.call.inputs if n is not x}  # view_as/reshape_as: shape donor
    c.add("replicate", {x: R, **others}, R)
    ins, outs = shape(x), c.call.out_shape
    for di, do in reshape_dim_map(ins, outs).items():
        if c.divisible(ins[di]) and c.divisible(outs[do]):
            c.add(f"shard({di}->{do})", {x: Shard(di), **others}, Shard(do))
    c.add("partial", {x: P, **others}, P)


def _expand(c: _Ctx) -> None:
    x = c.call.args["x"]
    others = {n: None for n in c.call.inputs if n is not x}
    c.add("replicate", {x: R, **others}, R)
    ins, outs = shape(x), c.call.out_shape
    off = len(outs) - len(ins)
    for d in range(len(ins)):
        if ins[d] == outs[d + off] and c.divisible(ins[d]):
            c.add(f"shard({d})", {x: Shard(d), **others}, Shard(d + off))
    c.add("partial", {x: P, **others}, P)


def permutation(call: OpCall) -> list[int]:
    """Output dim o reads input dim perm[o]."""
    nd = call.ndim
    if "dims" in call.args:
        return [_norm_dim(int(d), nd) for d in call.args["dims"]]
    d0, d1 = (_norm_dim(int(d), nd) for d in call.args["swap"])
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _permute(c: _Ctx) -> None:
    x = c.call.args["x"]
    _replicate(c)
    ins = shape(x)
    for o, i in enumerate(permutation(c.call)):
        if c.divisible(ins[i]):
            c.add(f"shard({i}->{o})", {x: Shard(i)}, Shard(o))
    c.add("partial", {x: P}, P)


def getitem_dim_map(in_shape, index) -> tuple[dict[int, int], set[int]] | None:
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


def _getitem(c: _Ctx, value_irrelevant: bool) -> None:
    x = c.call.args["x"]
    _replicate(c)
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


def _select(c: _Ctx, value_irrelevant: bool) -> None:
    x = c.call.args["x"]
    ins = shape(x)
    dim = _norm_dim(int(c.call.args["dim"]), len(ins))
    _replicate(c)
    drops = c.call.kind == "select"  # select removes the dim, slice/narrow keep it
    for d in range(len(ins)):
        if d != dim and c.divisible(ins[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d - 1 if drops and d > dim else d))
    c.add("partial", {x: P}, P)
    if value_irrelevant and c.divisible(ins[dim]) and c.call.kind == "select":
        c.add(f"shape_only({dim})", {x: Shard(dim)}, R)


def _split(c: _Ctx) -> None:
    x = c.call.args["x"]
    ins = shape(x)
    dim = _norm_dim(int(c.call.args["dim"]), len(ins))
    unbind = c.call.args.get("unbind")
    _replicate(c)
    for d in range(len(ins)):
        if d != dim and c.divisible(ins[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d - 1 if unbind and d > dim else d))
    c.add("partial", {x: P}, P)


def _cat(c: _Ctx) -> None:
    tensors = _nodes(*c.call.args["xs"])
    # torch.cat skips 1-D empty tensors whatever the dims of the rest (HF caches start as one).
    empty = {n: None for n in tensors if shape(n) == (0,)}
    xs = [n for n in tensors if n not in empty]
    c.add("replicate", {**empty, **{n: R for n in xs}}, R)
    out = c.call.out_shape
    dim = _norm_dim(int(c.call.args["dim"]), len(out))
    stack = c.call.args["stack"]
    for d in range(len(out)):
        if d == dim or not c.divisible(out[d]):
            continue
        di = d - 1 if stack and d > dim else d
        c.add(f"shard({d})", {**empty, **{n: Shard(di) for n in xs}}, Shard(d))
    c.add("partial", {**empty, **{n: P for n in xs}}, P)


def _repeat_interleave(c: _Ctx) -> None:
    x, repeats, dim = c.call.args["x"], c.call.args["repeats"], c.call.args["dim"]
    _replicate(c)
    if not isinstance(repeats, int) or dim is None:
        return
    ins = shape(x)
    for d in range(len(ins)):
        if c.divisible(ins[d]):  # a contiguous block of the dim repeats into a contiguous block
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))
    c.add("partial", {x: P}, P)


def _tuple_getitem(c: _Ctx) -> None:
    x = c.call.args["x"]
    s = shape(c.call.node)
    _replicate(c)
    for d in range(len(s)):
        if c.divisible(s[d]):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))
    c.add("partial", {x: P}, P)


# --------------------------------------------------------------------------------- matmuls
def _linear(c: _Ctx) -> None:
    x, w, b = c.call.args["x"], c.call.args["w"], c.call.args.get("b")
    b = b if isinstance(b, torch.fx.Node) else None
    xs, (n_out, k) = shape(x), shape(w)
    last = len(c.call.out_shape) - 1
    _replicate(c)
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


def _addmm(c: _Ctx) -> None:
    """``b + x @ w`` with ``w`` as ``[k, n]`` (HuggingFace Conv1D under export)."""
    b, x, w = c.call.args["b"], c.call.args["x"], c.call.args["w"]
    b = b if isinstance(b, torch.fx.Node) else None
    k, n_out = shape(w)
    bias_dims = len(shape(b)) if b is not None else 0
    _replicate(c)
    if c.divisible(n_out):
        c.add("column", {x: R, w: Shard(1), **({b: Shard(bias_dims - 1)} if b else {})}, Shard(1))
    if c.divisible(k):
        c.add("row", {x: Shard(1), w: Shard(0), **({b: R} if b else {})}, P, exact_grad=[b] if b else [])
    if c.divisible(shape(x)[0]) and bias_dims < 2:
        c.add("batch(0)", {x: Shard(0), w: R, **({b: R} if b else {})}, Shard(0))
    c.add("partial", {x: P, w: R, **({b: R} if b else {})}, P, exact_grad=[b] if b else [])


def _matmul(c: _Ctx) -> None:
    a, b = c.call.args["a"], c.call.args["b"]
    sa, sb, out = shape(a), shape(b), c.call.out_shape
    _replicate(c)
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


def _embedding(c: _Ctx) -> None:
    idx, w = c.call.args["idx"], c.call.args["w"]
    vocab, hidden = shape(w)
    _replicate(c)
    if c.divisible(vocab):
        c.add("vocab_parallel", {idx: R, w: Shard(0)}, P)
    if c.divisible(hidden):
        c.add("hidden_parallel", {idx: R, w: Shard(1)}, Shard(len(c.call.out_shape) - 1))
    for d, size in enumerate(shape(idx)):
        if c.divisible(size):
            c.add(f"batch({d})", {idx: Shard(d), w: R}, Shard(d))


# --------------------------------------------------------------------------------- the rest
def _keep_dims(c: _Ctx, x, excluded: set[int], name: str = "shard") -> None:
    """S(d) -> S(d) for every dim ``d`` of ``x`` not in ``excluded``; other inputs replicated."""
    s = shape(x)
    for d in range(len(s)):
        if d not in excluded and c.divisible(s[d]):
            req = {n: R for n in c.call.inputs}
            req[x] = Shard(d)
            c.add(f"{name}({d})", req, Shard(d))


def _norm(c: _Ctx) -> None:
    x = c.call.args["x"]
    nd = len(shape(x))
    _replicate(c)
    _keep_dims(c, x, set(range(nd - c.call.args["normalized"], nd)))


def _softmax(c: _Ctx) -> None:
    x, dim = c.call.args["x"], c.call.args["dim"]
    _replicate(c)
    if isinstance(dim, int):
        _keep_dims(c, x, {_norm_dim(dim, len(shape(x)))})


def _dropout(c: _Ctx) -> None:
    x = c.call.args["x"]
    _replicate(c)
    _keep_dims(c, x, set())
    c.add("partial", {x: P}, P)


def _rng_dropout(c: _Ctx) -> None:
    x = c.call.args["x"]
    _replicate(c)
    _keep_dims(c, x, {0})  # dim 0 is the sample dim the runtime's ids index


def _sdpa(c: _Ctx) -> None:
    q, k, v, mask = (c.call.args[n] for n in ("q", "k", "v", "mask"))
    mask = mask if isinstance(mask, torch.fx.Node) else None
    _replicate(c)
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


def _reduction(c: _Ctx) -> None:
    x = c.call.args["x"]
    ins, out = shape(x), c.call.out_shape
    dims = c.call.args["dims"]
    reduced = set(range(len(ins))) if dims is None else {_norm_dim(d, len(ins)) for d in dims}
    keep = len(out) == len(ins)
    _replicate(c)
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


def _cross_entropy(c: _Ctx) -> None:
    a = c.call.args
    x, target = a["x"], a["target"]
    _replicate(c)
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


def _pointwise_loss(c: _Ctx) -> None:
    x, target = c.call.args["x"], c.call.args["target"]
    _replicate(c)
    if not isinstance(target, torch.fx.Node) or shape(x) != shape(target):
        return
    red = c.call.args["reduction"]
    for d, size in enumerate(shape(x)):
        if c.divisible(size):
            c.add(f"shard({d})", {x: Shard(d), target: Shard(d)}, Shard(d) if red == "none" else P)


def _like(c: _Ctx) -> None:
    x = c.call.args["x"]
    others = {n: R for n in c.call.inputs if n is not x}
    c.add("replicate", {x: R, **others}, R)
    c.add("from_partial", {x: P, **others}, R)  # the shape of a partial sum is the full shape
    if c.call.args.get("random") or others:
        return
    for d, size in enumerate(shape(x)):
        if c.divisible(size):
            c.add(f"shard({d})", {x: Shard(d)}, Shard(d))


def _new(c: _Ctx) -> None:
    x = c.call.args["x"]
    c.add("replicate", {x: None, **{n: R for n in c.call.inputs if n is not x}}, R)


def _param(c: _Ctx) -> None:
    c.add("replicate", {}, R)
    for d, size in enumerate(shape(c.call.node)):
        if c.divisible(size):
            c.add(f"shard({d})", {}, Shard(d))


def _output(c: _Ctx) -> None:
    c.add("replicate", {n: R for n in c.call.inputs}, R)


_RULES = {
    "pointwise": _pointwise,
    "triu": _triu,
    "reshape": _reshape,
    "expand": _expand,
    "permute": _permute,
    "split": _split,
    "cat": _cat,
    "repeat_interleave": _repeat_interleave,
    "tuple_getitem": _tuple_getitem,
    "linear": _linear,
    "addmm": _addmm,
    "matmul": _matmul,
    "embedding": _embedding,
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
    c = _Ctx(call, tp, params)
    if tp == 1:
        _replicate(c)
        return c.out
    if call.kind in ("getitem", "select", "slice"):
        (_getitem if call.kind == "getitem" else _select)(c, value_irrelevant)
    elif call.kind in _RULES:
        _RULES[call.kind](c)
    else:  # placeholder, buffer, factory, other: replicated only
        _replicate(c)
    return c.out

"""The strategy of one node and the builder the rules use.

A :class:`Strategy` of a node says which placement each tensor input must have (parameters
included), which placement the op's own result then has, and which collectives the op performs
inside. The per-op rules live in :mod:`autopar.sharding.rules` (and ``view_rules``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from autopar.core.plan import Partial, Placement, Replicate
from autopar.sharding.ops import OpCall, is_tensor

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
class Ctx:
    """Builds strategies for one call: maps input nodes to required placements."""

    def __init__(self, call: OpCall, tp: int, params: dict):
        self.call, self.tp, self.params = call, tp, params
        self.out: list[Strategy] = []

    def divisible(self, size: int) -> bool:
        return size >= self.tp and size % self.tp == 0

    def add(
        self,
        name: str,
        req: dict,
        output: Placement,
        *,
        comm: Iterable[Comm] = (),
        exact_grad: Iterable[torch.fx.Node] = (),
        frac: float | None = None,
    ) -> None:
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


def tensor_nodes(*values: Any) -> list[torch.fx.Node]:
    return [v for v in values if isinstance(v, torch.fx.Node) and is_tensor(v)]


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def replicate(c: Ctx) -> None:
    c.add("replicate", {n: R for n in c.call.inputs}, R)

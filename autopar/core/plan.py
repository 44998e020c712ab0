"""The plan: plain, versioned data that the planner writes and the compiler reads.

A plan says how one training (or inference) step is split over a device mesh:

* ``mesh``: the mesh axes, outermost first. Axes are a list (``dp``, ``pp``, ``tp``; ``cp`` later),
  not three hard-coded fields; expert parallelism is the field ``ep``, folded into dp. Rank layout
  is row-major over the axes, so the last axis (``tp``) is innermost and stays inside a node. Example, 8 ranks, ``dp=2, pp=2, tp=2``::

      rank = ((dp_i * pp) + pp_i) * tp + tp_i
      tp groups  [[0,1],[2,3],[4,5],[6,7]]
      pp groups  [[0,2],[1,3],[4,6],[5,7]]
      dp groups  [[0,4],[1,5],[2,6],[3,7]]

* the pipeline: micro-batch size and count, schedule, virtual stages, and which stage (virtual
  stage, for interleaved schedules) each repeated block instance runs on;
* memory knobs: activation recompute, sequence parallelism, ZeRO stage;
* ``ep``: the expert-parallel degree, folded into dp (``groups("ep")``, ``groups("edp")``);
* ``placements``: per graph node, the tensor-parallel placement of its output and parameters in
  DTensor's vocabulary (``Replicate()``, ``Shard(dim)``, ``Partial()``);
* ``predicted``: what the cost model expects (filled by the planner / estimator).

Everything round-trips through JSON (``to_json`` / ``from_json``) and a hand-written plan
(``Plan.manual(dp=2, tp=2)``) is as valid as a planned one.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from autopar.core.errors import PlanError
from autopar.core.explain import explain_text
from autopar.core.text import gb_text, seconds_text

PLAN_VERSION = 1
SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")
MODES = ("train", "inference")
AXIS_ORDER = ("dp", "pp", "ep", "cp", "tp")  # outermost first; tp innermost


# --------------------------------------------------------------------------------- placements
@dataclass(frozen=True)
class Replicate:
    """Every rank of the axis holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Each rank of the axis holds one equal slice along tensor dim ``dim``."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Partial:
    """Each rank holds a partial sum; the full tensor is their sum (pending all-reduce)."""

    def __str__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial


def parse_placement(text: str) -> Placement:
    """Inverse of ``str(placement)``: ``"R"``, ``"P"``, ``"S(1)"``."""
    text = text.strip()
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    if text.startswith("S(") and text.endswith(")") and text[2:-1].lstrip("-").isdigit():
        return Shard(int(text[2:-1]))
    raise PlanError(f"placement {text!r} is not one of R, P, S(dim)")


@dataclass(kw_only=True)
class NodePlacement:
    """Placement of one graph node along the tensor-parallel axis."""

    output: Placement = field(default_factory=Replicate)
    """Placement of the node's output."""
    params: dict[str, Placement] = field(default_factory=dict)
    """Placement of each parameter the node reads, by parameter name."""
    collective: str | None = None
    """Collective inserted after the node (``all_reduce``, ``all_gather``, ``reduce_scatter``...)."""
    comms: list[dict[str, Any]] = field(default_factory=list)
    """Every collective the placements imply at this node, as the planner costed them:
    ``{"kind": "all_reduce", "bytes": full_tensor_bytes, "phase": "fwd" | "bwd"}`` (resharding of
    its inputs and the backward partners, collectives inside the op, gradient reductions). Empty for
    hand-written placements: the estimator then derives them from ``collective``."""

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"output": str(self.output)}
        if self.params:
            d["params"] = {k: str(v) for k, v in self.params.items()}
        if self.collective:
            d["collective"] = self.collective
        if self.comms:
            d["comms"] = [dict(c) for c in self.comms]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> NodePlacement:
        try:
            return cls(
                output=parse_placement(d.get("output", "R")),
                params={k: parse_placement(v) for k, v in d.get("params", {}).items()},
                collective=d.get("collective"),
                comms=list(d.get("comms", [])),
            )
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------- mesh
@dataclass(frozen=True)
class MeshAxis:
    name: str
    size: int


def rank_groups(mesh: list[MeshAxis], axis: str) -> list[list[int]]:
    """Ranks that differ only in their coordinate on ``axis`` (row-major layout)."""
    sizes = [a.size for a in mesh]
    names = [a.name for a in mesh]
    k = names.index(axis)
    others = [range(s) if i != k else [0] for i, s in enumerate(sizes)]
    groups = []
    for coord in itertools.product(*others):
        group = []
        for j in range(sizes[k]):
            c = list(coord)
            c[k] = j
            group.append(_flat(c, sizes))
        groups.append(group)
    return groups


def _flat(coord: list[int], sizes: list[int]) -> int:
    r = 0
    for c, s in zip(coord, sizes):
        r = r * s + c
    return r


# ------------------------------------------------------------------------------------- costs
@dataclass(kw_only=True)
class PredictedCost:
    """What the cost model expects of a plan; all times in seconds, memory in bytes."""

    step_time_s: float
    breakdown_s: dict[str, float] = field(default_factory=dict)
    """Step time by component: compute, tp_comm, pp_bubble, pp_p2p, dp_comm_exposed, optimizer, ..."""
    tokens_per_s: float = 0.0
    model_flops_per_step: float = 0.0
    """FLOPs of one step without recompute (the MFU numerator)."""
    hardware_flops_per_step: float = 0.0
    """FLOPs actually executed, recompute included."""
    mfu: float = 0.0
    """model_flops_per_step / (step_time_s * devices * peak FLOP/s)."""
    memory_bytes_per_device: float = 0.0
    """The largest per-device memory over all ranks."""
    memory_breakdown_bytes: dict[str, float] = field(default_factory=dict)
    memory_capacity_bytes: float = 0.0
    fits: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        """One line for ``print(autopar.estimate(...))``; ``repr`` keeps every field."""
        fits = "fits" if self.fits else "does NOT fit"
        return (
            f"step {seconds_text(self.step_time_s)}, {self.tokens_per_s:,.0f} tokens/s, "
            f"MFU {100 * self.mfu:.1f}%, memory {gb_text(self.memory_bytes_per_device, '.3g')} "
            f"of {gb_text(self.memory_capacity_bytes, '.3g')} per device ({fits})"
        )


def _mesh_from(mesh: Any) -> list[MeshAxis]:
    if not isinstance(mesh, list) or not mesh:
        raise PlanError("plan field 'mesh' must be a non-empty list of {name, size} objects")
    out = []
    for i, axis in enumerate(mesh):
        if not isinstance(axis, dict):
            raise PlanError(f"plan field mesh[{i}] must be an object with 'name' and 'size'")
        for key in ("name", "size"):
            if key not in axis:
                raise PlanError(f"plan field mesh[{i}] is missing {key!r}")
        out.append(MeshAxis(axis["name"], axis["size"]))
    return out


def _predicted_from(d: Any) -> PredictedCost:
    if not isinstance(d, dict):
        raise PlanError("plan field 'predicted' must be an object")
    known = {f.name for f in fields(PredictedCost)}
    unknown = set(d) - known
    if unknown:
        raise PlanError(
            f"plan field 'predicted' has unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
        )
    if "step_time_s" not in d:
        raise PlanError("plan field 'predicted' is missing 'step_time_s'")
    return PredictedCost(**d)


# -------------------------------------------------------------------------------------- plan
@dataclass(kw_only=True)
class Plan:
    """How to split one step over the cluster. See the module docstring."""

    mesh: list[MeshAxis]
    """Mesh axes, outermost first; the product of sizes is the number of ranks."""
    global_batch: int
    """Sequences (samples) per optimizer step across all data-parallel ranks."""
    micro_batch_size: int
    """Samples per micro-batch on one pipeline."""
    mode: str = "train"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved schedule); 1 otherwise."""
    recompute: str = "none"
    sequence_parallel: bool = False
    zero_stage: int = 0
    ep: int = 1
    """Expert-parallel degree, folded into dp: each dp group splits into dp/ep replicas of ep
    consecutive ranks that shard the experts of every MoE layer (E/ep each) and exchange tokens
    with all-to-all; expert gradients are reduced over the dp/ep ranks holding the same experts
    (``groups("edp")``). 1: experts replicated like every other parameter."""
    layer_stages: list[int] | None = None
    """Stage (virtual stage for interleaved) of each repeated-block instance, in order.
    ``None`` = split the blocks evenly. The stem goes with the first block, the head with the last."""
    placements: dict[str, NodePlacement] = field(default_factory=dict)
    """Tensor-parallel placement per graph node name. Empty = the default placements derived by the
    sharding rules (Megatron's layout on transformers). Nodes not listed follow their inputs:
    replicated when their inputs are, otherwise sharded like them (no gather is forced)."""
    predicted: PredictedCost | None = None
    search: dict[str, Any] | None = None
    """What the planner considered: ``alternatives`` (runner-ups with their costs and why they
    lost), ``rejected`` (notable configurations that did not fit or were invalid, with the reason)
    and ``stats`` (space size, plans costed, pruned, solve time, status)."""
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.mesh = [a if isinstance(a, MeshAxis) else MeshAxis(**a) for a in self.mesh]
        names = [a.name for a in self.mesh]
        if len(set(names)) != len(names):
            raise PlanError(f"mesh axes {names} repeat a name; each axis appears once")
        for a in self.mesh:
            if a.name not in AXIS_ORDER:
                raise PlanError(f"mesh axis {a.name!r} is unknown; known axes: {', '.join(AXIS_ORDER)}")
            if not isinstance(a.size, int) or a.size < 1:
                raise PlanError(f"mesh axis {a.name}={a.size!r}: must be a positive integer")
        if self.mode not in MODES:
            raise PlanError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"recompute={self.recompute!r}: choose one of {', '.join(RECOMPUTE)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanError(f"zero={self.zero_stage!r}: ZeRO stage must be 0, 1, 2 or 3")
        if self.virtual_stages < 1:
            raise PlanError(f"vpp={self.virtual_stages}: virtual stages must be >= 1")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise PlanError(
                f"vpp={self.virtual_stages} needs schedule=interleaved (got {self.schedule}); "
                "set schedule=interleaved or vpp=1"
            )
        if self.sequence_parallel and self.tp == 1:
            raise PlanError("sp=1 needs tp > 1: sequence parallelism splits along the tensor-parallel axis")
        if self.micro_batch_size < 1:
            raise PlanError(f"mbs={self.micro_batch_size}: micro-batch size must be >= 1")
        if isinstance(self.ep, bool) or not isinstance(self.ep, int) or self.ep < 1:
            raise PlanError(f"ep={self.ep!r}: the expert-parallel degree must be a whole number >= 1")
        if self.dp % self.ep:
            raise PlanError(
                f"ep={self.ep} does not divide dp={self.dp}: expert parallelism folds into data "
                f"parallelism (each dp group splits into dp/ep replicas of ep ranks); choose ep in "
                f"{[d for d in range(1, self.dp + 1) if self.dp % d == 0]} or a larger dp"
            )
        per_pipeline = self.global_batch / self.dp
        if self.global_batch % self.dp or (self.global_batch // self.dp) % self.micro_batch_size:
            raise PlanError(
                f"global batch {self.global_batch} does not split into dp={self.dp} pipelines of "
                f"micro-batches of {self.micro_batch_size} (per pipeline: {per_pipeline:g}); "
                f"choose mbs dividing {self.global_batch // self.dp if self.global_batch % self.dp == 0 else 'B/dp'} "
                "or a global batch divisible by dp*mbs"
            )

    # -- mesh helpers
    def degree(self, axis: str) -> int:
        for a in self.mesh:
            if a.name == axis:
                return a.size
        return 1

    @property
    def dp(self) -> int:
        return self.degree("dp")

    @property
    def tp(self) -> int:
        return self.degree("tp")

    @property
    def pp(self) -> int:
        return self.degree("pp")

    @property
    def world_size(self) -> int:
        return math.prod(a.size for a in self.mesh)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch_size)

    def ep_index(self, rank: int) -> int:
        """``rank``'s position in its expert-parallel group (which E/ep experts it holds)."""
        return self.coords(rank).get("dp", 0) % self.ep

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of ``rank``, e.g. ``{'dp': 1, 'pp': 0, 'tp': 1}``."""
        out = {}
        for a in reversed(self.mesh):
            out[a.name] = rank % a.size
            rank //= a.size
        return {a.name: out[a.name] for a in self.mesh}

    def groups(self, axis: str) -> list[list[int]]:
        """Rank groups along ``axis``; a single-rank group per rank if the axis is absent.

        ``ep`` and ``edp`` split each dp group (in dp order): ``ep`` groups are ``ep`` consecutive
        members, ``edp`` groups the members with the same position in their ep group. Example,
        ``dp=4, ep=2`` on 4 ranks: ep ``[[0,1],[2,3]]``, edp ``[[0,2],[1,3]]``."""
        if axis in ("ep", "edp"):
            out = []
            for g in self.groups("dp"):
                blocks = [g[i : i + self.ep] for i in range(0, len(g), self.ep)]
                out += blocks if axis == "ep" else [list(col) for col in zip(*blocks)]
            return out
        if axis not in [a.name for a in self.mesh]:
            return [[r] for r in range(self.world_size)]
        return rank_groups(self.mesh, axis)

    def stage_of_layers(self, num_layers: int) -> list[int]:
        """Stage (virtual stage) of each pipeline unit (a repeated block or, in a model without
        indexed modules, a child module: :mod:`autopar.tracing.blocks`); the even split when
        ``layer_stages`` is None."""
        if self.layer_stages is not None:
            if len(self.layer_stages) != num_layers:
                raise PlanError(
                    f"layer_stages has {len(self.layer_stages)} entries but the model has "
                    f"{num_layers} pipeline units (repeated blocks, or child modules); give one stage per unit"
                )
            return list(self.layer_stages)
        n_stages = self.pp * self.virtual_stages
        if num_layers < n_stages:
            raise PlanError(
                f"{num_layers} pipeline units (layers) cannot fill pp*vpp={n_stages} stages; "
                f"choose pp*vpp <= {num_layers}"
            )
        base, extra = divmod(num_layers, n_stages)
        out = []
        for s in range(n_stages):
            out += [s] * (base + (1 if s < extra else 0))
        return out

    # -- construction
    @classmethod
    def manual(
        cls,
        *,
        dp: int = 1,
        tp: int = 1,
        pp: int = 1,
        global_batch: int,
        micro_batch_size: int | None = None,
        axis_order: tuple[str, ...] = ("dp", "pp", "tp"),
        **kwargs: Any,
    ) -> Plan:
        """A hand-written plan. Axes of size 1 are kept so coordinates are always defined.

        ``axis_order``: outermost first. The default keeps tp inside a node and data-parallel
        replicas apart; ``("pp", "dp", "tp")`` gives each pipeline stage a contiguous block of
        ranks, i.e. its own nodes (what a cluster with two device kinds wants)."""
        sizes = {"dp": dp, "pp": pp, "tp": tp}
        if sorted(axis_order) != sorted(sizes):
            raise PlanError(f"axis_order={axis_order!r} must order exactly the axes dp, pp, tp")
        mesh = [MeshAxis(name, sizes[name]) for name in axis_order]
        if micro_batch_size is None:
            micro_batch_size = max(1, global_batch // (dp * max(pp, 1)))
        return cls(mesh=mesh, global_batch=global_batch, micro_batch_size=micro_batch_size, **kwargs)

    # -- serialisation
    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "version": self.version,
            "mesh": [{"name": a.name, "size": a.size} for a in self.mesh],
        }
        for f in fields(self):
            if f.name in ("version", "mesh", "placements", "predicted", "search"):
                continue
            if f.name == "ep" and self.ep == 1:
                continue  # plans without experts read as they always did
            d[f.name] = getattr(self, f.name)
        d["placements"] = {k: v.to_dict() for k, v in self.placements.items()}
        d["predicted"] = asdict(self.predicted) if self.predicted else None
        d["search"] = self.search
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise PlanError(
                f"plan version {version!r} is not supported (this autopar reads version "
                f"{PLAN_VERSION}); re-create the plan with `autopar plan`"
            )
        for required in ("mesh", "global_batch", "micro_batch_size"):
            if required not in d:
                raise PlanError(f"plan is missing the field {required!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"plan has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(d)
        kwargs["mesh"] = _mesh_from(d["mesh"])
        kwargs["placements"] = {
            k: NodePlacement.from_dict(v, f"placements[{k!r}]") for k, v in d.get("placements", {}).items()
        }
        if d.get("predicted"):
            kwargs["predicted"] = _predicted_from(d["predicted"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def summary(self) -> str:
        """One line: ``dp=2 tp=2 pp=1 mbs=4 m=2 1f1b recompute=none sp=0 zero=0``."""
        axes = " ".join(f"{a.name}={a.size}" for a in self.mesh)
        vpp = f" vpp={self.virtual_stages}" if self.virtual_stages > 1 else ""
        axes += f" (ep={self.ep} in dp)" if self.ep > 1 else ""
        return (
            f"{axes} mbs={self.micro_batch_size} m={self.num_micro_batches} {self.schedule}{vpp} "
            f"recompute={self.recompute} sp={int(self.sequence_parallel)} zero={self.zero_stage}"
        )

    def explain(self) -> str:
        """Why this plan: its cost breakdown against the runner-ups, and why notable alternatives
        lost or did not fit (a table for terminals)."""
        return explain_text(self)

    def __repr__(self) -> str:
        return f"Plan({self.summary()})"

"""The program of one rank: its pipeline stage of its tensor-parallel graph, plus the bookkeeping
that maps its local parameters back to the full model.

    traced graph ──lower(tp rank)──> per-rank graph ──split_module──> segments ──> stage of this rank

Built without any process group (``tp_group=None``), so ``rank_code(r)`` can show any rank's
program from one process; the runtime builds the same program with real groups.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.distributed import ProcessGroup

from autopar.core.errors import PlanError
from autopar.core.plan import Plan
from autopar.lower.collectives import TPContext
from autopar.lower.expert import ep_context, lower_experts
from autopar.lower.invariants import check_enabled, check_program, mutation_counts
from autopar.lower.segments import Units, find_units, split_segments, stage_of_segments
from autopar.lower.stages import StageModule, build_stage
from autopar.lower.tensor_parallel import lower_tensor_parallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """How a local parameter relates to the full one: chunk ``index`` of ``num_shards`` along ``dim``
    (tensor parallelism), of the chunk ``ep_index`` of ``ep_shards`` along ``ep_dim`` (expert
    parallelism: routed experts, :mod:`autopar.lower.expert`)."""

    dim: int | None = None
    num_shards: int = 1
    index: int = 0
    ep_dim: int | None = None
    ep_shards: int = 1
    ep_index: int = 0

    @property
    def is_expert(self) -> bool:
        """Split over the ep group: its gradient is reduced over edp, not dp."""
        return self.ep_dim is not None and self.ep_shards > 1


@dataclass
class ParamSlot:
    """Where a parameter lives on this rank: ``getattr(owner, attr)`` (survives FSDP re-registration)."""

    full_name: str
    """Name in the traced graph (``model.layers.0.attn.q_proj.weight``)."""
    owner: nn.Module
    attr: str
    shard: Shard = field(default_factory=Shard)

    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)


@dataclass
class LoweredGraph:
    """What the tensor-parallel lowering returns (``tp == 1``: the graph unchanged)."""

    gm: torch.fx.GraphModule
    shards: dict[str, Shard]
    code: str


@dataclass
class RankProgram:
    rank: int
    coords: dict[str, int]
    lowered: LoweredGraph
    split: torch.fx.GraphModule
    blocks: Units | None
    """The pipeline units (the tracer's, :func:`autopar.lower.segments.find_units`); None: no cut."""
    stage_of_segment: list[int]
    stages: list[StageModule]
    """This rank's stages, in order: one, or ``vpp`` virtual stages ``pp_index + k*pp`` (interleaved)."""
    slots: list[ParamSlot]
    params_by_stage: list[set[str]]
    """Full names of the parameters each (virtual) pipeline stage holds (tied weights across stages)."""

    @property
    def stage(self) -> StageModule:
        """This rank's first (usually only) stage."""
        return self.stages[0]

    @property
    def block_segments(self) -> set[int]:
        return set(range(1, self.blocks.count + 1)) if self.blocks else set()

    def tie_ranks(self, name: str) -> list[int]:
        """The pipeline ranks whose stages hold parameter ``name`` (virtual stage ``v`` runs on
        pipeline rank ``v % pp``), sorted."""
        pp = len(self.params_by_stage) // len(self.stages)
        return sorted({v % pp for v, names in enumerate(self.params_by_stage) if name in names})

    def local_param(self, name: str) -> torch.Tensor:
        """This rank's (tensor-parallel) shard of parameter ``name``, held by its stages or not:
        its shape is what a rank without the weight contributes to a sum over the pipeline."""
        full = self.lowered.gm.meta.get("autopar_full_names", {})
        local = {full.get(n, n): p for n, p in self.lowered.gm.named_parameters()}
        return local[name]

    def tied_names(self) -> list[str]:
        """Parameters held by more than one stage (tied embeddings): their gradients are summed."""
        seen: dict[str, int] = {}
        for names in self.params_by_stage:
            for n in names:
                seen[n] = seen.get(n, 0) + 1
        return sorted(n for n, c in seen.items() if c > 1)


def lower(
    gm: torch.fx.GraphModule,
    plan: Plan,
    tp_index: int,
    tp_group: ProcessGroup | None,
    rank: int = 0,
    ep_group: ProcessGroup | None = None,
) -> LoweredGraph:
    """Tensor-parallel lowering of a copy of ``gm`` for tp rank ``tp_index``, then the expert-parallel
    lowering of its MoE regions for ``rank`` (:mod:`autopar.lower.expert`)."""
    gm = copy.deepcopy(gm)
    if plan.tp == 1:
        experts = _lower_experts(gm, plan, rank, ep_group, TPContext(tp_group, tp_index, 1))
        return LoweredGraph(gm=gm, shards=experts, code=gm.code)
    out = lower_tensor_parallel(gm, plan, tp_index, tp_group)
    specs = {**out.shards, **out.buffer_shards}  # buffers split with their channels (BatchNorm)
    shards = {
        name: Shard(dim=spec.dim, num_shards=spec.num_shards, index=spec.index)
        for name, spec in specs.items()
    }
    full = {name: spec.full_name for name, spec in specs.items()}
    gm_out = out.gm
    gm_out.meta.setdefault("autopar_full_names", {}).update(full)
    shards.update(_lower_experts(gm_out, plan, rank, ep_group, TPContext(tp_group, tp_index, plan.tp)))
    return LoweredGraph(gm=gm_out, shards=shards, code=getattr(out, "code", gm_out.code))


def _lower_experts(
    gm: torch.fx.GraphModule, plan: Plan, rank: int, ep_group: ProcessGroup | None, tp: TPContext
) -> dict[str, Shard]:
    specs = lower_experts(gm, plan, ep_context(plan, rank, ep_group), tp)
    return {
        name: Shard(s.tp_dim, s.tp_shards, s.tp_index, s.ep_dim, s.ep_shards, s.ep_index)
        for name, s in specs.items()
    }


def _check_units(units: Units | None, plan: Plan, num_stages: int) -> None:
    if num_stages == 1:
        return
    if units is None:
        raise PlanError(
            f"pp={plan.pp}: the traced graph has no modules to cut between (no indexed module list, "
            "no child modules); use pp=1"
        )
    if units.count < num_stages:
        raise PlanError(
            f"pp*vpp={num_stages} stages need at least {num_stages} pipeline units and this model has "
            f"{units.count}: {units.describe()} (a unit is never cut inside: a leaf module such as "
            f"nn.LSTM is one); choose pp*vpp <= {units.count}"
        )


def build_program(
    gm: torch.fx.GraphModule,
    plan: Plan,
    rank: int,
    model_input_names: Sequence[str],
    tp_group: ProcessGroup | None = None,
    ep_group: ProcessGroup | None = None,
) -> RankProgram:
    coords = plan.coords(rank)
    mutations = mutation_counts(gm) if check_enabled() else None
    lowered = lower(gm, plan, coords.get("tp", 0), tp_group, rank, ep_group)
    full_names = lowered.gm.meta.get("autopar_full_names", {})
    local_params = dict(lowered.gm.named_parameters())
    blocks = find_units(lowered.gm)
    num_stages = plan.pp * plan.virtual_stages
    _check_units(blocks, plan, num_stages)
    split, num_segments = split_segments(lowered.gm, blocks)
    layer_stages = plan.stage_of_layers(blocks.count) if blocks else []
    if layer_stages and max(layer_stages) >= num_stages:
        raise PlanError(f"layer_stages={layer_stages} names stages beyond pp*vpp={num_stages}")
    stage_of_segment = stage_of_segments(num_segments, blocks, layer_stages)
    stages = [
        build_stage(split, stage_of_segment, num_stages, v, model_input_names) for v in range(num_stages)
    ]
    if mutations is not None:
        check_program(mutations, split, stages)
    by_id = {id(p): name for name, p in local_params.items()}

    def full(local: str) -> str:
        return full_names.get(local, local)

    params_by_stage = [{full(by_id[id(p)]) for p in st.parameters()} for st in stages]
    # Megatron's layout: virtual stage v runs on pipeline rank v % pp.
    mine = [st for v, st in enumerate(stages) if v % plan.pp == coords.get("pp", 0)]
    slots = []
    for stage in mine:
        for module_name, module in stage.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                local = by_id.get(id(p))
                if local is None:
                    raise AssertionError(
                        f"stage parameter {module_name}.{attr} not found in the lowered graph"
                    )
                slots.append(ParamSlot(full(local), module, attr, lowered.shards.get(local, Shard())))
    return RankProgram(
        rank=rank,
        coords=coords,
        lowered=lowered,
        split=split,
        blocks=blocks,
        stage_of_segment=stage_of_segment,
        stages=mine,
        slots=slots,
        params_by_stage=params_by_stage,
    )

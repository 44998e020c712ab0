"""``rank_code(r)``: the program of one rank as Python source, every collective on its own line.

Three parts: the rank's stage module (fx code of the stage and of each segment it runs, with the
tensor-parallel collectives the lowering inserted), the step driver (this stage's pipeline actions
with their sends and receives, in schedule order), and the gradient synchronisation
(DDP all-reduce; ZeRO-1 all-reduce, sharded step and parameter all-gather; ZeRO-2/3 FSDP
all-gather / reduce-scatter; tied-weight all-reduce; expert gradients over edp) and loss reduction.
Expert-parallel MoE regions list their dispatch and combine all-to-alls after the stage code. Recomputed code is
marked: a checkpointed block segment (``full``), an outlined score region (``selective``).
Collective calls are spelled ``dist.<collective>(...)`` so they can be counted.
"""

from __future__ import annotations

import textwrap

from autopar.core.plan import Plan
from autopar.lower.expert import ExpertParallelMoE
from autopar.lower.program import RankProgram
from autopar.lower.stages import StageSpec
from autopar.runtime.engines import apply_recompute
from autopar.runtime.groups import describe_groups
from autopar.runtime.recompute import region_modules
from autopar.runtime.schedule import for_plan


def _indent(code: str, n: int = 4) -> str:
    return textwrap.indent(code.strip("\n"), " " * n)


def _segment_label(prog: RankProgram, seg: int) -> str:
    if prog.blocks is None:
        return "the whole model"
    if seg == 0:
        return "stem"
    if seg <= prog.blocks.count:
        return prog.blocks.prefixes[seg - 1]
    return "head + loss"


def _stage_label(prog: RankProgram, plan: Plan, spec: StageSpec) -> str:
    where = ", ".join(_segment_label(prog, s) for s in spec.segments)
    if plan.virtual_stages > 1:
        return f"# virtual stage {spec.index} of {spec.num_stages} (chunk {spec.index // plan.pp}): {where}"
    return f"# stage {spec.index} of {spec.num_stages}: {where}"


def _header(prog: RankProgram, plan: Plan) -> list[str]:
    groups = describe_groups(plan, prog.rank)
    n_params = sum(p.numel() for st in prog.stages for p in st.parameters())
    sharded = sum(1 for s in prog.slots if s.shard.dim is not None and s.shard.num_shards > 1)
    experts = sum(1 for s in prog.slots if s.shard.is_expert)
    coords = " ".join(f"{k}={v}" for k, v in prog.coords.items())
    return [
        f"# autopar program of rank {prog.rank} / {plan.world_size}   ({coords})",
        f"# plan: {plan.summary()}",
        "# groups: " + (", ".join(f"{k}={v}" for k, v in groups.items()) or "none (one rank)"),
        *(_stage_label(prog, plan, st.spec) for st in prog.stages),
        f"# parameters: {n_params} elements in {len(prog.slots)} tensors, {sharded} tensor-parallel shards"
        + (f", {experts} expert-parallel shards" if experts else ""),
    ]


def _stage_code(prog: RankProgram) -> list[str]:
    lines = []
    for stage in prog.stages:
        gm = stage.gm
        lines += [f"class Stage{stage.spec.index}:", _indent(gm.code), ""]
        for seg in stage.spec.segments:
            sub = getattr(gm, f"submod_{seg}", None)
            if sub is None:
                continue
            inner = getattr(sub, "inner", sub)
            code = inner.code.replace("def forward(self", f"def submod_{seg}(self", 1)
            note = "  (recompute=full: checkpointed)" if inner is not sub else ""
            lines += [f"    # segment {seg}: {_segment_label(prog, seg)}{note}", _indent(code), ""]
            for name, region in region_modules(inner).items():
                code = region.code.replace("def forward(self", f"def {name}(self", 1)
                lines += [f"    # {name}: recompute=selective, checkpointed", _indent(code), ""]
    return lines


def _expert_lines(prog: RankProgram, plan: Plan) -> list[str]:
    """Each expert-parallel MoE region of this rank's stages, its all-to-alls spelled out
    (:meth:`autopar.lower.expert.ExpertParallelMoE.describe`)."""
    groups = describe_groups(plan, prog.rank)
    ep, tp = groups.get("ep", [prog.rank]), groups.get("tp", [prog.rank])
    lines = []
    for stage in prog.stages:
        for name, module in stage.named_modules():
            if isinstance(module, ExpertParallelMoE):
                lines += [*(f"    {line}" for line in module.describe(name, ep, tp)), ""]
    return (
        ["# MoE regions (expert parallelism, autopar/lower/expert.py): per micro-batch", *lines]
        if lines
        else []
    )


def _actions(prog: RankProgram, plan: Plan, train: bool) -> list:
    m = plan.num_micro_batches
    if train and plan.pp > 1:
        return for_plan(plan.schedule, plan.pp, m, plan.virtual_stages).orders[prog.coords.get("pp", 0)]
    out = [_A(st.spec.index, "F", i) for i in range(m) for st in prog.stages]
    if train:
        out += [_A(st.spec.index, "B", i) for i in range(m) for st in reversed(prog.stages)]
    return out


def _pipeline_lines(prog: RankProgram, plan: Plan, train: bool) -> list[str]:
    pp = describe_groups(plan, prog.rank).get("pp", [prog.rank])
    specs = {st.spec.index: st.spec for st in prog.stages}
    multi = len(prog.stages) > 1
    m = plan.num_micro_batches
    lines = []
    for a in _actions(prog, plan, train):
        spec = specs[a.stage]
        prev = pp[(a.stage - 1) % len(pp)] if a.stage > 0 else None
        nxt = pp[(a.stage + 1) % len(pp)] if a.stage < spec.num_stages - 1 else None
        v = str(a.stage) if multi else ""
        x, y, mb, tag = f"x{v}", f"y{v}", a.micro_batch, f"  # {a}"
        if a.kind == "F":
            if prev is not None:
                lines.append(f"{x}[{mb}] = dist.recv(src={prev}, group=pp){tag}")
                call = f"stage{v}(*{x}[{mb}], **inputs[{mb}])"
            else:
                call = f"stage{v}(*model_inputs[{mb}], **inputs[{mb}])"
            lines.append(f"{y}[{mb}] = {call}  # -> {', '.join(spec.output_names) or 'loss'}")
            if nxt is not None:
                lines.append(f"dist.send({y}[{mb}], dst={nxt}, group=pp){tag}")
        else:
            if nxt is not None:
                lines.append(f"dy = dist.recv(src={nxt}, group=pp){tag}")
                lines.append(f"autograd.backward({y}[{mb}], dy)")
            else:
                lines.append(f"autograd.backward({y}[{mb}] / {m}){tag}")
            if prev is not None:
                lines.append(f"dist.send({x}[{mb}].grad, dst={prev}, group=pp){tag}")
    return lines


class _A:
    def __init__(self, stage: int, kind: str, mb: int):
        self.stage, self.kind, self.micro_batch = stage, kind, mb

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro_batch}"


def _grad_sync_lines(prog: RankProgram, plan: Plan, dp: str) -> list[str]:
    """The gradient collectives of each ZeRO stage, as ``runtime/engines.py`` runs them."""
    if plan.zero_stage <= 1:
        return [f"dist.all_reduce(grads, group={dp}, op=AVG)  # DDP buckets, last micro-batch"]
    units = sum(len([s for s in st.spec.segments if s in prog.block_segments]) + 1 for st in prog.stages)
    gather = "before forward" + (
        " and again before backward" if plan.zero_stage == 3 else ", kept to backward"
    )
    return [
        f"# ZeRO-{plan.zero_stage} (FSDP2 fully_shard, {units} units, "
        f"reshard_after_forward={plan.zero_stage == 3}): per unit",
        f"#   dist.all_gather(params, group={dp}) {gather}",
        f"dist.reduce_scatter(grads, group={dp}, op=AVG)  # per unit, last micro-batch",
        "optimizer.step()  # this rank's shards (optimizer state sharded too)",
    ]


def _sync_lines(prog: RankProgram, plan: Plan) -> list[str]:
    groups = describe_groups(plan, prog.rank)
    dp = f"dp{groups.get('dp')}"
    lines = _grad_sync_lines(prog, plan, dp) if plan.dp > 1 else []
    for name in prog.tied_names():
        lines.append(f"dist.all_reduce({name}.grad, group=tie{groups['tie']})  # tied across stages")
    if plan.ep > 1 and any(s.shard.is_expert for s in prog.slots):
        edp = groups.get("edp")
        reduce = f"dist.all_reduce(expert_grads, group=edp{edp}); " if edp else ""
        lines.append(f"{reduce}expert_grads /= {plan.dp}  # experts: not in DDP (sync_expert_grads)")
    if plan.dp > 1 and plan.zero_stage == 1:
        lines += [
            "optimizer.step()  # ZeRO-1: this rank's rows of each parameter and their optimizer state",
            f"dist.all_gather(params, group={dp})  # every rank's updated rows, one buffer per dtype",
        ]
    elif plan.dp == 1 or plan.zero_stage == 0:
        lines.append("optimizer.step()")
    if plan.pp > 1:
        lines.append(f"dist.broadcast(loss, src={groups['pp'][-1]}, group=pp)")
    if plan.dp > 1:
        lines.append(f"dist.all_reduce(loss, group={dp}); loss /= {plan.dp}")
    return lines


def render(prog: RankProgram, plan: Plan, *, train: bool, has_sample_ids: bool) -> str:
    """The listing of ``prog`` (a program built for the listing: training applies its recompute in
    place, as the runtime does, so the listing shows the code that runs)."""
    share = plan.global_batch // plan.dp
    dp_i = prog.coords.get("dp", 0)
    if train:  # list the code that runs: checkpointed segments, outlined score regions
        for stage in prog.stages:
            apply_recompute(stage, prog.block_segments, plan.recompute)
    lines = _header(prog, plan) + [""] + _stage_code(prog) + _expert_lines(prog, plan)
    fn = "train_step" if train else "infer"
    lines += [f"def {fn}(batch):"]
    body = [
        f"# data-parallel share: samples [{dp_i * share}, {(dp_i + 1) * share}) of {plan.global_batch}; "
        f"{plan.num_micro_batches} micro-batches of {plan.micro_batch_size}",
        "inputs = split_micro_batches(graph_inputs(batch)"
        + (" + sample_ids(step)" if has_sample_ids else "")
        + f", {plan.num_micro_batches})",
    ]
    if plan.pp > 1:
        body.append(f"# pipeline schedule: {plan.schedule if train else 'forward only'}")
    body += _pipeline_lines(prog, plan, train)
    if train:
        body += _sync_lines(prog, plan)
    lines += [_indent("\n".join(body)), ""]
    return "\n".join(lines)

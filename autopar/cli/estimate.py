"""``autopar estimate MODEL --cluster CLUSTER --global-batch B [--plan k=v,...] [--software NAME] [--json]``.

Builds the model on the ``meta`` device (nothing is allocated), traces it with its loss at the
micro-batch size, resolves the plan keys (:func:`autopar.core.plan_rules.resolve_plan`) and prints what
:func:`autopar.estimator.estimate` predicts: step time and its breakdown, tokens/s, MFU, memory
per device against capacity.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from autopar.cli.args import add_workload_args
from autopar.core.errors import PlanError
from autopar.core.text import gb_text, seconds_text

if TYPE_CHECKING:
    from autopar.cluster import Cluster
    from autopar.core.plan import Plan, PredictedCost

ORDER = 10

JSON_KEYS = (
    "step_time_s",
    "tokens_per_s",
    "model_flops_per_step",
    "hardware_flops_per_step",
    "mfu",
    "memory_bytes_per_device",
    "memory_capacity_bytes",
    "fits",
    "breakdown_s",
    "memory_breakdown_bytes",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="predict step time and memory of one plan on a cluster",
        description="Predict the step time (with its breakdown), throughput, MFU and per-device memory of "
        "training MODEL on CLUSTER under one plan. Plan keys left out are chosen by the planner.",
    )
    add_workload_args(p)
    p.add_argument(
        "--plan",
        default="",
        metavar="k=v,...|FILE.json",
        help="keys: dp tp pp mbs vpp schedule recompute sp zero (the planner chooses keys left out), "
        "or a plan file from `autopar plan --out`",
    )
    p.add_argument(
        "--software",
        default=None,
        metavar="NAME",
        help="price the plan as NAME's software runs it, with the device kind's measured constants "
        "(cost_models.hardware.FRAMEWORKS: autopar, megatron, nemo-mcore, fsdp, composer, automodel, megatron-2019, "
        "megatron-deepspeed-2021); default: the cluster's kind, as autopar's planner costs it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def software_calibration(name: str | None, cluster: Cluster):
    """``--software NAME``: the cost-model constants of NAME's software on the cluster's device kind
    (None: the estimator's default). A typed error for an unknown name or a cluster mixing kinds."""
    if name is None:
        return None
    from autopar.core.errors import InputError
    from cost_models.hardware import FRAMEWORKS, calibration_for

    if name not in FRAMEWORKS:
        raise InputError(f"--software {name!r} is not known; choose one of: {', '.join(sorted(FRAMEWORKS))}")
    kinds = cluster.device_kinds
    if len(kinds) != 1:
        names = ", ".join(k.name for k in kinds)
        raise InputError(
            f"--software prices one device kind's software, but cluster {cluster.name!r} mixes {names}; "
            "estimate each kind's cluster on its own, or leave --software out"
        )
    return calibration_for(kinds[0].name, framework=name)


def run(args: argparse.Namespace) -> int:
    from autopar.cluster import Cluster
    from autopar.core.plan_rules import PLAN_KEYS, parse_plan_arg, plan_keys, resolve_plan

    # Before torch is imported and the model built: a bad cluster, plan key or software fails fast.
    cluster = Cluster.parse(args.cluster)
    calib = software_calibration(args.software, cluster)
    plan, keys = _plan_file(args.plan), {}
    if plan is None:
        keys = parse_plan_arg(args.plan)
    elif plan.global_batch != args.global_batch:
        raise PlanError(
            f"--global-batch {args.global_batch} disagrees with the plan file {args.plan}, which was "
            f"made for global batch {plan.global_batch}; pass --global-batch {plan.global_batch} or "
            f"re-plan with `autopar plan ... --global-batch {args.global_batch}`"
        )
    from autopar.models.spec import graph_layers, load_model

    loaded = load_model(args.model, seq=args.seq)
    chosen = [] if plan is not None else [k for k in PLAN_KEYS if k not in keys]
    if "ep" in chosen and not _has_experts(loaded.model):  # ep is a degree of MoE models only
        chosen.remove("ep")
    graph = None
    if loaded.num_layers is None:  # a user model without a config: count its blocks in the graph
        graph = loaded.trace(batch=1)
        loaded.num_layers = graph_layers(graph)
    if plan is None:
        # Validate the given keys with the rules' own messages before searching the rest.
        resolve_plan(
            keys, cluster, loaded.num_layers, loaded.heads, args.global_batch, kv_heads=loaded.kv_heads
        )
    if plan is None and chosen:
        import autopar

        graph = graph or loaded.trace(batch=1)
        plan = autopar.plan(
            graph, cluster, global_batch=args.global_batch, fixed=keys, progress=not args.json
        )
    elif plan is None:
        plan = resolve_plan(
            keys, cluster, loaded.num_layers, loaded.heads, args.global_batch, kv_heads=loaded.kv_heads
        )
    graph = graph or loaded.trace(batch=1)

    from autopar.estimator import estimate

    cost = estimate(graph, cluster, plan, calib=calib)
    if args.json:
        out = {k: getattr(cost, k) for k in JSON_KEYS}
        out.update(
            plan=plan_keys(plan),
            layer_stages=plan.layer_stages,
            chosen_by_planner=chosen,
            model=args.model,
            seq=loaded.seq,
            cluster=cluster.to_dict(),
            software=args.software,
        )
        out["extra"] = cost.extra
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(
        render(
            cost, plan, cluster, model=args.model, seq=loaded.seq, defaulted=chosen, software=args.software
        )
    )
    return 0


def _plan_file(text: str) -> Plan | None:
    """``--plan plan.json``: a plan written by ``autopar plan --out`` (None for key=value text)."""
    if not text.strip().lower().endswith(".json"):
        return None
    from autopar.core.plan_file import load_plan

    try:
        return load_plan(text)
    except PlanError as e:
        raise PlanError(f"--plan {text}: {e}") from None


# ------------------------------------------------------------------------------- output
def render(
    cost: PredictedCost,
    plan: Plan,
    cluster: Cluster,
    *,
    model: str,
    seq: int | None,
    defaulted: list[str],
    software: str | None = None,
) -> str:
    """The human-readable report of one estimate."""
    kinds = " + ".join(f"{g.nodes} x {cluster.devices_per_node} {g.device.name}" for g in cluster.node_groups)
    lines = [
        f"model    {model}" + (f"  (seq {seq})" if seq else ""),
        f"cluster  {cluster.name}: {kinds} = {cluster.num_devices} devices",
        f"plan     {plan.summary()}"
        + (f"   (chosen by the planner: {', '.join(defaulted)})" if defaulted else ""),
        *([f"software {software} (cost_models.hardware.FRAMEWORKS)"] if software else []),
        "",
        f"{'step time':<26}{seconds_text(cost.step_time_s, fixed=True):>14}",
    ]
    total = cost.step_time_s or 1.0
    for name, seconds in cost.breakdown_s.items():
        lines.append(f"  {name:<24}{seconds_text(seconds, fixed=True):>14}  {100 * seconds / total:5.1f}%")
    lines += [
        f"{'tokens/s':<26}{cost.tokens_per_s:>14,.0f}",
        f"{'MFU':<26}{100 * cost.mfu:>13.1f}%",
        f"{'model FLOPs/step':<26}{cost.model_flops_per_step:>14.3e}",
        f"{'hardware FLOPs/step':<26}{cost.hardware_flops_per_step:>14.3e}",
        "",
        f"{'memory per device':<26}{gb_text(cost.memory_bytes_per_device, ',.2f'):>14}  of {gb_text(cost.memory_capacity_bytes, ',.2f')}",
    ]
    for name, value in cost.memory_breakdown_bytes.items():
        lines.append(f"  {name:<24}{gb_text(value, ',.2f'):>14}")
    if cost.fits:
        lines.append(f"{'fits':<26}{'yes':>14}")
    else:
        over = cost.memory_bytes_per_device - cost.memory_capacity_bytes
        lines.append(
            f"{'fits':<26}{'NO':>14}  over by {gb_text(over, ',.2f')}: try recompute, zero, more pp/tp or a smaller mbs"
        )
    return "\n".join(lines)


def _has_experts(model: object) -> bool:
    """Whether the model has mixture-of-experts layers (built-in ``experts=``, HF Mixtral's
    ``num_local_experts``, Qwen2-MoE's ``num_experts``), so expert parallelism is a free key."""
    cfg = getattr(model, "config", None)
    return any((getattr(cfg, k, 0) or 0) > 1 for k in ("experts", "num_local_experts", "num_experts"))

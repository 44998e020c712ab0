"""``autopar plan MODEL --cluster CLUSTER --global-batch B [--plan k=v] [--json] [--out plan.json]``.

Traces MODEL on ``meta`` (nothing is allocated), searches every mesh and knob the plan keys leave
open (:func:`autopar.core.plan`) and prints the best plan with its predicted cost; ``--verbose`` adds
why it won (runner-ups, rejected meshes). ``--json`` prints the keys of ``autopar estimate --json``
plus ``solve_time_s`` and ``alternatives``; ``--out`` writes the plan (``Plan.to_json``) for
``autopar estimate --plan FILE``, ``autopar report`` and ``autopar.compile``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from autopar.cli.args import add_workload_args, positive_float, positive_int
from autopar.cli.estimate import JSON_KEYS, render
from autopar.cli.files import check_output, write_text, write_with

ORDER = 20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="find the fastest plan that fits (ILP planner)",
        description="Search data/tensor/pipeline degrees, micro-batching, schedule, recompute, sequence "
        "parallelism and ZeRO for the fastest plan of MODEL on CLUSTER that fits in memory.",
    )
    add_workload_args(p)
    p.add_argument("--plan", default="", metavar="k=v,...", help="keys to fix; the planner chooses the rest")
    p.add_argument("--mode", choices=("train", "inference"), default="train")
    p.add_argument("--top", type=positive_int, default=5, metavar="K", help="runner-ups to keep")
    p.add_argument(
        "--time-limit", type=positive_float, default=60.0, metavar="S", help="search time limit (s)"
    )
    p.add_argument("--out", metavar="FILE", help="write the plan as JSON")
    p.add_argument("--report", metavar="FILE", help="write an HTML report of the plan")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="explain the choice")
    p.add_argument(
        "--profile",
        action="store_true",
        help="plan with measured numbers of this machine (local:N clusters): the model's ops at the "
        "per-rank thread count and the N-process layout's contention, gloo collectives and optimizer "
        "(cached under $AUTOPAR_CACHE or ~/.cache/autopar)",
    )
    p.set_defaults(func=run)


def _profiled_inputs(args: argparse.Namespace, loaded, cluster) -> tuple:
    """``--profile``: the model built for real on this machine and traced at the per-rank batch
    of pure data parallelism (what the profile measures; other micro-batches scale from it)."""
    import torch

    from autopar.core.errors import PlanError
    from autopar.estimator.local import is_local
    from autopar.models import build_model

    if not is_local(cluster):
        raise PlanError(f"--profile measures this machine: use --cluster local:N (got {args.cluster!r})")
    params = sum(p.numel() for p in loaded.model.parameters())
    ram = cluster.device.memory_bytes * cluster.num_devices
    if 16 * params > 0.5 * ram:  # weights, grads, Adam moments, with room for activations
        raise PlanError(
            f"--profile runs {args.model} on this machine, but its {params / 1e6:.0f}M parameters need "
            f"~{16 * params / 1e9:.1f} GB for training state, over half of this machine's "
            f"{ram / 1e9:.1f} GB; plan it without --profile"
        )
    built = build_model(args.model, device="cpu", seq=args.seq)
    model = getattr(built, "model", built)
    batch = max(1, args.global_batch // cluster.num_devices)
    example = tuple(
        torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x
        for x in loaded.make_inputs(batch)
    )
    extra = {"model": model, "example_inputs": example, "loss_fn": loaded.loss_fn, "profile": True}
    from autopar.tracing import trace

    return trace(model, example, loss_fn=loaded.loss_fn), extra


def run(args: argparse.Namespace) -> int:
    import autopar
    from autopar.cluster import Cluster
    from autopar.core.plan_rules import parse_plan_arg, plan_keys

    t0 = time.perf_counter()
    # Outputs first: a path that cannot be written must fail before a search of minutes.
    inputs = [args.cluster, args.model.rsplit(":", 1)[0]]
    if args.out:
        check_output(args.out, flag="--out", inputs=inputs)
    if args.report:
        check_output(args.report, flag="--report", inputs=[*inputs, args.out])
    cluster = Cluster.parse(args.cluster)  # before torch is imported: bad input fails fast
    fixed = parse_plan_arg(args.plan)
    from autopar.models.spec import load_model

    loaded = load_model(args.model, seq=args.seq)
    if args.profile:
        graph, extra = _profiled_inputs(args, loaded, cluster)
    else:
        graph, extra = loaded.trace(batch=1), {}
    plan = autopar.plan(
        extra.pop("model", graph),
        cluster,
        **extra,
        global_batch=args.global_batch,
        mode=args.mode,
        fixed=fixed,
        top_k=args.top,
        time_limit_s=args.time_limit,
        progress=not args.json,
    )
    wall_s = time.perf_counter() - t0
    from autopar.report.context import attach_inputs  # light: no matplotlib

    settings = {"fixed": args.plan, "top_k": args.top, "time_limit_s": args.time_limit}
    attach_inputs(plan, cluster=cluster, model=args.model, seq=loaded.seq, settings=settings, graph=graph)
    if args.out:
        write_text(args.out, plan.to_json(), flag="--out")
    if args.report:
        from autopar.report import write_report

        write_with(
            args.report,
            lambda tmp: write_report(
                plan, tmp, cluster=cluster, model=args.model, graph=graph, seq=loaded.seq
            ),
            flag="--report",
        )
    cost = plan.predicted
    if args.json:
        out = {k: getattr(cost, k) for k in JSON_KEYS}
        out.update(
            plan=plan_keys(plan),
            layer_stages=plan.layer_stages,
            solve_time_s=plan.search["stats"]["solve_time_s"],
            wall_time_s=wall_s,
            search=plan.search["stats"],
            alternatives=plan.search["alternatives"],
            model=args.model,
            seq=loaded.seq,
            cluster=cluster.to_dict(),
        )
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(render(cost, plan, cluster, model=args.model, seq=loaded.seq, defaulted=[]))
    st = plan.search["stats"]
    print(
        f"\nplanned in {wall_s:.2f} s ({st['evaluated']} plans costed, {st['pruned']} pruned, {st['status']})"
        + (f"; written to {args.out}" if args.out else "")
    )
    if args.verbose:
        print()
        print(plan.explain())
    return 0

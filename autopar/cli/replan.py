"""``autopar replan CKPT --cluster NEW [--plan k=v] [--out plan.json]``: a plan for new resources.

Reads the checkpoint's manifest (the plan it was saved under, the model's names and shapes, the
global batch; the shard files are verified), plans the same model for the cluster ``NEW`` and
prints both plans and what moves: the degrees that change and the bytes each new rank reads and
keeps. ``autopar run NEW_PLAN.json --nproc N --resume CKPT -- train.py`` then continues the run
(``autopar.compile`` re-shards the state on load; docs/checkpoints.md).

The model comes from the manifest's ``model_spec`` (``compiled.save(..., model_spec=...)``) or
``--model``; a model whose parameter names or shapes differ from the checkpoint's is refused.
"""

from __future__ import annotations

import argparse

from autopar.cli.args import positive_float, positive_int
from autopar.core.errors import UsageError

ORDER = 46


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replan",
        help="plan a checkpointed run for a new cluster and show what moves",
        description="Plan the model of checkpoint CKPT for CLUSTER (e.g. after losing a node) and print "
        "the old and the new plan, the degrees that change and the bytes each new rank loads.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory (or a root: its newest)")
    p.add_argument(
        "--cluster", required=True, metavar="CLUSTER", help="the new cluster (as for `autopar plan`)"
    )
    p.add_argument(
        "--model", default=None, metavar="MODEL", help="the model (default: the manifest's model_spec)"
    )
    p.add_argument(
        "--global-batch", type=positive_int, default=None, metavar="B", help="default: the checkpoint's"
    )
    p.add_argument("--plan", default="", metavar="k=v,...", help="keys to fix; the planner chooses the rest")
    p.add_argument(
        "--time-limit", type=positive_float, default=60.0, metavar="S", help="search time limit (s)"
    )
    p.add_argument("--out", metavar="FILE", help="write the new plan as JSON (for `autopar run --resume`)")
    p.set_defaults(func=run)


def moves(old: dict, new, tensors: dict) -> list[str]:
    """What changes between the saved plan (manifest dict) and ``new``: the degrees, and the bytes
    each new rank reads (the full state: load-full-then-scatter) and keeps (its shards; an
    estimate from the degrees, ignoring replicated norms and biases)."""
    import math

    from autopar.core.plan import Plan
    from autopar.core.text import bytes_text as _bytes

    before = Plan.from_dict(old)
    lines = []
    for key in ("dp", "tp", "pp", "zero_stage"):
        a, b = getattr(before, key, None), getattr(new, key)
        lines.append(f"  {key:<10} {a} -> {b}" + ("" if a == b else "   (changes)"))
    sizes = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "uint8": 1}
    total = {"model": 0, "optim": 0}
    for key, d in tensors.items():
        kind = key.split("/", 1)[0]
        if kind in total:
            total[kind] += math.prod(d["shape"]) * sizes.get(d["dtype"], 4)
    split = new.tp * new.pp
    kept = total["model"] / split / (new.dp if new.zero_stage >= 3 else 1)
    kept += total["optim"] / split / (new.dp if new.zero_stage >= 1 else 1)
    lines.append(
        f"  state: {_bytes(total['model'])} parameters and buffers + {_bytes(total['optim'])} optimizer "
        f"state; each of the {new.world_size} new ranks reads the full state and keeps about "
        f"{_bytes(kept)} (tp={new.tp} x pp={new.pp} split"
        + (f", ZeRO-{new.zero_stage} over dp={new.dp}" if new.zero_stage else "")
        + ")"
    )
    return lines


def run(args: argparse.Namespace) -> int:
    import autopar
    from autopar.cluster import Cluster
    from autopar.core.plan import Plan
    from autopar.core.plan_rules import parse_plan_arg
    from autopar.models.spec import load_model
    from autopar.runtime import checkpoint as ckpt

    path = ckpt.resolve(args.checkpoint)
    manifest = ckpt.read_manifest(path)
    ckpt.verify_files(path, manifest)
    cluster = Cluster.parse(args.cluster)
    spec = args.model or manifest.get("model_spec")
    if not spec:
        raise UsageError(
            f"checkpoint {path} does not name its model (saved without model_spec); pass --model MODEL"
        )
    loaded = load_model(spec)
    ckpt.check_model(manifest, loaded.model.state_dict(), str(path), dtypes=False)  # planned in bf16
    global_batch = args.global_batch or manifest["global_batch"]
    graph = loaded.trace(batch=1)
    new = autopar.plan(
        graph,
        cluster,
        global_batch=global_batch,
        fixed=parse_plan_arg(args.plan),
        time_limit_s=args.time_limit,
        progress=False,
    )
    old = Plan.from_dict(manifest["plan"])
    print(
        f"checkpoint {path}: step {manifest['step']}, model {spec}, global batch {manifest['global_batch']}"
    )
    print(f"saved under  {old.summary()}  ({old.world_size} ranks)")
    print(f"new plan     {new.summary()}  ({new.world_size} ranks on {args.cluster})")
    print("what moves:")
    for line in moves(manifest["plan"], new, manifest["tensors"]):
        print(line)
    if args.out:
        from autopar.cli.files import write_text

        write_text(args.out, new.to_json(), flag="--out")
        print(f"continue with: autopar run {args.out} --nproc {new.world_size} --resume {path} -- TRAIN.py")
    return 0

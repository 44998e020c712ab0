"""``autopar profile MODEL [--batch B] [--seq S] [--out profile.json] [--cache C] [--collectives]``.

Builds MODEL with real fp32 weights on this machine's CPU (or ``--device cuda``), measures every op
of its traced graph (:func:`autopar.profile`) and prints the slowest ops; ``--out`` writes the
profile as JSON (its ``op_times`` feed ``autopar.estimate(..., op_times=...)``). ``--collectives``
also measures gloo all-reduce between 2 local processes.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from autopar.cli.args import int_in, positive_int
from autopar.cli.files import check_output, write_with
from autopar.core.errors import UsageError
from autopar.core.text import bytes_text, gb_text

if TYPE_CHECKING:
    from autopar.estimator.profile import Profile

ORDER = 45


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure per-op forward/backward times of a model on this machine",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "model", metavar="MODEL", help="gpt:hidden=..,layers=..; a preset (`autopar models`); file.py:factory"
    )
    p.add_argument(
        "--batch", type=positive_int, default=1, metavar="B", help="samples in the example batch (default 1)"
    )
    p.add_argument(
        "--seq", type=positive_int, default=None, metavar="S", help="sequence length (default: model's)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--threads", type=int_in(1, 4096), default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--repeats", type=int_in(1, 10_000), default=7, help="timed calls per op (median)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the profile as JSON")
    p.add_argument("--cache", default=None, metavar="FILE", help="JSON cache of measured op signatures")
    p.add_argument("--top", type=positive_int, default=15, help="rows of the slowest-ops table")
    p.add_argument("--collectives", action="store_true", help="also measure 2-rank gloo all-reduce")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import autopar
    from autopar.models import build_model
    from autopar.models.spec import adapt, check_spec_sizes

    if args.out:  # before minutes of measuring
        check_output(args.out, flag="--out", inputs=[args.cache])
    check_device(args.device)
    check_spec_sizes(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model.rsplit(":", 1)[0]
    if not (path.endswith(".py") or "/" in path or os.sep in path):  # a built-in GPT: size it on meta first
        check_batch_memory(args.batch, args.seq, build_model(args.model, device="meta").config)
    built = build_model(args.model, device="cpu", batch=args.batch, seq=args.seq, dtype=torch.float32)
    loaded = adapt(args.model, built, seq=args.seq)
    inputs = loaded.make_inputs(args.batch)
    graph = autopar.trace(loaded.model, inputs, loss_fn=loaded.loss_fn)
    prof = autopar.profile(graph, inputs, device=args.device, repeats=args.repeats, cache_path=args.cache)
    print(render(prof, args))
    if args.collectives:
        from autopar.estimator.profile import measure_collectives

        link = measure_collectives(2)["link"]
        print(
            f"gloo all_reduce, 2 ranks: {gb_text(link['bandwidth_bytes_per_s'], '.2f')}/s per link, "
            f"{link['latency_s'] * 1e6:.0f} us per hop"
        )
    if args.out:
        write_with(args.out, prof.save, flag="--out")
        print(f"wrote {args.out}")
    return 0


def check_device(device: str) -> None:
    """``--device``: a torch device this machine has (CUDA asked for without CUDA fails here, clearly)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); profile with --device cpu or on a machine with a GPU"
        )
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: profiling supports cpu or cuda")


def memory_bytes() -> int:
    """This machine's physical memory (a large stand-in where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_batch_memory(batch: int, seq: int | None, config: object) -> None:
    """Refuse a ``--batch`` whose largest fp32 activation (batch x seq x max(vocab, ffn): the logits or
    the MLP's inner layer) would not fit in half this machine's memory: the profile runs for real."""
    if config is None:
        return
    width = max(config.vocab, config.ffn_resolved)
    need = batch * (seq or config.seq) * width * 4
    have = memory_bytes() // 2
    if need > have:
        largest = max(1, have // ((seq or config.seq) * width * 4))
        raise UsageError(
            f"--batch {batch}: one activation of ({batch}, {seq or config.seq}, {width}) fp32 values needs "
            f"{bytes_text(need)}, more than half of this machine's memory ({bytes_text(have)}); profile at "
            f"--batch {largest} or less (per-op times scale with the batch)"
        )


def render(prof: Profile, args: argparse.Namespace) -> str:
    fwd_s, bwd_s = prof.total_s()
    lines = [
        f"model    {args.model}  (batch {args.batch})",
        f"device   {prof.device}",
        f"ops      {len(prof.nodes)} nodes, {len(prof.records)} distinct, {prof.num_measured} measured, "
        f"{prof.num_cached} from cache, {prof.profile_s:.1f} s",
        f"total    forward {fwd_s * 1e3:.2f} ms, backward {bwd_s * 1e3:.2f} ms",
        "",
        f"{'node':<40}{'op':<30}{'fwd ms':>10}{'bwd ms':>10}{'saved MB':>10}",
    ]
    saved = prof.saved_bytes
    for node, target, f, b in prof.slowest(args.top):
        lines.append(
            f"{node[:39]:<40}{target[:29]:<30}{f * 1e3:>10.3f}{b * 1e3:>10.3f}{saved[node] / 1e6:>10.2f}"
        )
    return "\n".join(lines)

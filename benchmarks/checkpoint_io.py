"""Checkpoint I/O: save and load time and bytes per rank, a >= 100M-parameter GPT on 4 gloo ranks.

    python benchmarks/checkpoint_io.py                       # 105M params, dp=2 x tp=2, 4 ranks
    python benchmarks/checkpoint_io.py --plan dp=4 --layers 4 --dir /tmp/ckpt

One launch: compile, one AdamW step (so the optimizer state exists), ``compiled.save(dir)``, then
``compiled.load(dir)`` on the same ranks. Per rank it reports:

* save: wall time of ``save()`` (gather of the full state + DCP write + hashing + publish) and the
  bytes this rank wrote (its ``__<rank>_0.distcp``: DCP's planner balances the keys over ranks);
* load: wall time of ``load()`` (manifest and model check, sha256 of a share of the files, DCP read
  of the full state, scatter into this rank's shards) and the bytes it read (the full state: the
  resharding is load-full-then-scatter, see docs/checkpoints.md).

The checkpoint holds parameters, buffers (tied weights under both names) and AdamW's two moments.
CPU and gloo: the numbers are this machine's disk and memory bandwidth, not a GPU cluster's.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import autopar  # noqa: E402
from autopar.core.plan_rules import parse_plan_arg  # noqa: E402
from autopar.models.gpt import GPT, GPTConfig, gpt_loss  # noqa: E402
from autopar.runtime.launch import run_local  # noqa: E402


def rank_main(cfg: GPTConfig, plan_keys: dict, batch: int, directory: str) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    model = GPT(cfg)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq))
    plan = autopar.Plan.manual(global_batch=batch, **plan_keys)
    compiled = autopar.compile(
        model,
        plan.world_size,
        example_inputs=(tokens, tokens),
        loss_fn=gpt_loss,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        plan=plan,
        global_batch=batch,
        timeout_s=600,
    )
    del model
    compiled.step((tokens, tokens))
    rank = dist.get_rank()
    dist.barrier()
    t0 = time.perf_counter()
    path = compiled.save(directory, keep=1)
    save_s = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in Path(path).glob(f"__{rank}_*.distcp"))
    dist.barrier()
    t0 = time.perf_counter()
    manifest = compiled.load(directory)
    load_s = time.perf_counter() - t0
    state_bytes = sum(
        torch.Size(d["shape"]).numel() * torch.empty(0, dtype=getattr(torch, d["dtype"])).element_size()
        for d in manifest["tensors"].values()
    )
    return {
        "rank": rank,
        "params": params,
        "save_s": save_s,
        "written_bytes": written,
        "load_s": load_s,
        "read_bytes": state_bytes,
        "dcp_and_hash_s": manifest["save_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--plan", default="dp=2,tp=2", help="k=v,... (dp, tp, pp, zero_stage)")
    parser.add_argument("--dir", default=None, help="checkpoint root (default: a temporary directory)")
    args = parser.parse_args()
    cfg = GPTConfig(hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab, seq=args.seq)
    keys = {k: v for k, v in parse_plan_arg(args.plan).items() if k in ("dp", "tp", "pp", "zero_stage")}
    ranks = keys.get("dp", 1) * keys.get("tp", 1) * keys.get("pp", 1)
    directory = args.dir or tempfile.mkdtemp(prefix="autopar-ckpt-bench-")
    try:
        rows = run_local(rank_main, ranks, (cfg, keys, args.batch, directory), timeout_s=900, deadline_s=1800)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    mb = 1e6
    print(f"GPT {rows[0]['params'] / 1e6:.1f}M parameters, plan {args.plan}, {ranks} gloo ranks (CPU)")
    print(f"{'rank':>4} {'save s':>8} {'written MB':>11} {'load s':>8} {'read MB':>9}")
    for r in rows:
        print(
            f"{r['rank']:>4} {r['save_s']:>8.2f} {r['written_bytes'] / mb:>11.1f} "
            f"{r['load_s']:>8.2f} {r['read_bytes'] / mb:>9.1f}"
        )
    total = sum(r["written_bytes"] for r in rows)
    print(
        f"checkpoint {total / mb:.1f} MB; save {max(r['save_s'] for r in rows):.2f} s "
        f"(of which DCP write + sha256 {rows[0]['dcp_and_hash_s']:.2f} s), "
        f"load {max(r['load_s'] for r in rows):.2f} s (slowest rank)"
    )


if __name__ == "__main__":
    main()

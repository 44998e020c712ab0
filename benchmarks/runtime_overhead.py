"""Runtime overhead: the compiled program vs the hand-written PyTorch equivalent, same ranks, same run.

    python benchmarks/runtime_overhead.py                 # dp, tp, pp on 2 gloo ranks each
    python benchmarks/runtime_overhead.py --modes tp --steps 20 --hidden 512

For each mode one launch runs both programs on the same processes, alternating step by step (so
load from other work on the machine hits both alike), and reports the median step time of each
after warm-up:

* dp: ``autopar.compile`` with ``dp=2`` vs ``DistributedDataParallel`` around the eager model;
* tp: ``tp=2`` vs DTensor ``parallelize_module`` with ``ColwiseParallel`` (q, k, v, fc1, lm_head)
  and ``RowwiseParallel`` (o_proj, fc2, the vocab-parallel token embedding), heads per rank set by
  hand as torchtitan does, ``loss_parallel`` for the cross entropy;
* pp: ``pp=2`` (1F1B) vs ``torch.distributed.pipelining`` ``PipelineStage`` + ``Schedule1F1B``
  over a hand-split model (embedding + first half of the layers | second half + head).

Both sides use the same model (untied embeddings, so the hand-written TP can shard them), data,
micro-batches and AdamW. Target (issue 6): ratio ours / hand-written <= 1.05 for each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autopar.models.gpt import GPT, GPTConfig, gpt_loss  # noqa: E402


def _config(args) -> GPTConfig:
    return GPTConfig(
        hidden=args["hidden"], layers=args["layers"], heads=args["heads"], vocab=args["vocab"],
        seq=args["seq"], tie_embeddings=False,
    )  # fmt: skip


def _model(args) -> GPT:
    torch.manual_seed(0)
    return GPT(_config(args))


def _batch(args):
    g = torch.Generator().manual_seed(1)
    shape = (args["batch"], args["seq"])
    return torch.randint(0, args["vocab"], shape, generator=g), torch.randint(
        0, args["vocab"], shape, generator=g
    )


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4)


# ------------------------------------------------------------------------------ hand-written
class _HandDP:
    def __init__(self, args):
        from torch.nn.parallel import DistributedDataParallel

        self.model = DistributedDataParallel(_model(args))
        self.opt = _adamw(self.model.parameters())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def step(self, tokens, targets):
        n = tokens.shape[0] // self.world
        sl = slice(self.rank * n, (self.rank + 1) * n)
        self.opt.zero_grad(set_to_none=True)
        loss = gpt_loss(self.model(tokens[sl]), targets[sl])
        loss.backward()
        self.opt.step()
        return loss


class _HandTP:
    def __init__(self, args):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        tp = dist.get_world_size()
        mesh = init_device_mesh("cpu", (tp,))
        model = _model(args)
        plan = {
            "tok_emb": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        }
        for i, layer in enumerate(model.layers):
            layer.attn.heads //= tp
            layer.attn.kv_heads //= tp
            for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc1"):
                plan[f"layers.{i}.{name}"] = ColwiseParallel()
            for name in ("attn.o_proj", "mlp.fc2"):
                plan[f"layers.{i}.{name}"] = RowwiseParallel()
        self.model = parallelize_module(model, mesh, plan)
        self.opt = _adamw(self.model.parameters())

    def step(self, tokens, targets):
        from torch.distributed.tensor.parallel import loss_parallel

        self.opt.zero_grad(set_to_none=True)
        with loss_parallel():
            logits = self.model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
        self.opt.step()
        return loss


class _Stage0(nn.Module):
    def __init__(self, gpt: GPT, cut: int):
        super().__init__()
        self.tok_emb, self.pos_emb = gpt.tok_emb, gpt.pos_emb
        self.layers = nn.ModuleList(gpt.layers[:cut])

    def forward(self, tokens):
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return x


class _Stage1(nn.Module):
    def __init__(self, gpt: GPT, cut: int):
        super().__init__()
        self.layers = nn.ModuleList(gpt.layers[cut:])
        self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


class _HandPP:
    def __init__(self, args):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        gpt = _model(args)
        cut = len(gpt.layers) // 2
        self.rank = dist.get_rank()
        mod = _Stage0(gpt, cut) if self.rank == 0 else _Stage1(gpt, cut)
        self.opt = _adamw(mod.parameters())
        m = args["micro_batches"]
        mbs = args["batch"] // m
        x = torch.zeros(mbs, args["seq"], args["hidden"], requires_grad=True)  # grads flow back
        tok = torch.zeros(mbs, args["seq"], dtype=torch.long)
        out = x if self.rank == 0 else torch.zeros(mbs, args["seq"], args["vocab"])
        stage = PipelineStage(
            mod, self.rank, 2, torch.device("cpu"), input_args=tok if self.rank == 0 else x, output_args=out
        )
        self.schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=gpt_loss)

    def step(self, tokens, targets):
        self.opt.zero_grad(set_to_none=True)
        if self.rank == 0:
            self.schedule.step(tokens)
        else:
            self.schedule.step(target=targets, losses=[], return_outputs=False)
        self.opt.step()


HAND = {"dp": _HandDP, "tp": _HandTP, "pp": _HandPP}


# ------------------------------------------------------------------------------ ours
class _Ours:
    def __init__(self, args, mode):
        import autopar

        m = args["micro_batches"] if mode == "pp" else 1
        plan = autopar.Plan.manual(
            **{mode: dist.get_world_size()}, global_batch=args["batch"],
            micro_batch_size=args["batch"] // (m * (2 if mode == "dp" else 1)),
        )  # fmt: skip
        batch = _batch(args)
        self.compiled = autopar.compile(
            _model(args), plan.world_size, example_inputs=batch, loss_fn=gpt_loss, optimizer=_adamw,
            plan=plan, global_batch=args["batch"],
        )  # fmt: skip

    def step(self, tokens, targets):
        return self.compiled.step((tokens, targets))


def _timed(fn, *args) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn(*args)
    dist.barrier()
    return time.perf_counter() - t0


def _rank(mode: str, args: dict) -> dict:
    torch.set_num_threads(args["threads"])
    ours, hand = _Ours(args, mode), HAND[mode](args)
    tokens, targets = _batch(args)
    t_ours, t_hand = [], []
    for i in range(args["warmup"] + args["steps"]):
        a = _timed(ours.step, tokens, targets)
        b = _timed(hand.step, tokens, targets)
        if i >= args["warmup"]:
            t_ours.append(a)
            t_hand.append(b)
    return {"ours_s": statistics.median(t_ours), "hand_s": statistics.median(t_hand)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="dp,tp,pp")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", default=None, help="also write the results here")
    args = vars(p.parse_args(argv))
    from autopar.runtime.launch import run_local

    rows = []
    print(f"{'mode':>4}  {'autopar ms':>10}  {'hand-written ms':>15}  {'ratio':>6}")
    for mode in args["modes"].split(","):
        res = run_local(_rank, 2, args=(mode, args), timeout_s=300)
        ours = max(r["ours_s"] for r in res)
        hand = max(r["hand_s"] for r in res)
        rows.append({"mode": mode, "ours_s": ours, "hand_s": hand, "ratio": ours / hand})
        print(f"{mode:>4}  {ours * 1e3:10.1f}  {hand * 1e3:15.1f}  {ours / hand:6.3f}", flush=True)
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump({"config": args, "results": rows}, f, indent=2)
    worst = max(r["ratio"] for r in rows)
    print(
        f"worst ratio {worst:.3f} (target <= 1.05); medians of {args['steps']} steps after {args['warmup']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""THE reference-vs-parallel helper: one device vs the compiled run, step by step.

Oracle: the same model (same seed), the same global batches and the same optimizer run eagerly on
one device for ``steps`` steps. The compiled run (any plan, any number of gloo ranks) must give,
after every step, the same loss, the same full gradients (gathered from every shard) and the
same updated parameters (``state_dict()``), within ``rtol=1e-5, atol=1e-6`` in fp32.

Dropout: the reference swaps ``nn.Dropout`` for :class:`autopar.lower.rng.DeterministicDropout`,
draws functional dropouts and SDPA's ``dropout_p`` (as explicit attention ops) from the same
counter-based generator (:func:`autopar.lower.rng.make_deterministic`) and feeds the step's sample
ids, so it draws exactly the masks the compiled graph draws for the same samples (see
``autopar/lower/rng.py``); everything else runs as the eager model does.

Usage (everything must be picklable: module-level builders, ``functools.partial``)::

    from autopar.testing.dist import run_ranks
    from autopar.testing.equivalence import assert_equivalent, gpt_case, reference, run_plans

    case = gpt_case(layers=2)
    trajs = run_ranks(run_plans, 2, args=(case, [Plan.manual(dp=2, global_batch=8)]))
    assert_equivalent(reference(case), trajs[0][0], "dp=2")
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import autopar
from autopar.lower import rng
from autopar.models.gpt import GPT, GPTConfig, gpt_loss

RTOL, ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Case:
    """A model, its data, loss and optimizer: everything both runs need."""

    name: str
    build: Callable[[], nn.Module]
    """Builds the model with its initial weights (seeded inside: every call gives the same model)."""
    make_batches: Callable[[int], list[tuple]]
    """``make_batches(steps)``: one global batch ``(inputs..., targets...)`` per step."""
    loss_fn: Callable | None
    global_batch: int
    optimizer: Callable = field(default=functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-6))
    """AdamW with eps=1e-6 (not 1e-8): Adam's update ``m / (sqrt(v) + eps)`` is scale-free, so a
    gradient that is analytically zero but ~1e-10 in fp32 (the key-projection bias: softmax is
    shift-invariant) becomes a full ``±lr`` step whose sign is rounding noise. With eps=1e-6 such
    noise moves a parameter < 1e-7, while real gradients (>= 1e-4 here) are unaffected."""
    steps: int = 3
    num_targets: int = 1


@dataclass
class Trajectory:
    losses: list[float] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Full gradients after each step's backward, by parameter name."""
    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Full state dict after each step's update."""


# ----------------------------------------------------------------------------------- cases
def build_gpt(cfg: GPTConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return GPT(cfg)


def token_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq), generator=g)
        targets = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append((tokens, targets))
    return out


def gpt_case(
    *,
    layers: int = 2,
    hidden: int = 16,
    heads: int = 4,
    vocab: int = 64,
    seq: int = 8,
    batch: int = 8,
    dropout: float = 0.0,
    **cfg: Any,
) -> Case:
    config = GPTConfig(
        hidden=hidden, layers=layers, heads=heads, vocab=vocab, seq=seq, dropout=dropout, **cfg
    )
    return Case(
        name=f"gpt(l={layers},h={hidden},dropout={dropout})",
        build=functools.partial(build_gpt, config, 0),
        make_batches=functools.partial(token_batches, vocab, batch, seq),
        loss_fn=gpt_loss,
        global_batch=batch,
    )


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLPNet(nn.Module):
    """A residual MLP: input projection, repeated blocks (``layers.<i>``), output projection."""

    def __init__(self, width: int = 16, hidden: int = 32, layers: int = 2, inputs: int = 8, outputs: int = 4):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.layers = nn.ModuleList(MLPBlock(width, hidden) for _ in range(layers))
        self.out = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def build_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLPNet()


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


def regression_batches(batch: int, steps: int, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(steps)]


def mlp_case(batch: int = 8) -> Case:
    return Case(
        name="mlp",
        build=functools.partial(build_mlp, 0),
        make_batches=functools.partial(regression_batches, batch),
        loss_fn=mse_loss,
        global_batch=batch,
    )


def lm_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on a HuggingFace ``CausalLMOutput``."""
    logits = out.logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )


def build_hf(kind: str, seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg)


def hf_case(kind: str, batch: int = 8, seq: int = 8) -> Case:
    """HuggingFace GPT-2 or Llama from a small config (random init, nothing downloaded)."""
    return Case(
        name=f"hf-{kind}",
        build=functools.partial(build_hf, kind, 0),
        make_batches=functools.partial(token_batches, 64, batch, seq),
        loss_fn=lm_loss,
        global_batch=batch,
    )


def lm_aux_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """:func:`lm_loss` plus ``AUX_COEF`` times the model's load-balancing loss (``out.aux_loss``,
    HuggingFace MoE models with ``output_router_logits=True``)."""
    return lm_loss(out, labels) + AUX_COEF * out.aux_loss


AUX_COEF = 0.1
"""Weight of the load-balancing loss in :func:`lm_aux_loss` (HuggingFace's default, 0.001, would
leave its gradient below the tests' tolerance)."""


def build_hf_moe(kind: str, seed: int, aux: bool = False) -> nn.Module:
    """HuggingFace ``MixtralForCausalLM`` (``kind="mixtral"``) or ``Qwen2MoeForCausalLM``
    (``"qwen2_moe"``: shared expert, ``norm_topk_prob=False``) from a small config: 2 layers, 4
    experts, top-2, random init (the router re-drawn with std 0.5 so routing is far from ties).
    ``aux``: ``output_router_logits=True`` (the model returns its load-balancing loss)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        max_position_embeddings=16, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0,
        output_router_logits=aux,
    )  # fmt: skip
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=8, num_local_experts=4, **common)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=4,
            norm_topk_prob=False, **common,
        )  # fmt: skip
    else:
        raise ValueError(f"kind={kind!r}: choose 'mixtral' or 'qwen2_moe'")
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def padded_token_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 3) -> list[tuple]:
    """``(tokens, attention_mask, targets)`` per step; every third sequence left-padded by 3."""
    out = []
    for tokens, targets in token_batches(vocab, batch, seq, steps, seed):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[::3, :3] = 0
        out.append((tokens, mask, targets))
    return out


def hf_moe_case(kind: str, batch: int = 8, seq: int = 8, aux: bool = False, padded: bool = False) -> Case:
    """HuggingFace Mixtral or Qwen2-MoE (see :func:`build_hf_moe`) with the next-token loss, plus
    its load-balancing loss when ``aux`` (:func:`lm_aux_loss`); ``padded``: the model also takes an
    attention mask (:func:`padded_token_batches`), which the load-balancing loss weights by."""
    batches = padded_token_batches if padded else token_batches
    return Case(
        name=f"hf-{kind}{'-aux' if aux else ''}{'-padded' if padded else ''}",
        build=functools.partial(build_hf_moe, kind, 0, aux),
        make_batches=functools.partial(batches, 64, batch, seq),
        loss_fn=lm_aux_loss if aux else lm_loss,
        global_batch=batch,
    )


# ----------------------------------------------------------------------------------- runs
def reference(case: Case) -> Trajectory:
    """The single-device run (see the module docstring)."""
    model = rng.make_deterministic(case.build())
    opt = case.optimizer(model.parameters())
    out = Trajectory()
    for step, batch in enumerate(case.make_batches(case.steps)):
        cut = len(batch) - case.num_targets
        opt.zero_grad(set_to_none=True)
        with rng.sample_ids(rng.sample_ids_for_step(step, case.global_batch)):
            output = model(*batch[:cut])
        loss = case.loss_fn(output, *batch[cut:]) if case.loss_fn else output
        loss.backward()
        out.losses.append(loss.item())
        out.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )
        opt.step()
        out.params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def parallel_run(case: Case, plan: autopar.Plan) -> tuple[Trajectory, autopar.ParallelModule]:
    """The compiled run of ``case`` under ``plan`` and the compiled module (for its program);
    call on every rank (or in-process for 1 rank)."""
    model = case.build()
    batches = case.make_batches(case.steps)
    compiled = autopar.compile(
        model,
        plan.world_size,
        example_inputs=batches[0],
        loss_fn=case.loss_fn,
        optimizer=case.optimizer,
        plan=plan,
        global_batch=case.global_batch,
        num_targets=case.num_targets,
    )
    out = Trajectory()
    for batch in batches:
        out.losses.append(compiled.step(batch))
        out.grads.append(compiled.full_grads())
        out.params.append(compiled.state_dict())
    return out, compiled


def parallel(case: Case, plan: autopar.Plan) -> Trajectory:
    """The compiled run of ``case`` under ``plan``; call on every rank (or in-process for 1 rank)."""
    return parallel_run(case, plan)[0]


def run_plans(case: Case, plans: list[autopar.Plan]) -> list[Trajectory]:
    """Rank function: the compiled trajectory of ``case`` under each plan, in one launch."""
    return [parallel(case, plan) for plan in plans]


def run_jobs(jobs: list[tuple[Case, list[autopar.Plan]]]) -> list[list[Trajectory]]:
    """Rank function: several cases, each under several plans, in one launch."""
    return [run_plans(case, plans) for case, plans in jobs]


def check_jobs(per_rank: list, jobs: list[tuple[Case, list[autopar.Plan]]]) -> None:
    """Assert every (case, plan) of a :func:`run_jobs` launch equals its one-device reference."""
    failures = []
    for j, (case, plans) in enumerate(jobs):
        ref = reference(case)
        for p, plan in enumerate(plans):
            problems = compare(ref, per_rank[0][j][p])
            if problems:
                failures.append(
                    f"{case.name} {plan.summary()}: {len(problems)} mismatches, e.g. {problems[:3]}"
                )
            for r in range(1, len(per_rank)):
                if per_rank[r][j][p].losses != per_rank[0][j][p].losses:
                    failures.append(
                        f"{case.name} {plan.summary()}: rank {r} reports other losses than rank 0"
                    )
    assert not failures, "\n".join(failures)


def reference_output(case: Case) -> torch.Tensor:
    """Inference oracle: the eager model's output on the first batch's inputs."""
    model = case.build().eval()
    batch = case.make_batches(1)[0]
    with torch.no_grad():
        return model(*batch[: len(batch) - case.num_targets])


def parallel_output(case: Case, plan: autopar.Plan) -> Any:
    model = case.build()
    batch = case.make_batches(1)[0]
    inputs = batch[: len(batch) - case.num_targets]
    compiled = autopar.compile(
        model,
        plan.world_size,
        example_inputs=inputs,
        plan=plan,
        global_batch=case.global_batch,
        mode="inference",
    )
    return compiled(*inputs)


def run_inference_plans(case: Case, plans: list[autopar.Plan]) -> list:
    return [parallel_output(case, plan) for plan in plans]


def run_inference_jobs(jobs: list[tuple[Case, list[autopar.Plan]]]) -> list[list]:
    """Rank function: the compiled inference output of several cases, each under several plans."""
    return [run_inference_plans(case, plans) for case, plans in jobs]


# ----------------------------------------------------------------------------------- compare
def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, float("inf")
    diff = (a.double() - b.double()).abs()
    ok = bool((diff <= atol + rtol * b.double().abs()).all())
    return ok, float(diff.max()) if diff.numel() else 0.0


def compare(ref: Trajectory, par: Trajectory, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Every mismatch as a readable line (empty = equivalent)."""
    problems = []
    if len(ref.losses) != len(par.losses):
        return [f"{len(par.losses)} steps ran, expected {len(ref.losses)}"]
    for step in range(len(ref.losses)):
        ok, d = _close(torch.tensor(par.losses[step]), torch.tensor(ref.losses[step]), rtol, atol)
        if not ok:
            problems.append(f"step {step}: loss {par.losses[step]!r} vs {ref.losses[step]!r}")
        for kind, r, p in (
            ("grad", ref.grads[step], par.grads[step]),
            ("param", ref.params[step], par.params[step]),
        ):
            for name, expected in r.items():
                if name not in p:
                    problems.append(f"step {step}: {kind} {name} missing")
                    continue
                ok, d = _close(p[name], expected, rtol, atol)
                if not ok:
                    problems.append(f"step {step}: {kind} {name} differs (max abs diff {d:.3g})")
    return problems


def assert_equivalent(
    ref: Trajectory, par: Trajectory, label: str, rtol: float = RTOL, atol: float = ATOL
) -> None:
    problems = compare(ref, par, rtol, atol)
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise AssertionError(f"{label}: {len(problems)} mismatches vs one device:\n  {shown}{more}")


def assert_same_on_all_ranks(per_rank: list, label: str) -> None:
    """Every rank reports the same losses (the loss is a global quantity)."""
    first = [t.losses for t in per_rank[0]] if isinstance(per_rank[0], list) else per_rank[0].losses
    for r, traj in enumerate(per_rank[1:], start=1):
        losses = [t.losses for t in traj] if isinstance(traj, list) else traj.losses
        assert losses == first, f"{label}: rank {r} losses {losses} differ from rank 0 {first}"


def clone_case(case: Case, **changes: Any) -> Case:
    return copy.replace(case, **changes) if hasattr(copy, "replace") else Case(**{**case.__dict__, **changes})

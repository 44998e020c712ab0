"""HuggingFace's MoE load-balancing loss as one device computes it: statistics of the whole batch.

With ``config.output_router_logits=True`` a HuggingFace Mixtral / Qwen2-MoE model adds
``router_aux_loss_coef * E * sum_e f_e P_e`` to its loss, where ``f_e`` (share of routing slots
sent to expert ``e``) and ``P_e`` (mean router probability of ``e``) are means over every layer
and every token of the batch. The product of two means is not a mean: split the batch over
data-parallel replicas and each would compute another loss. The traced graph holds it as one op,
``autopar::hf_balance_loss`` (:mod:`autopar.tracing.hf_moe`); :func:`apply` rewrites that op, on a
rank's stage modules after the tensor-parallel lowering and the pipeline split (like BatchNorm,
:mod:`autopar.lower.batchnorm`), into :func:`balance_loss`, which

* sums the three statistics (``[2E + 1]``: slot counts, probability sums, rows) over the dp group
  (ep folds into dp), so every replica computes the whole batch's loss;
* all-reduces the statistics' gradient in backward: each replica's loss holds the whole batch's aux
  term, so the sum over replicas of ``d aux / d stats`` is ``dp`` times the one-device gradient,
  which the data-parallel engine's mean over replicas brings back to one device's.

Tensor-parallel ranks hold the same tokens (the block runs whole on each), so nothing is summed over
tp. Micro-batches cannot see the whole batch: a plan with more than one micro-batch per replica is
refused (:func:`check_plan`), and the planner keeps one (the op is marked ``batch_statistics``).
The cost is one all-reduce of ``2E + 1`` floats per step, far below anything the estimator charges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from autopar.core.plan import Plan
from autopar.lower.batchnorm import DPStats, attach_context, whole_batch_refusal
from autopar.tracing import hf_moe
from autopar.tracing.hf_moe import is_balance_loss

CTX_ATTR = "autopar_dp_aux"


class _SumOverReplicas(torch.autograd.Function):
    """All-reduce (sum) over the dp group; backward all-reduces the gradient (every replica used
    the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dp: DPStats) -> torch.Tensor:  # type: ignore[override]
        ctx.dp = dp
        out = x.clone()
        dist.all_reduce(out, group=dp.require_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.dp.require_group())
        return out, None


def balance_loss(
    logits: list[torch.Tensor], mask: torch.Tensor | None, experts: int, top_k: int, *, dp: DPStats
) -> torch.Tensor:
    """HuggingFace's load-balancing loss over the whole batch: this rank's statistics summed over
    ``dp`` (see the module docstring)."""
    stats = hf_moe.balance_statistics(list(logits), mask, experts, top_k)
    if dp.world_size > 1:
        stats = _SumOverReplicas.apply(stats, dp)
    return hf_moe.balance_from_statistics(stats, experts)


def check_plan(gm: torch.fx.GraphModule, plan: Plan) -> bool:
    """Whether ``gm`` computes the load-balancing loss; raises :class:`PlanError` when ``plan`` runs
    more than one micro-batch per replica (no micro-batch sees the whole batch)."""
    found = any(is_balance_loss(n) for n in gm.graph.nodes)
    m = plan.num_micro_batches
    if found and m > 1:
        raise whole_batch_refusal(
            "the model computes HuggingFace's MoE load-balancing loss (config.output_router_logits="
            "True), a statistic of the whole batch over every layer's routing",
            plan,
            "set output_router_logits=False and add a per-micro-batch auxiliary loss of your own",
        )
    return found


def apply(stages: list[nn.Module], dp: DPStats) -> int:
    """Rewrite every traced load-balancing loss inside ``stages`` into :func:`balance_loss` over
    ``dp``; returns how many. In place."""
    count = 0
    for stage in stages:
        for gm in [m for m in stage.modules() if isinstance(m, torch.fx.GraphModule)]:
            found = [n for n in gm.graph.nodes if is_balance_loss(n)]
            if not found:
                continue
            ctx = attach_context(gm, CTX_ATTR, dp)
            for node in found:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(balance_loss, node.args, {**node.kwargs, "dp": ctx})
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            gm.graph.lint()
            gm.recompile()
            count += len(found)
    return count


__all__ = ["CTX_ATTR", "apply", "balance_loss", "check_plan", "is_balance_loss"]

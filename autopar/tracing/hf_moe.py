"""HuggingFace sparse MoE blocks as one ``moe`` region under ``torch.export``.

HuggingFace ``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` only trace with ``torch.export``,
which would inline their ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock`` into the ATen ops
of one example routing (``nonzero``, per-expert gathers). To keep each block whole:

1. :func:`hf_moe_regions` swaps every supported block, for the duration of the export only, for a
   :class:`HFMoERegion` that holds the block's own submodules (so parameter names do not change:
   ``mlp.gate.weight``, ``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``, Qwen2-MoE's
   ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight``) and whose forward is the custom op
   ``autopar::hf_moe_region`` (a fake impl gives its shape; the real impl and its autograd formula
   compute the block). Export records one ``call_function`` node per block.
2. :func:`fold_regions` replaces each such node by a ``call_module`` node on an :class:`HFMoERegion`
   installed at the block's path of the exported graph module, holding that graph module's own
   parameters. From there the region is exactly like autopar's own MoE layer: op kind ``moe``,
   ``OpNode.meta["moe"]`` from :attr:`HFMoERegion.config`, swapped by the expert lowering
   (:mod:`autopar.lower.expert`).

The region's forward reproduces the block (transformers 5.x layout, stacked experts):

* router ``logits = x @ gate.weight^T``, ``p = softmax(logits)`` in fp32, the ``top_k`` largest;
  Mixtral renormalises them over the k, Qwen2-MoE only with ``norm_topk_prob``;
* expert ``e``: ``gate, up = (x @ gate_up_proj[e]^T).chunk(2)``, ``(act(gate) * up) @ down_proj[e]^T``,
  times the token's weight, summed over the token's experts in expert order;
* Qwen2-MoE adds ``sigmoid(x @ shared_expert_gate.weight^T) * shared_expert(x)``.

The load-balancing loss (``config.output_router_logits=True``). HuggingFace records every layer's
router logits with a forward hook on the router and adds ``router_aux_loss_coef *
load_balancing_loss_func(router_logits, E, k, attention_mask)`` to the loss: ``E * sum_e f_e P_e``
with ``f_e`` the share of all routing slots of all layers and tokens sent to ``e`` and ``P_e`` the
mean router probability of ``e``, both over the *whole batch*. During the export the region then
uses ``autopar::hf_moe_region_logits`` (output and router logits), hands the logits to the router's
hooks as the router would, and the loss function is replaced by the custom op
``autopar::hf_balance_loss`` (:func:`balance_loss`, the same formula). The lowering
(:mod:`autopar.lower.moe_aux`) sums its three statistics (slot counts, probability sums, rows) over
the data-parallel group, so every replica computes the whole batch's loss; micro-batches cannot see
the whole batch, so a plan must give each replica one micro-batch (as for BatchNorm).

Blocks not kept as a region (each named with the reason by :func:`hf_moe_regions`, reported as a
graph note): the per-expert ``experts[i].w1/w2/w3`` layout of transformers 4.x and a training block
with Mixtral's ``router_jitter_noise > 0`` (random). Those stay inlined ops, which ``ep > 1`` refuses.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from autopar.core.errors import TraceError

HF_MOE_BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen2MoeSparseMoeBlock": "qwen2_moe"}
"""HuggingFace block class name -> the routing family :class:`HFMoERegion` reproduces."""


@dataclass(frozen=True)
class HFMoESpec:
    """Shape and routing of one HuggingFace sparse MoE block (also the estimator's interface, read
    by :func:`autopar.tracing.opkinds.moe_meta`: ``experts``, ``top_k``, ``hidden``, ``ffn``,
    ``shared_experts``, ``capacity_factor``)."""

    block: str
    """HuggingFace class name, e.g. ``MixtralSparseMoeBlock``."""
    hidden: int
    ffn: int
    """Each routed expert's inner width."""
    experts: int
    top_k: int
    norm_topk_prob: bool
    """Renormalise the top-k probabilities over the k (Mixtral: always)."""
    act: str
    """``config.hidden_act``."""
    shared_ffn: int = 0
    """Qwen2-MoE's sigmoid-gated shared expert inner width (0: none)."""
    router_logits: bool = False
    """``config.output_router_logits``: the region also returns its router logits ``[T, E]`` (read
    by the load-balancing loss)."""

    @property
    def shared_experts(self) -> int:
        """The shared expert in units of a routed expert's width (rounded up), for the cost model."""
        return math.ceil(self.shared_ffn / self.ffn) if self.shared_ffn else 0

    @property
    def capacity_factor(self) -> None:
        """HuggingFace blocks drop nothing."""
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HFMoESpec:
        return cls(**json.loads(text))


def unsupported_reason(block: nn.Module) -> str | None:
    """Why ``block`` (a HuggingFace sparse MoE block) cannot be kept as a region, or None."""
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if not all(isinstance(getattr(experts, a, None), torch.Tensor) for a in ("gate_up_proj", "down_proj")):
        return (
            "its experts are not stacked gate_up_proj/down_proj tensors (transformers 4.x per-expert "
            "w1/w2/w3 layout); upgrade transformers to 5.x"
        )
    layout = [getattr(experts, a, d) for a, d in (("has_bias", False), ("is_transposed", False),
                                                   ("is_concatenated", True), ("has_gate", True))]  # fmt: skip
    if layout != [False, False, True, True] or not isinstance(getattr(gate, "weight", None), torch.Tensor):
        return "its expert or router layout (bias, transposed or interleaved weights) is not the standard one"
    config = getattr(experts, "config", None) or getattr(gate, "config", None)
    if block.training and getattr(block, "jitter_noise", 0) > 0:
        return "router_jitter_noise > 0 multiplies the input by random noise in training; set it to 0"
    if not hasattr(experts, "act_fn") or config is None:
        return "it has no act_fn or config"
    return None


def spec_of(block: nn.Module) -> HFMoESpec:
    experts, gate = block.experts, block.gate
    e, two_f, h = experts.gate_up_proj.shape
    shared = getattr(block, "shared_expert", None)
    return HFMoESpec(
        block=type(block).__name__, hidden=int(h), ffn=int(two_f) // 2, experts=int(e), top_k=int(gate.top_k),
        norm_topk_prob=bool(getattr(gate, "norm_topk_prob", True)), act=str(experts.config.hidden_act),
        shared_ffn=int(shared.gate_proj.out_features) if shared is not None else 0,
        router_logits=bool(getattr(experts.config, "output_router_logits", False)),
    )  # fmt: skip


_ACTS: dict[str, nn.Module] = {}


def activation(name: str) -> nn.Module:
    """``transformers.activations.ACT2FN[name]`` (cached)."""
    if name not in _ACTS:
        from transformers.activations import ACT2FN

        _ACTS[name] = ACT2FN[name]
    return _ACTS[name]


def is_shape_only(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type == "meta" or is_fake(x)


# ------------------------------------------------------------------------------ the function
def route(
    flat: torch.Tensor, router: torch.Tensor, spec: HFMoESpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flat: [T, h]`` -> (weights ``[T, k]`` in fp32, expert index ``[T, k]``, router logits
    ``[T, E]``), as the HF router."""
    logits = F.linear(flat, router)
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top, index, logits


def expert(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, spec: HFMoESpec) -> torch.Tensor:
    """One expert on ``rows: [n, h]`` (its ``gate_up_proj[e]: [2f, h]``, ``down_proj[e]: [h, f]``)."""
    gate, up = F.linear(rows, gate_up).chunk(2, dim=-1)
    return F.linear(activation(spec.act)(gate) * up, down)


def shared_output(flat: torch.Tensor, params: list[torch.Tensor], spec: HFMoESpec) -> torch.Tensor:
    """Qwen2-MoE's ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` (params: gate_proj,
    up_proj, down_proj, shared_expert_gate weights)."""
    g, u, d, sg = params
    inner = activation(spec.act)(F.linear(flat, g)) * F.linear(flat, u)
    return torch.sigmoid(F.linear(flat, sg)) * F.linear(inner, d)


def moe_forward(
    x: torch.Tensor, params: list[torch.Tensor], spec: HFMoESpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output for ``x: [..., h]`` and its router logits ``[T, E]``; ``params = [router,
    gate_up_proj, down_proj, *shared]``. On meta/fake tensors every expert runs on an even share of
    the slots (balanced routing, what the cost model assumes): shapes and saved activations
    without data."""
    router, gate_up, down = params[:3]
    flat = x.reshape(-1, spec.hidden)
    weights, index, logits = route(flat, router, spec)
    if is_shape_only(x):
        slots = _balanced(flat, gate_up, down, spec)  # [T, k, h]
        out = (slots * weights.unsqueeze(-1)).sum(1).to(flat.dtype)
    else:
        out = torch.zeros_like(flat)
        for e in range(spec.experts):
            token, pos = torch.where(index == e)
            if token.numel():
                y = expert(flat[token], gate_up[e], down[e], spec) * weights[token, pos, None]
                out.index_add_(0, token, y.to(out.dtype))
    if spec.shared_ffn:
        out = out + shared_output(flat, params[3:], spec)
    return out.view(x.shape), logits


def _balanced(flat: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, spec: HFMoESpec) -> torch.Tensor:
    k, e, h = spec.top_k, spec.experts, spec.hidden
    slots = flat.repeat_interleave(k, dim=0)
    n = slots.shape[0]
    per = math.ceil(n / e)
    padded = F.pad(slots, (0, 0, 0, per * e - n)).view(e, per, h)
    gate, up = torch.bmm(padded, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(activation(spec.act)(gate) * up, down.transpose(1, 2)).reshape(per * e, h)[:n]
    return out.view(-1, k, h)


# ------------------------------------------------------------------------------ the custom ops
@torch.library.custom_op("autopar::hf_moe_region", mutates_args=())
def hf_moe_region(x: torch.Tensor, params: list[torch.Tensor], spec: str) -> torch.Tensor:
    """One HuggingFace sparse MoE block as an opaque op (``spec``: :meth:`HFMoESpec.to_json`)."""
    return moe_forward(x, list(params), HFMoESpec.from_json(spec))[0].clone()


@torch.library.custom_op("autopar::hf_moe_region_logits", mutates_args=())
def hf_moe_region_logits(
    x: torch.Tensor, params: list[torch.Tensor], spec: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hf_moe_region` that also returns the router logits ``[T, E]`` (``output_router_logits``)."""
    out, logits = moe_forward(x, list(params), HFMoESpec.from_json(spec))
    return out.clone(), logits.clone()


@hf_moe_region.register_fake
def _hf_moe_region_fake(x: torch.Tensor, params: list[torch.Tensor], spec: str) -> torch.Tensor:
    return torch.empty_like(x)


@hf_moe_region_logits.register_fake
def _hf_moe_region_logits_fake(
    x: torch.Tensor, params: list[torch.Tensor], spec: str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty((rows, params[0].shape[0]))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    x, params, spec = inputs
    ctx.save_for_backward(x, *params)
    ctx.spec = spec


def _backward(ctx, *grads_out: torch.Tensor):  # noqa: ANN001, ANN202 - torch.library's signature
    """Recompute the forward with autograd and differentiate it (the output, and the router logits
    when the op returns them)."""
    x, *params = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(t.requires_grad or t.is_floating_point()) for t in (x, *params)]
        outs = moe_forward(inputs[0], inputs[1:], HFMoESpec.from_json(ctx.spec))
        pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return grads[0], list(grads[1:]), None


hf_moe_region.register_autograd(_backward, setup_context=_setup_context)
hf_moe_region_logits.register_autograd(_backward, setup_context=_setup_context)


def balance_statistics(
    logits: list[torch.Tensor], mask: torch.Tensor | None, experts: int, top_k: int
) -> torch.Tensor:
    """The load-balancing loss's three sums over this rank's tokens, stacked ``[2E + 1]`` in fp32:
    routing slots per expert (every layer's top-k, no gradient), router probabilities per expert
    (summed over tokens and layers), rows (tokens times layers; the attention mask's weight when
    given)."""
    counts = torch.zeros(experts, dtype=torch.float32, device=logits[0].device)
    probs_sum = torch.zeros(experts, dtype=torch.float32, device=logits[0].device)
    rows = torch.zeros((), dtype=torch.float32, device=logits[0].device)
    weight = None if mask is None else mask.reshape(-1).to(torch.float32)
    for layer in logits:
        probs = torch.softmax(layer, dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        with torch.no_grad():
            hits = F.one_hot(chosen, experts).to(torch.float32)  # [T, k, E]
            if weight is not None:
                hits = hits * weight[:, None, None]
            counts = counts + hits.sum((0, 1))
        if weight is None:
            probs_sum = probs_sum + probs.float().sum(0)
            rows = rows + probs.shape[0]
        else:
            probs_sum = probs_sum + (probs.float() * weight[:, None]).sum(0)
            rows = rows + weight.sum()
    return torch.cat([counts, probs_sum, rows.reshape(1)])


def balance_from_statistics(stats: torch.Tensor, experts: int) -> torch.Tensor:
    """``E * sum_e (counts_e / rows) * (probs_e / rows)`` from :func:`balance_statistics`' sums."""
    counts, probs_sum, rows = stats[:experts], stats[experts : 2 * experts], stats[2 * experts]
    return experts * torch.sum((counts / rows) * (probs_sum / rows))


def balance_loss(
    logits: list[torch.Tensor], mask: torch.Tensor | None, experts: int, top_k: int
) -> torch.Tensor:
    """HuggingFace's ``load_balancing_loss_func`` (Switch Transformer's loss over every layer's
    routing slots) on one batch; the distributed form sums :func:`balance_statistics` over ranks."""
    return balance_from_statistics(balance_statistics(logits, mask, experts, top_k), experts)


@torch.library.custom_op("autopar::hf_balance_loss", mutates_args=())
def hf_balance_loss(
    logits: list[torch.Tensor], mask: torch.Tensor | None, experts: int, top_k: int
) -> torch.Tensor:
    """:func:`balance_loss` as one op of the traced graph (rewritten by :mod:`autopar.lower.moe_aux`)."""
    return balance_loss(list(logits), mask, experts, top_k).clone()


@hf_balance_loss.register_fake
def _hf_balance_loss_fake(
    logits: list[torch.Tensor], mask: torch.Tensor | None, experts: int, top_k: int
) -> torch.Tensor:
    return logits[0].new_empty((), dtype=torch.float32)


def _balance_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    logits, mask, experts, top_k = inputs
    ctx.save_for_backward(*logits, *([mask] if mask is not None else []))
    ctx.layers, ctx.experts, ctx.top_k = len(logits), experts, top_k


def _balance_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 - torch.library's signature
    saved = ctx.saved_tensors
    logits, mask = saved[: ctx.layers], (saved[ctx.layers] if len(saved) > ctx.layers else None)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in logits]
        loss = balance_loss(inputs, mask, ctx.experts, ctx.top_k)
        grads = torch.autograd.grad(loss, inputs, grad)
    return list(grads), None, None, None


hf_balance_loss.register_autograd(_balance_backward, setup_context=_balance_setup)


def is_balance_loss(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the traced load-balancing loss (``autopar::hf_balance_loss``)."""
    return node.op == "call_function" and node.target is hf_balance_loss._opoverload


def _traced_balance_loss(
    gate_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int | None = None,
    top_k: int = 2,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    """Stands in for HuggingFace's ``load_balancing_loss_func`` during the export: one op."""
    if gate_logits is None or not isinstance(gate_logits, tuple) or not gate_logits:
        return 0
    return hf_balance_loss(list(gate_logits), attention_mask, int(num_experts or 0), int(top_k))


# ------------------------------------------------------------------------------ the region module
class HFMoERegion(nn.Module):
    """A HuggingFace sparse MoE block as one leaf region (op kind ``moe``), holding the block's
    parameters under their HuggingFace names. ``marker=True`` (during export): forward is the
    custom op; otherwise forward computes the block (:func:`moe_forward`)."""

    autopar_region = "moe"

    def __init__(self, spec: HFMoESpec, block: nn.Module, marker: bool = False):
        super().__init__()
        self.config = spec
        self.marker = marker
        self.gate = block.gate
        self.experts = block.experts
        if spec.shared_ffn:
            self.shared_expert = block.shared_expert
            self.shared_expert_gate = block.shared_expert_gate

    def region_params(self) -> list[torch.Tensor]:
        """``[router, gate_up_proj, down_proj]`` (+ shared gate_proj, up_proj, down_proj, gate)."""
        out = [self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj]
        if self.config.shared_ffn:
            s = self.shared_expert
            out += [s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight, self.shared_expert_gate.weight]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block's output; with ``config.router_logits`` also the router logits (as a tuple, or,
        as a marker during the export, handed to the router's forward hooks the way HuggingFace's
        output recorder reads them)."""
        spec = self.config
        if not self.marker:
            out, logits = moe_forward(x, self.region_params(), spec)
            return (out, logits) if spec.router_logits else out
        if not spec.router_logits:
            return hf_moe_region(x, self.region_params(), spec.to_json())
        out, logits = hf_moe_region_logits(x, self.region_params(), spec.to_json())
        flat = x.reshape(-1, spec.hidden)
        for hook_id, hook in list(self.gate._forward_hooks.items()):
            if hook_id in self.gate._forward_hooks_with_kwargs:
                hook(self.gate, (flat,), {}, (logits, None, None))
            else:
                hook(self.gate, (flat,), (logits, None, None))
        return out


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


@contextmanager
def hf_moe_regions(model: nn.Module) -> Iterator[dict[str, str]]:
    """Swap ``model``'s supported HuggingFace sparse MoE blocks for marker regions while the block
    runs, restoring them afterwards. Yields ``{module path: reason}`` of the blocks left as they are."""
    swapped: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    for path, module in list(model.named_modules()):
        if type(module).__name__ not in HF_MOE_BLOCKS or any(path.startswith(p + ".") for p, _ in swapped):
            continue
        reason = unsupported_reason(module)
        if reason:
            skipped[path] = f"{type(module).__name__}: {reason}"
            continue
        _set_submodule(model, path, HFMoERegion(spec_of(module), module, marker=True))
        swapped.append((path, module))
    patched = []  # HuggingFace modules whose load_balancing_loss_func reads the regions' logits
    for _, module in swapped:
        source = sys.modules.get(type(module).__module__)
        if hasattr(source, "load_balancing_loss_func") and all(source is not m for m, _ in patched):
            patched.append((source, source.load_balancing_loss_func))
            source.load_balancing_loss_func = _traced_balance_loss
    try:
        yield skipped
    finally:
        for source, original in patched:
            source.load_balancing_loss_func = original
        for path, module in reversed(swapped):
            _set_submodule(model, path, module)


def fold_regions(gm: torch.fx.GraphModule) -> list[str]:
    """Replace every ``autopar::hf_moe_region`` node of an exported ``gm`` by a ``call_module`` node on
    an :class:`HFMoERegion` at the block's path (holding ``gm``'s own parameters); returns the paths."""
    ops = (torch.ops.autopar.hf_moe_region.default, torch.ops.autopar.hf_moe_region_logits.default)
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        x, params, spec_text = node.args
        if (
            not params
            or any(p.op != "get_attr" for p in params)
            or not str(params[0].target).endswith(".gate.weight")
        ):
            raise TraceError(
                f"the MoE region {node.name} reads its parameters through computed values, not the "
                "block's own parameters; autopar cannot keep it as one region"
            )
        path = str(params[0].target)[: -len(".gate.weight")]
        holder = gm.get_submodule(path)
        region = HFMoERegion(HFMoESpec.from_json(spec_text), holder)
        _set_submodule(gm, path, region)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for p in params:
            if not p.users:
                gm.graph.erase_node(p)
        folded.append(path)
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


__all__ = [
    "HFMoERegion",
    "HFMoESpec",
    "HF_MOE_BLOCKS",
    "activation",
    "balance_from_statistics",
    "balance_loss",
    "balance_statistics",
    "expert",
    "fold_regions",
    "hf_balance_loss",
    "hf_moe_region",
    "hf_moe_region_logits",
    "is_balance_loss",
    "hf_moe_regions",
    "moe_forward",
    "route",
    "shared_output",
    "spec_of",
    "unsupported_reason",
]

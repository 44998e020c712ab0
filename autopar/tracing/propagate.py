"""Run a traced graph node by node on meta or fake tensors: shapes, dtypes and saved activations.

One pass does both jobs. Every node gets ``node.meta["tensor_meta"]`` (``TensorMetadata`` of its
tensor output, or a tuple/list of them) and ``node.meta["val"]`` (the meta/fake value, unless the
tracer already set one). Autograd's saved-tensor hooks are active during the pass, so
``node.meta["saved_bytes"]`` is what autograd really keeps for backward while that node runs:

* each saved tensor is keyed by its storage; a storage saved again later (the LayerNorm output that
  the q, k and v projections all save) counts once, at the node that saved it first;
* the bytes are the storage's bytes (a saved view keeps its whole storage alive);
* parameters and buffers (and views of them, like ``weight.t()``) are not activations and are
  skipped;
* dropout runs as ``torch.native_dropout``, the kernel CUDA uses, which saves a 1-byte bool mask.
  CPU's composite dropout (``input * noise``) would save a noise tensor of the input's dtype; the
  plans are for accelerators, so the graph reports what they keep;
* ``scaled_dot_product_attention`` runs as the flash kernel's autograd node (fp16/bf16, no mask) or
  the memory-efficient one (otherwise), as on CUDA: they save q, k, v, the output and a per-row
  logsumexp. Meta and CPU would take the math path, which materialises the s x s scores.

Identical blocks (:mod:`autopar.tracing.blocks`) are run three times, not n times: when instance
2 of a block type matches instance 1 node by node (shapes, dtypes, saved bytes), each node of
instances 3.. whose inputs match the template's copies instance 1's results (fresh meta/fake
tensors of the same shape, so storage de-duplication downstream stays right) and records
``node.meta["replicated_from"]``. GPT-3 175B: 96 layers propagate in the time of 3.

Nothing is allocated: a model on ``meta`` runs on meta tensors; anything else runs under
``FakeTensorMode`` (real parameters are converted to fake ones on first use).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

log = logging.getLogger(__name__)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return (st._cdata, st.nbytes())


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """``value`` if it is a tensor, the tensors of a tuple or list (``chunk``'s, a module's ``(y, aux)``)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _tensor_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    if isinstance(value, (tuple, list)):
        metas = [_tensor_meta(v) for v in value]
        return type(value)(metas) if any(m is not None for m in metas) else None
    return None


class _SavedTensorRecorder:
    """Pack hook: sums the bytes of newly saved non-parameter storages into the current node."""

    def __init__(self, skip: Iterable[torch.Tensor]):
        self.skip_keys = {_storage_key(t)[0] for t in skip}
        self.seen: set[int] = set()
        self.keep_alive: list[torch.Tensor] = []
        self.current_bytes = 0
        self.current_count = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in self.skip_keys and key not in self.seen:
            self.seen.add(key)
            # Keeping the tensor alive keeps its storage address from being reused by a later one.
            self.keep_alive.append(t)
            self.current_bytes += nbytes
            self.current_count += 1
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def start_node(self) -> None:
        self.current_bytes = 0
        self.current_count = 0


_DROPOUT_FUNCTIONS = (F.dropout, torch.dropout, torch.ops.aten.dropout.default)


def _dropout_args(n: torch.fx.Node, args: tuple, kwargs: dict, module: nn.Module | None) -> tuple | None:
    """(input, p) when ``n`` is an active dropout, else None."""
    if n.op == "call_module" and type(module) is nn.Dropout:
        return (args[0], module.p) if module.training and module.p > 0 and not module.inplace else None
    if n.op != "call_function" or n.target not in _DROPOUT_FUNCTIONS:
        return None
    names = ("input", "p", "training", "inplace") if n.target is F.dropout else ("input", "p", "train")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    p = bound.get("p", 0.5)
    train = bound.get("training", bound.get("train", True))
    if not train or not p or bound.get("inplace", False):
        return None
    return bound["input"], p


def _fresh_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return t.requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh_like(v) for v in value)
    return value


def _same_value(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    ta, tb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    if ta is not None or tb is not None:
        return ta == tb
    try:
        return bool(a.meta.get("val") == b.meta.get("val"))
    except Exception:  # noqa: BLE001 - symbolic or exotic values: do not replicate
        return False


class _Replicator:
    """Decides, node by node, whether a later block instance can copy its template's results."""

    def __init__(self, templates: dict | None):
        self.copy_from: dict[torch.fx.Node, torch.fx.Node] = {}
        self.type_of: dict[torch.fx.Node, str] = {}
        self.checks: dict[str, tuple[list, list]] = {}
        self.verified: dict[str, bool] = {}
        self.template_nodes: set[torch.fx.Node] = set()
        for type_key, (template, check, later) in (templates or {}).items():
            self.checks[type_key] = (template, check)
            self.template_nodes.update(template)
            for nodes in later:
                for n, t in zip(nodes, template):
                    if n.op not in ("get_attr", "placeholder", "output"):
                        self.copy_from[n], self.type_of[n] = t, type_key

    def _type_ok(self, type_key: str) -> bool:
        if type_key not in self.verified:
            template, check = self.checks[type_key]
            self.verified[type_key] = all(
                "saved_bytes" in a.meta
                and "saved_bytes" in b.meta
                and a.meta["saved_bytes"] == b.meta["saved_bytes"]
                and _same_value(a, b)
                for a, b in zip(template, check)
            )
        return self.verified[type_key]

    def template(self, n: torch.fx.Node) -> torch.fx.Node | None:
        t = self.copy_from.get(n)
        if t is None or not self._type_ok(self.type_of[n]):
            return None
        ins, tins = n.all_input_nodes, t.all_input_nodes
        if len(ins) != len(tins) or not all(_same_value(a, b) for a, b in zip(ins, tins)):
            return None
        return t


_SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _fused_attention(n: torch.fx.Node, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The CUDA fused-attention kernel's result for an SDPA node, or None to run it as traced."""
    if n.op != "call_function" or n.target not in _SDPA_FUNCTIONS:
        return None
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    if bound.get("enable_gqa") or q.dim() != 4 or q.shape[1] != k.shape[1]:
        return None
    mask, p = bound.get("attn_mask"), float(bound.get("dropout_p", 0.0))
    causal, scale = bool(bound.get("is_causal", False)), bound.get("scale")
    aten = torch.ops.aten
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention(q, k, v, p, causal, False, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, p, causal, scale=scale)[0]


class _Propagator(torch.fx.Interpreter):
    def __init__(
        self,
        gm: torch.fx.GraphModule,
        recorder: _SavedTensorRecorder,
        keep_val: bool,
        templates: dict | None,
    ):
        super().__init__(gm, garbage_collect_values=True)
        self.recorder = recorder
        self.keep_val = keep_val
        self.replicator = _Replicator(templates)
        self.template_values: dict[torch.fx.Node, object] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        t = self.replicator.template(n)
        if t is not None:
            result = _fresh_like(self.template_values[t])
            for key in ("tensor_meta", "saved_bytes", "saved_tensors", "aliases_input"):
                if key in t.meta:
                    n.meta[key] = t.meta[key]
            if not (self.keep_val and "val" in n.meta):
                n.meta["val"] = result
            n.meta["replicated_from"] = t.name
            return result
        result = self._run_and_record(n)
        if n in self.replicator.template_nodes:
            self.template_values[n] = result
        return result

    def _run_and_record(self, n: torch.fx.Node) -> Any:
        self.recorder.start_node()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.recorder.pack, self.recorder.unpack):
                result = self._run(n)
        except Exception as exc:
            raise PropagationError(n, exc) from exc
        n.meta["tensor_meta"] = _tensor_meta(result)
        if isinstance(result, torch.Tensor):
            in_keys = {_storage_key(v)[0] for m in n.all_input_nodes for v in _tensors_in(self.env.get(m))}
            n.meta["aliases_input"] = _storage_key(result)[0] in in_keys
        if not (self.keep_val and "val" in n.meta):
            n.meta["val"] = result
        n.meta["saved_bytes"] = self.recorder.current_bytes
        n.meta["saved_tensors"] = self.recorder.current_count
        return result

    def _run(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            module = self.fetch_attr(n.target) if n.op == "call_module" else None
            dropout = _dropout_args(n, args, kwargs, module)
            if dropout is not None and isinstance(dropout[0], torch.Tensor):
                return torch.native_dropout(dropout[0], float(dropout[1]), True)[0]
            fused = _fused_attention(n, args, kwargs)
            if fused is not None:
                return fused
        return super().run_node(n)


class PropagationError(RuntimeError):
    """A node failed while running on meta/fake tensors; ``node`` is the fx node."""

    def __init__(self, node: torch.fx.Node, exc: BaseException):
        super().__init__(f"{node.format_node()}: {type(exc).__name__}: {exc}")
        self.node = node
        self.exc = exc


def _all_meta(gm: torch.nn.Module) -> bool:
    tensors = [*gm.parameters(), *gm.buffers()]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("meta").requires_grad_(x.requires_grad)
    return x


@contextlib.contextmanager
def _execution_mode(gm: torch.nn.Module, args: tuple) -> Iterator[tuple[tuple, list[torch.Tensor]]]:
    """Yields (converted args, tensors to skip as non-activations) inside meta or fake mode."""
    state = [*gm.parameters(), *gm.buffers()]
    if _all_meta(gm):
        yield tuple(_to_meta(a) for a in args), state
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    # The converter memoises per real tensor, so these are the fakes the graph will see.
    fake_state = [mode.from_tensor(t) for t in state]
    with mode, _fake_buffers(gm, mode):
        # Autograd runs above the fake mode: it saves the real parameters themselves, not their fakes.
        yield fake_args, [*fake_state, *state]


@contextlib.contextmanager
def _fake_buffers(gm: torch.nn.Module, mode: Any) -> Iterator[None]:
    """The buffers' fakes in place of the buffers while the graph runs.

    An op whose tensors are all real runs for real even under ``FakeTensorMode``: BatchNorm's
    ``num_batches_tracked.add_(1)`` (and any ``self.buffer += ...`` in user code) would update the
    model's state at trace time, so the first real step would start from a state one device never
    had. With the fakes swapped in, only the fakes change.
    """
    swapped = []
    for module in gm.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                swapped.append((module, name, buf))
                module._buffers[name] = mode.from_tensor(buf)
    try:
        yield
    finally:
        for module, name, buf in swapped:
            module._buffers[name] = buf


def propagate(
    gm: torch.fx.GraphModule, args: tuple, *, keep_val: bool = False, templates: dict | None = None
) -> Any:
    """Annotate every node of ``gm`` with tensor_meta, val and saved_bytes; return the output value.

    ``templates``: :func:`autopar.tracing.blocks.replication_templates` of ``gm`` (optional).
    """
    with _execution_mode(gm, args) as (run_args, skip), torch.enable_grad():
        recorder = _SavedTensorRecorder(skip)
        out = _Propagator(gm, recorder, keep_val, templates).run(*run_args)
    return out

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
  plans are for accelerators, so the graph reports what they keep.

Nothing is allocated: a model on ``meta`` runs on meta tensors; anything else runs under
``FakeTensorMode`` (real parameters are converted to fake ones on first use).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

log = logging.getLogger(__name__)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return (st._cdata, st.nbytes())


def _tensor_meta(value):
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

    def pack(self, t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if key not in self.skip_keys and key not in self.seen:
            self.seen.add(key)
            # Keeping the tensor alive keeps its storage address from being reused by a later one.
            self.keep_alive.append(t)
            self.current_bytes += nbytes
            self.current_count += 1
        return t

    @staticmethod
    def unpack(t):
        return t

    def start_node(self) -> None:
        self.current_bytes = 0
        self.current_count = 0


_DROPOUT_FUNCTIONS = (F.dropout, torch.dropout, torch.ops.aten.dropout.default)


def _dropout_args(n: torch.fx.Node, args: tuple, kwargs: dict, module) -> tuple | None:
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


class _Propagator(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, recorder: _SavedTensorRecorder, keep_val: bool):
        super().__init__(gm, garbage_collect_values=True)
        self.recorder = recorder
        self.keep_val = keep_val

    def run_node(self, n: torch.fx.Node):
        self.recorder.start_node()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.recorder.pack, self.recorder.unpack):
                result = self._run(n)
        except Exception as exc:
            raise PropagationError(n, exc) from exc
        n.meta["tensor_meta"] = _tensor_meta(result)
        if not (self.keep_val and "val" in n.meta):
            n.meta["val"] = result
        n.meta["saved_bytes"] = self.recorder.current_bytes
        n.meta["saved_tensors"] = self.recorder.current_count
        return result

    def _run(self, n: torch.fx.Node):
        if n.op in ("call_module", "call_function"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            module = self.fetch_attr(n.target) if n.op == "call_module" else None
            dropout = _dropout_args(n, args, kwargs, module)
            if dropout is not None and isinstance(dropout[0], torch.Tensor):
                return torch.native_dropout(dropout[0], float(dropout[1]), True)[0]
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


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to("meta").requires_grad_(x.requires_grad)
    return x


@contextlib.contextmanager
def _execution_mode(gm: torch.nn.Module, args: tuple):
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
    with mode:
        yield fake_args, fake_state


def propagate(gm: torch.fx.GraphModule, args: tuple, *, keep_val: bool = False):
    """Annotate every node of ``gm`` with tensor_meta, val and saved_bytes; return the output value."""
    with _execution_mode(gm, args) as (run_args, skip), torch.enable_grad():
        recorder = _SavedTensorRecorder(skip)
        out = _Propagator(gm, recorder, keep_val).run(*run_args)
    return out

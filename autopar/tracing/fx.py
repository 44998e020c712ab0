"""Model + loss -> ``torch.fx.GraphModule`` with shapes, module paths and source lines on every node.

Two tracers, tried in this order by ``tracer="auto"``:

* ``symbolic_trace`` (``torch.fx.Tracer``): fast, keeps ``nn.Linear``/``nn.LayerNorm``/... as
  ``call_module`` nodes and Python-level calls (``torch.softmax``, ``operator.add``, ``view``).
* ``export`` (``torch.export.export(strict=False)``, then ``ExportedProgram.module()``): handles
  real-world models (HuggingFace) that symbolic tracing cannot; nodes are ATen ops
  (``aten.linear.default``), parameters are ``get_attr`` nodes.

Mixture-of-experts layers stay one leaf region under both: autopar's own (``autopar_region = "moe"``)
as a ``call_module`` leaf of symbolic tracing, HuggingFace's sparse MoE blocks under export through a
custom op folded back into a ``call_module`` node afterwards (:mod:`autopar.tracing.hf_moe`).

Both produce the graph of :class:`~autopar.tracing.wrap.ModelWithLoss`, so parameter names carry
the prefix ``model.``. Each node's ``meta`` holds ``tensor_meta`` and ``val`` (shapes and dtypes from
meta/fake tensors), ``nn_module_stack`` (module path; ``{key: (qualified name, type)}``, innermost
last), ``stack_trace`` (user source, fx's ``File "...", line N, in fn`` format) and ``saved_bytes``
(see :mod:`autopar.tracing.propagate`).
"""

from __future__ import annotations

import linecache
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, NoReturn

import torch
import torch.fx
from torch import nn

from autopar.core.errors import TraceError
from autopar.tracing import opkinds
from autopar.tracing.blocks import find_blocks, replication_templates
from autopar.tracing.propagate import PropagationError, propagate
from autopar.tracing.wrap import MODEL_PREFIX, wrap

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)
_TRACING_DIR = os.path.dirname(__file__)
_SKIP_PREFIXES = (_TORCH_DIR, _TRACING_DIR, "<autopar.", "<eval_with_key")


def is_user_file(filename: str) -> bool:
    """Whether ``filename`` is the user's code (a model or loss), not torch's or autopar's tracing
    machinery: the frames a node's source location and an error's "at" line are taken from."""
    return not filename.startswith(_SKIP_PREFIXES) and "/torch/" not in filename


def _format_frame(filename: str, lineno: int, name: str) -> str:
    code = linecache.getline(filename, lineno).strip()
    return f'  File "{filename}", line {lineno}, in {name}\n    {code}'


def user_frame_from_stack() -> str:
    """fx-style stack trace of the innermost user frame of the current Python stack ('' if none)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if is_user_file(filename):
            return _format_frame(filename, frame.f_lineno, frame.f_code.co_name)
        frame = frame.f_back
    return ""


def user_frame_from_traceback(tb: TracebackType | None) -> tuple[str, int, str] | None:
    """(file, line, code) of the innermost user frame of an exception traceback."""
    found = None
    for fs in traceback.extract_tb(tb):
        if is_user_file(fs.filename):
            found = (fs.filename, fs.lineno or 0, (fs.line or "").strip())
    return found


class AutoparTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that records the user source line of every node cheaply.

    fx's ``record_stack_traces`` costs ~0.35 ms a node (1.2 s for GPT-3 175B); walking the frame
    stack to the first frame outside torch costs a few microseconds.
    """

    def __init__(self, leaf_modules: Iterable = ()):
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {MODEL_PREFIX + x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if opkinds.is_moe_region(m):  # routing is data-dependent: the layer is one region
            return True
        if module_qualified_name in self._leaf_names or (
            self._leaf_types and isinstance(m, self._leaf_types)
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace and node.op not in ("placeholder", "output", "get_attr"):
            node.stack_trace = user_frame_from_stack()
        return node

    def current_module_path(self) -> str:
        if not self.module_stack:
            return ""
        qualname = list(self.module_stack.values())[-1][0]
        return qualname[len(MODEL_PREFIX) :] if qualname.startswith(MODEL_PREFIX) else qualname


def _symbolic(wrapper: nn.Module, leaf_modules: Iterable) -> torch.fx.GraphModule:
    tracer = AutoparTracer(leaf_modules)
    try:
        graph = tracer.trace(wrapper)
    except Exception as exc:
        exc.autopar_module_path = tracer.current_module_path()  # type: ignore[attr-defined]
        raise
    return torch.fx.GraphModule(tracer.root, graph, type(wrapper).__name__)


def _export(wrapper: nn.Module, args: tuple) -> torch.fx.GraphModule:
    from autopar.tracing.hf_moe import fold_regions, hf_moe_regions

    with hf_moe_regions(wrapper) as skipped:  # HuggingFace MoE blocks: one region each
        ep = torch.export.export(wrapper, args, strict=False)
    gm = ep.module()
    gm.meta["autopar_hf_moe"] = {"regions": fold_regions(gm), "skipped": skipped}
    return gm


def _describe_failure(exc: BaseException) -> str:
    where = getattr(exc, "autopar_module_path", None)
    if isinstance(exc, PropagationError):
        stack = exc.node.stack_trace or ""
        stack_frames = [ln for ln in stack.splitlines() if ln.strip().startswith("File")]
        loc = stack_frames[-1].strip() if stack_frames else "unknown source"
        mod = exc.node.meta.get("nn_module_stack")
        where = list(mod.values())[-1][0] if mod else ""
        return f"in module '{_strip(where)}' at {loc}: {exc.exc}"
    frame = user_frame_from_traceback(exc.__traceback__)
    loc = f"{frame[0]}:{frame[1]} `{frame[2]}`" if frame else "unknown source"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    mod = f"in module '{where}' " if where else ""
    return f"{mod}at {loc}: {type(exc).__name__}: {first_line}"


def _strip(qualname: object) -> str:
    qualname = str(qualname or "")
    return qualname[len(MODEL_PREFIX) :] if qualname.startswith(MODEL_PREFIX) else qualname


_FIX = (
    "Make the branch traceable: compute both sides and select with torch.where(cond, a, b), or use "
    "torch.cond; move value checks (asserts on tensor contents) out of forward; a condition on shapes "
    "only is fine under tracer='export'. Shapes are traced on meta/fake tensors, which have no values."
)


def _is_control_flow(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "control flow" in text or "GuardOnDataDependent" in text or "data-dependent" in text


def _headline(model: nn.Module, failures: list[tuple[str, BaseException]]) -> str:
    head = f"cannot trace {type(model).__name__} with its loss"
    for _, exc in failures:
        if _is_control_flow(exc):
            where = getattr(exc, "autopar_module_path", None)
            frame = user_frame_from_traceback(exc.__traceback__)
            loc = f" at {frame[0]}:{frame[1]} `{frame[2]}`" if frame else ""
            mod = f" in module '{where}'" if where else ""
            return f"{head}: data-dependent control flow{mod}{loc}"
    return head


def _raise_untraceable(model: nn.Module, failures: list[tuple[str, BaseException]]) -> NoReturn:
    lines = [_headline(model, failures) + "; tracers tried:"]
    lines += [f"  {name}: {_describe_failure(exc)}" for name, exc in failures]
    lines.append(_FIX)
    raise TraceError("\n".join(lines)) from failures[-1][1]


def fx_trace(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    loss_fn: Callable | None = None,
    num_targets: int | None = None,
    tracer: str = "auto",
    leaf_modules: Iterable = (),
    replicate_blocks: bool = True,
) -> torch.fx.GraphModule:
    """The fx graph of ``model`` with its loss, every node annotated (see the module docstring).

    ``example_inputs`` is ``(model inputs..., loss targets...)``. With ``loss_fn`` the last
    ``num_targets`` inputs (default 1) are the targets and the graph returns
    ``loss_fn(model(*inputs), *targets)``; without ``loss_fn`` the graph returns ``model(*inputs)``
    (the model computes its own loss; a HuggingFace output's ``loss`` field is taken if present).
    Placeholders are named after the model's forward arguments, then the loss_fn's.
    ``gm.meta["autopar"]`` records ``tracer``, ``input_names``, ``target_names``, ``trace_s`` and
    ``blocks`` (per instance in execution order: ``{"prefix", "type_key", "index_in_type",
    "nodes"}``, node names); nodes of a repeated block carry
    ``node.meta["autopar_block"] = (block_type, instance)``. ``replicate_blocks=False`` runs every
    block instance during propagation instead of copying identical ones (for checking).

    ``tracer``: ``"auto"`` (symbolic trace, export if that fails), ``"symbolic_trace"`` or
    ``"export"``. ``leaf_modules``: module types or qualified names (in ``model``) kept as one
    ``call_module`` node by symbolic tracing.

    Raises :class:`~autopar.core.errors.TraceError` naming the module path, source line and a fix when
    no tracer can handle the model (data-dependent control flow, for example).
    """
    if tracer not in ("auto", "symbolic_trace", "export"):
        raise TraceError(f"tracer={tracer!r}: choose 'auto', 'symbolic_trace' or 'export'")
    wrapper, args = wrap(model, example_inputs, loss_fn, num_targets)
    order = ["symbolic_trace", "export"] if tracer == "auto" else [tracer]
    failures: list[tuple[str, BaseException]] = []
    for name in order:
        t0 = time.perf_counter()
        try:
            gm = _symbolic(wrapper, leaf_modules) if name == "symbolic_trace" else _export(wrapper, args)
            blocks = find_blocks(gm)
            templates = replication_templates(blocks) if replicate_blocks else None
            propagate(gm, args, keep_val=name == "export", templates=templates)
        except Exception as exc:  # noqa: BLE001 - reported below with its location
            log.info("%s failed on %s: %s", name, type(model).__name__, exc)
            failures.append((name, exc))
            continue
        gm.meta["autopar"] = {
            "tracer": name,
            "input_names": wrapper.input_names,
            "target_names": wrapper.target_names,
            "trace_s": time.perf_counter() - t0,
            "blocks": [b.as_dict() for b in blocks],
            "hf_moe": gm.meta.pop("autopar_hf_moe", {}),
        }
        return gm
    _raise_untraceable(model, failures)
    raise AssertionError("unreachable")

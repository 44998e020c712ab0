"""The model-with-loss wrapper that every tracer sees.

``ModelWithLoss(model, loss_fn, input_names, target_names)`` is an ``nn.Module`` whose forward takes
the model inputs, then the loss targets, as named positional arguments and returns::

    loss_fn(model(*inputs), *targets)      if loss_fn is given
    model(*inputs)                         otherwise (the model returns its own loss, or an output)

The model is the submodule ``model``, so every parameter keeps its original qualified name under the
prefix ``model.`` (``layers.0.attn.q_proj.weight`` -> ``model.layers.0.attn.q_proj.weight``). A loss
that is an ``nn.Module`` (``nn.CrossEntropyLoss()``) is the submodule ``loss_fn``.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from autopar.core.errors import TraceError

MODEL_PREFIX = "model."
"""Prefix of the original model's parameter and module names inside the traced graph module."""


def split_inputs(
    example_inputs: Any, loss_fn: Callable | None, num_targets: int | None
) -> tuple[tuple, tuple]:
    """Split ``example_inputs`` into (model inputs, loss targets).

    With a ``loss_fn`` the last ``num_targets`` inputs (default 1) are the targets; without one,
    every input goes to the model.
    """
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, Sequence):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if num_targets is None:
        num_targets = 1 if loss_fn is not None else 0
    if loss_fn is None and num_targets:
        raise TraceError(
            f"num_targets={num_targets} but loss_fn is None: targets only make sense with a loss_fn; "
            "pass loss_fn=callable(output, *targets) or num_targets=0"
        )
    if not 0 <= num_targets <= len(example_inputs):
        raise TraceError(
            f"num_targets={num_targets} does not fit {len(example_inputs)} example inputs; "
            "example_inputs must be (model inputs..., loss targets...)"
        )
    cut = len(example_inputs) - num_targets
    return example_inputs[:cut], example_inputs[cut:]


def _param_names(fn: Callable, skip: int) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
            break
        names.append(p.name)
    return names[skip:]


def _unique_identifiers(wanted: list[str], fallback: str, count: int, taken: set[str]) -> list[str]:
    out = []
    for i in range(count):
        name = wanted[i] if i < len(wanted) else f"{fallback}_{i}"
        if not name.isidentifier() or keyword.iskeyword(name) or name in taken or name == "self":
            name = f"{fallback}_{i}"
        while name in taken:
            name = f"{name}_"
        taken.add(name)
        out.append(name)
    return out


def argument_names(
    model: nn.Module, loss_fn: Callable | None, n_inputs: int, n_targets: int
) -> tuple[list[str], list[str]]:
    """Placeholder names: the model's forward parameter names, then the loss_fn's (after the output)."""
    taken: set[str] = set()
    inputs = _unique_identifiers(_param_names(model.forward, 0), "input", n_inputs, taken)
    loss_call = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    wanted = _param_names(loss_call, 1) if loss_call is not None else []
    targets = _unique_identifiers(wanted, "target", n_targets, taken)
    return inputs, targets


def _loss_from_output(out: Any) -> Any:
    # HuggingFace models return a ModelOutput (a dict) with "loss" when given labels.
    if isinstance(out, dict) and "loss" in out and out["loss"] is not None:
        return out["loss"]
    return out


class ModelWithLoss(nn.Module):
    """``forward(*inputs, *targets)`` -> loss (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | None,
        input_names: Iterable[str],
        target_names: Iterable[str],
    ):
        super().__init__()
        self.model = model
        if isinstance(loss_fn, nn.Module):
            self.loss_fn = loss_fn
        else:
            self._loss_callable = loss_fn
        self.input_names = list(input_names)
        self.target_names = list(target_names)
        self.__class__ = _specialised_class(self.input_names, self.target_names)

    def compute(self, inputs: tuple, targets: tuple) -> Any:
        out = self.model(*inputs)
        loss_fn = self._modules.get("loss_fn") or self.__dict__.get("_loss_callable")
        if loss_fn is None:
            return _loss_from_output(out)
        return loss_fn(out, *targets)


_CLASS_CACHE: dict[tuple, type] = {}


def _specialised_class(input_names: list[str], target_names: list[str]) -> type:
    """A subclass whose forward has named positional arguments (tracers name placeholders after them)."""
    key = (tuple(input_names), tuple(target_names))
    if key in _CLASS_CACHE:
        return _CLASS_CACHE[key]
    args = ", ".join(["self", *input_names, *target_names])
    ins = "".join(f"{n}, " for n in input_names)
    tgs = "".join(f"{n}, " for n in target_names)
    src = f"def forward({args}):\n    return self.compute(({ins}), ({tgs}))\n"
    namespace: dict = {}
    exec(compile(src, "<autopar.ModelWithLoss>", "exec"), namespace)
    cls = type("ModelWithLoss", (ModelWithLoss,), {"forward": namespace["forward"]})
    cls.__module__ = __name__
    _CLASS_CACHE[key] = cls
    return cls


def wrap(
    model: nn.Module, example_inputs: Any, loss_fn: Callable | None, num_targets: int | None
) -> tuple[ModelWithLoss, tuple]:
    """(wrapper, flat example args) for ``model`` with its loss."""
    inputs, targets = split_inputs(example_inputs, loss_fn, num_targets)
    in_names, tg_names = argument_names(model, loss_fn, len(inputs), len(targets))
    return ModelWithLoss(model, loss_fn, in_names, tg_names), (*inputs, *targets)

"""Tracing: ``nn.Module`` + example inputs (+ loss) -> fx graph -> analysed :class:`~autopar.core.ir.OpGraph`.

* :func:`fx_trace` returns the raw ``torch.fx.GraphModule`` of the model with its loss, with
  shapes, module paths, source lines and saved-activation bytes in ``node.meta``.
* :func:`trace` analyses it into an :class:`~autopar.core.ir.OpGraph`.
"""

from __future__ import annotations

from autopar.tracing.fx import fx_trace
from autopar.tracing.wrap import MODEL_PREFIX, ModelWithLoss

__all__ = ["MODEL_PREFIX", "ModelWithLoss", "fx_trace", "trace"]


def trace(model, example_inputs, *, loss_fn=None, num_targets=None, tracer="auto", leaf_modules=()):
    """Trace and analyse ``model`` with its loss; see :func:`autopar.tracing.analyse.analyse`."""
    from autopar.tracing.analyse import trace as _trace

    return _trace(
        model,
        example_inputs,
        loss_fn=loss_fn,
        num_targets=num_targets,
        tracer=tracer,
        leaf_modules=leaf_modules,
    )

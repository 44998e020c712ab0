"""The model zoo: the built-in GPT family by shape, named presets and ``file.py:factory`` loaders.

built = autopar.build_model("gpt3-175b")            # on meta: nothing allocated
model, example_inputs, loss_fn = built
graph = autopar.trace(model, example_inputs, loss_fn=loss_fn)

Public API (what other packages import from here):

* :mod:`autopar.models.gpt`: :class:`GPT`, :class:`GPTConfig` and :func:`gpt_loss`, the built-in
  decoder-only transformer;
* :mod:`autopar.models.moe`: :class:`~autopar.models.moe.MoE` and :class:`~autopar.models.moe.MoEConfig`,
  the mixture-of-experts layer (``GPTConfig(experts=E, ...)``), with :func:`~autopar.models.moe.swiglu`;
* :mod:`autopar.models.presets`: :data:`PRESETS` (name -> :class:`Preset`, each with its source);
* :mod:`autopar.models.zoo`: :func:`build_model` (a spec string ``gpt:...``, a preset name or
  ``file.py:factory``) and :class:`BuiltModel`, :func:`build_gpt`, :func:`load_factory`,
  :func:`count_params`, :func:`list_models` (what ``autopar models`` prints);
* :mod:`autopar.models.spec`: :func:`load_model` / :func:`adapt` -> :class:`LoadedModel` (a model
  with its inputs, loss and shape, as the CLI and the report load it) and :func:`graph_layers`.

Importing this package imports torch.
"""

from __future__ import annotations

from autopar.models.gpt import GPT, GPTConfig, gpt_loss
from autopar.models.presets import PRESETS, Preset
from autopar.models.zoo import BuiltModel, build_gpt, build_model, count_params, list_models, load_factory

__all__ = [
    "GPT",
    "PRESETS",
    "BuiltModel",
    "GPTConfig",
    "Preset",
    "build_gpt",
    "build_model",
    "count_params",
    "gpt_loss",
    "list_models",
    "load_factory",
]

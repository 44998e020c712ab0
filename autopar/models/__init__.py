"""The model zoo: the built-in GPT family by shape, named presets and ``file.py:factory`` loaders.

built = autopar.build_model("gpt3-175b")            # on meta: nothing allocated
model, example_inputs, loss_fn = built
graph = autopar.trace(model, example_inputs, loss_fn=loss_fn)
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

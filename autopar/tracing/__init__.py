"""Tracing: ``nn.Module`` + example inputs (+ loss) -> fx graph -> analysed :class:`~autopar.core.ir.OpGraph`.

Public API:

* :func:`fx_trace` returns the raw ``torch.fx.GraphModule`` of the model with its loss, with
  shapes, module paths, source lines and saved-activation bytes in ``node.meta``.
* :func:`trace` analyses it into an :class:`~autopar.core.ir.OpGraph`
  (:func:`autopar.tracing.analyse.analyse` does the second step alone).
* :class:`ModelWithLoss` / :data:`MODEL_PREFIX`: the model-plus-loss wrapper that is traced (the
  model's parameters appear under ``model.``); :func:`autopar.tracing.wrap.split_inputs` splits
  example inputs into model inputs and targets.
* :mod:`autopar.tracing.opkinds`: THE op table (:data:`~autopar.tracing.opkinds.OPS`: base op name
  -> cost kind, sharding family, FLOPs rule), read by the cost model and the sharding rules;
  :func:`~autopar.tracing.opkinds.is_moe_region` (a mixture-of-experts layer kept as one leaf region,
  op kind ``moe``), :func:`~autopar.tracing.opkinds.moe_meta` (its ``OpNode.meta["moe"]``) and
  :func:`~autopar.tracing.opkinds.moe_flops`.
* :mod:`autopar.tracing.hf_moe`: HuggingFace sparse MoE blocks (Mixtral, Qwen2-MoE) kept as one
  ``moe`` region under ``torch.export``: :class:`~autopar.tracing.hf_moe.HFMoERegion` (the region,
  the block's parameter names, :class:`~autopar.tracing.hf_moe.HFMoESpec` as its ``config``) and the
  block's function in parts (:func:`~autopar.tracing.hf_moe.route`,
  :func:`~autopar.tracing.hf_moe.expert`, :func:`~autopar.tracing.hf_moe.shared_output`), which the
  expert lowering reuses.
* :func:`autopar.tracing.fx.is_user_file`: whether a stack frame is the user's code.
* :func:`autopar.tracing.collapse.first_blocks_module`: the graph with only the first instance of
  each repeated block.
"""

from __future__ import annotations

from autopar.tracing.analyse import trace
from autopar.tracing.fx import fx_trace
from autopar.tracing.wrap import MODEL_PREFIX, ModelWithLoss

__all__ = ["MODEL_PREFIX", "ModelWithLoss", "fx_trace", "trace"]

"""The state methods of :class:`autopar.api.ParallelModule`: full (unsharded) state dicts and
gradients, the full training state (optimizer, step, RNG) and checkpoints (docs/checkpoints.md).

:class:`StateMethods` is a mixin: ``ParallelModule`` inherits these methods, so users call them on
the compiled module (``compiled.save(...)``, ``compiled.state_dict()``). They read the module's
program, process groups, optimizer and failure reporter, all set up by ``ParallelModule``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from autopar.core.errors import CheckpointError
from autopar.runtime.failure import guard
from autopar.runtime.state import (
    gather_full,
    gather_optimizer_full,
    scatter_full,
    scatter_optimizer_full,
)

log = logging.getLogger(__name__)


class StateMethods:
    """Full state dicts, gradients and checkpoints of a :class:`autopar.api.ParallelModule`
    (every method is collective: call it on every rank)."""

    def _full(self, grads: bool) -> dict[str, torch.Tensor]:
        self._require_runtime()
        with guard(self._reporter, "gathering the full state", self.timeout_s):
            slots = self._program.slots if grads else self._program.slots + self._buffer_slots
            traced = gather_full(slots, self._groups, grads=grads)
        return {key: traced[name] for key, name in self._key_to_traced.items() if name in traced}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full, unsharded state dict (original parameter names), on every rank (collective)."""
        out = self._full(grads=False)
        for key, value in self._model.state_dict().items():
            out.setdefault(key, value.detach().clone())
        return {key: out[key] for key in self._model.state_dict()}

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients of the last step by original parameter name, on every rank (collective)."""
        return self._full(grads=True)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (as from the original model): each rank takes its shards."""
        self._require_runtime()
        traced = {}
        for key, name in self._key_to_traced.items():
            if key in state:
                traced.setdefault(name, state[key])
        with guard(self._reporter, "load_state_dict", self.timeout_s):
            scatter_full(self._program.slots, traced)
            scatter_full([s for s in self._buffer_slots if s.full_name in traced], traced)

    @property
    def global_step(self) -> int:
        """Training steps taken, counting those of the checkpoint this module resumed from: the
        data position of a loop that feeds one global batch per step."""
        return self._step

    def full_state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training, unsharded, on every rank (collective)::

            {"model": state_dict(), "optim": {"state": {param key: {"step", "exp_avg", ...}},
             "param_groups": [hyper-parameters]}, "step": int, "samples_seen": int,
             "seed": int, "rng": {"torch_cpu": ByteTensor}}

        ``optim`` is keyed by the original parameter names (the first name of a tied weight);
        :func:`autopar.runtime.checkpoint.torch_optimizer_state` turns it into the index-keyed form
        ``torch.optim.Optimizer.load_state_dict`` of the original model takes. Dropout masks are a
        function of (seed, step, sample), so ``seed`` and ``step`` are the dropout RNG state."""
        model = self.state_dict()
        optim: dict[str, Any] = {"state": {}, "param_groups": []}
        if self._optimizer is not None:
            with guard(self._reporter, "gathering the optimizer state", self.timeout_s):
                traced = gather_optimizer_full(self._optimizer, self._program.slots, self._groups)
            for key, _ in self._model.named_parameters():  # tied weights: the first name only
                name = self._key_to_traced.get(key)
                if name in traced:
                    optim["state"][key] = traced[name]
            optim["param_groups"] = [
                {k: v for k, v in group.items() if k != "params"} for group in self._optimizer.param_groups
            ]
        return {
            "model": model,
            "optim": optim,
            "step": self._step,
            "samples_seen": self._step * self.plan.global_batch,
            "seed": self.seed,
            "rng": {"torch_cpu": torch.get_rng_state()},
        }

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`full_state_dict` (of any plan): parameters, optimizer state, step, RNG."""
        self.load_state_dict(state["model"])
        optim = state.get("optim") or {}
        if self._optimizer is not None and optim.get("state"):
            traced = {
                self._key_to_traced[k]: v for k, v in optim["state"].items() if k in self._key_to_traced
            }
            with guard(self._reporter, "loading the optimizer state", self.timeout_s):
                scatter_optimizer_full(self._optimizer, self._program.slots, traced)
        groups = optim.get("param_groups") or []
        if self._optimizer is not None and groups:
            if len(groups) != len(self._optimizer.param_groups):
                log.warning(
                    "the saved optimizer has %d parameter groups, this one %d: hyper-parameters "
                    "(learning rate...) not restored",
                    len(groups),
                    len(self._optimizer.param_groups),
                )
            else:
                for group, saved in zip(self._optimizer.param_groups, groups):
                    group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        self._step = int(state.get("step", self._step))
        if "torch_cpu" in state.get("rng", {}):
            torch.set_rng_state(state["rng"]["torch_cpu"])
        if state.get("seed", self.seed) != self.seed:
            log.warning(
                "the checkpoint was trained with seed=%s, this module has seed=%s: dropout masks will "
                "differ from the saved run's; compile with seed=%s to continue it exactly",
                state["seed"],
                self.seed,
                state["seed"],
            )

    def save(
        self,
        root: str | os.PathLike,
        *,
        keep: int | None = None,
        extra: dict[str, Any] | None = None,
        model_spec: str | None = None,
    ) -> Path:
        """Save the full training state as ``root/step-<N>`` (collective; docs/checkpoints.md):
        DCP shard files written by all ranks in parallel, then a manifest, then one rename.
        ``keep``: keep the newest ``keep`` checkpoints. ``extra``: JSON data of the caller's (its
        data loader's position). ``model_spec``: the model's MODEL string, for ``autopar replan``."""
        from autopar.runtime.checkpoint import describe_tensor, save_checkpoint

        self._require_runtime()
        if keep is not None and keep < 1:
            raise CheckpointError(f"keep={keep}: keep at least the checkpoint being written (keep >= 1)")
        state = {**self.full_state_dict(), "extra": dict(extra or {})}
        info = {
            "plan": json.loads(self.plan.to_json()),
            "world_size": self.plan.world_size,
            "global_batch": self.plan.global_batch,
            "model_spec": model_spec,
            "model": {k: describe_tensor(v) for k, v in state["model"].items()},
        }
        with guard(self._reporter, "saving a checkpoint", self.timeout_s):
            return save_checkpoint(root, state, info, keep=keep)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load a checkpoint saved under any plan (collective); returns its manifest. The model,
        the shard files and the format version are checked before anything is loaded, so a bad
        checkpoint raises :class:`~autopar.core.errors.CheckpointError` and changes nothing."""
        from autopar.runtime.checkpoint import load_checkpoint

        self._require_runtime()
        # Not under guard(): its checks raise the same CheckpointError on every rank, which guard
        # would turn into a RuntimeFailure.
        state, manifest = load_checkpoint(path, self._model.state_dict())
        if manifest.get("global_batch") not in (None, self.plan.global_batch):
            log.warning(
                "checkpoint global_batch=%s, this plan's %s: step %d resumes at sample %s of the data",
                manifest["global_batch"],
                self.plan.global_batch,
                state["step"],
                state.get("samples_seen"),
            )
        self.load_full_state_dict(state)
        return manifest

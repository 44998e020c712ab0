"""The compiler: ``autopar.compile(model, cluster, ...)`` -> :class:`ParallelModule`.

trace (``autopar.tracing.fx_trace``) -> dropout pass -> tensor-parallel lowering (``autopar.lower``)
-> pipeline split (``autopar.runtime.segments`` / ``stages``) -> DDP / FSDP / recompute wrappers
-> the step driver (``autopar.runtime.pipeline``). See ``docs/compiler.md``.
"""

from autopar.compiler.module import ParallelModule, compile

__all__ = ["ParallelModule", "compile"]

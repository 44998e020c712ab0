"""autopar: a declarative auto-parallel planner and compiler for PyTorch.

    import autopar
    cluster = autopar.Cluster.local(ranks=4)
    compiled = autopar.compile(model, cluster, example_inputs=(tokens, targets), loss_fn=loss)

Public names are imported lazily so that ``import autopar`` stays fast and optional pieces
(matplotlib, pulp) load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


_LAZY = {
    # stage: trace / ir
    "trace": "autopar.tracing",
    "OpGraph": "autopar.core.ir",
    "OpNode": "autopar.core.ir",
    # declarations
    "Cluster": "autopar.cluster",
    "DeviceSpec": "autopar.cluster",
    "Link": "autopar.cluster",
    "Plan": "autopar.core.plan",
    "Replicate": "autopar.core.plan",
    "Shard": "autopar.core.plan",
    "Partial": "autopar.core.plan",
    # model zoo
    "build_model": "autopar.models",
    # cost / solve / compile / report
    "estimate": "autopar.estimator",
    "plan": "autopar.solve",
    "profile": "autopar.estimator.profile",
    "compile": "autopar.api",
    "ParallelModule": "autopar.api",
    # errors
    "AutoparError": "autopar.core.errors",
    "ModelSpecError": "autopar.core.errors",
    "TraceError": "autopar.core.errors",
    "ClusterError": "autopar.core.errors",
    "PlanError": "autopar.core.errors",
    "InfeasibleError": "autopar.core.errors",
    "RuntimeFailure": "autopar.core.errors",
    "ReportError": "autopar.core.errors",
    "InputError": "autopar.core.errors",
    "NonFiniteError": "autopar.core.errors",
    "UsageError": "autopar.core.errors",
    "CheckpointError": "autopar.core.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autopar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

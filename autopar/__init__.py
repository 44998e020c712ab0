"""autopar: a declarative auto-parallel planner and compiler for PyTorch.

    import autopar
    cluster = autopar.Cluster.local(ranks=4)
    compiled = autopar.compile(model, cluster, example_inputs=(tokens, targets), loss_fn=loss)

Public names are imported lazily so that ``import autopar`` stays fast and optional pieces
(matplotlib, pulp) load only when used.
"""

from __future__ import annotations

import importlib

# ``autopar.plan`` is both a module (the Plan type) and the planner function. Load the module
# first: Python binds a submodule onto its package only on first import, so the function defined
# below keeps the name for good.
import autopar.plan as _plan_module  # noqa: F401

__version__ = "0.1.0"


def plan(model_or_graph, cluster, **kwargs):
    """Find the fastest plan that fits; see :func:`autopar.solve.plan`."""
    from autopar.solve import plan as _plan

    return _plan(model_or_graph, cluster, **kwargs)


_LAZY = {
    # stage: trace / ir
    "trace": "autopar.tracing",
    "OpGraph": "autopar.ir",
    "OpNode": "autopar.ir",
    # declarations
    "Cluster": "autopar.cluster",
    "DeviceSpec": "autopar.cluster",
    "Link": "autopar.cluster",
    "Plan": "autopar.plan",
    "Replicate": "autopar.plan",
    "Shard": "autopar.plan",
    "Partial": "autopar.plan",
    # model zoo
    "build_model": "autopar.models",
    # cost / solve / compile / report
    "estimate": "autopar.estimator",
    "profile": "autopar.profiler",
    "compile": "autopar.compiler",
    "ParallelModule": "autopar.compiler",
    # errors
    "AutoparError": "autopar.errors",
    "ModelSpecError": "autopar.errors",
    "TraceError": "autopar.errors",
    "ClusterError": "autopar.errors",
    "PlanError": "autopar.errors",
    "InfeasibleError": "autopar.errors",
    "RuntimeFailure": "autopar.errors",
}

__all__ = sorted([*_LAZY, "plan"])


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autopar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

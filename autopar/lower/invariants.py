"""Checks of a lowered program against the traced graph it came from.

The pipeline cut rewrites the graph (rematerialised input-only values, copies of written graph
inputs, the segment split, one graph per stage). What it must never do is drop or copy away a
write: a lost ``masked_fill_`` in T5's decoder-input shift trains on all-zero decoder inputs
without any error. :func:`check_program` runs after lowering when ``AUTOPAR_CHECK=1`` (and under
pytest, see :func:`check_enabled`): every mutation of the traced graph is still in the program,
every segment runs on exactly one stage, and every graph lints.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import torch
import torch.fx

from autopar.lower.segments import is_mutation

CHECK_ENV = "AUTOPAR_CHECK"


def check_enabled() -> bool:
    """Whether to check every program built: ``AUTOPAR_CHECK=1``, or under pytest unless
    ``AUTOPAR_CHECK=0`` (the checks cost one pass over each graph)."""
    value = os.environ.get(CHECK_ENV, "")
    if value:
        return value != "0"
    return "PYTEST_CURRENT_TEST" in os.environ


def _target_key(node: torch.fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", None) or str(target)
    return f"{node.op}:{name}"


def mutation_counts(gm: torch.fx.GraphModule) -> Counter:
    """How many mutation nodes of each target (``call_function:masked_fill_.Scalar``) ``gm`` has."""
    return Counter(_target_key(n) for n in gm.graph.nodes if is_mutation(n))


def _graph_modules(root: torch.nn.Module) -> list[torch.fx.GraphModule]:
    return [m for m in root.modules() if isinstance(m, torch.fx.GraphModule)]


def check_program(mutations: Counter, split: torch.fx.GraphModule, stages: Sequence[torch.nn.Module]) -> None:
    """Raise AssertionError when the program lost a mutation, a segment is run by no stage or by
    two, or a graph does not lint.

    ``mutations``: :func:`mutation_counts` of the traced graph; ``split``: the segment split;
    ``stages``: the stage modules of *every* pipeline stage (each holds its segments' submodules).
    """
    segments = [m for name, m in split.named_children() if name.startswith("submod_")]
    kept: Counter = Counter()
    for seg in segments:
        seg.graph.lint()
        kept += mutation_counts(seg)
    lost = {k: n - kept[k] for k, n in mutations.items() if kept[k] < n}
    if lost:
        raise AssertionError(f"the pipeline split lost mutations (op: how many): {lost}")
    owners: Counter = Counter()
    for stage in stages:
        for gm in _graph_modules(stage):
            gm.graph.lint()
        gm = getattr(stage, "gm", stage)
        owners.update(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    names = {name for name, _ in split.named_children() if name.startswith("submod_")}
    wrong = {n: owners[n] for n in names if owners[n] != 1}
    if wrong:
        raise AssertionError(f"segments not run by exactly one stage (segment: stages running it): {wrong}")

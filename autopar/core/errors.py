"""Typed errors for user mistakes. Each message states the value seen, the rule, and the fix.

``assert`` is reserved for internal invariants; anything a user can cause raises one of these, and
the CLI prints the message (no traceback) and exits with status 2.
"""

from __future__ import annotations


class AutoparError(Exception):
    """Base class of every error a user can cause."""


class ModelSpecError(AutoparError):
    """A model name, shape string or ``file.py:factory`` path that cannot be resolved."""


class TraceError(AutoparError):
    """The model cannot be traced (data-dependent control flow, unsupported op, ...)."""


class ClusterError(AutoparError):
    """An invalid cluster declaration: unknown device or preset, bad or missing field."""


class PlanError(AutoparError):
    """An invalid plan: degrees that do not match the cluster, a bad key or value."""


class InfeasibleError(AutoparError):
    """No plan fits the cluster's memory. ``details`` carries the closest candidate and its overflow."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class RuntimeFailure(AutoparError):
    """A rank failed or timed out while running a compiled program."""


class ReportError(AutoparError):
    """A plan file, measurement or option the report cannot use; the message names the field."""


class InputError(AutoparError):
    """An argument of ``autopar.compile`` or a ``step()`` batch that does not fit the model or the
    traced example (shape, count, type); the message names the argument, the rule and the value."""


class NonFiniteError(AutoparError):
    """A training step produced a NaN/inf loss or gradient (``nan_check``); the optimizer did not
    step, so the parameters are those of before the step. ``step`` is the step number."""

    def __init__(self, message: str, step: int, parameters: list[str] | None = None):
        super().__init__(message)
        self.step = step
        self.parameters = parameters or []


class UsageError(AutoparError):
    """A command-line value or file path autopar cannot use: an output that would overwrite an input
    or cannot be written, a script or device that is not there, a number out of its range."""


class CheckpointError(AutoparError):
    """A checkpoint that cannot be saved or loaded: incomplete (a save did not finish), of another
    model (names, shapes or dtypes differ), of another format version, a missing, truncated or
    corrupted shard file. The message names the key or file; nothing is loaded or overwritten."""

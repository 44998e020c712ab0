"""The planner: outer search over meshes and knobs, inter-op ILP for stage splits."""

from autopar.solve.planner import plan

__all__ = ["plan"]

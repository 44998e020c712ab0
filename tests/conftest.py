"""Suite-wide settings: measurements autopar caches on disk (profiled planning) go to a directory of
this test session, so a run never reads a developer's cache nor leaves one behind."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("AUTOPAR_CACHE", tempfile.mkdtemp(prefix="autopar-test-cache-"))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_module(monkeypatch):
    """``load(name)``: the script ``benchmarks/<name>.py`` as a module, its sibling scripts importable."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
        return module

    return load

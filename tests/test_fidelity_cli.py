"""benchmarks/fidelity.py --sets --rows: the named sets are checked before any tracing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_rows_of_an_unknown_set_are_refused_with_the_known_names(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # fidelity.py imports its sibling fidelity_sets
    spec = importlib.util.spec_from_file_location("fidelity_cli", BENCH / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    assert module.main(["--sets", "--rows", "mpt_h100", "no_such_set"]) == 2
    err = capsys.readouterr().err
    assert "no set no_such_set" in err and "mpt_h100" in err and "dgxc_gpt3_h100" in err
    assert "no set mpt_h100" not in err  # the known one is not reported

"""benchmarks/fidelity.py --sets --rows: the named sets are checked before any tracing."""

from __future__ import annotations


def test_rows_of_an_unknown_set_are_refused_with_the_known_names(capsys, benchmark_module):
    fidelity = benchmark_module("fidelity")
    assert fidelity.main(["--sets", "--rows", "mpt_h100", "no_such_set"]) == 2
    err = capsys.readouterr().err
    assert "no set no_such_set" in err and "mpt_h100" in err and "dgxc_gpt3_h100" in err
    assert "no set mpt_h100" not in err  # the known one is not reported

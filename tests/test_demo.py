"""``python -m autopar.cli.demo`` end to end, shortened (2 ranks, 3 steps, a hand-written plan): it
trains on real gloo processes and its own check against the single-process run passes."""

from __future__ import annotations

import pytest

from autopar.cli import demo

pytestmark = pytest.mark.multiproc


def test_demo_trains_and_matches_one_process(capsys, tmp_path):
    report = tmp_path / "plan.html"
    status = demo.main(["--ranks", "2", "--steps", "3", "--plan", "dp=1,pp=2,mbs=4", "--report", str(report)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "losses match the single-process run" in out
    assert "plan:    dp=1 pp=2 tp=1 mbs=4 m=4 1f1b" in out  # 16 sequences / 4 per micro-batch
    assert report.exists() and report.stat().st_size > 1000

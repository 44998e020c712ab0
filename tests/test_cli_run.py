"""``autopar run PLAN.json --nproc N -- script``: the torchrun command and the plan hand-off
(no processes are started here; the compiled run under torchrun is exercised by the runtime tests'
launcher, and `compile(plan=None)` reading $AUTOPAR_PLAN is checked below)."""

from __future__ import annotations

import pytest

import autopar
from autopar.cli.main import main
from autopar.testing.equivalence import gpt_case


def _plan_file(tmp_path, **kw):
    path = tmp_path / "plan.json"
    path.write_text(autopar.Plan.manual(global_batch=8, **kw).to_json())
    return path


def test_dry_run_prints_the_torchrun_command_with_the_plan(tmp_path, capsys):
    path = _plan_file(tmp_path, pp=2, micro_batch_size=2)
    assert main(["run", str(path), "--nproc", "2", "--dry-run", "--", "train.py", "--lr", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"AUTOPAR_PLAN={path} ")
    assert out.endswith("-m torch.distributed.run --nproc-per-node=2 train.py --lr 3")


def test_process_count_must_match_the_plan(tmp_path, capsys):
    path = _plan_file(tmp_path, dp=2)
    assert main(["run", str(path), "--nproc", "4", "--", "train.py"]) == 2
    assert "needs 2 processes but --nproc is 4" in capsys.readouterr().err


def test_compile_without_a_plan_takes_the_one_autopar_run_passes(tmp_path, monkeypatch):
    path = _plan_file(tmp_path, micro_batch_size=4)
    monkeypatch.setenv("AUTOPAR_PLAN", str(path))
    case = gpt_case()
    compiled = autopar.compile(
        case.build(), autopar.Cluster.local(ranks=1), example_inputs=case.make_batches(1)[0],
        loss_fn=case.loss_fn, global_batch=8,
    )  # fmt: skip
    assert compiled.plan.micro_batch_size == 4 and compiled.plan.predicted is None


@pytest.mark.parametrize("argv", [["run", "--nproc", "2"]])
def test_missing_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)

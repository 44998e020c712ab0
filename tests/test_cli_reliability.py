"""Every bad CLI input or file ends in exit 2 with an AutoparError message (value seen, rule, fix):
never another exception, a hang or a lost file (issue 16).

Two parts: one test per case users met (each reproduced as written in the issue), and a hypothesis
battery through ``autopar.cli.main.main`` in-process over random model specs, cluster files (random
bytes included) and plan keys, whose oracle is "exit 0, or exit 2 with an ``autopar ...: error:``
line, within a time bound". Settings are derandomized, without a database or shrinking, so a run is
the same every time and stays fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from autopar.cli import files
from autopar.cli.main import main
from autopar.core.errors import UsageError
from autopar.core.plan import Plan

M = "gpt:hidden=64,layers=2,heads=4,vocab=128,seq=16"
FULL_PLAN = "dp=8,tp=1,pp=1,mbs=1,vpp=1,schedule=1f1b,recompute=none,sp=0,zero=0"
E = ["--cluster", "dgx-a100-80g:8", "--global-batch", "8"]
LIMIT_S = 120.0
"""No CLI call here may take longer (a hang fails the test instead of stalling CI)."""

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=25,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


class Outcome:
    def __init__(self, status: int, stdout: str, stderr: str, seconds: float):
        self.status, self.stdout, self.stderr, self.seconds = status, stdout, stderr, seconds

    def __repr__(self) -> str:
        return f"Outcome(status={self.status}, stderr={self.stderr[-400:]!r})"


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError(f"an autopar command ran past {LIMIT_S} s")


def cli(*argv: str) -> Outcome:
    """Run ``autopar ARGV`` in-process; argparse's own exits count as their status. Any other
    exception propagates (and fails the test): that is the bug this file hunts."""
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(argv))
            except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
                status = e.code if isinstance(e.code, int) else 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return Outcome(status, out.getvalue(), err.getvalue(), time.perf_counter() - t0)


def assert_clean(r: Outcome) -> None:
    """Exit 0, or exit 2 with one ``error:`` message and no traceback."""
    assert r.status in (0, 2), r
    assert "Traceback" not in r.stderr, r
    if r.status == 2:
        assert re.search(r"autopar( \w+)?: error: \S", r.stderr), r


def assert_error(r: Outcome, *fragments: str) -> None:
    assert r.status == 2, r
    assert "Traceback" not in r.stderr, r
    for fragment in fragments:
        assert fragment in r.stderr, r


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(Plan.manual(dp=8, global_batch=8, micro_batch_size=1).to_json())
    return path


# ------------------------------------------------------------------------ one test per case
def test_report_refuses_to_overwrite_its_input_and_leaves_it_intact(plan_file: Path):
    before = plan_file.read_bytes()
    for out in (str(plan_file), str(plan_file.parent / "." / ".." / plan_file.parent.name / "plan.json")):
        assert_error(cli("report", str(plan_file), "-o", out), "is the input file", "choose another")
        assert plan_file.read_bytes() == before
    link = plan_file.parent / "link.json"
    link.symlink_to(plan_file)
    assert_error(cli("report", str(plan_file), "-o", str(link)), "is the input file")
    assert plan_file.read_bytes() == before


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match="No space left"):
        files.write_with(target, fail, flag="--out")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    files.write_text(target, "new", flag="--out")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) & 0o600 == 0o600


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("layers", "1000000000", ["layers=1,000,000,000", "limit of 1,024"]),
        ("hidden", "1000000000000", ["hidden=1,000,000,000,000", "limit of 131,072"]),
        ("ffn", "-5", ["ffn=-5", "positive integer"]),
        ("kv_heads", "-2", ["kv_heads=-2", "positive integer"]),
    ],
)
def test_model_sizes_are_bounded_before_anything_is_built(field: str, value: str, words: list[str]):
    import autopar.estimator
    import autopar.models.spec  # noqa: F401  (imports out of the timing: the check itself is fast)

    spec = re.sub(rf"{field}=\d+", "", M).replace(",,", ",").rstrip(",") + f",{field}={value}"
    r = cli("estimate", spec, *E)
    assert_error(r, *words)
    assert r.seconds < 10, r.seconds


def test_cluster_file_of_garbage_bytes_unreadable_or_a_directory(tmp_path: Path, monkeypatch):
    garbage = tmp_path / "c.yaml"
    garbage.write_bytes(bytes(range(256))[::-1])
    assert_error(cli("estimate", M, "--cluster", str(garbage), "--global-batch", "8"), "is not text")
    folder = tmp_path / "clusters"
    folder.mkdir()
    assert_error(cli("estimate", M, "--cluster", str(folder), "--global-batch", "8"), "is a directory")
    good = tmp_path / "ok.yaml"
    good.write_text("preset: dgx-a100-80g\n")

    def denied(self: Path, *a: object, **k: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # as root chmod 000 would not stop the read
    assert_error(cli("estimate", M, "--cluster", str(good), "--global-batch", "8"), "Permission denied")


def test_plan_file_of_garbage_bytes(tmp_path: Path):
    garbage = tmp_path / "plan.json"
    garbage.write_bytes(b"\xff\xfe\x00garbage\x9c")
    assert_error(cli("report", str(garbage)), "is not text")
    assert_error(cli("estimate", M, *E, "--plan", str(garbage)), "is not text")


def test_plan_outputs_are_checked_before_the_search(tmp_path: Path, monkeypatch):
    import autopar.models.spec

    def no_build(*a: object, **k: object) -> None:
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(autopar.models.spec, "load_model", no_build)
    missing = tmp_path / "no" / "such" / "dir" / "plan.json"
    assert_error(cli("plan", M, *E, "--out", str(missing)), "does not exist", "mkdir -p")
    readonly = tmp_path / "ro.json"
    readonly.write_text("keep")
    readonly.chmod(0o444)
    assert_error(cli("plan", M, *E, "--out", str(readonly)), "read-only", "chmod u+w")
    assert readonly.read_text() == "keep"
    assert_error(cli("plan", M, *E, "--report", str(tmp_path)), "is a directory")


def test_run_checks_the_script_before_torchrun(plan_file: Path, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun was started"))
    assert_error(
        cli("run", str(plan_file), "--nproc", "8", "--", "no_such_train.py"),
        "no_such_train.py",
        "does not exist",
    )


def test_profile_batch_and_device_are_checked():
    r = cli("profile", M, "--batch", "1000000000000")
    assert_error(r, "--batch 1000000000000", "half of this machine's memory", "or less")
    import torch

    if not torch.cuda.is_available():
        assert_error(cli("profile", M, "--device", "cuda"), "CUDA is not available", "--device cpu")
    assert_error(cli("profile", M, "--device", "tpu9"), "--device 'tpu9'")


def test_a_plan_file_with_another_batch_is_refused(plan_file: Path):
    r = cli("estimate", M, "--cluster", "dgx-a100-80g:8", "--global-batch", "4", "--plan", str(plan_file))
    assert_error(r, "--global-batch 4", "global batch 8")
    assert_clean(cli("estimate", M, *E, "--plan", str(plan_file)))


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_plan_time_limit_must_be_positive(value: str):
    assert_error(cli("plan", M, *E, "--time-limit", value), "--time-limit")


@pytest.mark.parametrize(
    "argv",
    [
        ["profile", M, "--repeats", "1000000000000"],
        ["profile", M, "--threads", "0"],
        ["report", "plan.json", "--seq", "-1"],
        ["run", "plan.json", "--nproc", "0", "--", "train.py"],
        ["run", "plan.json", "--nproc", "2", "--master-port", "70000", "--", "train.py"],
    ],
)
def test_numbers_that_would_make_work_unbounded_or_meaningless_are_refused(argv: list[str]):
    assert_error(cli(*argv), "argument --")


def test_the_vpp_error_names_vpp():
    assert_error(cli("estimate", M, *E, "--plan", "vpp=2"), "vpp=2", "pp >= 2")


def test_readme_python_example_runs_and_prints_a_readable_cost():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    assert re.match(r"step [\d.]+ \w?s, [\d,]+ tokens/s, MFU [\d.]+%, memory .* per device \(fits\)", printed)
    assert "PredictedCost(" not in printed


def test_readme_cli_lines_use_complete_model_specs():
    from autopar.models import build_model

    text = (Path(__file__).parents[1] / "README.md").read_text()
    specs = re.findall(r"^autopar (?:profile|plan|estimate) (\S+)", text, re.M)
    assert any(s.startswith("gpt:") for s in specs), specs
    for spec in specs:
        build_model(spec, device="meta")  # raises ModelSpecError for an incomplete spec


# ------------------------------------------------------------------------ hypothesis battery
# Each case is a valid input with 0-2 mutations (a bad value, a missing key, garbage), so both the
# whole pipeline (exit 0) and each check (exit 2) are reached.
_BAD = st.one_of(
    st.sampled_from([0, -3, 10**9, 10**12, 10**30, 2.5, "", "x", "1e999", "nan", "-0", "é\x00"]),
    st.text(alphabet="=,:;-x.e 0123456789abc", max_size=6),
)
_VALUES = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(
        st.sampled_from(["name", "gbps", "memory_gb", "bandwidth_bytes_per_s"]),
        st.integers(-5, 5),
        max_size=2,
    ),
)


def _mutate(draw: st.DrawFn, d: dict, values: st.SearchStrategy) -> dict:
    d = dict(d)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(d)))
        if draw(st.integers(0, 3)) == 0:
            d.pop(key)
        else:
            d[key] = draw(values)
        if not d:
            break
    return d


@st.composite
def model_specs(draw: st.DrawFn) -> str:
    fields = {
        "hidden": draw(st.sampled_from([32, 64])),
        "layers": draw(st.sampled_from([1, 2])),
        "heads": draw(st.sampled_from([1, 2, 4])),
        "vocab": draw(st.sampled_from([64, 128])),
        "seq": draw(st.sampled_from([8, 16])),
    }
    optional = {
        "ffn": [32, 128],
        "kv_heads": [1, 2],
        "norm": ["rmsnorm"],
        "act": ["swiglu"],
        "dropout": [0.1],
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=2, unique=True)):
        fields[key] = draw(st.sampled_from(optional[key]))
    fields = _mutate(draw, fields, _BAD)
    body = ",".join(f"{k}={v}" for k, v in fields.items())
    return draw(st.sampled_from(["gpt:", "gpt:", "tiny:"])) + body


@FUZZ
@given(spec=model_specs())
def test_fuzz_model_specs(spec: str):
    assert_clean(cli("estimate", spec, *E, "--plan", FULL_PLAN))


_CLUSTER = {
    "nodes": 1,
    "devices_per_node": 8,
    "device": "a100-80g",
    "intra_node": {"bandwidth_bytes_per_s": 3e11, "latency_s": 3.4e-6},
    "inter_node": {"bandwidth_bytes_per_s": 2.5e10, "latency_s": 1.4e-5},
}


@st.composite
def cluster_files(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".yaml", ".json", ".yml"]))
    kind = draw(st.sampled_from(["bytes", "cut", "preset", "full", "full"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=200))
    base = {"preset": "dgx-a100-80g", "nodes": 1} if kind == "preset" else _CLUSTER
    text = json.dumps(_mutate(draw, base, _VALUES))
    if kind == "cut":
        return suffix, text.encode()[: draw(st.integers(0, len(text)))] + draw(st.binary(max_size=4))
    return suffix, text.encode()


@FUZZ
@given(case=cluster_files())
def test_fuzz_cluster_files(tmp_path_factory, case: tuple[str, bytes]):
    suffix, data = case
    path = tmp_path_factory.mktemp("cluster") / f"c{suffix}"
    path.write_bytes(data)
    assert_clean(cli("estimate", M, "--cluster", str(path), "--global-batch", "8", "--plan", FULL_PLAN))


_MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (4, 1, 2), (2, 4, 1), (1, 4, 2)]


@st.composite
def plan_args(draw: st.DrawFn) -> str:
    dp, tp, pp = draw(st.sampled_from(_MESHES))
    keys = {
        "dp": dp,
        "tp": tp,
        "pp": pp,
        "mbs": draw(st.sampled_from([1, 2])),
        "vpp": 1,
        "schedule": draw(st.sampled_from(["1f1b", "gpipe"])),
        "recompute": draw(st.sampled_from(["none", "full", "selective"])),
        "sp": draw(st.sampled_from([0, 1])) if tp > 1 else 0,
        "zero": draw(st.sampled_from([0, 1, 2, 3])),
    }
    bad = st.one_of(_BAD, st.sampled_from(["interleaved", "zigzag", "most", "maybe", 3, 64, 16]))
    items = [f"{k}={v}" for k, v in _mutate(draw, keys, bad).items()]
    if draw(st.integers(0, 4)) == 0:
        junk = draw(st.sampled_from(["bogus=1", "dp", "=", "tp==2", "pp=1=2", "dp=8"]))
        items.insert(draw(st.integers(0, len(items))), junk)
    return ",".join(items)


@FUZZ
@given(plan=plan_args(), batch=st.sampled_from(["8", "8", "16", "7", "0", "-8", "1000000000000"]))
def test_fuzz_plan_keys(plan: str, batch: str):
    assert_clean(cli("estimate", M, "--cluster", "dgx-a100-80g:8", "--global-batch", batch, "--plan", plan))


_PLAN = json.loads(Plan.manual(dp=8, global_batch=8, micro_batch_size=1).to_json())


@st.composite
def plan_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "cut", "fields", "fields"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    text = json.dumps(_mutate(draw, _PLAN, _VALUES)).encode()
    if kind == "cut":
        return text[: draw(st.integers(0, len(text)))] + draw(st.binary(max_size=4))
    return text


@FUZZ
@given(data=plan_files())
def test_fuzz_plan_files(tmp_path_factory, data: bytes):
    folder = tmp_path_factory.mktemp("plan")
    path = folder / "plan.json"
    path.write_bytes(data)
    assert_clean(cli("report", str(path), "--text"))
    assert_clean(cli("estimate", M, *E, "--plan", str(path)))
    assert path.read_bytes() == data and sorted(os.listdir(folder)) == ["plan.json"]

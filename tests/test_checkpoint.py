"""Checkpoints: save under one plan, resume under another, on real gloo ranks.

Oracle: 6 uninterrupted AdamW steps of the same tiny GPT (hidden 32, 2 layers, dropout 0.1) on one
device (:func:`eager`, the equivalence harness's counter-based dropout). A run that trains 3 steps
under plan A, saves, and resumes under plan B for 3 more must report every loss and end with the
full model *and optimizer* state of that run, within rtol 1e-6 / atol 1e-7 (the plans reduce in
other orders than one device, so bit-identity is not expected; the save/load round trip itself is
checked bit-exact). Pairs: dp2·tp2 -> pp2·dp2, dp4 -> dp2 (4 -> 2 ranks), tp2 -> dp2·pp2
(2 -> 4 ranks), ZeRO-3 dp2 -> tp2, ZeRO-1 dp2 -> ZeRO-3 dp2.

Three launches (2, 4, 2 ranks) produce every checkpoint and trajectory; the tests read them. The
last launch ends with a real crash: rank 1 SIGKILLs itself while a save is being written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch

import autopar
from autopar import Plan
from autopar.core.errors import CheckpointError
from autopar.lower import rng
from autopar.runtime import checkpoint as ckpt
from autopar.testing.dist import LaunchFailure, run_ranks
from autopar.testing.equivalence import gpt_case

pytestmark = pytest.mark.multiproc

CASE = gpt_case(hidden=32, layers=2, heads=4, dropout=0.1)
STEPS, B = 12, CASE.global_batch
RTOL, ATOL = 1e-6, 1e-6


def P(**kw) -> Plan:
    kw.setdefault("micro_batch_size", 2)
    return Plan.manual(global_batch=B, **kw)


# ----------------------------------------------------------------------------------- oracle
def eager(start: dict | None = None, stop: int = 6) -> dict:
    """One device, steps ``start["step"]..stop`` (from a full state; from step 0 without one): the
    losses, then the model and optimizer state after step ``stop - 1``. From step 0 one cached
    run of all STEPS steps serves every ``stop``."""
    if start is not None:
        return _run_eager(start, stop)[stop]
    if not _cached:
        _cached.update(_run_eager(None, STEPS))
    return {**_cached[stop], "losses": _cached[STEPS]["losses"][:stop]}


_cached: dict[int, dict] = {}


def _run_eager(start: dict | None, stop: int) -> dict[int, dict]:
    """``{steps done: {"losses", "model", "optim"}}`` after every step up to ``stop``."""
    model = rng.make_deterministic(CASE.build())
    opt = CASE.optimizer(model.parameters())
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(ckpt.torch_optimizer_state(start["optim"], model))
        first = start["step"]
    losses, out = [], {}
    for step, (tokens, targets) in list(enumerate(CASE.make_batches(STEPS)))[first:stop]:
        opt.zero_grad(set_to_none=True)
        with rng.sample_ids(rng.sample_ids_for_step(step, B)):
            loss = CASE.loss_fn(model(tokens), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        optim = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
        model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[step + 1] = {"losses": list(losses), "model": model_state, "optim": optim}
    return out


# ----------------------------------------------------------------------------------- rank code
def train(plan: Plan, steps: int, *, save: str | None = None, resume: str | None = None) -> dict | None:
    """Compile under ``plan`` (resuming from ``resume``), take ``steps`` steps, save to ``save``;
    rank 0 returns its losses and the full state."""
    batches = CASE.make_batches(STEPS)
    compiled = autopar.compile(
        CASE.build(),
        plan.world_size,
        example_inputs=batches[0],
        loss_fn=CASE.loss_fn,
        optimizer=CASE.optimizer,
        plan=plan,
        global_batch=B,
        resume_from=resume,
        timeout_s=60,
    )
    start = compiled.global_step
    losses = [compiled.step(batches[i]) for i in range(start, start + steps)]
    if save:
        compiled.save(save, keep=2, model_spec="gpt:hidden=32,layers=2,heads=4,vocab=64,seq=8")
    state = compiled.full_state_dict()
    return {"start": start, "losses": losses, "state": state} if compiled.rank == 0 else None


def two_ranks_first(root: str) -> dict:
    """A chain: ZeRO-1 (steps 0-2) -> ZeRO-3 (3-5) -> tp2 (6-8), each saving for the next."""
    return {
        "z1": train(P(dp=2, zero_stage=1), 3, save=f"{root}/z1"),
        "z1->z3": train(P(dp=2, zero_stage=3), 3, resume=f"{root}/z1", save=f"{root}/z3"),
        "z3->tp2": train(P(tp=2), 3, resume=f"{root}/z3", save=f"{root}/tp2"),
    }


def four_ranks(root: str) -> dict:
    return {
        "dp2tp2": train(P(dp=2, tp=2), 3, save=f"{root}/dp2tp2"),
        "dp2tp2->pp2dp2": train(P(pp=2, dp=2, axis_order=("pp", "dp", "tp")), 3, resume=f"{root}/dp2tp2"),
        "dp4": train(P(dp=4), 3, save=f"{root}/dp4"),
        "tp2->dp2pp2": train(P(dp=2, pp=2), 3, resume=f"{root}/tp2"),
    }


def _die_while_saving(directory: Path, names: list[str]) -> dict:
    """Stands in for the hashing step of a save on rank 1: the shard files are written, the
    manifest is not; the process is killed as by the OOM killer or a lost node."""
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def two_ranks_last(root: str) -> None:
    """dp4 -> dp2 (rank 0 writes the result to a file), then a save during which rank 1 dies."""
    result = train(P(dp=2), 3, resume=f"{root}/dp4", save=f"{root}/crash")
    if result is not None:
        Path(root, "dp4-dp2.pkl").write_bytes(pickle.dumps(result))
    batches = CASE.make_batches(STEPS)
    compiled = autopar.compile(
        CASE.build(), 2, example_inputs=batches[0], loss_fn=CASE.loss_fn, optimizer=CASE.optimizer,
        plan=P(dp=2), global_batch=B, resume_from=f"{root}/crash", timeout_s=10,
    )  # fmt: skip
    if compiled.rank == 1:
        ckpt.hash_files = _die_while_saving
    compiled.save(f"{root}/crash")  # step 6 of the "crash" root: never completes


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    out = {"root": root}
    out.update(run_ranks(two_ranks_first, 2, args=(str(root),), timeout_s=60)[0])
    out.update(run_ranks(four_ranks, 4, args=(str(root),), timeout_s=60)[0])
    with pytest.raises(LaunchFailure) as crash:
        run_ranks(two_ranks_last, 2, args=(str(root),), timeout_s=10)
    out["crash"] = str(crash.value)
    result = root / "dp4-dp2.pkl"
    assert result.is_file(), f"the dp4 -> dp2 run did not finish: {crash.value}"
    out["dp4->dp2"] = pickle.loads(result.read_bytes())
    return out


@pytest.fixture(scope="module")
def oracle() -> dict:
    return eager()


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and bool(
        ((a.double() - b.double()).abs() <= atol + RTOL * b.double().abs()).all()
    )


def assert_matches(run: dict, ref: dict, first: int, label: str, final: bool = True) -> None:
    """Losses within rtol 1e-6; parameters within rtol 1e-6 + atol 1e-6; each optimizer state
    kind (``exp_avg``...) within rtol 1e-6 + 1e-6 of its largest value over the model (Adam's
    moments of gradients that are analytically zero, such as the key bias's, are rounding noise of
    ~1e-10 whose relative error means nothing). ``step`` exactly."""
    want = ref["losses"][first : first + len(run["losses"])]
    for i, (got, exp) in enumerate(zip(run["losses"], want)):
        assert close(torch.tensor(got), torch.tensor(exp), 0.0), (
            f"{label}: step {first + i} loss {got} vs {exp}"
        )
    if not final:
        return
    state = run["state"]
    bad = [k for k, v in ref["model"].items() if not close(state["model"][k], v, ATOL)]
    assert not bad, f"{label}: parameters differ from one device after {STEPS} steps: {bad[:5]}"
    scale: dict[str, float] = {}
    for entry in ref["optim"].values():
        for key, value in entry.items():
            scale[key] = max(scale.get(key, 0.0), float(value.abs().max()))
    for name, entry in ref["optim"].items():
        for key, value in entry.items():
            got = state["optim"]["state"][name][key]
            assert close(got, value, ATOL * scale[key]), f"{label}: optimizer state {name}.{key} differs"


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "saved,resumed",
    [
        ("dp2tp2", "dp2tp2->pp2dp2"),
        ("dp4", "dp4->dp2"),
        ("z3->tp2", "tp2->dp2pp2"),
        ("z1->z3", "z3->tp2"),
        ("z1", "z1->z3"),
    ],
)
def test_resume_under_another_plan_continues_the_uninterrupted_run(runs, saved, resumed):
    """The losses of 3 steps under plan A and of the next 3 under plan B, then the full model and
    optimizer state, equal those of the uninterrupted run on one device at the same steps."""
    first = runs[resumed]["start"]
    assert first == runs[saved]["start"] + 3
    assert_matches(runs[saved], eager(stop=first), runs[saved]["start"], saved, final=False)
    assert_matches(runs[resumed], eager(stop=first + 3), first, f"{saved} -> {resumed}")
    state = runs[resumed]["state"]
    assert state["step"] == first + 3 and state["samples_seen"] == (first + 3) * B


def test_full_state_loads_into_the_original_model_and_optimizer(runs, oracle):
    """The checkpoint's full state, loaded into the eager model and torch AdamW, continues exactly
    as the one-device run: the full form is the original training's state."""
    state, manifest = ckpt.load_checkpoint(runs["root"] / "dp2tp2", CASE.build().state_dict())
    assert state["step"] == 3 and manifest["plan"]["mesh"][0]["size"] == 2
    resumed = eager(state)
    run = {
        "losses": resumed["losses"],
        "state": {"model": resumed["model"], "optim": {"state": resumed["optim"]}},
    }
    assert_matches(run, oracle, 3, "eager from the dp2·tp2 checkpoint")


def test_save_writes_shards_in_parallel_with_a_manifest(runs):
    path = ckpt.resolve(runs["root"] / "dp4")
    manifest = ckpt.read_manifest(path)
    shards = [n for n in manifest["files"] if n.endswith(".distcp")]
    assert sorted(shards) == [f"__{r}_0.distcp" for r in range(4)], shards
    assert all(manifest["files"][n]["bytes"] > 1000 for n in shards)  # every rank wrote a share
    for name, entry in manifest["files"].items():
        assert ckpt.hash_files(path, [name])[name] == entry
    assert (
        manifest["step"] == 3 and manifest["world_size"] == 4 and manifest["version"] == ckpt.FORMAT_VERSION
    )
    assert manifest["model"]["lm_head.weight"] == {"shape": [64, 32], "dtype": "float32"}
    assert Plan.from_json(json.dumps(manifest["plan"])).dp == 4


def test_crash_during_save_leaves_the_previous_checkpoint_loadable(runs):
    root = runs["root"] / "crash"
    assert "rank 1" in runs["crash"] and "SIGKILL" in runs["crash"], runs["crash"]
    found = {(c.step, c.complete) for c in ckpt.list_checkpoints(root)}
    assert found == {(6, True), (6, False)} or found == {(3, True), (6, True), (6, False)}, found
    partial = next(c.path for c in ckpt.list_checkpoints(root) if not c.complete)
    assert partial.name == "step-00000006.partial"
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.resolve(partial)
    assert ckpt.resolve(root) == root / "step-00000006"  # the complete save of that step
    state, _ = ckpt.load_checkpoint(root, CASE.build().state_dict())
    saved = runs["dp4->dp2"]["state"]  # what the ranks held when they saved it: bit-identical
    assert all(torch.equal(state["model"][k], v) for k, v in saved["model"].items())
    for name, entry in saved["optim"]["state"].items():
        assert all(torch.equal(state["optim"]["state"][name][k], v) for k, v in entry.items()), name


def test_keep_last_k_and_stale_partial_saves(tmp_path):
    compiled = one_rank()
    (tmp_path / "step-00000001.partial").mkdir()  # a crashed save of step 1
    for batch in CASE.make_batches(3):
        compiled.step(batch)
        compiled.save(tmp_path, keep=2)
    assert [(c.step, c.complete) for c in ckpt.list_checkpoints(tmp_path)] == [(2, True), (3, True)]
    compiled.save(tmp_path, keep=2)  # step 3 again: replaced by one rename, still complete
    assert [(c.step, c.complete) for c in ckpt.list_checkpoints(tmp_path)] == [(2, True), (3, True)]
    with pytest.raises(CheckpointError, match="keep=0"):
        compiled.save(tmp_path, keep=0)


# ----------------------------------------------------------------------------------- bad input
def one_rank(**cfg) -> autopar.ParallelModule:
    case = gpt_case(**{"hidden": 32, "layers": 2, "heads": 4, **cfg})
    batch = case.make_batches(1)[0]
    return autopar.compile(
        case.build(),
        1,
        example_inputs=batch,
        loss_fn=case.loss_fn,
        plan=Plan.manual(global_batch=B),
        global_batch=B,
    )


def copy_of(runs, tmp_path, name: str = "tp2") -> Path:
    src = ckpt.resolve(runs["root"] / name)
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def assert_refused(compiled, path, match: str) -> None:
    """The load raises CheckpointError and changes nothing: the model, the checkpoint's files."""
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    files = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    with pytest.raises(CheckpointError, match=match):
        compiled.load(path)
    after = compiled.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and compiled.global_step == 0
    assert files == {p.name: p.read_bytes() for p in Path(path).iterdir()}


def test_bad_checkpoints_raise_a_typed_error_naming_key_or_file(runs, tmp_path):
    compiled = one_rank()
    other = one_rank(hidden=16)
    assert_refused(
        other,
        ckpt.resolve(runs["root"] / "tp2"),
        r"another model: 'tok_emb.weight' is float32 \[64, 32\] there but float32 \[64, 16\] here",
    )
    truncated = copy_of(runs, tmp_path / "t")
    with open(truncated / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    assert_refused(compiled, truncated, r"__1_0.distcp has 100 bytes, expected \d+ \(truncated")
    missing = copy_of(runs, tmp_path / "m")
    (missing / "__0_0.distcp").unlink()
    assert_refused(compiled, missing, r"__0_0.distcp is missing")
    version = copy_of(runs, tmp_path / "v")
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    assert_refused(compiled, version, "format version 99; this autopar reads version 1")
    with pytest.raises(CheckpointError, match="does not exist"):
        compiled.load(tmp_path / "nowhere")
    good = ckpt.resolve(runs["root"] / "tp2")
    compiled.load(good)  # a 2-rank checkpoint on 1 rank: tp2 -> 1 device
    assert compiled.global_step == 9


def test_cli_replan_prints_the_new_plan_and_refuses_bad_checkpoints(runs, tmp_path, capsys):
    from autopar.cli.main import main

    good = ckpt.resolve(runs["root"] / "dp4")
    args = [
        "replan",
        str(good),
        "--cluster",
        "local:2",
        "--plan",
        "dp=2",
        "--out",
        str(tmp_path / "new.json"),
    ]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "saved under  dp=4" in shown and "new plan     dp=2" in shown and "step 3" in shown, shown
    assert "dp         4 -> 2   (changes)" in shown and f"--resume {good}" in shown, shown
    assert Plan.from_json((tmp_path / "new.json").read_text()).dp == 2
    bad = copy_of(runs, tmp_path, "dp4")
    (bad / "__2_0.distcp").write_bytes(b"garbage")
    assert main(["replan", str(bad), "--cluster", "local:2"]) == 2
    assert "__2_0.distcp has 7 bytes" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                str(tmp_path / "new.json"),
                "--nproc",
                "2",
                "--resume",
                str(bad.parent),
                "--dry-run",
                "--",
                "t.py",
            ]
        )
        == 0
    )
    assert f"AUTOPAR_RESUME={bad.parent}" in capsys.readouterr().out

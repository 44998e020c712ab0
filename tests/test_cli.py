"""The command line: exit codes and messages through a real subprocess (`python -m autopar`), the
subcommand-module framework, and the --plan key rules (resolve_plan) against hand-computed cases."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types

import pytest

from autopar import Cluster, PlanError
from autopar.cli.main import command_modules, main
from autopar.core.errors import AutoparError
from autopar.core.plan_rules import parse_plan_arg, plan_keys, resolve_plan


def autopar(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autopar", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, every fragment in stderr, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ------------------------------------------------------------------------------- commands
def test_hardware_table_lists_every_kind_and_preset():
    r = autopar("hardware")
    assert r.returncode == 0, r.stderr
    for name in ("a100-40g", "a100-80g", "h100-sxm", "h200", "v100-16g", "v100-32g", "cpu"):
        assert f"\n{name} " in r.stdout
    for name in ("dgx-a100-80g", "dgx-a100-40g", "dgx-h100", "hgx-h200", "aws-p3.16xlarge", "local"):
        assert f"\n{name} " in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("dgx-h100 "))
    assert row.split()[1:6] == ["h100-sxm", "8", "450", "3.4", "50"]


def test_hardware_json_round_trips_the_constants():
    r = autopar("hardware", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["devices"]["a100-80g"]["peak_flops_per_s"]["bf16"] == 312e12
    assert data["presets"]["dgx-a100-80g"]["inter_node"]["bandwidth_bytes_per_s"] == 25e9
    assert data["presets"]["aws-p3.16xlarge"]["inter_node"]["bandwidth_bytes_per_s"] == pytest.approx(
        25e9 / 64
    )


def test_models_lists_the_zoo_or_degrades():
    r = autopar("models")
    try:
        from autopar.models import list_models  # noqa: F401
    except ImportError:
        assert r.returncode == 1 and "model zoo is not available" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert "gpt3-175b" in r.stdout and "gpt:hidden=H" in r.stdout


def test_no_command_and_bad_arguments_exit_2():
    r = autopar()
    assert r.returncode == 2 and "usage: autopar" in r.stderr
    assert_user_error(autopar("nosuch"), "invalid choice: 'nosuch'")
    assert_user_error(autopar("estimate", "gpt3-175b", "--cluster", "dgx-h100"), "--global-batch")
    assert_user_error(
        autopar("estimate", "x", "--cluster", "dgx-h100", "--global-batch", "0"),
        "--global-batch: 0 must be >= 1",
    )


@pytest.mark.parametrize(
    "cluster, plan, fragments",
    [
        ("dgx-a100", "", ["unknown cluster preset 'dgx-a100'", "dgx-a100-80g, dgx-a100-40g"]),
        ("dgx-a100-80g:nodes=0", "", ["nodes: 0 must be >= 1"]),
        ("dgx-a100-80g:100", "", ["100 devices is not a whole number of 8-device nodes"]),
        ("dgx-a100-80g:node=2", "", ["unknown override 'node' (did you mean 'nodes'?)"]),
        ("no/such/cluster.yaml", "", ["cluster file 'no/such/cluster.yaml' not found"]),
        ("dgx-h100", "tpp=2", ["unknown plan key 'tpp' (did you mean 'tp'?)"]),
        ("dgx-h100", "tp=0", ["plan key tp='0': must be a whole number >= 1"]),
        ("dgx-h100", "schedule=zigzag", ["schedule='zigzag': choose one of gpipe, 1f1b, interleaved"]),
        ("dgx-h100", "zero=4", ["ZeRO stage must be 0, 1, 2 or 3"]),
        ("dgx-h100", "tp", ["--plan item 'tp' is not key=value"]),
        (
            "dgx-h100:nodes=8",
            "tp=4,pp=8,mbs=1,vpp=7,schedule=interleaved",
            ["go with the keys you fixed (tp=4, pp=8, mbs=1, vpp=7, schedule=interleaved)", "fix fewer keys"],
        ),
    ],
)
def test_estimate_rejects_bad_cluster_and_plan_keys(cluster, plan, fragments):
    r = autopar("estimate", "gpt3-175b", "--cluster", cluster, "--global-batch", "64", "--plan", plan)
    assert_user_error(r, *fragments)


def test_estimate_on_a_heterogeneous_cluster_costs_each_kind(tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text(
        "devices_per_node: 8\n"
        "node_groups: [{nodes: 2, device: a100-80g}, {nodes: 2, device: v100-32g}]\n"
        "intra_node: {bandwidth_bytes_per_s: 300.0e9, latency_s: 5.0e-6}\n"
        "inter_node: {bandwidth_bytes_per_s: 25.0e9, latency_s: 1.0e-5}\n"
    )
    spec = "gpt:hidden=1024,layers=8,heads=16,vocab=8192,seq=512"
    plan = "dp=8,tp=2,pp=2,mbs=1,vpp=1,schedule=1f1b,recompute=none,sp=0,zero=0"
    r = autopar("estimate", spec, "--cluster", str(f), "--global-batch", "64", "--plan", plan, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True
    assert set(out["extra"]["memory_capacity_bytes_per_stage"]) <= {80e9, 32e9}


def test_estimate_software_prices_the_plan_as_that_software_runs_it(tmp_path):
    """``--software nemo-mcore`` costs the plan with NeMo/Megatron-Core's behaviour on the kind's
    constants: faster than autopar's own costing of the same sequence-parallel plan on H100 (TE's
    pipelined TP collectives, Hopper's fused attention), the name in the output; an unknown name or
    a cluster mixing kinds is a user error naming the choices."""
    spec = "gpt:hidden=1024,layers=8,heads=16,vocab=8192,seq=1024,bias=0"
    plan = "dp=4,tp=2,pp=1,mbs=2,vpp=1,schedule=1f1b,recompute=none,sp=1,zero=1"
    args = ("estimate", spec, "--cluster", "dgx-h100", "--global-batch", "32", "--plan", plan, "--json")
    own, nemo = (json.loads(autopar(*args, *extra).stdout) for extra in ((), ("--software", "nemo-mcore")))
    assert own["software"] is None and nemo["software"] == "nemo-mcore"
    assert nemo["step_time_s"] < own["step_time_s"]
    assert nemo["breakdown_s"]["tp_comm"] < own["breakdown_s"]["tp_comm"]
    assert_user_error(autopar(*args, "--software", "jax"), "--software 'jax' is not known", "nemo-mcore")
    f = tmp_path / "mixed.yaml"
    f.write_text(
        "devices_per_node: 8\n"
        "node_groups: [{nodes: 1, device: h100-sxm}, {nodes: 1, device: a100-80g}]\n"
        "intra_node: {bandwidth_bytes_per_s: 300.0e9, latency_s: 5.0e-6}\n"
        "inter_node: {bandwidth_bytes_per_s: 25.0e9, latency_s: 1.0e-5}\n"
    )
    mixed = autopar(
        "estimate", spec, "--cluster", str(f), "--global-batch", "32", "--plan", plan, "--software", "fsdp"
    )
    assert_user_error(mixed, "mixes h100-sxm, a100-80g")


# ------------------------------------------------------------------------------ framework
def test_every_command_module_imports_and_registers():
    names = command_modules()
    assert {"autopar.cli.estimate", "autopar.cli.hardware", "autopar.cli.models"} <= set(names)
    for name in names:
        module = importlib.import_module(name)
        assert callable(module.add_parser), name


def _fake_command(exc: BaseException):
    def add_parser(subparsers):
        p = subparsers.add_parser("boom")
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(exc))

    return types.SimpleNamespace(__name__="autopar.cli.boom", ORDER=1, add_parser=add_parser)


def test_user_errors_exit_2_and_bugs_keep_their_traceback(monkeypatch, capsys):
    monkeypatch.setattr("autopar.cli.main.load_commands", lambda: [_fake_command(PlanError("tp=3 is wrong"))])
    assert main(["boom"]) == 2
    assert "autopar boom: error: tp=3 is wrong" in capsys.readouterr().err
    monkeypatch.setattr("autopar.cli.main.load_commands", lambda: [_fake_command(ZeroDivisionError("bug"))])
    with pytest.raises(ZeroDivisionError):
        main(["boom"])
    assert issubclass(PlanError, AutoparError)


# ---------------------------------------------------------------------------- plan keys
DGX16 = Cluster.preset("dgx-a100-80g", nodes=16)  # 128 GPUs


def test_resolve_plan_defaults_fill_the_devices():
    plan = resolve_plan(parse_plan_arg("tp=8,pp=8"), DGX16, num_layers=96, heads=96, global_batch=1536)
    assert plan_keys(plan) == {
        "dp": 2, "tp": 8, "pp": 8, "mbs": 1, "vpp": 1, "schedule": "1f1b", "recompute": "none",
        "sp": 0, "zero": 0, "micro_batches": 768, "global_batch": 1536,
    }  # fmt: skip
    assert plan.world_size == 128
    plan = resolve_plan({}, DGX16, num_layers=96, heads=96, global_batch=1536)
    assert (plan.dp, plan.tp, plan.pp) == (128, 1, 1)
    plan = resolve_plan(
        parse_plan_arg("tp=8,pp=4,vpp=3,mbs=2,sp=1,recompute=selective,zero=1"), DGX16, 96, 96, 1536
    )
    assert plan.schedule == "interleaved" and plan.virtual_stages == 3 and plan.sequence_parallel
    assert plan.num_micro_batches == 1536 // (4 * 2) and plan.zero_stage == 1


@pytest.mark.parametrize(
    "keys, layers, heads, batch, message",
    [
        (
            "dp=4,tp=8,pp=8",
            96,
            96,
            1536,
            "dp*tp*pp = 4*8*8 = 256 but cluster 'dgx-a100-80g:nodes=16' has 128 devices",
        ),
        ("tp=3", 96, 96, 1536, "tp*pp = 3*1 = 3 does not divide the 128 devices"),
        ("tp=16", 96, 96, 1536, None),  # allowed: 16 divides 96 heads and 128 devices
        ("tp=64,pp=2", 96, 96, 1536, "tp=64 does not divide the model's 96 attention heads"),
        ("pp=128", 96, 96, 1536, "pp*vpp = 128*1 = 128 stages exceed the model's 96 layers"),
        ("tp=8,pp=8,mbs=5", 96, 96, 1536, "mbs=5 does not divide the per-replica batch 1536/dp=2 = 768"),
        ("tp=8", 96, 96, 100, "global batch 100 does not split over dp=16 data-parallel replicas"),
        ("tp=8,pp=8,vpp=2,mbs=256", 96, 96, 1536, "needs the 3 micro-batches per step"),
        ("tp=8,pp=8,schedule=interleaved", 96, 96, 1536, "schedule=interleaved needs vpp >= 2"),
        ("vpp=2,schedule=1f1b,pp=2", 96, 96, 1536, "vpp=2 needs schedule=interleaved"),
        ("sp=1", 96, 96, 1536, "sp=1 needs tp > 1"),
    ],
)
def test_resolve_plan_rules(keys, layers, heads, batch, message):
    parsed = parse_plan_arg(keys)
    if message is None:
        resolve_plan(parsed, DGX16, layers, heads, batch)
        return
    with pytest.raises(PlanError) as e:
        resolve_plan(parsed, DGX16, layers, heads, batch)
    assert message in str(e.value), str(e.value)


def test_bare_device_count_mistaken_for_nodes_gets_a_hint():
    # DESIGN.md's example pairs dgx-a100-80g:128 with dp=16,tp=8,pp=8 (1024 GPUs = 128 nodes).
    with pytest.raises(
        PlanError, match=r"PRESET:128 means 128 devices in all: for 128 nodes write PRESET:nodes=128"
    ):
        resolve_plan(parse_plan_arg("tp=8,pp=8,dp=16"), Cluster.parse("dgx-a100-80g:128"), 96, 96, 1536)
    plan = resolve_plan(
        parse_plan_arg("tp=8,pp=8,dp=16"), Cluster.parse("dgx-a100-80g:nodes=128"), 96, 96, 1536
    )
    assert plan.world_size == 1024


def test_resolve_plan_error_lists_valid_choices():
    with pytest.raises(PlanError, match=r"choose tp in \{1, 2, 4, 8\}"):
        resolve_plan({"tp": 16, "pp": 1}, Cluster.preset("dgx-h100", nodes=2), 32, 40, 64)
    with pytest.raises(PlanError, match=r"choose mbs in \{1, 2, 3, 4, 6, 12\}"):
        resolve_plan({"mbs": 5}, Cluster.preset("dgx-h100"), 32, 32, 96)


def test_grouped_query_attention_limits_tp():
    with pytest.raises(
        PlanError, match=r"tp=16 does not divide the model's 8 key/value heads .*\{1, 2, 4, 8\}"
    ):
        resolve_plan({"tp": 16}, Cluster.preset("dgx-h100", nodes=2), 80, 64, 64, kv_heads=8)
    assert resolve_plan({"tp": 8}, Cluster.preset("dgx-h100", nodes=2), 80, 64, 64, kv_heads=8).dp == 2


# ---------------------------------------------------------------------------- model spec
def test_model_spec_adapts_the_builtin_gpt_on_meta():
    from autopar.models.gpt import GPT, GPTConfig
    from autopar.models.spec import adapt

    cfg = GPTConfig(hidden=64, layers=3, heads=4, kv_heads=2, vocab=128, seq=16, norm="rmsnorm", act="swiglu")
    loaded = adapt("tiny", GPT(cfg, device="meta"), seq=8)
    assert (loaded.num_layers, loaded.heads, loaded.kv_heads, loaded.seq) == (3, 4, 2, 8)
    tokens, targets = loaded.make_inputs(5)
    assert tokens.shape == targets.shape == (5, 8) and tokens.device.type == "meta"
    graph = loaded.trace(batch=2)
    assert graph.batch_size == 2
    assert max(bt.count for bt in graph.block_types.values()) == 3


# ------------------------------------------------------------------------- end to end
TINY = "gpt:hidden=64,layers=4,heads=4,vocab=256,seq=32"


def test_estimate_json_end_to_end():
    r = autopar("estimate", TINY, "--cluster", "dgx-h100", "--global-batch", "16", "--plan", "tp=2,pp=2", "--seq", "16", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    required = {"step_time_s", "tokens_per_s", "model_flops_per_step", "hardware_flops_per_step", "mfu",
                "memory_bytes_per_device", "memory_capacity_bytes", "fits", "plan", "breakdown_s",
                "memory_breakdown_bytes"}  # fmt: skip
    assert required <= set(out)
    # tp and pp were fixed; the planner chose the rest and must do no worse than the fixed defaults.
    assert out["plan"]["tp"] == 2 and out["plan"]["pp"] == 2 and out["plan"]["dp"] == 2
    assert set(out["chosen_by_planner"]) == {"dp", "mbs", "vpp", "schedule", "recompute", "sp", "zero"}
    full = "tp=2,pp=2,dp=2,mbs=1,vpp=1,schedule=1f1b,recompute=none,sp=0,zero=0"
    r2 = autopar("estimate", TINY, "--cluster", "dgx-h100", "--global-batch", "16", "--plan", full, "--seq", "16", "--json")  # fmt: skip
    default = json.loads(r2.stdout)
    assert default["chosen_by_planner"] == [] and default["plan"]["mbs"] == 1
    assert out["step_time_s"] <= default["step_time_s"] * (1 + 1e-9)
    assert out["seq"] == 16 and out["memory_capacity_bytes"] == 80e9
    # Internal consistency of the report: the parts add up, throughput and MFU follow from the time.
    assert sum(out["breakdown_s"].values()) == pytest.approx(out["step_time_s"], rel=1e-6)
    assert out["tokens_per_s"] == pytest.approx(16 * 16 / out["step_time_s"], rel=1e-6)
    mfu = out["model_flops_per_step"] / (out["step_time_s"] * 8 * 989.4e12)
    assert out["mfu"] == pytest.approx(mfu, rel=1e-6)
    assert sum(out["memory_breakdown_bytes"].values()) == pytest.approx(
        out["memory_bytes_per_device"], rel=1e-6
    )
    assert out["fits"] is True


def test_estimate_table_reports_overflow_on_a_small_device(tmp_path, capsys):
    # In-process (autopar.cli.main): the same code path as the console script, without a
    # second torch start-up; the subprocess tests above cover the process boundary.
    cluster = tmp_path / "small.yaml"
    cluster.write_text(
        "nodes: 1\ndevices_per_node: 2\n"
        "device: {name: tiny-gpu, peak_flops_per_s: {bf16: 1.0e14, fp32: 1.0e13}, memory_bytes: 1.0e6,"
        " hbm_bytes_per_s: 1.0e12}\n"
        "intra_node: {bandwidth_gbps: 800, latency_us: 5}\n"
    )
    full = "dp=2,tp=1,pp=1,mbs=2,vpp=1,schedule=1f1b,recompute=none,sp=0,zero=0"
    assert main(["estimate", TINY, "--cluster", str(cluster), "--global-batch", "8", "--plan", full]) == 0
    stdout = capsys.readouterr().out
    assert "plan     dp=2 pp=1 tp=1 mbs=2 m=2 1f1b" in stdout
    for row in ("step time", "compute", "tokens/s", "MFU", "memory per device", "of 0.00 GB"):
        assert row in stdout, stdout
    assert "NO  over by" in stdout
    # With keys left open the planner searches them, finds nothing that fits and says by how much.
    assert main(["estimate", TINY, "--cluster", str(cluster), "--global-batch", "8", "--plan", "mbs=2"]) == 2
    err = capsys.readouterr().err
    assert "no plan fits in memory" in err and "over the 1.0 MB capacity" in err and "Traceback" not in err


def test_estimate_model_rules_and_bad_model(capsys):
    assert main(["estimate", TINY, "--cluster", "dgx-h100", "--global-batch", "16", "--plan", "tp=8"]) == 2
    err = capsys.readouterr().err
    assert "tp=8 does not divide the model's 4 attention heads" in err and "choose tp in {1, 2, 4}" in err
    assert main(["estimate", "gpt4-1t", "--cluster", "dgx-h100", "--global-batch", "16"]) == 2
    assert "autopar estimate: error: " in capsys.readouterr().err


FACTORY = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=16, n=6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build(device="meta", batch=1):
    with torch.device(device):
        model = Net()
    x = torch.zeros(batch, 16, device=device)
    return model, (x, torch.zeros(batch, dtype=torch.long, device=device)), nn.functional.cross_entropy
"""


def test_estimate_user_factory_counts_its_blocks_in_the_graph(tmp_path, capsys):
    path = tmp_path / "mlp.py"
    path.write_text(FACTORY)
    spec = f"{path}:build"
    # No config to read the layer count from: it comes from the traced graph (6 identical blocks).
    assert main(["estimate", spec, "--cluster", "local:8", "--global-batch", "4", "--plan", "pp=8"]) == 2
    assert "pp*vpp = 8*1 = 8 stages exceed the model's 6 layers" in capsys.readouterr().err
    assert (
        main(["estimate", spec, "--cluster", "local:2", "--global-batch", "4", "--plan", "pp=2", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["pp"] == 2 and out["seq"] is None and out["step_time_s"] > 0
    assert main(["estimate", spec, "--cluster", "local:2", "--global-batch", "4", "--seq", "8"]) == 2
    assert "--seq 8 applies to built-in GPT models" in capsys.readouterr().err

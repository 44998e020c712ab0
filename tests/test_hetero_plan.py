"""Planning on a cluster with two device kinds (1 node of A100 80GB + 1 node of V100 32GB).

Oracle: the planner's plan against the best plan that ignores the difference (layers split evenly
over the stages, every other key as the planner chose), costed by the same estimator.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import autopar
from autopar.cluster import Cluster
from autopar.estimator import estimate
from autopar.models import GPTConfig


def _cluster() -> Cluster:
    links = Cluster.preset("dgx-a100-80g").to_dict()
    return Cluster.from_dict(
        {
            "name": "a100+v100",
            "devices_per_node": 8,
            "node_groups": [{"nodes": 1, "device": "a100-80g"}, {"nodes": 1, "device": "v100-32g"}],
            "intra_node": links["intra_node"],
            "inter_node": links["inter_node"],
        }
    )


@pytest.fixture(scope="module")
def graph():
    config = GPTConfig(hidden=4096, layers=16, heads=32, vocab=51200, seq=2048)
    model, inputs, loss_fn = autopar.build_model(config, device="meta", batch=1, dtype=torch.float16)
    return autopar.trace(model, inputs, loss_fn=loss_fn)


def test_stages_are_sized_to_their_devices(graph):
    cluster = _cluster()
    plan = autopar.plan(graph, cluster, global_batch=64, fixed={"pp": 2}, progress=False)
    # pp outermost: stage 0 on the A100 node, stage 1 on the V100 node.
    assert [a.name for a in plan.mesh][0] == "pp"
    assert {cluster.device_of(r).name for r in plan.groups("pp")[0][:1]} == {"a100-80g"}
    stages = plan.stage_of_layers(16)
    a100_blocks = stages.count(0)
    assert a100_blocks > 8, stages  # the faster devices get more layers
    even = dataclasses.replace(plan, layer_stages=None, predicted=None, search=None)
    even_cost = estimate(graph, cluster, even)
    assert plan.predicted.step_time_s < 0.9 * even_cost.step_time_s


def test_cli_plans_and_prints_a_two_kind_cluster(tmp_path):
    path = tmp_path / "hetero.json"
    path.write_text(json.dumps(_cluster().to_dict()))
    spec = "gpt:hidden=1024,layers=8,heads=16,vocab=8192,seq=512"
    r = subprocess.run(
        [sys.executable, "-m", "autopar", "plan", spec, "--cluster", str(path), "--global-batch", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "a100-80g" in r.stdout and "v100-32g" in r.stdout and "step time" in r.stdout

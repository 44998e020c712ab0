"""The profiler: measured per-op times on a tiny GPT, signature cache, JSON, estimator use, gloo."""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.cluster import Cluster
from autopar.core.plan import Plan
from autopar.estimator.profile import Profile, measure_collectives
from autopar.models.gpt import GPT, GPTConfig, gpt_loss


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden=32, layers=2, heads=2, vocab=64, seq=16))
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    graph = autopar.trace(model, (x, y), loss_fn=gpt_loss)
    prof = autopar.profile(graph, (x, y), repeats=3, warmup=1, progress=False)
    yield graph, (x, y), prof
    torch.set_num_threads(threads)


def test_every_compute_node_is_timed_and_positive(tiny):
    graph, _, prof = tiny
    compute = [
        n.name for n in graph.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
    ]
    assert set(prof.op_times) == set(compute)
    assert all(f > 0 for f, _ in prof.op_times.values())
    assert all(b >= 0 for _, b in prof.op_times.values())
    fwd_s, bwd_s = prof.total_s()
    assert fwd_s > 0 and bwd_s > 0
    linears = [n for n, s in prof.nodes.items() if prof.records[s].target == "Linear"]
    assert linears and all(prof.op_times[n][1] > 0 for n in linears)  # weight + input gradients
    # a linear saves its input for the weight gradient: b * s * h fp32 bytes at least
    assert max(prof.saved_bytes[n] for n in linears) >= 2 * 16 * 32 * 4


def test_identical_layers_are_measured_once(tiny):
    graph, _, prof = tiny
    l0 = [n for n in prof.nodes if "layers_0_" in n]
    l1 = {n.replace("layers_0_", "layers_1_") for n in l0}
    assert l0 and l1 <= set(prof.nodes)
    for n in l0:
        assert prof.nodes[n] == prof.nodes[n.replace("layers_0_", "layers_1_")]
    assert prof.num_measured == len(prof.records) < len(prof.nodes)


def test_json_round_trip_and_cache_hit(tiny, tmp_path):
    graph, inputs, prof = tiny
    back = Profile.from_json(prof.to_json())
    assert back.op_times == prof.op_times and back.device == prof.device
    path = tmp_path / "p.json"
    prof.save(path)
    assert Profile.load(path).op_times == prof.op_times
    cache = tmp_path / "cache.json"
    first = autopar.profile(graph, inputs, repeats=1, warmup=0, cache_path=cache, progress=False)
    again = autopar.profile(graph, inputs, repeats=1, warmup=0, cache_path=cache, progress=False)
    assert first.num_measured > 0 and again.num_measured == 0
    assert again.num_cached == len(first.records)
    assert again.op_times == first.op_times


def test_estimate_uses_profiled_times(tiny):
    graph, _, prof = tiny
    plan = Plan.manual(dp=1, global_batch=2, micro_batch_size=2)
    cluster = Cluster.local(ranks=1)
    profiled = autopar.estimate(graph, cluster, plan, op_times=prof.op_times)
    roofline = autopar.estimate(graph, cluster, plan)
    assert profiled.breakdown_s["compute"] == pytest.approx(sum(prof.total_s()), rel=1e-6)
    assert profiled.breakdown_s["compute"] != pytest.approx(roofline.breakdown_s["compute"], rel=0.01)


def test_profile_accepts_a_module(tiny):
    _, inputs, _ = tiny
    model = GPT(GPTConfig(hidden=16, layers=1, heads=2, vocab=32, seq=8))
    x = torch.randint(0, 32, (1, 8))
    prof = autopar.profile(model, (x, x), loss_fn=gpt_loss, repeats=1, warmup=0, progress=False)
    assert prof.op_times and all(f > 0 for f, _ in prof.op_times.values())


def test_bad_inputs_raise_typed_errors(tiny):
    graph, (x, _), _ = tiny
    with pytest.raises(autopar.core.errors.TraceError, match="inputs"):
        autopar.profile(graph, (x,), progress=False)
    with pytest.raises(autopar.core.errors.AutoparError, match="repeats"):
        autopar.profile(graph, (x, x), repeats=0, progress=False)


def test_measure_collectives_fits_a_link():
    """Real gloo processes: the result is well formed. Timings are not compared (they vary with load)."""
    r = measure_collectives(2, sizes_bytes=(4096, 1 << 20, 4 << 20), repeats=3, timeout_s=60)
    assert r["ranks"] == 2 and r["sizes_bytes"] == [4096, 1 << 20, 4 << 20] and len(r["times_s"]) == 3
    assert all(t > 0 for t in r["times_s"])
    link = r["link"]
    assert 0 < link["bandwidth_bytes_per_s"] < float("inf") and link["latency_s"] >= 0
    assert link["source"].startswith("measured: gloo all_reduce, 2 local ranks")
    cluster = Cluster.local(
        ranks=2,
        intra_node_bandwidth_bytes_per_s=link["bandwidth_bytes_per_s"],
        intra_node_latency_s=link["latency_s"],
    )
    assert cluster.intra_node.bandwidth_bytes_per_s == pytest.approx(link["bandwidth_bytes_per_s"])


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_ring_fit_recovers_the_link_it_was_timed_on(ranks):
    from autopar.estimator.profile_comm import fit_times

    bandwidth, latency = 2e9, 30e-6
    hops = 2 * (ranks - 1)
    sizes = (4096, 1 << 20, 4 << 20, 16 << 20)
    times = {d: hops * latency + hops / ranks * d / bandwidth for d in sizes}
    link = fit_times(ranks, times)["link"]
    assert link["bandwidth_bytes_per_s"] == pytest.approx(bandwidth, rel=1e-9)
    assert link["latency_s"] == pytest.approx(latency, rel=1e-9)
    assert "ring fit over 4 sizes" in link["source"]


def test_times_that_do_not_grow_with_size_are_reported_not_taken_as_an_infinite_link(caplog):
    """A busy machine can time 4 MiB faster than 4 KiB; the fit must not return an infinite bandwidth."""
    from autopar.estimator.profile_comm import fit_times

    times = {4096: 4.4e-3, 4 << 20: 3.2e-3}
    with caplog.at_level("WARNING"):
        link = fit_times(2, times)["link"]
    assert link["bandwidth_bytes_per_s"] == pytest.approx((4 << 20) / 3.2e-3)
    assert link["latency_s"] == 0.0
    assert "did not grow with size" in link["source"] and "rerun on a quiet machine" in caplog.text


def test_saved_bytes_match_the_layer_inputs(tiny):
    """fc2 saves its input (b, s, 4h) fp32 for the weight gradient; the tracer's per-node count agrees."""
    graph, _, prof = tiny
    b, s, h = 2, 16, 32
    fc2 = "model_layers_0_mlp_fc2"
    assert prof.saved_bytes[fc2] == b * s * 4 * h * 4
    assert prof.saved_bytes[fc2] == pytest.approx(graph[fc2].saved_bytes)


def test_clock_choice():
    from autopar.estimator.profile import resolve_clock

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert resolve_clock("auto", torch.device("cpu")) == "cpu"
        torch.set_num_threads(2)
        assert resolve_clock("auto", torch.device("cpu")) == "wall"
    finally:
        torch.set_num_threads(threads)
    assert resolve_clock("wall", torch.device("cpu")) == "wall"
    with pytest.raises(autopar.core.errors.AutoparError, match="clock"):
        resolve_clock("gpu", torch.device("cpu"))

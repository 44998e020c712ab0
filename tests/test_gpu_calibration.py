"""benchmarks/gpu_calibration.py: the prepared device run, checked on the CPU (``--smoke``)."""

from __future__ import annotations

import json

import torch


def test_smoke_run_measures_every_group_beside_a_prediction(tmp_path, benchmark_module):
    gc = benchmark_module("gpu_calibration")
    out = tmp_path / "gpu.json"
    assert gc.main(["--smoke", "--out", str(out), "--markdown"]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["group"] for r in rows} == {"gemm", "attention", "memory"}
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 and r["ratio"] > 0 for r in rows)
    cases = {r["case"] for r in rows}
    assert any("causal fwd+bwd" in c for c in cases) and any("full fwd" in c for c in cases)
    assert any("sustained" in c for c in cases)
    assert {"cross_entropy on .float() logits", "cross_entropy on 16-bit logits"} <= cases
    assert data["kind"] == "cpu" and data["calibration"]["loss_bytes_factor"]


def test_gpu_names_map_to_the_cost_models_kinds_and_no_gpu_is_a_clear_refusal(capsys, benchmark_module):
    gc = benchmark_module("gpu_calibration")
    assert gc.kind_of("NVIDIA H200") == "h200"
    assert gc.kind_of("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gc.kind_of("NVIDIA A100-SXM4-80GB") == "a100-80g"
    assert gc.kind_of("NVIDIA A100-SXM4-40GB") == "a100-40g"
    assert gc.kind_of("Tesla V100-SXM2-32GB") == "v100-32g"
    assert gc.kind_of("NVIDIA GeForce RTX 4090") is None
    if not torch.cuda.is_available():
        assert gc.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err

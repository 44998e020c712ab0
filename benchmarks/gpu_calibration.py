"""The cost model's per-kind constants against kernels measured on this GPU: one prepared run.

Measures, on the one GPU it finds (``cuda:0``), what the cost model predicts from its constants
(:func:`cost_models.hardware.calibration_for` of the GPU's kind, the datasheet peaks of
:mod:`autopar.cluster.hardware`), and prints both side by side:

* **GEMM** (BF16 ``torch.matmul``): a large square product and the projection / MLP shapes of 2B and
  8B-class transformers at 8192 tokens; and a *sustained* run of the square product (``--sustain``
  seconds) that shows whether the throughput of the first second holds under long full load (the
  sustained-load question of docs/cost_model.md, section 7).
* **Attention** (``F.scaled_dot_product_attention``, BF16, head width 128): forward and forward +
  backward, causal and not, at sequence 2048 / 4096 / 8192, and causal with dropout 0.1 inside the
  kernel at 2048 (the dgxc GPT-3 rows' setting, which the model does not slow down). Each row reports TFLOP/s counted both
  ways, over the whole ``s x s`` square (the model's count) and over the executed half of a causal
  kernel, which settles how a flash kernel should be counted on this software.
* **Memory-bound kernels**: a copy, GELU and LayerNorm (forward + backward) and the cross-entropy
  loss over a 131072-word vocabulary on ``.float()`` logits and on BF16 logits, against
  ``hbm_efficiency`` and ``loss_bytes_factor``.

Nothing here changes a constant: the output is a table (``--markdown`` for docs) and a JSON file
(``--out``) to read against ``cost_models/hardware.py``. Collectives need two GPUs and are not
measured. Run on a lent device as one command, about two minutes of GPU time::

    python benchmarks/gpu_calibration.py --out $OUT/gpu_calibration.json --markdown

``--smoke`` runs every measurement at toy sizes on the CPU (the code path CI checks; its numbers
mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from autopar.cluster.hardware import DEVICES, cpu_spec
from cost_models import Calibration, DeviceRates, OpWork
from cost_models.compute import memory_op_time_s
from cost_models.hardware import calibration_for
from cost_models.step import op_time_s

KIND_OF_NAME = (
    ("H200", "h200"),
    ("H100", "h100-sxm"),
    ("A100-SXM4-80GB", "a100-80g"),
    ("A100 80GB", "a100-80g"),
    ("A100", "a100-40g"),
    ("V100", "v100-32g"),
)
"""``torch.cuda.get_device_name`` fragment -> the cost model's device kind (first match wins)."""


@dataclass
class Row:
    """One measurement beside the model's prediction."""

    group: str
    case: str
    measured_s: float
    predicted_s: float
    work: float
    """FLOPs (compute rows) or bytes (memory rows) the rate columns divide by."""
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float:
        """Measured over predicted time (> 1: the model is too fast)."""
        return self.measured_s / self.predicted_s

    def rate(self, seconds: float) -> float:
        scale = 1e12 if self.unit == "TFLOP/s" else 1e9
        return self.work / seconds / scale


def kind_of(name: str) -> str | None:
    for fragment, kind in KIND_OF_NAME:
        if fragment in name:
            return kind
    return None


class Timer:
    """Median seconds per call of ``fn`` over repeats that fill ``min_s`` (after a warm-up)."""

    def __init__(self, device: torch.device, min_s: float):
        self.device, self.min_s = device, min_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        samples: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < self.min_s or len(samples) < 3:
            t0 = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


# ----------------------------------------------------------------------------------- GEMM
def gemm_rows(timer: Timer, rates: DeviceRates, calib: Calibration, dtype, smoke: bool) -> list[Row]:
    shapes = {
        "square 8192": (8192, 8192, 8192),
        "2B qkv (8192 x 6144 x 2048)": (8192, 6144, 2048),
        "2B mlp up (8192 x 8192 x 2048)": (8192, 8192, 2048),
        "8B qkv (8192 x 6144 x 4096)": (8192, 6144, 4096),
        "8B mlp up (8192 x 14336 x 4096)": (8192, 14336, 4096),
        "8B mlp down (8192 x 4096 x 14336)": (8192, 4096, 14336),
    }
    if smoke:
        shapes = {"square 64": (64, 64, 64), "tall 128 x 32 x 64": (128, 32, 64)}
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for case, (m, n, k) in shapes.items():
        a = torch.randn(m, k, device=timer.device, dtype=dtype)
        b = torch.randn(k, n, device=timer.device, dtype=dtype)
        measured = timer(lambda a=a, b=b: torch.matmul(a, b))
        op = OpWork(name=case, op_class="gemm", gemm=(1, m, n, k), elem_bytes=elem)
        predicted = op_time_s(op, rates, calib)[0]
        rows.append(Row("gemm", case, measured, predicted, 2.0 * m * n * k, "TFLOP/s"))
    return rows


def sustained_row(device: torch.device, rates, calib, dtype, seconds: float, smoke: bool) -> Row:
    """The square GEMM back to back for ``seconds``: throughput of the first second against the
    last half (clocks under long full load)."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stamps: list[tuple[float, int]] = []
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < seconds or len(stamps) < 8:  # at least 8 batches
        for _ in range(10):
            torch.matmul(a, b)
        sync()
        done += 10
        stamps.append((time.perf_counter() - start, done))
    flops = 2.0 * n**3

    def rate(t0: float, t1: float) -> float:
        inside = [(t, c) for t, c in stamps if t0 <= t <= t1]
        if len(inside) < 2:  # a window too short for two batches (a loaded machine): the whole run
            inside = [(0.0, 0), stamps[-1]]
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        return (cb - ca) * flops / (tb - ta)

    first, last = rate(0.0, min(1.0, seconds / 4)), rate(seconds / 2, seconds)
    elem = torch.tensor([], dtype=dtype).element_size()
    op = OpWork(name="square", op_class="gemm", gemm=(1, n, n, n), elem_bytes=elem)
    return Row(
        "gemm",
        f"square {n}, sustained {seconds:g} s (last half)",
        flops / last,
        op_time_s(op, rates, calib)[0],
        flops,
        "TFLOP/s",
        note=f"first second {first / 1e12:.1f} TFLOP/s, last half {last / 1e12:.1f} TFLOP/s",
    )


# ------------------------------------------------------------------------------ attention
def attention_rows(timer: Timer, rates, calib, dtype, smoke: bool) -> list[Row]:
    batch, heads, d = (1, 2, 16) if smoke else (2, 32, 128)
    seqs = (32, 64) if smoke else (2048, 4096, 8192)
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for s in seqs:
        q, k, v = (
            torch.randn(batch, heads, s, d, device=timer.device, dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn(batch, heads, s, d, device=timer.device, dtype=dtype)
        full = 4.0 * batch * heads * s * s * d  # forward over the whole square (the model's count)
        op = OpWork(
            name="sdpa",
            op_class="roofline",
            flops_fwd=full,
            flops_bwd=2.0 * full,
            bytes_fwd=4.0 * batch * heads * s * d * elem,
            attention_gemm=(batch * heads, s, d),
        )
        pred_f, pred_b = op_time_s(op, rates, calib)
        # (causal, dropout): dropout inside the kernel only where the GPT-3 rows have it (s 2048)
        variants = [(False, 0.0), (True, 0.0)] + ([(True, 0.1)] if s == seqs[0] else [])
        for causal, p in variants:

            def fwd(causal=causal, q=q, k=k, v=v, p=p):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)

            def fwd_bwd(causal=causal, q=q, k=k, v=v, grad=grad, p=p):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)
                out.backward(grad)

            executed = 0.5 if causal else 1.0
            label = f"s={s} {'causal' if causal else 'full'}" + (f" dropout {p:g}" if p else "")
            for mode, fn, flops, predicted in (
                ("fwd", fwd, full, pred_f),
                ("fwd+bwd", fwd_bwd, 3.0 * full, pred_f + pred_b),
            ):
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    measured = timer(fn)
                rows.append(
                    Row(
                        "attention",
                        f"{label} {mode}",
                        measured,
                        predicted,
                        flops,
                        "TFLOP/s",
                        note=f"executed-FLOP rate {flops * executed / measured / 1e12:.1f} TFLOP/s",
                    )
                )
    return rows


# ------------------------------------------------------------------------- memory-bound ops
def memory_rows(timer: Timer, rates, calib, dtype, smoke: bool) -> list[Row]:
    tokens, hidden, vocab = (64, 32, 256) if smoke else (8192, 4096, 131072)
    dev = timer.device
    elem = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(tokens * 8, hidden, device=dev, dtype=dtype)
    y = torch.empty_like(x)
    xb = x.nbytes
    rows = [
        Row(
            "memory",
            "copy",
            timer(lambda: y.copy_(x)),
            memory_op_time_s(2 * xb, rates, calib=calib),
            2 * xb,
            "GB/s",
        )
    ]

    xg = x.detach().requires_grad_(True)
    g = torch.randn_like(x)

    def gelu():
        F.gelu(xg).backward(g)

    # forward reads x and writes y; backward reads dy and x and writes dx: 5 passes
    rows.append(Row("memory", "gelu fwd+bwd", timer(gelu), _mem(5 * xb, rates, calib, 2), 5 * xb, "GB/s"))
    ln = torch.nn.LayerNorm(hidden, device=dev, dtype=dtype)

    def layer_norm():
        ln(xg).backward(g)

    rows.append(
        Row("memory", "layer_norm fwd+bwd", timer(layer_norm), _mem(5 * xb, rates, calib, 2), 5 * xb, "GB/s")
    )

    logits = torch.randn(tokens, vocab, device=dev, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,), device=dev)
    lb = logits.nbytes
    for name, upcast, factor in (
        (
            "cross_entropy on .float() logits",
            True,
            calibration_for("h100-sxm", framework="fsdp").loss_bytes_factor,
        ),
        (
            "cross_entropy on 16-bit logits",
            False,
            calibration_for("h100-sxm", framework="automodel").loss_bytes_factor,
        ),
    ):

        def loss(upcast=upcast):
            F.cross_entropy(logits.float() if upcast else logits, target).backward()

        moved = sum(factor) * lb * (2 / elem)  # the factors are per byte of 16-bit logits
        rows.append(
            Row(
                "memory",
                name,
                timer(loss),
                _mem(moved, rates, calib, 2),
                moved,
                "GB/s",
                note=f"loss_bytes_factor {factor}",
            )
        )
    return rows


def _mem(nbytes: float, rates: DeviceRates, calib: Calibration, kernels: int) -> float:
    """A memory-bound pass of ``nbytes`` split over ``kernels`` launches."""
    return memory_op_time_s(nbytes, rates, calib=calib) + (kernels - 1) * calib.kernel_overhead_s


# ---------------------------------------------------------------------------------- report
def table(rows: list[Row], markdown: bool) -> list[str]:
    head = ("group", "case", "measured", "predicted", "measured / predicted time", "note")
    out = []
    if markdown:
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (
            r.group,
            r.case,
            f"{r.rate(r.measured_s):.1f} {r.unit}",
            f"{r.rate(r.predicted_s):.1f} {r.unit}",
            f"{r.ratio:.2f}",
            r.note,
        )
        out.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(str(c) for c in cells))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the rows and the device as JSON here")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (for docs)")
    ap.add_argument("--sustain", type=float, default=20.0, help="seconds of the sustained GEMM run")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per measurement")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the code path)")
    args = ap.parse_args(argv)

    if args.smoke:
        device, dtype, kind, spec = torch.device("cpu"), torch.float32, "cpu", cpu_spec(1.0)
        args.sustain, args.min_time = min(args.sustain, 0.3), min(args.min_time, 0.02)
        calib = Calibration()
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run this on a GPU machine, or pass --smoke", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda:0"), torch.bfloat16
        name = torch.cuda.get_device_name(device)
        kind = kind_of(name)
        if kind is None:
            print(f"unknown GPU {name!r}: add it to KIND_OF_NAME", file=sys.stderr)
            return 2
        spec = DEVICES[kind]
        calib = calibration_for(kind)
        torch.backends.cuda.matmul.allow_tf32 = False
    key = "fp32" if dtype == torch.float32 else "bf16"
    rates = DeviceRates(peak_flops_per_s=spec.peak_flops(key), hbm_bytes_per_s=spec.hbm_bytes_per_s)
    timer = Timer(device, args.min_time)
    print(
        f"device {device} kind {kind}: peak {rates.peak_flops_per_s / 1e12:.1f} TFLOP/s ({key}), "
        f"HBM {rates.hbm_bytes_per_s / 1e9:.0f} GB/s; torch {torch.__version__}",
        flush=True,
    )
    rows: list[Row] = []
    for label, step in (
        ("gemm", lambda: gemm_rows(timer, rates, calib, dtype, args.smoke)),
        ("sustained gemm", lambda: [sustained_row(device, rates, calib, dtype, args.sustain, args.smoke)]),
        ("attention", lambda: attention_rows(timer, rates, calib, dtype, args.smoke)),
        ("memory-bound", lambda: memory_rows(timer, rates, calib, dtype, args.smoke)),
    ):
        t0 = time.perf_counter()
        rows += step()
        print(f"  {label}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    print("\n".join(table(rows, args.markdown)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "kind": kind,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "calibration": {
                k: v for k, v in calib.to_dict().items() if not isinstance(v, float) or math.isfinite(v)
            },
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
        }
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

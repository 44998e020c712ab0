"""Write the example reports shown in docs/reports.md, and time the 175B one.

    python scripts/report_examples.py OUT_DIR [--skip-demo]
    scripts/screenshot_report.sh docs/img OUT_DIR/*.html

* ``small-gpt-local4.html``: the demo's GPT (hidden 64, 4 layers) planned with tp=2, pp=2 on
  ``Cluster.local(4)``, compiled and trained on 4 gloo processes (``python -m autopar.cli.demo``), with
  the measured step time overlaid.
* ``gpt3-175b-1024xa100.html``: GPT-3 175B on 128 DGX A100 nodes (1024 GPUs), global batch 1536,
  chosen by the planner; the report is timed (wall and CPU seconds).
* ``hetero-a100-v100.html``: GPT-3 13B on a heterogeneous cluster (2 nodes of A100 80GB + 2 of V100
  32GB), global batch 64, chosen by the planner (``pp`` outermost, so each stage holds one device
  kind, and the layers sized to each stage's devices); every stage is costed on its own kind.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def gpt3_175b(out: Path) -> None:
    import autopar
    from autopar.cluster import Cluster
    from autopar.models.spec import load_model
    from autopar.report import attach_inputs, write_report

    cluster = Cluster.parse("dgx-a100-80g:nodes=128")
    loaded = load_model("gpt3-175b")
    graph = loaded.trace(batch=1)
    plan = autopar.plan(graph, cluster, global_batch=1536, progress=False)
    attach_inputs(plan, cluster=cluster, model="gpt3-175b", seq=loaded.seq, graph=graph)
    (out / "gpt3-175b-1024xa100.json").write_text(plan.to_json())
    wall, cpu = time.perf_counter(), time.process_time()
    write_report(plan, out / "gpt3-175b-1024xa100.html", cluster=cluster, model="gpt3-175b", graph=graph)
    print(
        f"175B report from the plan and graph: {time.perf_counter() - wall:.2f} s wall, "
        f"{time.process_time() - cpu:.2f} s CPU"
    )
    wall = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "autopar",
            "report",
            str(out / "gpt3-175b-1024xa100.json"),
            "-o",
            str(out / "x.html"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (out / "x.html").unlink()
    print(
        f"175B report from the plan file (`autopar report`, new process): {time.perf_counter() - wall:.2f} s wall"
    )
    print(r.stdout.strip())


def hetero(out: Path) -> None:
    import autopar
    from autopar.cluster import Cluster
    from autopar.models.spec import load_model
    from autopar.report import attach_inputs, write_report

    cluster = Cluster.from_dict(
        {
            "name": "2x DGX A100 + 2x V100 nodes",
            "devices_per_node": 8,
            "node_groups": [{"nodes": 2, "device": "a100-80g"}, {"nodes": 2, "device": "v100-32g"}],
            "intra_node": {"bandwidth_bytes_per_s": 150e9, "latency_s": 5e-6},
            "inter_node": {"bandwidth_bytes_per_s": 25e9, "latency_s": 1e-5},
        }
    )
    loaded = load_model("gpt3-13b")
    graph = loaded.trace(batch=1)
    t0 = time.perf_counter()
    plan = autopar.plan(graph, cluster, global_batch=64, progress=False)
    print(f"13B on A100 + V100: planned in {time.perf_counter() - t0:.1f} s: {plan.summary()}")
    attach_inputs(plan, cluster=cluster, model="gpt3-13b", seq=loaded.seq, graph=graph)
    (out / "hetero-a100-v100.json").write_text(plan.to_json())
    write_report(plan, out / "hetero-a100-v100.html", cluster=cluster, model="gpt3-13b", graph=graph)


def demo(out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "autopar.cli.demo",
            "--plan",
            "tp=2,pp=2",
            "--steps",
            "8",
            "--report",
            str(out / "small-gpt-local4.html"),
        ],
        check=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--skip-demo", action="store_true", help="do not run the 4-process demo")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hetero(args.out)
    gpt3_175b(args.out)
    if not args.skip_demo:
        demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plots of the benchmark results that are JSON only: the serving latency percentiles
(Panes against Redis, from `serve_load`'s JSON) and the GPU against the CPU backend by
batch size (from `benches/gpu-check.sh`'s `gpu.json`).

    .venv/bin/python benches/plots.py        # rewrites the PNGs next to their JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# The percentiles `serve_load` reports, as (quantile, field).
PERCENTILES = [(0.5, "p50_ms"), (0.99, "p99_ms"), (0.999, "p999_ms"), (1.0, "max_ms")]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def serving_latency(report: dict[str, Any], path: Path) -> None:
    """Read latency against percentile, one line per target and request size: a CDF
    seen from its tail (x: 1 / (1 − q), so p50, p99 and p99.9 are evenly spaced)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"panes": "-", "redis": "--"}
    for phase in report["phases"]:
        points = [(q, phase[f]) for q, f in PERCENTILES if phase.get(f) is not None]
        # The maximum sits one decade past p99.9.
        xs = [1 / (1 - q) if q < 1 else 1e4 for q, _ in points]
        style = styles["redis" if phase["target"].startswith("redis") else "panes"]
        ax.plot(xs, [v for _, v in points], style, marker="o",
                label=f"{phase['target']}, {phase['keys']} key{'s' if phase['keys'] != 1 else ''}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([2, 100, 1000, 1e4], ["p50", "p99", "p99.9", "max"])
    ax.set_ylabel("read latency, ms (client side)")
    ingest = report.get("ingest_sent_per_s") or 0
    ax.set_title(f"GetFeatures vs Redis MGET at {report['rate']} reads/s, "
                 f"{ingest / 1e6:.1f} M events/s ingest ({report['machine']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_vs_cpu(report: dict[str, Any], path: Path) -> None:
    """Fold throughput of each backend against the batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = report["rows"]
    xs = [r["events"] for r in rows]
    for name, field in [("cpu backend", "cpu_ms"), ("gpu backend", "gpu_ms")]:
        ax.plot(xs, [r["events"] / (r[field] / 1e3) / 1e6 for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("events per folded batch")
    ax.set_ylabel("M events/s")
    ax.set_title(f"Fold, {report['keys']:,} keys: {report['gpu']['name']} vs "
                 f"{report['machine']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(results: Path = RESULTS) -> list[Path]:
    written = []
    serve = results / "serve" / "latest.json"
    if serve.exists():
        out = serve.with_name("latency.png")
        serving_latency(json.loads(serve.read_text()), out)
        written.append(out)
    for gpu in sorted(results.glob("gpu-*/gpu.json")):
        out = gpu.with_name("throughput.png")
        gpu_vs_cpu(json.loads(gpu.read_text()), out)
        written.append(out)
    return written


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS):
        print(p)

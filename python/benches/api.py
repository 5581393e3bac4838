"""Cost of the Python layer: the same events pushed from Python, and read latency.

    .venv/bin/python python/benches/api.py [--events 10000000]

Pushes the standard workload's shape (100 K Int64 keys drawn from Zipf(1.1), events
50 µs apart, 8 features over 3 windows) from a pyarrow Table and from a polars
DataFrame, in 64 K-row batches, then times reads of 1 and 100 keys. For scale, the same
run times a plain pass over the same columns (`pyarrow.compute.sum` of each), the
cheapest thing Python can do with the data.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

import panes

VIEW = panes.View(
    "cards", key="card", time="ts", pane="1m", allowed_lateness="5s",
    features=[
        panes.count(window="5m", name="n_5m"),
        panes.sum("amount", window="5m", name="sum_5m"),
        panes.mean("amount", window="1h", hop="5m", name="mean_1h"),
        panes.max("amount", window="1h", hop="5m", name="max_1h"),
        panes.std("amount", window="1d", hop="1h", name="std_1d"),
        panes.last("amount", window="1d", hop="1h", name="last_1d"),
        panes.count(window="1d", hop="1h", name="n_1d"),
        panes.sum("items", window="1d", hop="1h", name="items_1d"),
    ],
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    n = ap.parse_args().events
    rng = np.random.default_rng(1)
    keys = (rng.zipf(1.1, n) % 100_000).astype(np.int64)
    table = pa.table({
        "card": keys,
        "ts": (1_767_225_600_000 + np.arange(n, dtype=np.int64) // 20),
        "amount": np.round(rng.lognormal(3, 1, n), 2),
        "items": rng.integers(1, 5, n).astype(np.int32),
    })
    print(f"{n:,} events, {table.nbytes / 2**20:.0f} MiB")

    t0 = time.perf_counter()
    for c in table.columns:
        pc.sum(c)
    scan = time.perf_counter() - t0
    print(f"pyarrow.compute.sum over every column: {n / scan / 1e6:8.1f} M events/s")

    for name, data in (("pyarrow", table), ("polars", pl.from_arrow(table)), ("pyarrow", table)):
        engine = panes.Engine(VIEW)
        t0 = time.perf_counter()
        batches = data.to_batches(max_chunksize=65_536) if name == "pyarrow" else data.iter_slices(65_536)
        for b in batches:
            engine.push(b)
        engine.flush()
        dt = time.perf_counter() - t0
        print(f"push from {name:8}: {n / dt / 1e6:8.1f} M events/s ({dt / scan:.0f}x the scan's time)")

    for k in (1, 100):
        lat = []
        for i in range(2_000):
            ks = list(range(i % 1000, i % 1000 + k))
            t0 = time.perf_counter()
            engine.read(ks)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        print(f"read {k:3} keys x 8 features -> polars: p50 {statistics.median(lat) * 1e6:7.1f} µs, "
              f"p99 {lat[int(0.99 * len(lat))] * 1e6:7.1f} µs")
        lat = []
        for i in range(2_000):
            ks = list(range(i % 1000, i % 1000 + k))
            t0 = time.perf_counter()
            engine.read(ks, as_numpy=True)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        print(f"read {k:3} keys x 8 features -> numpy : p50 {statistics.median(lat) * 1e6:7.1f} µs, "
              f"p99 {lat[int(0.99 * len(lat))] * 1e6:7.1f} µs")


if __name__ == "__main__":
    main()

"""Zero-copy pushes and GIL release, measured in a child process so that other
tests' allocations cannot blur the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

ZERO_COPY = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, pyarrow as pa, polars as pl
    import panes

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n = 10_000_000
    engine = panes.Engine(panes.View("v", key="k", time="ts", pane="1m", allowed_lateness="1h", features=[
        panes.sum("x", window="1h", name="s"), panes.count(window="lifetime", name="n")]))
    # Warm up: load code and create the state of every key first.
    warm = pa.table({"k": np.arange(100, dtype=np.int64), "ts": np.zeros(100, dtype=np.int64),
                     "x": np.ones(100)})
    engine.push(warm)
    engine.read(list(range(100)))
    # Columns built in place, so the process peak is the data itself.
    k = np.empty(n, dtype=np.int64); np.remainder(np.arange(n, dtype=np.int64), 100, out=k)
    ts = np.empty(n, dtype=np.int64); np.floor_divide(np.arange(n, dtype=np.int64), 1000, out=ts)
    x = np.empty(n, dtype=np.float64); x.fill(0.5)
    table = pa.table({"k": k, "ts": ts, "x": x})  # zero-copy from numpy
    results = {"column_mib": x.nbytes / 2**20}
    for name, data in (("pyarrow", table), ("polars", pl.from_arrow(table))):
        before = peak_mib()
        report = engine.push(data)
        assert report.accepted == n, report
        results[name] = peak_mib() - before
    got = engine.read([0, 1])
    results["n"] = got["n"].to_list()
    print(json.dumps(results))
    """
)


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pushing_10m_rows_does_not_copy_the_columns() -> None:
    r = run(ZERO_COPY)
    assert r["n"] == [1 + 2 * 100_000, 1 + 2 * 100_000], "every row counted (warm-up + two pushes)"
    # A copy of the float column alone would add 76 MiB to the peak; the push may
    # only use its micro-batch buffers.
    for name in ("pyarrow", "polars"):
        assert r[name] < 0.15 * r["column_mib"], f"{name}: peak rose {r[name]:.1f} MiB: {r}"


GIL = textwrap.dedent(
    """
    import json, threading, time
    import numpy as np, pyarrow as pa
    import panes

    rng = np.random.default_rng(1)
    n = 3_000_000
    events = pa.table({"k": rng.integers(0, 100_000, n), "ts": np.sort(rng.integers(0, 86_400_000, n)),
                       "x": rng.random(n)})
    spine = pa.table({"k": rng.integers(0, 100_000, 500_000), "ts": rng.integers(0, 86_400_000, 500_000)})
    engine = panes.Engine(panes.View("v", key="k", time="ts", pane="1m", features=[
        panes.mean("x", window="1h", name="m"), panes.std("x", window="1d", hop="1h", name="s")]))
    ticks = []
    done = threading.Event()
    span = {}

    def work():
        span["start"] = time.perf_counter()
        engine.backfill(events, spine)
        span["end"] = time.perf_counter()
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        sum(range(2000))  # pure-Python work: needs the GIL
    t.join()
    inside = [x for x in ticks if span["start"] <= x <= span["end"]]
    gaps = np.diff([span["start"], *inside, span["end"]])
    print(json.dumps({"duration": span["end"] - span["start"], "ticks": len(inside),
                      "max_gap": float(gaps.max())}))
    """
)


def test_backfill_releases_the_gil() -> None:
    r = run(GIL)
    assert r["duration"] > 0.3, f"the backfill must be long enough to tell: {r}"
    # Holding the GIL would stall this thread for the whole backfill.
    assert r["max_gap"] < 0.5 * r["duration"], r
    assert r["ticks"] > 100, r

"""Panes against its peers, on the same data in the same run.

    .venv/bin/python benches/harness.py --quick [--out DIR]   # < 3 minutes here
    .venv/bin/python benches/harness.py [--out DIR]           # the full sweep

The standard workload (benches/workload.toml: 8 features — count, sum, mean, max,
std, last — over 5-minute, 1-hour and 1-day windows) on synthetic card transactions,
10 000 events per second of event time, keys drawn from Zipf(1.1), Int64 or string
keys. For each case:

- Panes ingests every event (pushed in batches of a given size) and reads every key it
  holds (`Engine.read_all`, inside the timing) at the latest event time; backends
  `scalar`, `cpu` (1 and 2 threads);
- polars (lazy, one conditional group-by) and DuckDB (one SQL group-by with FILTER
  clauses) compute the same feature values at the same time from the same Arrow table;
- before any timing, each peer's answer is checked against Panes' (every key, every
  feature, exact for count/min/max/last and 1e-9 relative otherwise): a disagreement
  stops the run with the differing values.

The run measures the machine's memory read bandwidth and reports Panes as a fraction
of the events/s bound it implies at the workload's bytes per event. Output: JSON (machine,
versions, every figure with min / median / max over the repeats), a Markdown table and
PNG plots, in --out (default benches/results/latest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

import panes

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ROOT / "benches" / "workload.toml"
BASE_MS = 1_767_225_600_000
EVENTS_PER_SECOND = 10_000
EXACT = {"count", "min", "max", "last"}


class Mismatch(AssertionError):
    """A peer's answer differs from Panes'."""


# --- data --------------------------------------------------------------------------


def events(n: int, keys: int, string_keys: bool, seed: int = 1) -> pa.Table:
    """Card transactions in time order: `card` (Zipf(1.1) over `keys` cards), `ts`
    (ms, UTC), `amount` (log-normal, cents) and `seq` (arrival order)."""
    rng = np.random.default_rng(seed)
    # numpy's zipf is unbounded: fold it onto the key range, as the Rust harness does.
    card = (rng.zipf(1.1, n) - 1) % keys
    ts = BASE_MS + (np.arange(n, dtype=np.int64) * 1000) // EVENTS_PER_SECOND
    cols: dict[str, Any] = {
        "card": pa.array([f"card-{c}" for c in card]) if string_keys else pa.array(card, pa.int64()),
        "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "amount": np.round(rng.lognormal(3.5, 1.0, n), 2),
        "seq": np.arange(n, dtype=np.int64),
    }
    return pa.table(cols)


def workload() -> list[dict[str, Any]]:
    engine = panes.Engine.from_toml(WORKLOAD)
    return [
        {"name": f.name, "agg": f.agg, "column": f.column, "window": _ms(f.window), "hop": _ms(f.hop or "1s")}
        for f in engine.views[0].features
    ]


def _ms(d: str) -> int:
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    for u in ("ms", "s", "m", "h", "d"):
        if d.endswith(u) and d[: -len(u)].isdigit():
            return int(d[: -len(u)]) * units[u]
    raise ValueError(d)


# --- engines -----------------------------------------------------------------------


def run_panes(table: pa.Table, batch: int, backend: str) -> tuple[pl.DataFrame, dict[str, float]]:
    engine = panes.Engine.from_toml(WORKLOAD, backend=backend, batch_rows=max(batch, 1024))
    data = table.drop_columns(["seq"])
    t0 = time.perf_counter()
    for b in data.to_batches(max_chunksize=batch):
        engine.push(b)
    engine.flush()
    t1 = time.perf_counter()
    out = engine.read_all()
    t2 = time.perf_counter()
    return out, {"ingest_s": t1 - t0, "read_s": t2 - t1, "total_s": t2 - t0}


def _window_cond(ts: str, at: int | str, f: dict[str, Any]) -> str:
    """SQL: event time `ts` is in feature `f`'s window at read time `at` (DESIGN §3)."""
    hop, n = f["hop"], f["window"] // f["hop"]
    return f"{ts} <= {at} AND {ts} // {hop} >= {at} // {hop} - {n - 1}"


def _duckdb_aggs(feats: list[dict[str, Any]], at: int | str) -> str:
    aggs = []
    for f in feats:
        c = _window_cond("t", at, f)
        col = f["column"]
        expr = {
            "count": f"count(t) FILTER (WHERE {c})" if col is None else f"count({col}) FILTER (WHERE {c})",
            "sum": f"coalesce(sum({col}) FILTER (WHERE {c}), 0)",
            "mean": f"avg({col}) FILTER (WHERE {c})",
            "min": f"min({col}) FILTER (WHERE {c})",
            "max": f"max({col}) FILTER (WHERE {c})",
            "var": f"var_samp({col}) FILTER (WHERE {c})",
            "std": f"stddev_samp({col}) FILTER (WHERE {c})",
            "last": f"arg_max({col}, t::HUGEINT * 4294967296 + seq) FILTER (WHERE {c} AND {col} IS NOT NULL)",
        }[f["agg"]]
        aggs.append(f"{expr} AS {f['name']}")
    return ", ".join(aggs)


def run_duckdb(table: pa.Table, feats: list[dict[str, Any]], at: int) -> pl.DataFrame:
    con = duckdb.connect()
    con.register("events", table)
    sql = f"SELECT card, {_duckdb_aggs(feats, at)} FROM (SELECT *, epoch_ms(ts) AS t FROM events) GROUP BY card"
    return pl.DataFrame(con.sql(sql).to_arrow_table())


def _polars_aggs(feats: list[dict[str, Any]], at: int | pl.Expr) -> list[pl.Expr]:
    t = pl.col("t")
    aggs = []
    for f in feats:
        hop, n = f["hop"], f["window"] // f["hop"]
        cond = (t <= at) & (t // hop >= at // hop - n + 1)
        col = pl.col(f["column"]) if f["column"] else None
        agg = f["agg"]
        if col is None:
            e = cond.sum()
        else:
            v = col.filter(cond & col.is_not_null())
            e = {
                "count": v.count(),
                "sum": v.sum(),
                "mean": v.mean(),
                "min": v.min(),
                "max": v.max(),
                "var": v.var(ddof=1),
                "std": v.std(ddof=1),
                # Events are in arrival order: the latest time wins, ties to the last pushed.
                "last": v.sort_by(t.filter(cond & col.is_not_null()), maintain_order=True).last(),
            }[agg]
        aggs.append(e.alias(f["name"]))
    return aggs


def run_polars(table: pa.Table, feats: list[dict[str, Any]], at: int) -> pl.DataFrame:
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    return df.lazy().with_columns(t=pl.col("ts").dt.epoch("ms")).group_by("card").agg(_polars_aggs(feats, at)).collect()


# --- backfill ----------------------------------------------------------------------


def backfill_case(n: int, m: int, keys: int, repeats: int, peers: list[str]) -> dict[str, Any]:
    """Point-in-time features for `m` spine rows over `n` events: Panes' backfill, and
    the peers joining each spine row to its key's events in the widest window."""
    table = events(n, keys, False)
    rng = np.random.default_rng(2)
    end = BASE_MS + (n * 1000) // EVENTS_PER_SECOND
    spine = pa.table({
        "card": pa.array(rng.integers(0, keys, m), pa.int64()),
        "at": pa.array(rng.integers(BASE_MS, end + 60_000, m), pa.int64()),
        "label": np.arange(m, dtype=np.int64),
    })
    feats = workload()
    widest = max(f["window"] + f["hop"] for f in feats)  # covers every feature's panes
    data = table.drop_columns(["seq"])
    engine = panes.Engine.from_toml(WORKLOAD)

    def panes_run() -> pl.DataFrame:
        return engine.backfill(data, spine, at_column="at").drop("card").rename({"label": "card"})

    def duckdb_run() -> pl.DataFrame:
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")
        con.register("events", table)
        con.register("spine", spine)
        sql = (
            f"SELECT s.label AS card, {_duckdb_aggs(feats, 's.at')} FROM spine s LEFT JOIN "
            f"(SELECT card AS ecard, amount, seq, epoch_ms(ts) AS t FROM events) e "
            f"ON e.ecard = s.card AND e.t <= s.at AND e.t > s.at - {widest} GROUP BY s.label"
        )
        return pl.DataFrame(con.sql(sql).to_arrow_table())

    def polars_run() -> pl.DataFrame:
        ev = pl.from_arrow(table)
        sp = pl.from_arrow(spine)
        assert isinstance(ev, pl.DataFrame) and isinstance(sp, pl.DataFrame)
        at = pl.col("at")
        pairs = (
            sp.lazy()
            .join(ev.lazy().with_columns(t=pl.col("ts").dt.epoch("ms")), on="card", how="inner")
            .filter((pl.col("t") <= at) & (pl.col("t") > at - widest))
        )
        agg = pairs.group_by("label").agg(_polars_aggs(feats, at))
        out = sp.lazy().select("label").join(agg, on="label", how="left").rename({"label": "card"})
        return out.collect(engine="streaming")

    ref, t = timed(panes_run, repeats)
    result: dict[str, Any] = {"events": n, "spine_rows": m, "keys": keys, "engines": {"panes-cpu": _stats_t(m, t)}}
    for name, fn in (("duckdb", duckdb_run), ("polars", polars_run)):
        if name not in peers:
            continue
        check(ref, fn(), feats, name)
        _, tp = timed(fn, repeats)
        result["engines"][name] = _stats_t(m, tp)
    result["skipped_peers"] = [p for p in ("duckdb", "polars") if p not in peers]
    return result


# --- Nexmark ------------------------------------------------------------------------

NEXMARK_TOML = """
[[views]]
name = "hot_items"          # q5's window: bids per auction, 10 s sliding every 2 s
key = "auction"
time = "date_time"
pane = "2s"

[[views.features]]
name = "bids_10s"
agg = "count"
window = "10s"
hop = "2s"

[[views]]
name = "highest_bid"        # q7's window: the highest price per 10 s tumbling window
key = "all"
time = "date_time"
pane = "10s"

[[views.features]]
name = "max_price_10s"
agg = "max"
column = "price"
window = "10s"
hop = "10s"
"""

NEXMARK_QUERIES = {
    # view: (key column, feature, aggregation, column, window ms, hop ms)
    "hot_items": ("auction", "bids_10s", "count", None, 10_000, 2_000),
    "highest_bid": ("all", "max_price_10s", "max", "price", 10_000, 10_000),
}


# The features scripts/test.sh builds the workspace with.
WORKSPACE_FEATURES = "panes-engine/kafka,panes-bench/kafka"


def nexmark_bids(events: int) -> pa.Table:
    """Bids of `events` Nexmark events, from the `nexmark` crate (benches/src/bin),
    generated once into target/."""
    path = ROOT / "target" / f"nexmark-{events}.arrow"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        # Built with the test command's workspace and features (scripts/test.sh), so
        # that it reuses that build: `cargo run -p panes-bench` alone resolves other
        # features and rebuilds Arrow, naga and wgpu first (over 10 minutes here).
        subprocess.run(
            ["cargo", "build", "-q", "--locked", "--workspace", "--features", WORKSPACE_FEATURES,
             "--bin", "nexmark"],
            cwd=ROOT, check=True,
        )
        subprocess.run(
            [str(ROOT / "target" / "debug" / "nexmark"), "--events", str(events), "--out", str(path)],
            cwd=ROOT, check=True,
        )
    with pa.ipc.open_file(path) as f:
        return f.read_all()


def nexmark_case(bids: pa.Table, view: str, backend: str, repeats: int, peers: bool) -> dict[str, Any]:
    key, feature, agg, column, window, hop = NEXMARK_QUERIES[view]
    f = {"name": feature, "agg": agg, "column": column, "window": window, "hop": hop}
    at = int(pc_max(bids.column("date_time")))
    data = bids.select([key, "date_time", *([column] if column else [])])
    keys = pa.chunked_array(bids.column(key)).unique()  # for the report only

    def panes_run() -> pl.DataFrame:
        engine = panes.Engine.from_toml_str(NEXMARK_TOML, backend=backend)
        for b in data.to_batches(max_chunksize=65_536):
            engine.push(b, view=view)
        return engine.read_all(features=[feature])

    def duckdb_run() -> pl.DataFrame:
        con = duckdb.connect()
        con.register("bids", data)
        c = _window_cond("epoch_ms(date_time)", at, f)
        expr = f"count(*) FILTER (WHERE {c})" if agg == "count" else f"max({column}) FILTER (WHERE {c})"
        sql = f'SELECT "{key}", {expr} AS {feature} FROM bids GROUP BY "{key}"'
        return pl.DataFrame(con.sql(sql).to_arrow_table())

    def polars_run() -> pl.DataFrame:
        df = pl.from_arrow(data)
        assert isinstance(df, pl.DataFrame)
        t = pl.col("date_time").dt.epoch("ms")
        cond = (t <= at) & (t // hop >= at // hop - window // hop + 1)
        e = cond.sum() if agg == "count" else pl.col(column).filter(cond).max()
        return df.lazy().group_by(key).agg(e.alias(feature)).collect()

    ref, t_panes = timed(panes_run, repeats)
    n = bids.num_rows
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"query": view, "bids": n, "keys": len(keys), "engines": {}}
    used = {"scalar": 1}.get(backend, cores)
    result["engines"][f"panes-{backend}"] = {**_stats_t(n, t_panes), "cores": used,
                                              "events_per_s_per_core": n / t_panes["median"] / used}
    for name, fn in (("duckdb", duckdb_run), ("polars", polars_run)) if peers else ():
        out = fn()
        check(ref.rename({key: "card"}), out.rename({key: "card"}), [f], name)
        _, t = timed(fn, repeats)
        result["engines"][name] = {**_stats_t(n, t), "cores": cores,
                                   "events_per_s_per_core": n / t["median"] / cores}
    return result


# --- sketches ----------------------------------------------------------------------

SKETCH_TOML = """
[[views]]
name = "cards"
key = "card"
time = "ts"

[[views.features]]
name = "merchants"
agg = "approx_distinct"
column = "merchant"
precision = 12
window = "10m"
hop = "1m"

[[views.features]]
name = "amount_p90"
agg = "quantile"
column = "amount"
q = 0.9
relative_accuracy = 0.01
window = "10m"
hop = "1m"

[[views.features]]
name = "top_categories"
agg = "top_k"
column = "category"
k = 5
window = "10m"
hop = "1m"
"""
CATEGORIES = [f"cat-{i:02d}" for i in range(40)]


def sketch_events(n: int, keys: int, seed: int = 2) -> pa.Table:
    """The synthetic transactions with a merchant (Zipf over 20 000 ids) and a category
    (Zipf over 40 names) per event."""
    rng = np.random.default_rng(seed)
    t = events(n, keys, False, seed)
    merchant = (rng.zipf(1.2, n) - 1) % 20_000
    category = np.array(CATEGORIES)[(rng.zipf(1.3, n) - 1) % len(CATEGORIES)]
    return t.append_column("merchant", pa.array(merchant, pa.int64())).append_column(
        "category", pa.array(category, pa.string()))


def sketch_case(n: int, keys: int, repeats: int) -> dict[str, Any]:
    """`approx_distinct`, `quantile` and `top_k` over 10-minute windows: Panes against
    the exact answers of DuckDB and polars (count(DISTINCT), quantile_disc / the lower
    quantile, frequency counts) and DuckDB's and polars' approximate functions, each
    timed from the same table, with the error of every approximate answer measured
    against the exact one."""
    table = sketch_events(n, keys)
    at = int(pc_max(table.column("ts")))
    hop, panes_n = 60_000, 10
    cond = f"t <= {at} AND t // {hop} >= {at} // {hop} - {panes_n - 1}"
    data = table.drop_columns(["seq"])

    def panes_run() -> pl.DataFrame:
        engine = panes.Engine.from_toml_str(SKETCH_TOML, backend="cpu", batch_rows=65_536)
        for b in data.to_batches(max_chunksize=65_536):
            engine.push(b)
        return engine.read_all(at=at)

    def duckdb_sql(exact: bool) -> str:
        if exact:
            # DESIGN's v[⌊q · (n − 1)⌋] (quantile_disc takes another element for some n).
            d = "count(DISTINCT merchant)"
            q = "list_sort(list(amount))[floor(0.9 * (count(amount) - 1))::BIGINT + 1]"
            top = f"""(SELECT card, list(category ORDER BY n DESC, category)[1:5] AS top_categories
                       FROM (SELECT card, category, count(*) AS n FROM w GROUP BY card, category)
                       GROUP BY card)"""
        else:
            d, q = "approx_count_distinct(merchant)", "approx_quantile(amount, 0.9)"
            top = "(SELECT card, approx_top_k(category, 5) AS top_categories FROM w GROUP BY card)"
        return f"""WITH w AS (SELECT card, merchant, amount, category
                              FROM (SELECT *, epoch_ms(ts) AS t FROM events) WHERE {cond}),
                   s AS (SELECT card, {d} AS merchants, {q} AS amount_p90 FROM w GROUP BY card)
                   SELECT s.card, merchants, amount_p90, top_categories FROM s JOIN {top} USING (card)"""

    def duckdb_run(exact: bool) -> pl.DataFrame:
        con = duckdb.connect()
        con.register("events", data)
        return pl.DataFrame(con.sql(duckdb_sql(exact)).to_arrow_table())

    def polars_run(exact: bool) -> pl.DataFrame:
        df = pl.from_arrow(data)
        assert isinstance(df, pl.DataFrame)
        t = pl.col("ts").dt.epoch("ms")
        w = df.lazy().filter((t <= at) & (t // hop >= at // hop - panes_n + 1))
        distinct = pl.col("merchant").n_unique() if exact else pl.col("merchant").approx_n_unique()
        stats = w.group_by("card").agg(
            distinct.alias("merchants"),
            pl.col("amount").quantile(0.9, interpolation="lower").alias("amount_p90"),
        )
        top = (
            w.group_by("card", "category").len()
            .sort(["card", "len", "category"], descending=[False, True, False])
            .group_by("card").agg(pl.col("category").head(5).alias("top_categories"))
        )
        return stats.join(top, on="card").collect()

    ref, t_panes = timed(panes_run, repeats)
    exact = duckdb_run(True).sort("card")
    ref = ref.sort("card")
    if ref["card"].to_list() != exact["card"].to_list():
        raise Mismatch("sketches: Panes and DuckDB hold different keys")
    # Panes within the bounds of DESIGN §3b; the exact peers agree with each other.
    d_exact = exact["merchants"].to_numpy().astype(float)
    q_exact = exact["amount_p90"].to_numpy()
    polars_exact = polars_run(True).sort("card")
    if not (np.array_equal(polars_exact["merchants"].to_numpy(), d_exact)
            and np.array_equal(polars_exact["amount_p90"].to_numpy(), q_exact)
            and polars_exact["top_categories"].to_list() == exact["top_categories"].to_list()):
        raise Mismatch("sketches: polars' and DuckDB's exact answers differ")

    def errors(frame: pl.DataFrame) -> dict[str, float]:
        d = frame["merchants"].to_numpy().astype(float)
        q = frame["amount_p90"].to_numpy().astype(float)
        top = frame["top_categories"].to_list()
        return {
            "distinct_max_rel_error": float(np.max(np.abs(d - d_exact) / d_exact)),
            "distinct_mean_rel_error": float(np.mean(np.abs(d - d_exact) / d_exact)),
            "quantile_max_rel_error": float(np.max(np.abs(q - q_exact) / np.abs(q_exact))),
            "top_k_exact_share": float(np.mean([a == b for a, b in zip(top, exact["top_categories"].to_list())])),
        }

    result: dict[str, Any] = {"events": n, "keys": ref.height, "engines": {}}
    cores = os.cpu_count() or 1
    e = errors(ref)
    se = 1.04 / np.sqrt(2.0 ** 12)
    bound = np.maximum(3 * se * d_exact, 3)
    if np.any(np.abs(ref["merchants"].to_numpy() - d_exact) > bound) or e["quantile_max_rel_error"] > 0.01 \
            or e["top_k_exact_share"] != 1.0:
        raise Mismatch(f"sketches: Panes outside its bounds: {e}")
    result["engines"]["panes-cpu"] = {**_stats_t(n, t_panes), "cores": cores, **e}
    runs = {
        "duckdb-exact": lambda: duckdb_run(True),
        "duckdb-approx": lambda: duckdb_run(False),
        "polars-exact": lambda: polars_run(True),
        "polars-approx": lambda: polars_run(False),
    }
    for name, fn in runs.items():
        out, t = timed(fn, repeats)
        result["engines"][name] = {**_stats_t(n, t), "cores": cores, **errors(out.sort("card"))}
    return result


def pc_max(col: pa.ChunkedArray) -> int:
    import pyarrow.compute as pc

    return int(pc.max(col.cast(pa.int64())).as_py())


# --- the check ---------------------------------------------------------------------


def check(panes_out: pl.DataFrame, peer: pl.DataFrame, feats: list[dict[str, Any]], peer_name: str) -> None:
    """Raises Mismatch unless `peer` has Panes' values for every key and feature."""
    names = [f["name"] for f in feats]
    left = panes_out.select("card", *names).cast({n: pl.Float64 for n in names})
    right = peer.select("card", *names).cast({n: pl.Float64 for n in names})
    if left.height != right.height:
        raise Mismatch(f"{peer_name}: {right.height} keys, Panes has {left.height}")
    j = left.join(right, on="card", how="inner", suffix="_peer")
    if j.height != left.height:
        raise Mismatch(f"{peer_name}: only {j.height} of {left.height} keys in common")
    for f in feats:
        a = j[f["name"]].fill_null(np.nan).to_numpy()
        b = j[f["name"] + "_peer"].fill_null(np.nan).to_numpy()
        if f["agg"] in ("count", "sum"):
            b = np.nan_to_num(b, nan=0.0)  # an empty window is 0 for count and sum
        na, nb = np.isnan(a), np.isnan(b)
        bad = na != nb
        ok = ~(na | nb)
        if f["agg"] in EXACT:
            bad[ok] |= a[ok] != b[ok]
        else:
            bad[ok] |= np.abs(a[ok] - b[ok]) > 1e-9 * np.maximum(np.abs(b[ok]), 1e-300) + 1e-12
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise Mismatch(
                f"{peer_name} disagrees with Panes on {f['name']} for key {j['card'][i]}: "
                f"peer {b[i]!r}, Panes {a[i]!r} ({int(bad.sum())} keys differ)"
            )


# --- measurement -------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, float]]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, {"min": min(times), "median": statistics.median(times), "max": max(times)}


def bandwidth() -> float:
    """Streaming read bandwidth, bytes/s (best of 5 sums over 512 MiB)."""
    a = np.ones(64 * 2**20, dtype=np.float64)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"panes": panes.__version__, "polars": pl.__version__, "duckdb": duckdb.__version__,
                     "pyarrow": pa.__version__, "numpy": np.__version__},
    }


def case(n: int, keys: int, string_keys: bool, batch: int, backends: list[str], repeats: int,
         peers: bool) -> dict[str, Any]:
    table = events(n, keys, string_keys)
    feats = workload()
    at = BASE_MS + ((n - 1) * 1000) // EVENTS_PER_SECOND
    bytes_per_event = (table.nbytes - table.column("seq").nbytes) / n
    result: dict[str, Any] = {"events": n, "keys": keys, "string_keys": string_keys, "batch": batch,
                              "bytes_per_event": bytes_per_event, "engines": {}}
    reference = None
    for backend in backends:
        runs = [run_panes(table, batch, backend) for _ in range(repeats)]
        reference = runs[0][0]
        totals = [r[1]["total_s"] for r in runs]
        result["engines"][f"panes-{backend}"] = {
            **_stats(n, totals),
            # Where the time goes: pushing every event vs the final read of every key.
            "ingest_s_median": statistics.median(r[1]["ingest_s"] for r in runs),
            "read_s_median": statistics.median(r[1]["read_s"] for r in runs),
        }
    if peers and reference is not None:
        for name, fn in (("duckdb", run_duckdb), ("polars", run_polars)):
            out = fn(table, feats, at)
            check(reference, out, feats, name)  # before timing: a wrong answer is not timed
            _, t = timed(lambda fn=fn: fn(table, feats, at), repeats)
            result["engines"][name] = _stats_t(n, t)
    return result


def _stats(n: int, seconds: list[float]) -> dict[str, float]:
    return _stats_t(n, {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)})


def _stats_t(n: int, t: dict[str, float]) -> dict[str, float]:
    return {"seconds_median": t["median"], "events_per_s_median": n / t["median"],
            "events_per_s_min": n / t["max"], "events_per_s_max": n / t["min"]}


def cpu_one_thread(args: argparse.Namespace, n: int, keys: int, batch: int) -> dict[str, float]:
    """The Cpu backend with one rayon thread, in a child process (the pool is global)."""
    code = (
        "import json, sys; sys.path.insert(0, %r); import harness as h; "
        "r = h.case(%d, %d, False, %d, ['cpu'], %d, False); print(json.dumps(r['engines']['panes-cpu']))"
        % (str(Path(__file__).parent), n, keys, batch, args.repeats)
    )
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    bound = report["bandwidth_bytes_per_s"]
    lines = [
        f"# Panes benchmark ({report['mode']} run, {report['repeats']} repeats)",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores; memory read bandwidth "
        f"{bound / 1e9:.1f} GB/s, measured in this run.",
        "",
        "## Synthetic features (8 features over 3 windows), events/s, median",
        "",
        "| events | keys | key type | batch | engine | events/s | vs polars | vs DuckDB | of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["synthetic"]:
        eng = c["engines"]
        ev_bound = bound / c["bytes_per_event"]
        for name, e in eng.items():
            rate = e["events_per_s_median"]
            vs = lambda p: f"{rate / eng[p]['events_per_s_median']:.2f}×" if p in eng else "–"  # noqa: E731
            lines.append(
                f"| {c['events']:,} | {c['keys']:,} | {'string' if c['string_keys'] else 'Int64'} | "
                f"{c['batch']:,} | {name} | {rate / 1e6:.2f} M | {vs('polars')} | {vs('duckdb')} | "
                f"{100 * rate / ev_bound:.2f} % |"
            )
    lines += ["", "## Panes by batch size (Int64 keys), events/s, median", "",
              "| batch | backend | events/s |", "|---|---|---|"]
    for c in report["batches"]:
        for name, e in c["engines"].items():
            lines.append(f"| {c['batch']:,} | {name} | {e['events_per_s_median'] / 1e6:.2f} M |")
    if report.get("nexmark"):
        lines += ["", "## Nexmark windows (bids of the `nexmark` crate's stream), median", "",
                  "| query | bids | keys | engine | events/s | per core |", "|---|---|---|---|---|---|"]
        for c in report["nexmark"]:
            for name, e in c["engines"].items():
                lines.append(f"| {c['query']} | {c['bids']:,} | {c['keys']:,} | {name} | "
                             f"{e['events_per_s_median'] / 1e6:.2f} M | {e['events_per_s_per_core'] / 1e6:.2f} M |")
    if report.get("backfill"):
        b = report["backfill"]
        lines += ["", f"## Backfill: {b['events']:,} events, {b['spine_rows']:,} spine rows, {b['keys']:,} keys, median", "",
                  "| engine | seconds | spine rows/s | vs Panes |", "|---|---|---|---|"]
        base = b["engines"]["panes-cpu"]["seconds_median"]
        for name, e in b["engines"].items():
            lines.append(f"| {name} | {e['seconds_median']:.2f} | {e['events_per_s_median'] / 1e6:.2f} M | "
                         f"{e['seconds_median'] / base:.2f}× the time |")
    lines += ["", "## Not measured", ""] + [f"- {x}" for x in report["not_measured"]]
    return "\n".join(lines) + "\n"


def _line_plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
               path: Path) -> None:
    """One line per name, log x, y in M events/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] / 1e6 for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(cases: list[dict[str, Any]], x: str) -> dict[str, list[tuple[float, float]]]:
    """Median events/s of each engine against the case field `x`."""
    out: dict[str, list[tuple[float, float]]] = {}
    for c in cases:
        for name, e in c["engines"].items():
            out.setdefault(name, []).append((c[x], e["events_per_s_median"]))
    return out


def plots(report: dict[str, Any], out: Path) -> list[str]:
    int_cases = [c for c in report["synthetic"] if not c["string_keys"]]
    _line_plot(_series(int_cases, "keys"), "distinct keys", "M events/s (ingest + read, median)",
               "Throughput vs key cardinality (Int64 keys)", out / "throughput_vs_keys.png")
    _line_plot(_series(report["batches"], "batch"), "batch size (events per push)", "M events/s (median)",
               "Panes backends vs batch size (GPU: not built yet)", out / "backends_vs_batch.png")
    return ["throughput_vs_keys.png", "backends_vs_batch.png"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller sweep (under 3 minutes here)")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "latest")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--events", type=int, default=None, help="override the events per case")
    ap.add_argument("--keys", type=int, nargs="*", default=None, help="override the key cardinalities")
    ap.add_argument("--skip-nexmark", action="store_true", help="skip the Nexmark queries (they build a Rust generator)")
    ap.add_argument("--sketches", action="store_true",
                    help="only the sketch case (approx_distinct, quantile, top_k against exact and approximate peers)")
    args = ap.parse_args(argv)
    if args.sketches:
        return sketches_only(args)
    if args.repeats is None:
        args.repeats = 3
    n = args.events or (1_000_000 if args.quick else 10_000_000)
    # Ring positions are allocated as the stream reaches their panes, so the state
    # follows the panes in use (not the 2 408 B per key of full rings that
    # `panes check benches/workload.toml` gives as the most a key costs): the full
    # sweep runs 10 M keys too.
    cardinalities = args.keys or (
        [1_000, 100_000, 1_000_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000, 10_000_000])
    batch_sizes = [1_024, 16_384, 65_536, 1_048_576] if args.quick else [1_024, 4_096, 16_384, 65_536, 262_144, 1_048_576]
    args.out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    mode = "custom" if (args.events or args.keys) else "quick" if args.quick else "full"
    report: dict[str, Any] = {"mode": mode, "machine": machine(), "repeats": args.repeats}
    report["bandwidth_bytes_per_s"] = bandwidth()
    print(f"bandwidth {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    report["synthetic"] = []
    for keys in cardinalities:
        for string_keys in (False, True):
            if string_keys and keys != 100_000 and args.keys is None:
                continue  # string keys at the headline cardinality only
            c = case(n, keys, string_keys, 65_536, ["cpu", "scalar"], args.repeats, peers=True)
            if not string_keys and args.keys is None and keys == 100_000:
                c["engines"]["panes-cpu-1thread"] = cpu_one_thread(args, n, keys, 65_536)
            report["synthetic"].append(c)
            print(json.dumps({k: c[k] for k in ("keys", "string_keys")}),
                  {k: f"{v['events_per_s_median'] / 1e6:.2f} M/s" for k, v in c["engines"].items()}, flush=True)
    report["batches"] = []
    for b in batch_sizes:
        c = case(n, 100_000 if args.keys is None else args.keys[0], False, b, ["cpu", "scalar"], args.repeats,
                 peers=False)
        report["batches"].append(c)
        print("batch", b, {k: f"{v['events_per_s_median'] / 1e6:.2f} M/s" for k, v in c["engines"].items()}, flush=True)
    report["nexmark"] = []
    if not args.skip_nexmark:
        bids = nexmark_bids(n)
        for view in NEXMARK_QUERIES:
            for backend in ("cpu", "scalar"):
                c = nexmark_case(bids, view, backend, args.repeats, peers=backend == "cpu")
                report["nexmark"].append(c)
                print("nexmark", view, {k: f"{v['events_per_s_median'] / 1e6:.2f} M/s" for k, v in c["engines"].items()},
                      flush=True)
    bn, bm = (1_000_000, 100_000) if args.quick else (10_000_000, 1_000_000)
    if args.events:
        bn, bm = n, max(n // 10, 1)
    report["backfill"] = backfill_case(bn, bm, 100_000 if args.keys is None else args.keys[0], args.repeats,
                                       ["duckdb", "polars"])
    print("backfill", {k: f"{v['seconds_median']:.2f} s" for k, v in report["backfill"]["engines"].items()}, flush=True)
    report["not_measured"] = [
        *([] if mode == "full" else ["10 M keys: in the full sweep only."]),
        "Gpu backend: measured by `benches/gpu-check.sh` on a machine with a GPU (benches/results/gpu-*), not here.",
        "Serving latency: measured by the serving load generator (`serve_load`, benches/results/serve/), not here.",
    ]
    report["seconds"] = time.perf_counter() - t_start
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(markdown(report))
    report["plots"] = plots(report, args.out)
    print(f"wrote {args.out} in {report['seconds']:.0f} s", flush=True)
    return report


def sketches_only(args: argparse.Namespace) -> dict[str, Any]:
    n = args.events or 1_000_000
    keys = (args.keys or [10_000])[0]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "sketches", "machine": machine(), "repeats": args.repeats or 3,
              "sketches": sketch_case(n, keys, args.repeats or 3)}
    rows = ["| engine | events/s (median) | vs Panes | approx_distinct error, max / mean | quantile error, max | "
            "top_k exact |", "|---|---|---|---|---|---|"]
    base = report["sketches"]["engines"]["panes-cpu"]["events_per_s_median"]
    for name, r in report["sketches"]["engines"].items():
        rows.append(f"| {name} | {r['events_per_s_median'] / 1e6:.2f} M | {r['events_per_s_median'] / base:.2f}× | "
                    f"{r['distinct_max_rel_error']:.2%} / {r['distinct_mean_rel_error']:.3%} | "
                    f"{r['quantile_max_rel_error']:.3%} | {r['top_k_exact_share']:.0%} |")
    text = (f"Sketch case: {n:,} events, {report['sketches']['keys']:,} keys, "
            f"{report['machine']['cores']} cores, median of {report['repeats']}.\n\n" + "\n".join(rows) + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(text)
    print(text, flush=True)
    return report


if __name__ == "__main__":
    main()

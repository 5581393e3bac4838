"""`panes backfill` checked against an independent SQL oracle.

DuckDB computes every feature straight from DESIGN §3, with no code shared with
Panes: lateness from a running maximum of event time in arrival order, windows from
pane arithmetic in a join, `last` by (time, arrival). The engine's answer must match
it row by row.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))

LATENESS_MS = 3_000
# name, agg, column, window (ms, None = lifetime), hop (ms)
FEATURES = [
    ("rows_1m", "count", None, 60_000, 10_000),
    ("amount_sum_1m", "sum", "amount", 60_000, 10_000),
    ("amount_mean_5m", "mean", "amount", 300_000, 60_000),
    ("amount_min_5m_tumbling", "min", "amount", 300_000, 300_000),
    ("amount_max_1h", "max", "amount", 3_600_000, 300_000),
    ("amount_var_1h", "var", "amount", 3_600_000, 300_000),
    ("amount_std_1h", "std", "amount", 3_600_000, 300_000),
    ("amount_last", "last", "amount", None, 10_000),
    ("amount_count_lifetime", "count", "amount", None, 10_000),
]

SQL_AGG = {
    ("count", None): "count(a.t)",
    ("count", "amount"): "count(a.amount)",
    ("sum", "amount"): "coalesce(sum(a.amount), 0)",
    ("mean", "amount"): "avg(a.amount)",
    ("min", "amount"): "min(a.amount)",
    ("max", "amount"): "max(a.amount)",
    ("var", "amount"): "var_samp(a.amount)",
    ("std", "amount"): "stddev_samp(a.amount)",
    # Greatest time, ties to the event that arrived last; nulls skipped.
    ("last", "amount"): "arg_max(a.amount, a.t::HUGEINT * 100000000 + a.seq) FILTER (WHERE a.amount IS NOT NULL)",
}


def feature_file() -> str:
    out = [
        "[[views]]",
        'name = "cards"',
        'key = "card"',
        'time = "ts"',
        'pane = "10s"',
        f'allowed_lateness = "{LATENESS_MS}ms"',
    ]
    for name, agg, column, window, hop in FEATURES:
        out += ["", "[[views.features]]", f'name = "{name}"', f'agg = "{agg}"']
        if column:
            out.append(f'column = "{column}"')
        out.append(f'window = "{window}ms"' if window else 'window = "lifetime"')
        out.append(f'hop = "{hop}ms"')
    return "\n".join(out) + "\n"


def make_inputs(tmp: Path, rng: np.random.Generator, n: int, m: int) -> tuple[Path, Path]:
    seq = np.arange(n)
    base = 1_767_225_600_000
    jitter = np.where(rng.random(n) < 0.2, rng.integers(0, 6_000, n), 0)
    ts = base + seq * 50 - jitter
    card = rng.zipf(1.3, n) % 500
    events = pa.table(
        {
            "seq": pa.array(seq, pa.int64()),
            "card": pa.array(card, pa.int64(), mask=rng.random(n) < 0.001),
            "ts": pa.array(ts, pa.int64(), mask=rng.random(n) < 0.001).cast(pa.timestamp("ms", tz="UTC")),
            "amount": pa.array(np.round(rng.normal(100, 30, n), 2), mask=rng.random(n) < 0.02),
        }
    )
    ev_path = tmp / "events.parquet"
    pq.write_table(events, ev_path, row_group_size=50_000)

    at = rng.integers(base - 60_000, int(ts.max()) + 3_600_000, m)
    spine = pa.table(
        {
            "label": pa.array(np.arange(m), pa.int64()),
            # Int32 spine keys must find Int64 event keys.
            "card": pa.array(rng.integers(0, 520, m), pa.int32()),
            "ts": pa.array(at, pa.int64(), mask=rng.random(m) < 0.002).cast(pa.timestamp("ms")),
        }
    )
    sp_path = tmp / "spine.parquet"
    pq.write_table(spine, sp_path)
    return ev_path, sp_path


def oracle(ev_path: Path, sp_path: Path) -> dict[str, np.ndarray]:
    con = duckdb.connect()
    con.execute(
        f"""
        CREATE TABLE acc AS
        WITH valid AS (
            SELECT seq, card, epoch_ms(ts) AS t, amount
            FROM read_parquet('{ev_path}')
            WHERE card IS NOT NULL AND ts IS NOT NULL
        ), marked AS (
            SELECT *, max(t) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_max
            FROM valid
        )
        SELECT seq, card, t, amount FROM marked
        WHERE prev_max IS NULL OR t >= prev_max - {LATENESS_MS}
        """
    )
    con.execute(f"CREATE TABLE spine AS SELECT label, card, epoch_ms(ts) AS at FROM read_parquet('{sp_path}')")
    out = {}
    for name, agg, column, window, hop in FEATURES:
        cond = "a.t <= s.at"
        if window:
            cond += f" AND a.t // {hop} >= s.at // {hop} - {window // hop} + 1"
        rows = con.execute(
            f"""
            SELECT s.label, {SQL_AGG[(agg, column)]} AS v
            FROM spine s LEFT JOIN acc a ON a.card = s.card AND {cond}
            WHERE s.at IS NOT NULL
            GROUP BY s.label ORDER BY s.label
            """
        ).fetchall()
        v = np.full(con.execute("SELECT count(*) FROM spine").fetchone()[0], np.nan)
        for label, value in rows:
            v[label] = np.nan if value is None else float(value)
        out[name] = v
    return out


def test_backfill_matches_duckdb_oracle(tmp_path: Path) -> None:
    assert PANES.exists(), f"build the CLI first (cargo build -p panes-engine): {PANES} is missing"
    rng = np.random.default_rng(20261126)
    ev_path, sp_path = make_inputs(tmp_path, rng, n=200_000, m=5_000)
    (tmp_path / "features.toml").write_text(feature_file())
    out_path = tmp_path / "out.parquet"
    run = subprocess.run(
        [
            str(PANES), "backfill",
            "--features", str(tmp_path / "features.toml"),
            "--events", str(ev_path),
            "--spine", str(sp_path),
            "--out", str(out_path),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    got = pq.read_table(out_path)
    assert got.column("label").to_pylist() == list(range(5_000)), "spine order is kept"
    want = oracle(ev_path, sp_path)
    null_at = np.array(got.column("ts").is_null())
    for name, agg, *_ in FEATURES:
        g = np.array(got.column(name).to_numpy(zero_copy_only=False), dtype=float)
        w = want[name]
        assert np.all(np.isnan(g[null_at])), f"{name}: rows without a time get nulls"
        g, w = g[~null_at], w[~null_at]
        assert np.array_equal(np.isnan(g), np.isnan(w)), f"{name}: null pattern differs"
        ok = ~np.isnan(w)
        if agg in ("count", "min", "max", "last"):
            np.testing.assert_array_equal(g[ok], w[ok], err_msg=name)
        else:
            np.testing.assert_allclose(g[ok], w[ok], rtol=1e-9, atol=1e-9, err_msg=name)

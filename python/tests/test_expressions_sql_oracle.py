"""Filters and derived columns (DESIGN §3b) through `panes backfill`, against DuckDB
running the same SQL expressions, and the same view read online."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import panes

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))
BASE_MS = 1_767_225_600_000
LATENESS_MS = 3_000

DERIVED = {
    "amount_usd": "amount * fx",
    "per_unit": "amount_usd / units",
    "tier": "CASE WHEN amount_usd > 150 THEN 'big' ELSE upper(substr(status, 1, 3)) || '-' || merchant END",
}
VIEW_FILTER = "status <> 'declined'"
# name, agg, column, window (ms, None = lifetime), filter
FEATURES = [
    ("rows_10s", "count", None, 10_000, None),
    ("usd_sum_10s", "sum", "amount_usd", 10_000, None),
    ("big_rows_10s", "count", None, 10_000, "tier = 'big'"),
    ("per_unit_mean_life", "mean", "per_unit", None, "units > 1 AND merchant LIKE 'm1%'"),
    ("usd_max_10s", "max", "amount_usd", 10_000, "status IS NOT NULL AND amount BETWEEN 20 AND 180"),
    ("tier_last_10s", "last", "tier", 10_000, None),
]


def feature_file() -> str:
    lines = [
        "[[views]]", 'name = "cards"', 'key = "card"', 'time = "ts"', 'pane = "1s"',
        f'allowed_lateness = "{LATENESS_MS}ms"', f"filter = {json.dumps(VIEW_FILTER)}", "",
    ]
    for name, expr in DERIVED.items():
        lines += ["[[views.columns]]", f"name = {json.dumps(name)}", f"expr = {json.dumps(expr)}", ""]
    for name, agg, column, window, flt in FEATURES:
        lines += ["[[views.features]]", f'name = "{name}"', f'agg = "{agg}"']
        if column:
            lines.append(f'column = "{column}"')
        lines.append(f'window = "{window}ms"' if window else 'window = "lifetime"')
        if flt:
            lines.append(f"filter = {json.dumps(flt)}")
        lines.append("")
    return "\n".join(lines)


def make_events(rng: np.random.Generator, n: int) -> pa.Table:
    seq = np.arange(n)
    jitter = np.where(rng.random(n) < 0.2, rng.integers(0, 6_000, n), 0)
    statuses = np.array(["approved", "declined", "pending"])
    return pa.table(
        {
            "seq": pa.array(seq, pa.int64()),
            "card": pa.array(rng.integers(0, 40, n), pa.int64(), mask=rng.random(n) < 0.002),
            "ts": pa.array(BASE_MS + seq * 40 - jitter, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "amount": pa.array(np.round(rng.uniform(0, 200, n), 2), mask=rng.random(n) < 0.05),
            "fx": pa.array(rng.choice([0.5, 1.0, 1.25], n)),
            "units": pa.array(rng.integers(0, 4, n), pa.int64()),
            "status": pa.array(statuses[rng.integers(0, 3, n)], mask=rng.random(n) < 0.05),
            "merchant": pa.array([f"m{m}" for m in rng.integers(0, 30, n)]),
        }
    )


def duckdb_oracle(events: pa.Table, spine: pa.Table) -> tuple[dict[str, list], dict[str, int]]:
    """Each feature per spine row (None for null), and the view's counters."""
    con = duckdb.connect()
    con.register("events_in", events)
    con.register("spine_in", spine)
    # The same expressions; a division by zero is null (and counted) in Panes.
    con.execute(
        f"""
        CREATE TABLE d1 AS SELECT *, amount * fx AS amount_usd FROM events_in;
        CREATE TABLE derived AS SELECT *,
            amount_usd / NULLIF(units, 0) AS per_unit,
            {DERIVED['tier']} AS tier,
            amount_usd IS NOT NULL AND units = 0 AS expr_error,
            coalesce({VIEW_FILTER}, false) AS kept
        FROM d1;
        """
    )
    counters = dict(
        zip(
            ["filtered", "expr_errors"],
            con.execute("SELECT count(*) FILTER (NOT kept), count(*) FILTER (expr_error) FROM derived").fetchone(),
        )
    )
    con.execute(
        f"""
        CREATE TABLE acc AS
        WITH valid AS (
            SELECT *, epoch_ms(ts) AS t FROM derived
            WHERE kept AND card IS NOT NULL AND ts IS NOT NULL
        ), marked AS (
            SELECT *, max(t) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_max
            FROM valid
        )
        SELECT * FROM marked WHERE prev_max IS NULL OR t >= prev_max - {LATENESS_MS}
        """
    )
    counters["accepted"] = con.execute("SELECT count(*) FROM acc").fetchone()[0]
    con.execute("CREATE TABLE spine AS SELECT label, card, epoch_ms(ts::TIMESTAMP) AS at FROM spine_in")
    out: dict[str, list] = {}
    for name, agg, column, window, flt in FEATURES:
        cond = "a.t <= s.at"
        if window:
            cond += f" AND a.t // 1000 >= s.at // 1000 - {window // 1000} + 1"
        if flt:
            cond += f" AND coalesce(({flt}), false)"
        value = {
            "count": f"count({'a.' + column if column else 'a.seq'})",
            "sum": f"coalesce(sum(a.{column}), 0)",
            "mean": f"avg(a.{column})",
            "max": f"max(a.{column})",
            "last": f"arg_max(a.{column}, (a.t, a.seq)) FILTER (a.{column} IS NOT NULL)",
        }[agg]
        rows = con.execute(
            f"""
            SELECT s.label, {value} FROM spine s LEFT JOIN acc a ON a.card = s.card AND {cond}
            GROUP BY s.label ORDER BY s.label
            """
        ).fetchall()
        out[name] = [v for _, v in rows]
    return out, counters


@pytest.mark.skipif(
    not PANES.exists() and "PANES_BIN" not in os.environ,
    reason="the CLI is not built (cargo build -p panes-engine); the test command always builds it",
)
def test_filters_and_derived_columns_match_duckdb(tmp_path: Path) -> None:
    rng = np.random.default_rng(20261201)
    events = make_events(rng, 20_000)
    t_max = BASE_MS + 20_000 * 40
    spine = pa.table(
        {
            "label": pa.array(np.arange(3_000), pa.int64()),
            "card": pa.array(rng.integers(0, 42, 3_000), pa.int64()),
            "ts": pa.array(rng.integers(BASE_MS - 5_000, t_max + 20_000, 3_000), pa.int64()).cast(
                pa.timestamp("ms")
            ),
        }
    )
    pq.write_table(events, tmp_path / "events.parquet", row_group_size=5_000)
    pq.write_table(spine, tmp_path / "spine.parquet")
    (tmp_path / "features.toml").write_text(feature_file())
    run = subprocess.run(
        [str(PANES), "backfill", "--features", str(tmp_path / "features.toml"),
         "--events", str(tmp_path / "events.parquet"), "--spine", str(tmp_path / "spine.parquet"),
         "--out", str(tmp_path / "out.parquet")],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    got = pq.read_table(tmp_path / "out.parquet")
    want, counters = duckdb_oracle(events, spine)
    assert counters["filtered"] > 0 and counters["expr_errors"] > 0
    for name, agg, *_ in FEATURES:
        g = got.column(name).to_pylist()
        w = want[name]
        for r, (a, b) in enumerate(zip(g, w)):
            if agg == "last" or b is None or a is None:
                assert a == b, f"{name} row {r}: {a!r} vs {b!r}"
            else:
                assert abs(float(a) - float(b)) <= 1e-9 * max(abs(float(b)), 1.0), f"{name} row {r}: {a} vs {b}"

    # Online: the same events pushed into an engine; its counters are exact and a read
    # at the last spine time equals the backfill there.
    engine = panes.Engine.from_toml_str(feature_file())
    for batch in events.to_batches(max_chunksize=1_700):
        engine.push(batch, view="cards")
    m = engine.metrics()["cards"]
    assert (m["filtered"], m["expr_errors"], m["accepted"]) == (
        counters["filtered"], counters["expr_errors"], counters["accepted"]
    )
    at = t_max + 20_000
    frame = engine.read(list(range(42)), at=at, view="cards")
    spine_at = pa.table({"label": pa.array(range(42), pa.int64()), "card": pa.array(range(42), pa.int64()),
                         "ts": pa.array([at] * 42, pa.int64()).cast(pa.timestamp("ms"))})
    want_at, _ = duckdb_oracle(events, spine_at)
    for name, agg, *_ in FEATURES:
        g = frame[name].to_list()
        for r, (a, b) in enumerate(zip(g, want_at[name])):
            if agg == "last" or b is None or a is None:
                assert a == b, f"online {name} card {r}: {a!r} vs {b!r}"
            else:
                assert abs(float(a) - float(b)) <= 1e-9 * max(abs(float(b)), 1.0), f"online {name} card {r}"


def test_python_views_carry_filters_and_derived_columns() -> None:
    v = panes.View(
        "cards", key="card", time="ts",
        filter="status = 'approved'",
        columns={"amount_usd": "amount * fx"},
        features=[panes.count(window="1m", filter="amount_usd > 100", name="big_1m")],
    )
    engine = panes.Engine([v])
    (got,) = engine.views
    assert got.filter == "status = 'approved'"
    assert dict(got.columns) == {"amount_usd": "amount * fx"}
    assert got.features[0].filter == "amount_usd > 100"
    with pytest.raises(panes.SpecError, match="column 5"):
        panes.Engine([panes.View("x", key="k", time="ts", filter="a = = 1",
                                 features=[panes.count(window="1m")])])

"""Filters, derived columns and a composite key (DESIGN §3b) through `panes backfill`,
against DuckDB running the same SQL expressions, and the same view read online: in
Python, and from `panes serve` over gRPC and Flight on the CPU and GPU backends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

import panes
from panes.client import Client

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))
BASE_MS = 1_767_225_600_000
LATENESS_MS = 3_000

DERIVED = {
    "amount_usd": "amount * fx",
    "per_unit": "amount_usd / units",
    "tier": "CASE WHEN amount_usd > 150 THEN 'big' ELSE upper(substr(status, 1, 3)) || '-' || merchant END",
    # A bad cast ('x7') fails for that row.
    "code_num": "CAST(code AS BIGINT)",
}
MERCHANTS = 8
CARDS = 40
VIEW_FILTER = "status <> 'declined'"
# name, agg, column, window (ms, None = lifetime), filter
FEATURES = [
    ("rows_10s", "count", None, 10_000, None),
    ("usd_sum_10s", "sum", "amount_usd", 10_000, None),
    ("big_rows_10s", "count", None, 10_000, "tier = 'big'"),
    ("per_unit_mean_life", "mean", "per_unit", None, "units > 1 AND merchant LIKE 'm1%'"),
    ("usd_max_10s", "max", "amount_usd", 10_000, "status IS NOT NULL AND amount BETWEEN 20 AND 180"),
    ("tier_last_10s", "last", "tier", 10_000, None),
    ("code_sum_10s", "sum", "code_num", 10_000, None),
]


def feature_file() -> str:
    lines = [
        "[[views]]", 'name = "cards"', 'key = ["merchant", "card"]', 'time = "ts"', 'pane = "1s"',
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
            "card": pa.array(rng.integers(0, CARDS, n), pa.int64(), mask=rng.random(n) < 0.002),
            "ts": pa.array(BASE_MS + seq * 40 - jitter, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "amount": pa.array(np.round(rng.uniform(0, 200, n), 2), mask=rng.random(n) < 0.05),
            "fx": pa.array(rng.choice([0.5, 1.0, 1.25], n)),
            "units": pa.array(rng.integers(0, 4, n), pa.int64()),
            "status": pa.array(statuses[rng.integers(0, 3, n)], mask=rng.random(n) < 0.05),
            "merchant": pa.array(
                [f"m{m}" for m in rng.integers(0, MERCHANTS, n)], mask=rng.random(n) < 0.002
            ),
            "code": pa.array(
                [f"x{c}" if c % 23 == 0 else str(c) for c in rng.integers(0, 1_000, n)],
                mask=rng.random(n) < 0.05,
            ),
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
            TRY_CAST(code AS BIGINT) AS code_num,
            (amount_usd IS NOT NULL AND units = 0)
                OR (code IS NOT NULL AND TRY_CAST(code AS BIGINT) IS NULL) AS expr_error,
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
            WHERE kept AND card IS NOT NULL AND merchant IS NOT NULL AND ts IS NOT NULL
        ), marked AS (
            SELECT *, max(t) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_max
            FROM valid
        )
        SELECT * FROM marked WHERE prev_max IS NULL OR t >= prev_max - {LATENESS_MS}
        """
    )
    counters["accepted"] = con.execute("SELECT count(*) FROM acc").fetchone()[0]
    con.execute(
        # The spine's key columns renamed, so that a feature filter's columns are the events'.
        "CREATE TABLE spine AS SELECT label, merchant AS s_merchant, card AS s_card,"
        " epoch_ms(ts::TIMESTAMP) AS at FROM spine_in"
    )
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
            SELECT s.label, {value} FROM spine s
            LEFT JOIN acc a ON a.card = s.s_card AND a.merchant = s.s_merchant AND {cond}
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
            "card": pa.array(rng.integers(0, CARDS + 2, 3_000), pa.int64()),
            "merchant": pa.array([f"m{m}" for m in rng.integers(0, MERCHANTS + 1, 3_000)]),
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

    check(got.to_pydict(), want, "backfill")

    # Online: the same events pushed into an engine; its counters are exact and a read
    # at one time past the last event equals DuckDB there, for every pair (and one of a
    # merchant never seen).
    engine = panes.Engine.from_toml_str(feature_file())
    for batch in events.to_batches(max_chunksize=1_700):
        engine.push(batch, view="cards")
    m = engine.metrics()["cards"]
    assert (m["filtered"], m["expr_errors"], m["accepted"]) == (
        counters["filtered"], counters["expr_errors"], counters["accepted"]
    )
    at = t_max + 5_000
    pairs = [(f"m{m}", c) for m in range(MERCHANTS + 1) for c in range(CARDS)]
    frame = engine.read(pairs, at=at, view="cards")
    assert frame.columns[:2] == ["merchant", "card"]
    spine_at = pa.table({
        "label": pa.array(range(len(pairs)), pa.int64()),
        "merchant": pa.array([p[0] for p in pairs]),
        "card": pa.array([p[1] for p in pairs], pa.int64()),
        "ts": pa.array([at] * len(pairs), pa.int64()).cast(pa.timestamp("ms")),
    })
    want_at, _ = duckdb_oracle(events, spine_at)
    check(frame.to_dict(as_series=False), want_at, "online read")
    # A DataFrame of key columns (any order, other columns too) reads the same.
    again = engine.read(spine_at.select(["card", "label", "merchant"]), at=at, view="cards")
    assert again.equals(frame)

    # Served: the same events ingested into `panes serve` on each backend; gRPC
    # GetFeatures and Flight DoGet by tuple equal DuckDB too.
    numeric = [f[0] for f in FEATURES if f[1] != "last"]
    for backend in ["cpu", "gpu"]:
        with serve(tmp_path, backend) as address:
            with Client(address) as c:
                r = c.ingest("cards", events, batch_rows=4_000)
                assert r.accepted == counters["accepted"], (backend, r)
                f = c.get_features("cards", pairs, features=numeric, at_ms=at)
                served = {
                    n: [float(f.values[i, j]) if f.valid[i, j] else None for i in range(len(pairs))]
                    for j, n in enumerate(f.names)
                }
                check(served, want_at, f"gRPC on {backend}")
                described = c.describe_view("cards")
                assert (described["key"], described["key_kind"]) == (
                    ["merchant", "card"], "(string, int)"
                )
            client = flight.connect(f"grpc://{address}")
            ticket = {"view": "cards", "keys": [list(p) for p in pairs], "at_ms": at}
            table = client.do_get(flight.Ticket(json.dumps(ticket).encode())).read_all()
            assert table.column_names[:2] == ["merchant", "card"]
            check(table.to_pydict(), want_at, f"Flight on {backend}")
            client.close()


def check(got: dict[str, list], want: dict[str, list], what: str) -> None:
    for name, agg, *_ in FEATURES:
        if name not in got:
            continue
        for r, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
            if agg == "last" or b is None or a is None:
                assert a == b, f"{what}: {name} row {r}: {a!r} vs {b!r}"
            else:
                assert abs(float(a) - float(b)) <= 1e-9 * max(abs(float(b)), 1.0), (
                    f"{what}: {name} row {r}: {a} vs {b}"
                )


class serve:
    """`panes serve` of the feature file on `backend`, for a `with` block."""

    def __init__(self, tmp_path: Path, backend: str) -> None:
        features = tmp_path / "serve.toml"
        features.write_text(feature_file())
        self.proc = subprocess.Popen(
            [str(PANES), "serve", "--features", str(features), "--listen", "127.0.0.1:0",
             "--metrics", "127.0.0.1:0", "--batch-age-ms", "2", "--backend", backend],
            stderr=subprocess.PIPE, text=True,
        )

    def __enter__(self) -> str:
        assert self.proc.stderr is not None
        # The Vulkan loader may write a line or two before the server's.
        seen = []
        for _ in range(20):
            seen.append(self.proc.stderr.readline())
            m = re.search(r"gRPC \+ Flight on (\S+),", seen[-1])
            if m:
                return m.group(1)
        raise AssertionError("".join(seen))

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0


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


@pytest.mark.skipif(
    not PANES.exists() and "PANES_BIN" not in os.environ,
    reason="the CLI is not built (cargo build -p panes-engine); the test command always builds it",
)
def test_panes_check_names_view_field_and_position(tmp_path: Path) -> None:
    pq.write_table(make_events(np.random.default_rng(1), 100), tmp_path / "events.parquet")
    good = feature_file()
    cases = [
        # (edit of the feature file, what the error must say)
        ('expr = "amount * fx"', 'expr = "amount * fxx"', 'columns.amount_usd.expr', "fxx"),
        ('expr = "amount * fx"', "expr = \"amount * 'a'\"", "columns.amount_usd.expr", "column 1"),
        (f"filter = {json.dumps(VIEW_FILTER)}", 'filter = "status <> = 1"', "filter", "column 11"),
        (f"filter = {json.dumps(VIEW_FILTER)}", 'filter = "units + 1"', "filter", "boolean"),
        ('name = "tier"', 'name = "status"', "columns.status.expr", "status"),
        ('key = ["merchant", "card"]', 'key = ["merchant", "shop"]', "key[1]", '"shop" is not in the events'),
    ]
    for old, new, field, says in cases:
        assert old in good, old
        (tmp_path / "f.toml").write_text(good.replace(old, new, 1))
        run = subprocess.run(
            [str(PANES), "check", str(tmp_path / "f.toml"), "--events", str(tmp_path / "events.parquet")],
            capture_output=True, text=True,
        )
        assert run.returncode == 2, (new, run.stdout, run.stderr)
        assert 'view "cards"' in run.stderr and field in run.stderr and says in run.stderr, (new, run.stderr)
    (tmp_path / "f.toml").write_text(good)
    run = subprocess.run(
        [str(PANES), "check", str(tmp_path / "f.toml"), "--events", str(tmp_path / "events.parquet")],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr


def test_python_views_take_composite_keys() -> None:
    v = panes.View("pairs", key=["merchant", "card"], time="ts", features=[panes.count(window="1m", name="n")])
    assert 'key = ["merchant", "card"]' in v.to_toml()
    engine = panes.Engine([v])
    assert engine.views[0].key == ("merchant", "card")
    engine.push(pa.table({"merchant": ["a", "b", None], "card": [1, 2, 3], "ts": [1, 2, 3]}))
    got = engine.read([("a", 1), ("b", 2), ("a", 2)], at=10)
    assert got["n"].to_list() == [1, 1, 0]
    with pytest.raises(panes.DataError, match="tuple of 2 values"):
        engine.read([("a", 1), ("b",)])
    with pytest.raises(Exception, match="composite key"):
        engine.read([1, 2])

"""Feature services with on-demand features (DESIGN §3b): `panes backfill --service`
checked against DuckDB SQL on a spine with both views' key columns and a request
column, and online reads (`Engine.read_service`) equal to the backfill for the same
rows and times."""

from __future__ import annotations

import subprocess
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import panes
from oracle import BASE_MS, LATENESS_MS, PANES, accepted, cli_backfill, make_events, needs_cli

FEATURES = f"""
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1m"
allowed_lateness = "{LATENESS_MS}ms"

[[views.features]]
name = "tx_5m"
agg = "count"
window = "5m"

[[views.features]]
name = "amount_mean_1h"
agg = "mean"
column = "amount"
window = "1h"
hop = "5m"

[[views.features]]
name = "card_amount_max_1h"
agg = "max"
column = "amount"
window = "1h"
hop = "5m"

[[views]]
name = "merchants"
key = "merchant"
time = "ts"
pane = "1m"
allowed_lateness = "{LATENESS_MS}ms"

[[views.features]]
name = "merchant_amount_sum_10m"
agg = "sum"
column = "amount"
window = "10m"

[[views.features]]
name = "merchant_tx_last_3"
agg = "count"
column = "amount"
window = "3 events"

[[services]]
name = "fraud_v1"
features = ["tx_5m", "amount_mean_1h", "merchant_amount_sum_10m", "merchant_tx_last_3"]

[[services.on_demand]]
name = "amount_vs_mean"
expr = "request_amount / amount_mean_1h"

[[services.on_demand]]
name = "busy"
expr = "CASE WHEN tx_5m + merchant_tx_last_3 >= 5 THEN 'busy' ELSE 'quiet' END"
"""

SERVICE_COLUMNS = ["tx_5m", "amount_mean_1h", "merchant_amount_sum_10m", "merchant_tx_last_3", "amount_vs_mean", "busy"]


def spine(rng: np.random.Generator, events: pa.Table, m: int, t_max: int) -> pa.Table:
    """Rows with a card and a merchant seen together in the events, random times, and
    a request amount (some null)."""
    pairs = events.select(["card", "merchant"]).to_pylist()
    pick = rng.integers(0, len(pairs), m)
    return pa.table(
        {
            "label": pa.array(np.arange(m), pa.int64()),
            "card": pa.array([pairs[i]["card"] for i in pick], pa.int64()),
            "merchant": pa.array([pairs[i]["merchant"] for i in pick], pa.string()),
            "ts": pa.array(rng.integers(BASE_MS, t_max + 600_000, m), pa.int64()).cast(pa.timestamp("ms")),
            "request_amount": pa.array(np.round(rng.normal(100, 40, m), 2), mask=rng.random(m) < 0.05),
        }
    )


def oracle(events: pa.Table, spine_t: pa.Table) -> pl.DataFrame:
    con = duckdb.connect()
    con.register("events_in", events)
    con.register("spine_in", spine_t)

    for table, key in [("cards", "card"), ("merchants", "merchant")]:
        valid = f"SELECT seq, {key} AS k, epoch_ms(ts) AS t, amount FROM events_in WHERE {key} IS NOT NULL AND ts IS NOT NULL"
        con.execute(f"CREATE TABLE {table} AS {accepted(valid)}")
    con.execute(
        "CREATE TABLE s AS SELECT label, card, merchant, epoch_ms(ts::TIMESTAMP) AS at, request_amount FROM spine_in"
    )

    def window(table: str, key: str, agg: str, window: int, hop: int) -> str:
        return f"""
            SELECT s.label, {agg} AS v FROM s LEFT JOIN {table} a
              ON a.k = s.{key} AND a.t <= s.at AND a.t // {hop} >= s.at // {hop} - {window // hop} + 1
            GROUP BY s.label
        """

    parts = {
        "tx_5m": window("cards", "card", "count(a.t)", 300_000, 60_000),
        "amount_mean_1h": window("cards", "card", "avg(a.amount)", 3_600_000, 300_000),
        "merchant_amount_sum_10m": window("merchants", "merchant", "coalesce(sum(a.amount), 0)", 600_000, 60_000),
        # The 3 newest events by (time, arrival); count of their non-null amounts.
        "merchant_tx_last_3": """
            SELECT s.label, count(w.amount) AS v FROM s LEFT JOIN (
                SELECT s.label, a.amount,
                       row_number() OVER (PARTITION BY s.label ORDER BY a.t DESC, a.seq DESC) AS rn
                FROM s JOIN merchants a ON a.k = s.merchant AND a.t <= s.at
            ) w ON w.label = s.label AND w.rn <= 3
            GROUP BY s.label
        """,
    }
    select = ", ".join(f"{name}.v AS {name}" for name in parts)
    joins = " ".join(f"JOIN ({sql}) {name} USING (label)" for name, sql in parts.items())
    return pl.from_arrow(
        con.sql(
            f"""
            SELECT s.label, {select},
                   CASE WHEN amount_mean_1h.v = 0 THEN NULL ELSE s.request_amount / amount_mean_1h.v END
                       AS amount_vs_mean,
                   CASE WHEN tx_5m.v + merchant_tx_last_3.v >= 5 THEN 'busy' ELSE 'quiet' END AS busy
            FROM s {joins} ORDER BY s.label
            """
        ).to_arrow_table()
    )  # type: ignore[return-value]


def assert_frames_equal(got: pl.DataFrame, want: pl.DataFrame, what: str) -> None:
    assert got.columns[-len(SERVICE_COLUMNS):] == SERVICE_COLUMNS, what
    for name in SERVICE_COLUMNS:
        g, w = got[name], want[name]
        assert g.null_count() == w.null_count(), f"{what} {name}: nulls {g.null_count()} vs {w.null_count()}"
        if name == "busy":
            assert g.to_list() == w.to_list(), f"{what} {name}"
        else:
            np.testing.assert_allclose(
                g.cast(pl.Float64).fill_null(np.nan).to_numpy(),
                w.cast(pl.Float64).fill_null(np.nan).to_numpy(),
                rtol=1e-9,
                atol=1e-9,
                err_msg=f"{what} {name}",
            )


@needs_cli
def test_backfill_of_a_service_matches_duckdb(tmp_path: Path) -> None:
    rng = np.random.default_rng(20261203)
    events = make_events(rng, 40_000, keys=300)
    spine_t = spine(rng, events, 2_000, BASE_MS + 40_000 * 50)
    got = pl.from_arrow(cli_backfill(tmp_path, events, spine_t, FEATURES, "--service", "fraud_v1"))
    assert isinstance(got, pl.DataFrame)
    assert got.columns == spine_t.column_names + SERVICE_COLUMNS
    assert got["label"].to_list() == list(range(2_000)), "spine order is kept"
    want = oracle(events, spine_t)
    assert want["tx_5m"].max() > 3 and want["merchant_tx_last_3"].max() == 3
    assert_frames_equal(got, want, "backfill --service")


def test_online_service_reads_equal_the_backfill() -> None:
    rng = np.random.default_rng(5)
    events = make_events(rng, 20_000, keys=200, bad=False)
    t_end = BASE_MS + 20_000 * 50
    for backend in ["scalar", "cpu", "gpu"]:
        engine = panes.Engine.from_toml_str(FEATURES, backend=backend)
        for start in range(0, events.num_rows, 7_000):
            for view in ["cards", "merchants"]:
                engine.push(events.slice(start, 7_000), view=view)
        request = spine(rng, events, 300, t_end)
        # Reads at or after every event (exact online), some rows without a time.
        times = [t_end + int(d) for d in rng.integers(0, 120_000, 300)]
        request = request.set_column(
            3, "ts", pa.array(times, pa.int64(), mask=np.arange(300) % 10 == 0).cast(pa.timestamp("ms"))
        )
        online = engine.read_service("fraud_v1", pl.from_arrow(request))
        assert online.columns == SERVICE_COLUMNS
        # Backfill gives rows without a time nulls; online reads them at each view's
        # read time: they are compared with plain reads below.
        offline = engine.backfill(events, request, service="fraud_v1")
        timed = ~np.array(request.column("ts").is_null())
        assert_frames_equal(
            online.filter(pl.Series(timed)), offline.filter(pl.Series(timed)), f"{backend}: rows with a time"
        )
        untimed = online.filter(pl.Series(~timed))
        cards = engine.read(request.column("card").filter(pa.array(~timed)), view="cards")
        merchants = engine.read(request.column("merchant").filter(pa.array(~timed)), view="merchants")
        assert untimed["tx_5m"].to_list() == cards["tx_5m"].to_list()
        assert untimed["amount_mean_1h"].to_list() == cards["amount_mean_1h"].to_list()
        assert untimed["merchant_amount_sum_10m"].to_list() == merchants["merchant_amount_sum_10m"].to_list()


def test_service_errors_are_clear() -> None:
    with pytest.raises(panes.SpecError, match='unknown feature "nope"'):
        panes.Engine.from_toml_str(FEATURES.replace('"merchant_tx_last_3"]', '"merchant_tx_last_3", "nope"]'))
    with pytest.raises(panes.SpecError, match="not in the service's features"):
        panes.Engine.from_toml_str(FEATURES.replace("request_amount / amount_mean_1h", "card_amount_max_1h * 2"))
    engine = panes.Engine.from_toml_str(FEATURES)
    engine.push(make_events(np.random.default_rng(1), 1_000, bad=False), view="cards")
    with pytest.raises(panes.PanesError, match='unknown service "other"; the services are fraud_v1'):
        engine.read_service("other", pl.DataFrame({"card": [1]}))
    with pytest.raises(panes.PanesError, match='needs key column\\(s\\) merchant of view "merchants"'):
        engine.read_service("fraud_v1", pl.DataFrame({"card": [1], "request_amount": [1.0]}))
    with pytest.raises(panes.PanesError, match="request_amount"):
        engine.read_service("fraud_v1", pl.DataFrame({"card": [1], "merchant": ["m1"]}))
    assert engine.services[0]["name"] == "fraud_v1"
    assert [d["name"] for d in engine.services[0]["on_demand"]] == ["amount_vs_mean", "busy"]


@needs_cli
def test_service_reads_over_grpc_equal_the_in_process_read(tmp_path: Path) -> None:
    import re
    import signal

    from panes.client import Client

    (tmp_path / "features.toml").write_text(FEATURES)
    proc = subprocess.Popen(
        [str(PANES), "serve", "--features", str(tmp_path / "features.toml"), "--listen", "127.0.0.1:0",
         "--batch-age-ms", "2", "--backend", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        m = re.search(r"gRPC \+ Flight on (\S+),", proc.stderr.readline())
        assert m
        rng = np.random.default_rng(9)
        events = make_events(rng, 5_000, keys=100, bad=False)
        local = panes.Engine.from_toml_str(FEATURES, backend="cpu")
        with Client(m.group(1).rstrip(",")) as c:
            for view in ["cards", "merchants"]:
                c.ingest(view, events)
                local.push(events, view=view)
            request = spine(rng, events, 50, BASE_MS)
            # At or after every event: exact online.
            later = pa.array(BASE_MS + 5_000 * 50 + rng.integers(0, 60_000, 50), pa.int64())
            request = request.set_column(3, "ts", later.cast(pa.timestamp("ms")))
            got = c.get_service("fraud_v1", request)
            want = local.read_service("fraud_v1", pl.from_arrow(request))
            assert got.names == SERVICE_COLUMNS
            for j, name in enumerate(SERVICE_COLUMNS[:-1]):
                w = want[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
                g = np.where(got.valid[:, j], got.values[:, j], np.nan)
                np.testing.assert_allclose(g, w, rtol=1e-12, err_msg=name)
            assert got.strings["busy"] == want["busy"].to_list()
            # A subscription to the same rows starts with the same vectors.
            rows: list[int] = []
            updates = c.subscribe_service("fraud_v1", request, interval_ms=20)
            for u in updates:
                assert u.snapshot and u.keys == []
                rows.extend(u.request_rows)
                sel = np.array(u.request_rows)
                np.testing.assert_array_equal(u.features.valid, got.valid[sel])
                np.testing.assert_array_equal(
                    np.where(u.features.valid, u.features.values, 0), np.where(got.valid[sel], got.values[sel], 0)
                )
                if len(rows) == 50:
                    break
            updates.close()  # type: ignore[attr-defined]
            assert rows == list(range(50))
            with pytest.raises(panes.PanesError, match='unknown service "nope"'):
                c.get_service("nope", request)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

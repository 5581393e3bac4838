"""Count and session windows (DESIGN §3b) through `panes backfill`, checked against
DuckDB SQL: count windows by ROW_NUMBER over (time, arrival), session windows by the
gaps between a key's events and a running sum of them. Events have disorder, late
events and nulls (the oracle's generator)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from oracle import (
    BASE_MS,
    LATENESS_MS,
    assert_features_equal,
    cli_backfill,
    create_accepted,
    make_events,
    make_spine,
    needs_cli,
    sql,
)

# name, agg, column, window ("events", n) or ("session", gap ms), feature filter or
# None, then the aggregation's parameter as in `oracle.FEATURES`.
FEATURES: list[tuple] = [
    ("rows_last_5", "count", None, ("events", 5), None),
    ("amount_count_last_5", "count", "amount", ("events", 5), None),
    ("amount_sum_last_20", "sum", "amount", ("events", 20), None),
    ("amount_mean_last_1", "mean", "amount", ("events", 1), None),
    ("amount_min_last_7", "min", "amount", ("events", 7), None),
    ("amount_max_last_7", "max", "amount", ("events", 7), None),
    ("amount_var_last_20", "var", "amount", ("events", 20), None),
    ("amount_std_last_3", "std", "amount", ("events", 3), None),
    ("amount_last_last_4", "last", "amount", ("events", 4), None),
    ("amount_first_last_4", "first", "amount", ("events", 4), None),
    ("amount_decayed_last_50", "decayed_sum", "amount", ("events", 50), None, 20_000),
    ("amount_distinct_last_50", "approx_distinct", "amount", ("events", 50), None, 12),
    ("amount_p90_last_50", "quantile", "amount", ("events", 50), None, (0.9, 0.01)),
    ("amount_last_3_of_10", "last_n", "amount", ("events", 10), None, 3),
    ("amount_top_2_of_30", "top_k", "amount", ("events", 30), None, (2, 10_000)),
    ("category_last_of_6", "last", "category", ("events", 6), None),
    ("category_top_2_of_40", "top_k", "category", ("events", 40), None, (2, 10_000)),
    # The window is chosen from the view's events first; the filter applies within it.
    ("big_in_last_10", "count", None, ("events", 10), "amount > 110"),
    ("rows_session_2s", "count", None, ("session", 2_000), None),
    ("amount_sum_session_2s", "sum", "amount", ("session", 2_000), None),
    ("amount_mean_session_30s", "mean", "amount", ("session", 30_000), None),
    ("amount_var_session_30s", "var", "amount", ("session", 30_000), None),
    ("amount_min_session_30s", "min", "amount", ("session", 30_000), None),
    ("amount_max_session_2s", "max", "amount", ("session", 2_000), None),
    ("amount_first_session_30s", "first", "amount", ("session", 30_000), None),
    ("amount_last_session_2s", "last", "amount", ("session", 2_000), None),
    ("rows_decayed_session_30s", "decayed_count", None, ("session", 30_000), None, 10_000),
    ("merchant_distinct_session_30s", "approx_distinct", "merchant", ("session", 30_000), None, 12),
    ("amount_median_session_30s", "quantile", "amount", ("session", 30_000), None, (0.5, 0.01)),
    ("amount_last_5_session_2s", "last_n", "amount", ("session", 2_000), None, 5),
    ("category_top_3_session_30s", "top_k", "category", ("session", 30_000), None, (3, 10_000)),
    ("category_first_session_2s", "first", "category", ("session", 2_000), None),
    ("big_in_session_30s", "count", None, ("session", 30_000), "amount > 110"),
]


def feature_file() -> str:
    out = ["[[views]]", 'name = "cards"', 'key = "card"', 'time = "ts"', f'allowed_lateness = "{LATENESS_MS}ms"']
    for name, agg, column, (kind, size), filt, *param in FEATURES:
        out += ["", "[[views.features]]", f'name = "{name}"', f'agg = "{agg}"']
        if column:
            out.append(f'column = "{column}"')
        out.append(f'window = "{size} events"' if kind == "events" else f'session_gap = "{size}ms"')
        if filt:
            out.append(f'filter = "{filt}"')
        if param:
            p = param[0]
            if agg in ("decayed_sum", "decayed_count"):
                out.append(f'half_life = "{p}ms"')
            elif agg == "approx_distinct":
                out.append(f"precision = {p}")
            elif agg == "quantile":
                out += [f"q = {p[0]}", f"relative_accuracy = {p[1]}"]
            elif agg == "last_n":
                out.append(f"n = {p}")
            elif agg == "top_k":
                out += [f"k = {p[0]}", f"capacity = {p[1]}"]
    return "\n".join(out) + "\n"


def oracle(events: pa.Table, spine: pa.Table) -> dict[str, object]:
    """Each feature for each spine row, indexed by the spine's `label` (NaN or None
    for null)."""
    con = duckdb.connect()
    con.register("events_in", events)
    con.register("spine_in", spine)
    create_accepted(con)
    con.execute("CREATE TABLE spine AS SELECT label, card, epoch_ms(ts::TIMESTAMP) AS at FROM spine_in")
    # Every spine row with the key's events at or before its time, newest first.
    con.execute(
        """
        CREATE TABLE joined AS
        SELECT s.label, a.*,
               row_number() OVER (PARTITION BY s.label ORDER BY a.t DESC, a.seq DESC) AS rn
        FROM spine s JOIN acc a ON a.card = s.card AND a.t <= s.at
        """
    )
    n = spine.num_rows
    out: dict[str, object] = {}
    for name, agg, column, (kind, size), filt, *param in FEATURES:
        expr = sql(agg, column, param)
        if filt:
            expr = f"count(a.t) FILTER (WHERE a.{filt})"
        if kind == "events":
            window = f"SELECT * FROM joined WHERE rn <= {size}"
        else:
            # A break where an event is more than the gap after the one before it; the
            # session is the events after the last break, if the last event is within
            # the gap of the read time.
            window = f"""
                WITH b AS (
                    SELECT *, CASE WHEN t - lag(t) OVER (PARTITION BY label ORDER BY t, seq) > {size}
                                   THEN 1 ELSE 0 END AS brk
                    FROM joined
                ), r AS (
                    SELECT *, sum(brk) OVER (PARTITION BY label ORDER BY t, seq ROWS UNBOUNDED PRECEDING) AS sid
                    FROM b
                ), m AS (
                    SELECT *, max(sid) OVER (PARTITION BY label) AS last_sid,
                              max(t) OVER (PARTITION BY label) AS last_t
                    FROM r
                )
                SELECT m.* FROM m JOIN spine s USING (label)
                WHERE sid = last_sid AND s.at - last_t <= {size}
            """
        rows = con.execute(
            f"""
            SELECT s.label, {expr} AS v
            FROM spine s LEFT JOIN ({window}) a ON a.label = s.label
            WHERE s.at IS NOT NULL
            GROUP BY s.label
            """
        ).fetchall()
        if agg == "top_k":
            k = param[0][0]
            tops: list = [None] * n
            for label, hist in rows:
                counts = sorted((hist or {}).items(), key=lambda e: (-e[1], e[0]))
                tops[label] = [v if column == "category" else float(v) for v, _ in counts[:k]]
            out[name] = tops
        elif agg == "last_n" or column == "category" and agg != "count":
            values: list = [None] * n
            for label, value in rows:
                values[label] = list(value) if agg == "last_n" else value
            out[name] = values
        else:
            v = np.full(n, np.nan)
            for label, value in rows:
                v[label] = np.nan if value is None else float(value)
            out[name] = v
    return out


@needs_cli
def test_count_and_session_windows_in_backfill_match_duckdb(tmp_path: Path) -> None:
    rng = np.random.default_rng(20261202)
    events = make_events(rng, 50_000)
    spine = make_spine(rng, 3_000, BASE_MS + 50_000 * 50)
    got = cli_backfill(tmp_path, events, spine, feature_file())
    assert got.column("label").to_pylist() == list(range(3_000)), "spine order is kept"
    cols = {
        name: got.column(name).to_pylist()
        if pa.types.is_list(got.column(name).type) or pa.types.is_string(got.column(name).type)
        else got.column(name).to_numpy(zero_copy_only=False).astype(float)
        for name, *_ in FEATURES
    }
    want = oracle(events, spine)
    # Both kinds must be exercised: windows shorter than the key's history, sessions
    # that hold several events and reads after a session ended.
    assert np.nanmax(want["rows_last_5"]) == 5
    assert np.nanmax(want["rows_session_2s"]) > 3
    assert np.sum(want["rows_session_2s"] == 0) > 100
    assert_features_equal(cols, want, "event windows", features=FEATURES)

"""Definitions, key and time forms, view selection, metrics, repr, threads."""

from __future__ import annotations

import datetime as dt
import threading

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import panes


def cards_view(**kw: object) -> panes.View:
    return panes.View(
        "cards",
        key="card",
        time="ts",
        pane="10s",
        allowed_lateness="5s",
        features=[
            panes.count(window="5m", name="n_5m"),
            panes.sum("amount", window="1h", hop="1m"),
            panes.mean("amount", window="lifetime"),
            panes.last("amount", window="1h", hop="1h", name="last_1h"),
        ],
        **kw,  # type: ignore[arg-type]
    )


def events() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "card": [1, 1, 2, 1],
            "ts": [0, 20_000, 30_000, 40_000],
            "amount": [10.0, 30.0, 5.0, 2.0],
        }
    )


def test_definitions_round_trip_through_toml() -> None:
    engine = panes.Engine([cards_view()])
    text = engine.to_toml()
    again = panes.Engine.from_toml_str(text)
    assert again.to_toml() == text
    assert engine.views == again.views
    v = engine.views[0]
    assert [f.name for f in v.features] == ["n_5m", "amount_sum_1h", "amount_mean_lifetime", "last_1h"]
    assert v.features[0].hop == "10s", "hop defaults to the view's pane"
    assert v.allowed_lateness == "5s" and v.read_time == "event_time"


def test_from_toml_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "features.toml"
    path.write_text(panes.Engine([cards_view()]).to_toml())
    engine = panes.Engine.from_toml(path, backend="scalar")
    assert engine.backend == "scalar"
    assert engine.views[0].name == "cards"


def test_durations_as_timedelta_and_ms() -> None:
    v = panes.View(
        "v", key="k", time="t", pane=dt.timedelta(seconds=30), allowed_lateness=1500,
        features=[panes.max("x", window=dt.timedelta(minutes=5), hop=60_000)],
    )
    engine = panes.Engine(v)
    got = engine.views[0]
    assert (got.pane, got.allowed_lateness) == ("30s", "1500ms")
    assert (got.features[0].window, got.features[0].hop) == ("5m", "1m")


def test_repr_shows_backend_views_and_features() -> None:
    r = repr(panes.Engine([cards_view()], backend="cpu"))
    assert "backend=cpu" in r and "cards" in r
    assert "amount_sum_1h" in r and "sum(amount) over 1h hop 1m" in r


@pytest.mark.parametrize(
    "keys",
    [
        [1, 2, 3],
        (1, 2, 3),
        np.array([1, 2, 3], dtype=np.int32),
        np.array([1, 2, 3], dtype=np.uint64),
        pa.array([1, 2, 3], pa.int16()),
        pa.chunked_array([[1], [2, 3]]),
        pl.Series("card", [1, 2, 3]),
        pd.Series([1, 2, 3]).to_numpy(),
    ],
    ids=["list", "tuple", "np-int32", "np-uint64", "pa-int16", "pa-chunked", "polars", "pandas-numpy"],
)
def test_keys_in_every_form_give_the_same_features(keys: object) -> None:
    engine = panes.Engine([cards_view()])
    engine.push(events())
    got = engine.read(keys)
    assert got["n_5m"].to_list() == [3, 1, 0]
    assert got["amount_sum_1h"].to_list() == [42.0, 5.0, 0.0]
    assert got["last_1h"].to_list() == [2.0, 5.0, None]


def test_string_keys_and_null_keys() -> None:
    v = panes.View("users", key="user", time="ts", features=[panes.count(window="lifetime", name="n")])
    engine = panes.Engine(v)
    engine.push(pa.table({"user": pa.array(["a", "b", "a"], pa.string_view()), "ts": [1, 2, 3]}))
    assert engine.read(["a", "b", None, "zz"])["n"].to_list() == [2, 1, 0, 0]
    assert engine.read(pa.array(["a"], pa.large_string()))["n"].to_list() == [2]


def test_features_select_and_order_and_at_forms() -> None:
    engine = panes.Engine([cards_view()])
    engine.push(events())
    got = engine.read([1], features=["last_1h", "n_5m"])
    assert got.columns == ["card", "last_1h", "n_5m"]
    # The same time in every accepted form.
    for at in (40_000, dt.datetime(1970, 1, 1, 0, 0, 40), dt.datetime(1970, 1, 1, 0, 0, 40, tzinfo=dt.UTC),
               np.datetime64(40, "s"), "1970-01-01T00:00:40Z", "1970-01-01 00:00:40"):
        assert engine.read([1], at=at)["n_5m"].to_list() == [3], at
    # A later time: the 5-minute window has moved past every event.
    assert engine.read([1], at=dt.datetime(1970, 1, 1, 1))["n_5m"].to_list() == [0]


def test_several_views_are_chosen_by_columns_or_features() -> None:
    users = panes.View("users", key="user", time="ts", features=[panes.count(window="lifetime", name="user_n")])
    engine = panes.Engine([cards_view(), users])
    assert engine.push(events()).view == "cards"
    assert engine.push(pl.DataFrame({"user": ["u"], "ts": [5]})).view == "users"
    assert engine.read(["u"], features=["user_n"])["user_n"].to_list() == [1]
    assert engine.read([1], view="cards")["n_5m"].to_list() == [3]
    with pytest.raises(panes.DataError, match="pass view= or features="):
        engine.read([1])
    with pytest.raises(panes.DataError, match="different views"):
        engine.read([1], features=["n_5m", "user_n"])
    both = pl.DataFrame({"card": [1], "user": ["u"], "ts": [50_000], "amount": [1.0]})
    with pytest.raises(panes.DataError, match="several views"):
        engine.push(both)
    assert engine.push(both, view="users").accepted == 1


def test_new_keys_past_max_keys_or_the_memory_budget_are_rejected() -> None:
    engine = panes.Engine([cards_view(max_keys=2)])
    r = engine.push(pl.DataFrame({"card": [1, 2, 3, 1], "ts": [1, 2, 3, 4], "amount": [1.0] * 4}))
    assert (r.accepted, r.rejected) == (3, 1)
    assert r.rejections[0][:2] == (2, "key_limit")
    assert "max_keys = 2" in r.rejections[0][2]
    assert engine.metrics()["cards"]["rejected"]["key_limit"] == 1
    assert "max_keys = 2" in engine.to_toml()

    budget = panes.Engine([cards_view()], max_state_bytes=1)
    r = budget.push(pl.DataFrame({"card": [1], "ts": [1], "amount": [1.0]}))
    assert r.rejected == 1 and "state memory budget" in r.rejections[0][2]
    capped = panes.Engine([cards_view()], max_keys=1)
    assert capped.push(pl.DataFrame({"card": [1, 2], "ts": [1, 2], "amount": [1.0, 2.0]})).rejected == 1


def test_push_reports_and_metrics_count_every_row() -> None:
    engine = panes.Engine([cards_view()])
    data = pa.table(
        {
            "card": pa.array([1, None, 1, 1, 2], pa.int64()),
            "ts": pa.array(["1970-01-01T00:01:00Z", "1970-01-01T00:01:00Z", "not a time", None, "1970-01-01T00:00:10Z"]),
            "amount": pa.array([1.0, 2.0, 3.0, 4.0, None]),
        }
    )
    r = engine.push(data)
    assert (r.accepted, r.late, r.rejected) == (1, 1, 3)
    assert [(row, reason) for row, reason, _ in r.rejections] == [(1, "null_key"), (2, "bad_time"), (3, "null_time")]
    assert "not a time" in r.rejections[1][2]
    m = engine.metrics()["cards"]
    assert m["accepted"] == 1 and m["late"] == 1
    assert m["rejected"] == {"null_key": 1, "null_time": 1, "bad_time": 1, "schema": 0, "key_limit": 0}
    assert m["max_event_time"] == 60_000 and m["watermark"] == 55_000
    assert m["keys"] == 1 and m["backend"] in ("cpu", "scalar")
    engine.flush()
    m = engine.metrics()["cards"]
    assert m["pending"] == 0 and m["state_bytes"] > 0


def test_read_copies_cost_memory_and_change_no_value() -> None:
    engines = [panes.Engine([cards_view()], backend="cpu", read_copy=keep) for keep in (True, False)]
    rng = np.random.default_rng(5)
    for minute in range(0, 60, 3):  # a fold per push: older panes go quiet and get copied
        n = 2_000
        data = pa.table(
            {
                "card": pa.array(rng.integers(0, 500, n), pa.int64()),
                "ts": pa.array(minute * 60_000 + np.sort(rng.integers(0, 180_000, n)), pa.int64()),
                "amount": pa.array(rng.normal(100.0, 30.0, n)),
            }
        )
        for e in engines:
            e.push(data)
            e.flush()
    kept, plain = (e.metrics()["cards"]["state_bytes"] for e in engines)
    assert kept > plain, (kept, plain)
    keys = list(range(-5, 505))
    assert engines[0].read(keys).equals(engines[1].read(keys))


def test_read_all_returns_every_key_as_read_does() -> None:
    engine = panes.Engine([cards_view()], backend="cpu")
    assert engine.read_all().height == 0
    rng = np.random.default_rng(3)
    n = 20_000
    engine.push(pa.table({
        "card": pa.array(rng.integers(-50, 950, n), pa.int64()),
        "ts": pa.array(np.sort(rng.integers(0, 1_800_000, n)), pa.int64()),
        "amount": pa.array(rng.normal(100.0, 30.0, n)),
    }))
    every = engine.read_all()
    assert every.columns == ["card", "n_5m", "amount_sum_1h", "amount_mean_lifetime", "last_1h"]
    assert every["card"].n_unique() == every.height == engine.metrics()["cards"]["keys"]
    keys = every["card"].to_list()
    assert every.equals(engine.read(keys))
    # A read time and a selection of features, as for `read`, and its errors.
    at = 1_900_000
    assert engine.read_all(at=at, features=["amount_sum_1h", "n_5m"]).equals(
        engine.read(keys, at=at, features=["amount_sum_1h", "n_5m"]))
    with pytest.raises(panes.InexactReadError, match="cannot read key"):
        engine.read_all(at=1_000, features=["last_1h"])
    # String keys come back as strings.
    text = panes.Engine([cards_view()])
    text.push(events().with_columns(pl.format("card-{}", pl.col("card")).alias("card")))
    assert sorted(text.read_all()["card"].to_list()) == ["card-1", "card-2"]


def test_backfill_from_files_with_dead_letters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    engine = panes.Engine([cards_view()])
    ev = events().with_columns(pl.col("card").cast(pl.Int64)).vstack(
        pl.DataFrame({"card": [1], "ts": [0], "amount": [99.0]})  # late: 40 s behind
    )
    ev.write_parquet(tmp_path / "events.parquet")
    spine = pl.DataFrame({"card": [1, 2], "when": [25_000, 40_000]})
    pq.write_table(spine.to_arrow(), tmp_path / "spine.parquet")
    res = engine.backfill_report(tmp_path / "events.parquet", str(tmp_path / "spine.parquet"), at_column="when",
                                 dead_letter=True)
    assert res.features["n_5m"].to_list() == [2, 1]
    assert res.dead_letter is not None
    assert res.dead_letter["panes_reason"].to_list() == ["late"]
    assert res.report["views"]["cards"]["late"] == 1
    # The online state is untouched by a backfill.
    assert engine.metrics()["cards"]["accepted"] == 0


def test_an_engine_is_safe_to_share_between_threads() -> None:
    """Four threads push disjoint keys while others read; the end state equals one
    thread pushing everything."""
    v = panes.View("v", key="k", time="ts", allowed_lateness="10s",
                   features=[panes.count(window="lifetime", name="n"), panes.sum("x", window="lifetime", name="s"),
                             panes.last("x", window="lifetime", name="l")])
    shared = panes.Engine(v, batch_rows=512)
    rng = np.random.default_rng(5)
    parts = []
    for t in range(4):
        n = 20_000
        parts.append(pa.table({"k": rng.integers(0, 50, n) * 4 + t, "ts": rng.integers(0, 10_000, n),
                               "x": rng.random(n)}))
    errors: list[BaseException] = []

    def pusher(t: pa.Table) -> None:
        try:
            for b in t.to_batches(max_chunksize=1_000):
                shared.push(b)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(200):
                got = shared.read(list(range(200)))
                assert got.height == 200
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=pusher, args=(p,)) for p in parts] + [threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    alone = panes.Engine(v)
    for p in parts:
        alone.push(p)
    keys = list(range(200))
    a, b = shared.read(keys), alone.read(keys)
    assert a["n"].to_list() == b["n"].to_list()
    assert a["l"].to_list() == b["l"].to_list()
    np.testing.assert_allclose(a["s"].to_numpy(), b["s"].to_numpy(), rtol=1e-12)


def test_gpu_backend_reads_equal_the_cpu() -> None:
    # The test command installs a Vulkan driver (lavapipe where there is no GPU).
    rng = np.random.default_rng(5)
    n = 50_000
    data = pa.table({
        "card": rng.integers(0, 300, n),
        "ts": np.sort(rng.integers(0, 3_600_000, n)),
        "amount": np.where(rng.random(n) < 0.05, np.nan, rng.normal(100, 30, n)),
    })
    reads = []
    for backend in ("cpu", "gpu"):
        engine = panes.Engine([cards_view()], backend=backend, batch_rows=7_000)
        assert engine.backend == backend
        engine.push(data)
        reads.append(engine.read(list(range(300)), as_numpy=True))
    np.testing.assert_allclose(reads[1], reads[0], rtol=1e-9, equal_nan=True)


def test_gpu_backend_sketches_and_lists_equal_the_cpu() -> None:
    # approx_distinct, quantile, top_k and last_n fold on the GPU with the CPU's bits.
    rng = np.random.default_rng(6)
    n = 30_000
    data = pa.table({
        "card": rng.integers(0, 200, n),
        "ts": np.sort(rng.integers(0, 3_600_000, n)),
        "merchant": rng.integers(0, 40, n),
        "amount": np.where(rng.random(n) < 0.05, np.nan, rng.lognormal(3, 2, n)),
    })
    view = panes.View(
        "cards",
        key="card",
        time="ts",
        features=[
            panes.approx_distinct("merchant", window="10m", hop="1m", name="merchants"),
            panes.approx_distinct("amount", window="lifetime", name="amounts"),
            panes.quantile("amount", 0.9, window="10m", hop="1m", name="p90"),
            panes.top_k("merchant", 3, window="lifetime", name="top"),
            panes.last_n("amount", 4, window="30m", hop="5m", name="recent"),
        ],
    )
    reads = []
    for backend in ("cpu", "gpu"):
        engine = panes.Engine([view], backend=backend, batch_rows=7_000)
        assert engine.backend == backend
        engine.push(data)
        reads.append(engine.read(list(range(200))))
    cpu, gpu = reads
    assert cpu["merchants"].max() > 5 and cpu["amounts"].max() > 64
    assert gpu.equals(cpu, null_equal=True)


def test_count_and_session_windows() -> None:
    view = panes.View(
        "visits",
        key="user",
        time="ts",
        allowed_lateness="1m",
        features=[
            panes.mean("amount", window="3 events"),
            panes.last_n("page", 2, window="10 events", name="pages"),
            panes.count(session_gap="30m", name="session_events"),
            panes.sum("amount", session_gap="30m"),
        ],
    )
    names = [f.name for f in view.features]
    assert names == ["amount_mean_3_events", "pages", "session_events", "amount_sum_session_30m"]
    assert repr(view.features[2]) == "<Feature session_events: count() over sessions (gap 30m)>"
    engine = panes.Engine([view], backend="cpu")
    assert engine.views == panes.Engine.from_toml_str(engine.to_toml()).views
    f = engine.views[0].features
    assert (f[0].window, f[0].hop, f[2].window, f[2].session_gap) == ("3 events", None, None, "30m")
    minute = 60_000
    engine.push(
        pl.DataFrame(
            {
                "user": [2, 1, 1, 1, 1],
                "ts": [0, 0, 10 * minute, 50 * minute, 55 * minute],
                "amount": [16.0, 1.0, 2.0, 4.0, 8.0],
                "page": ["e", "a", "b", "c", "d"],
            }
        )
    )
    got = engine.read([1, 2, 3], at=56 * minute)
    assert got["amount_mean_3_events"].to_list() == [14 / 3, 16.0, None]
    assert got["pages"].to_list() == [["d", "c"], ["e"], []]
    # User 1's session started at 50 min (40 min after the event before); user 2's
    # ended more than 30 min before the read.
    assert got["session_events"].to_list() == [2, 0, 0]
    assert got["amount_sum_session_30m"].to_list() == [12.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="not both"):
        panes.count(window="5m", session_gap="30m")
    with pytest.raises(TypeError, match="not both"):
        panes.count()

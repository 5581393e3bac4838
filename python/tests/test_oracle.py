"""The Python API against the DuckDB oracle, on random data, for every aggregation ×
window kind, through push + read and through backfill, with pyarrow, polars and
pandas inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import panes
from oracle import BASE_MS, FEATURES, STRINGS, assert_features_equal, feature_file, make_events, make_spine, oracle

FORMATS = {
    "pyarrow": lambda t: t,
    "pyarrow-batches": lambda t: pa.RecordBatchReader.from_batches(t.schema, t.to_batches(max_chunksize=7_000)),
    "polars": lambda t: pl.from_arrow(t),
    # pandas with Arrow-backed columns keeps nullable integer keys and times intact.
    "pandas": lambda t: t.to_pandas(types_mapper=pd.ArrowDtype),
}
NAMES = [f[0] for f in FEATURES]
LISTS = [f[0] for f in FEATURES if f[1] in ("last_n", "top_k")]
NUMBERS = [n for n in NAMES if n not in LISTS and n not in STRINGS]


def columns(df: pl.DataFrame) -> dict:
    """Each feature column: lists as Python lists, the rest as float64 with NaN for null."""
    return {
        n: df[n].to_list() if n in LISTS or n in STRINGS else df[n].cast(pl.Float64).fill_null(np.nan).to_numpy()
        for n in NAMES
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_backfill_matches_oracle(fmt: str) -> None:
    rng = np.random.default_rng(11)
    events = make_events(rng, 60_000)
    spine = make_spine(rng, 3_000, BASE_MS + 60_000 * 50)
    engine = panes.Engine.from_toml_str(feature_file())
    got = engine.backfill(FORMATS[fmt](events), FORMATS[fmt](spine))
    assert isinstance(got, pl.DataFrame)
    assert got["label"].to_list() == list(range(3_000)), "spine order is kept"
    assert got.columns[: len(spine.column_names)] == spine.column_names
    assert_features_equal(columns(got), oracle(events, spine), f"backfill[{fmt}]")


@pytest.mark.parametrize("fmt", ["pyarrow", "polars", "pandas"])
def test_push_then_read_matches_oracle_at_every_step(fmt: str) -> None:
    """Events pushed in random-size chunks; after each chunk every key is read at the
    latest event time and compared with the oracle of the events pushed so far."""
    rng = np.random.default_rng(29)
    events = make_events(rng, 40_000, keys=300)
    keys = np.arange(310)
    engine = panes.Engine.from_toml_str(feature_file(), batch_rows=4096)
    pushed = 0
    accepted = late = rejected = 0
    while pushed < events.num_rows:
        n = int(rng.integers(1, 9_000))
        chunk = events.slice(pushed, n)
        report = engine.push(FORMATS[fmt](chunk))
        accepted, late, rejected = accepted + report.accepted, late + report.late, rejected + report.rejected
        pushed += chunk.num_rows
        got = engine.read(keys)
        assert got.columns == ["card", *NAMES]
        m = engine.metrics()["cards"]
        at = m["max_event_time"]
        spine = pa.table(
            {
                "label": np.arange(len(keys)),
                "card": keys,
                "ts": pa.array(np.full(len(keys), at), pa.int64()).cast(pa.timestamp("ms")),
            }
        )
        want = oracle(events.slice(0, pushed), spine)
        assert_features_equal(columns(got), want, f"read[{fmt}] after {pushed} events")
    m = engine.metrics()["cards"]
    assert (m["accepted"], m["late"], sum(m["rejected"].values())) == (accepted, late, rejected)
    assert accepted + late + rejected == events.num_rows, "every event is accounted for"
    assert late > 0 and rejected > 0


def test_read_as_numpy_matches_dataframe() -> None:
    rng = np.random.default_rng(3)
    events = make_events(rng, 20_000, keys=50)
    engine = panes.Engine.from_toml_str(feature_file())
    engine.push(events)
    keys = list(range(60))
    df = engine.read(keys)
    with pytest.raises(ValueError, match="list-valued"):
        engine.read(keys, as_numpy=True)
    with pytest.raises(ValueError, match='"category_first_5m", whose values are strings'):
        engine.read(keys, features=["rows_1m", "category_first_5m"], as_numpy=True)
    assert df["category_last"].dtype == pl.String
    assert df["category_top_2"].dtype == pl.List(pl.String)
    arr = engine.read(keys, features=NUMBERS, as_numpy=True)
    assert arr.shape == (60, len(NUMBERS)) and arr.dtype == np.float64
    want = df.select(NUMBERS).cast(pl.Float64).fill_null(np.nan).to_numpy()
    np.testing.assert_array_equal(arr, want)
    assert np.isnan(arr[55, NUMBERS.index("amount_mean_5m")]), "unknown key: null mean is NaN"
    assert arr[55, NUMBERS.index("rows_1m")] == 0
    assert df["amount_last_20"][55].to_list() == [], "unknown key: an empty list"

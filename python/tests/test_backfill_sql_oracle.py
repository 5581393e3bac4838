"""`panes backfill` (the CLI) checked against the DuckDB oracle of DESIGN §3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from oracle import (
    BASE_MS,
    assert_features_equal,
    cli_backfill,
    feature_file,
    make_events,
    make_spine,
    needs_cli,
    oracle,
)

@needs_cli
def test_cli_backfill_matches_duckdb_oracle(tmp_path: Path) -> None:
    rng = np.random.default_rng(20261126)
    events = make_events(rng, 200_000)
    spine = make_spine(rng, 5_000, BASE_MS + 200_000 * 50)
    got = cli_backfill(tmp_path, events, spine, feature_file(), row_group_size=50_000)
    assert got.column("label").to_pylist() == list(range(5_000)), "spine order is kept"
    null_at = np.array(got.column("ts").is_null())
    cols = {
        n: got.column(n).to_pylist()
        if pa.types.is_list(got.column(n).type) or pa.types.is_string(got.column(n).type)
        else got.column(n).to_numpy(zero_copy_only=False).astype(float)
        for n in got.column_names
    }
    for name in cols:
        if name in ("label", "card", "ts"):
            continue
        if isinstance(cols[name], list):
            assert all(cols[name][r] is None for r in np.flatnonzero(null_at)), f"{name}: rows without a time get nulls"
        else:
            assert np.all(np.isnan(cols[name][null_at])), f"{name}: rows without a time get nulls"
    assert_features_equal(cols, oracle(events, spine), "cli backfill")

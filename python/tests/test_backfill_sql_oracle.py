"""`panes backfill` (the CLI) checked against the DuckDB oracle of DESIGN §3."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oracle import BASE_MS, assert_features_equal, feature_file, make_events, make_spine, oracle

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))


@pytest.mark.skipif(
    not PANES.exists() and "PANES_BIN" not in os.environ,
    reason="the CLI is not built (cargo build -p panes-engine); the test command always builds it",
)
def test_cli_backfill_matches_duckdb_oracle(tmp_path: Path) -> None:
    rng = np.random.default_rng(20261126)
    events = make_events(rng, 200_000)
    spine = make_spine(rng, 5_000, BASE_MS + 200_000 * 50)
    pq.write_table(events, tmp_path / "events.parquet", row_group_size=50_000)
    pq.write_table(spine, tmp_path / "spine.parquet")
    (tmp_path / "features.toml").write_text(feature_file())
    out_path = tmp_path / "out.parquet"
    run = subprocess.run(
        [
            str(PANES), "backfill",
            "--features", str(tmp_path / "features.toml"),
            "--events", str(tmp_path / "events.parquet"),
            "--spine", str(tmp_path / "spine.parquet"),
            "--out", str(out_path),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    got = pq.read_table(out_path)
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

"""The benchmark harness: its correctness pre-check catches a planted difference, and a
tiny run writes the JSON, Markdown and PNG report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
import harness  # noqa: E402


@pytest.fixture(scope="module")
def answers() -> tuple[pl.DataFrame, dict[str, pl.DataFrame], list[dict[str, object]]]:
    table = harness.events(30_000, 300, string_keys=False)
    feats = harness.workload()
    at = harness.BASE_MS + (29_999 * 1000) // harness.EVENTS_PER_SECOND
    ref, _ = harness.run_panes(table, 4096, "cpu")
    peers = {"duckdb": harness.run_duckdb(table, feats, at), "polars": harness.run_polars(table, feats, at)}
    return ref, peers, feats


def test_peers_agree_with_panes(answers) -> None:  # type: ignore[no-untyped-def]
    ref, peers, feats = answers
    for name, out in peers.items():
        harness.check(ref, out, feats, name)


@pytest.mark.parametrize("feature", ["amount_sum_5m", "txn_count_1d", "amount_last_1d", "amount_std_1h"])
def test_a_planted_difference_fails_the_run(answers, feature: str) -> None:  # type: ignore[no-untyped-def]
    ref, peers, feats = answers
    peer = peers["duckdb"]
    # Change one key's value by a relative 1e-7: beyond the 1e-9 tolerance.
    planted = peer.with_columns(
        pl.when(pl.int_range(pl.len()) == 7)
        .then(pl.col(feature) * (1 + 1e-7) + 1e-7)
        .otherwise(pl.col(feature))
        .alias(feature)
    )
    with pytest.raises(harness.Mismatch, match=feature):
        harness.check(ref, planted, feats, "duckdb")


def test_a_missing_key_or_null_fails_the_run(answers) -> None:  # type: ignore[no-untyped-def]
    ref, peers, feats = answers
    with pytest.raises(harness.Mismatch, match="keys"):
        harness.check(ref, peers["polars"].head(10), feats, "polars")
    nulled = peers["polars"].with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("amount_mean_1h")).alias("amount_mean_1h")
    )
    with pytest.raises(harness.Mismatch, match="amount_mean_1h"):
        harness.check(ref, nulled, feats, "polars")


def test_a_tiny_run_writes_the_report(tmp_path: Path) -> None:
    report = harness.main(
        ["--events", "20000", "--keys", "200", "--repeats", "1", "--skip-nexmark", "--out", str(tmp_path)]
    )
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["bandwidth_bytes_per_s"] > 0
    engines = data["synthetic"][0]["engines"]
    assert {"panes-cpu", "panes-scalar", "duckdb", "polars"} <= set(engines)
    md = (tmp_path / "report.md").read_text()
    assert "| 20,000 | 200 | Int64 |" in md
    # The backfill case ran, checked against both peers.
    assert {"panes-cpu", "duckdb", "polars"} <= set(data["backfill"]["engines"])
    assert "## Backfill" in md
    for png in report["plots"]:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_nexmark_queries_agree_with_the_peers() -> None:
    """The two Nexmark windows on a bid stream of the generator's shape (the generator
    itself is a Rust binary, run by the harness)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(4)
    n = 20_000
    bids = pa.table({
        "auction": rng.integers(1000, 1300, n),
        "bidder": rng.integers(0, 500, n),
        "price": rng.integers(100, 10_000, n),
        "date_time": pa.array(harness.BASE_MS + np.arange(n) * 3, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "all": np.zeros(n, dtype=np.int64),
    })
    for view in harness.NEXMARK_QUERIES:
        r = harness.nexmark_case(bids, view, "cpu", 1, peers=True)  # raises on disagreement
        assert {"panes-cpu", "duckdb", "polars"} <= set(r["engines"])


def test_plots_of_the_committed_results(tmp_path: Path) -> None:
    """`benches/plots.py` draws the serving and GPU plots from the committed JSON."""
    import shutil

    import plots  # noqa: E402  (benches/, on the path above)

    results = Path(harness.__file__).parent / "results"
    for sub in ("serve", "gpu-h100", "gpu-lavapipe"):
        shutil.copytree(results / sub, tmp_path / sub)
    written = plots.main(tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in written)
    assert names == ["gpu-h100/throughput.png", "gpu-lavapipe/throughput.png", "serve/latency.png"]
    for p in written:
        assert p.stat().st_size > 10_000, p

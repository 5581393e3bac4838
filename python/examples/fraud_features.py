"""Fraud-style features on synthetic card transactions, end to end.

1. define per-card features (counts, sums, means, spread, last amount over
   several windows);
2. stream transactions into an engine, as a payment service would;
3. read a feature vector for a scoring request;
4. backfill a point-in-time training set from the same history;
5. fit a small scikit-learn model on it and score the live vector.

Run: python python/examples/fraud_features.py
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

import panes

DAY_MS = 86_400_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def transactions(rng: np.random.Generator, cards: int = 2_000, days: int = 7) -> pl.DataFrame:
    """Ordinary spending, plus fraud bursts: a stolen card is used many times within
    minutes for larger amounts."""
    n = cards * days * 6
    normal = pl.DataFrame(
        {
            "card": rng.integers(0, cards, n),
            "ts": START_MS + rng.integers(0, days * DAY_MS, n),
            "amount": np.round(rng.lognormal(3.2, 0.8, n), 2),
            "fraud": np.zeros(n, dtype=np.int8),
        }
    )
    bursts = []
    for card in rng.choice(cards, size=cards // 20, replace=False):
        t0 = START_MS + int(rng.integers(DAY_MS, days * DAY_MS))
        k = int(rng.integers(4, 12))
        bursts.append(
            pl.DataFrame(
                {
                    "card": np.full(k, card),
                    "ts": t0 + np.sort(rng.integers(0, 15 * 60_000, k)),
                    "amount": np.round(rng.lognormal(4.6, 0.7, k), 2),
                    "fraud": np.ones(k, dtype=np.int8),
                }
            )
        )
    events = pl.concat([normal, *bursts]).sort("ts")
    # Arrival is a little out of order, as from real payment gateways.
    jitter = rng.integers(0, 2_000, events.height)
    return events.with_columns(
        ts=pl.from_epoch(pl.col("ts"), time_unit="ms").dt.replace_time_zone("UTC"),
        arrival=pl.col("ts") + jitter,
    ).sort("arrival").drop("arrival")


def main() -> None:
    rng = np.random.default_rng(7)
    cards = panes.View(
        "cards",
        key="card",
        time="ts",
        pane="1m",
        allowed_lateness="5s",
        features=[
            panes.count(window="10m", name="tx_10m"),
            panes.count(window="1h", hop="5m", name="tx_1h"),
            panes.sum("amount", window="10m", name="amount_sum_10m"),
            panes.max("amount", window="1h", hop="5m", name="amount_max_1h"),
            panes.mean("amount", window="1d", hop="1h", name="amount_mean_1d"),
            panes.std("amount", window="1d", hop="1h", name="amount_std_1d"),
            panes.last("amount", window="lifetime", name="amount_last"),
            panes.count(window="lifetime", name="tx_lifetime"),
        ],
    )
    engine = panes.Engine([cards])
    print(engine)

    # 2. Stream: a week of transactions arriving in micro-batches.
    events = transactions(rng)
    t0 = time.perf_counter()
    accepted = late = 0
    for batch in events.drop("fraud").iter_slices(20_000):
        r = engine.push(batch)
        accepted, late = accepted + r.accepted, late + r.late
    dt = time.perf_counter() - t0
    print(f"\npushed {events.height:,} transactions in {dt:.2f} s "
          f"({events.height / dt / 1e6:.2f} M/s): {accepted:,} accepted, {late:,} late")

    # 3. A scoring request: the latest features of three cards.
    scoring = engine.read([3, 14, 15])
    print("\nfeature vectors for a scoring request:")
    print(scoring)

    # 4. Training set: every transaction, with the features as of its own time.
    spine = events.select("card", "ts", "fraud")
    train = engine.backfill(events.drop("fraud"), spine, at_column="ts")
    names = [f.name for f in cards.features]
    print(f"\nbackfilled {train.height:,} training rows")

    # Online and offline agree: the last transaction of a card, backfilled at its
    # time, has the feature vector the online engine serves at that time.
    last = train.sort("ts").group_by("card", maintain_order=True).last().head(5)
    online = pl.concat(
        [engine.read([row["card"]], at=row["ts"]) for row in last.iter_rows(named=True)]
    )
    assert online.select(names).equals(last.select(names)), "online and backfill disagree"

    # 5. Fit on the first five days, evaluate on the rest.
    split = START_MS + 5 * DAY_MS
    x = train.select(names).to_numpy()
    y = train["fraud"].to_numpy()
    is_train = (train["ts"].dt.epoch("ms") < split).to_numpy()
    model = HistGradientBoostingClassifier(max_iter=100, random_state=0)
    model.fit(x[is_train], y[is_train])
    auc = roc_auc_score(y[~is_train], model.predict_proba(x[~is_train])[:, 1])
    print(f"held-out ROC AUC: {auc:.3f}")
    assert auc > 0.9, f"the features should separate fraud bursts (AUC {auc:.3f})"

    scores = model.predict_proba(engine.read([3, 14, 15], as_numpy=True))[:, 1]
    print("live fraud scores:", np.round(scores, 3))
    m = engine.metrics()["cards"]
    print(f"\nengine: {m['keys']:,} cards, {m['state_bytes'] / 2**20:.1f} MiB of state, "
          f"watermark {m['watermark']}, backend {m['backend']}")


if __name__ == "__main__":
    main()

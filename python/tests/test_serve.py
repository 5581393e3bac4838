"""`panes serve` from Python: the gRPC client (panes.client) and Arrow Flight
(pyarrow.flight) against a real server process on loopback, checked against the
in-process engine fed the same events."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest

import panes
from panes.client import Client, ServerError

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))

pytestmark = pytest.mark.skipif(
    not PANES.exists() and "PANES_BIN" not in os.environ,
    reason="the CLI is not built (cargo build -p panes-engine); the test command always builds it",
)

VIEWS = [
    panes.View(
        "cards",
        key="card",
        time="ts",
        pane="1s",
        allowed_lateness="2s",
        features=[
            panes.count(window="1m", name="n_1m"),
            panes.sum("amount", window="1m", name="amount_sum_1m"),
            panes.max("amount", window="10m", hop="10s", name="amount_max_10m"),
            panes.mean("amount", window="lifetime", name="amount_mean_life"),
            panes.first("amount", window="1m", name="amount_first_1m"),
            panes.decayed_sum("amount", half_life="30s", window="1m", name="amount_decayed_1m"),
            panes.approx_distinct("amount", window="10m", hop="10s", name="amounts_10m"),
            panes.quantile("amount", 0.9, window="10m", hop="10s", name="amount_p90_10m"),
            panes.last_n("amount", 3, window="1m", name="amount_last_3"),
        ],
    ),
    panes.View(
        "users",
        key="user",
        time="ts",
        filter="user IS NULL OR user <> 'mallory'",
        columns={"initial": "upper(left(user, 1))"},
        features=[panes.count(window="1h", name="clicks_1h", filter="initial <> 'Z'")],
    ),
    panes.View(
        "clicks",
        key="user",
        time="ts",
        features=[
            panes.first("category", window="lifetime", name="first_category"),
            panes.last_n("category", 3, window="lifetime", name="recent_categories"),
            panes.top_k("category", 2, window="lifetime", name="top_categories"),
            panes.count("category", window="lifetime", name="categories"),
        ],
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    d = tmp_path_factory.mktemp("serve")
    features = d / "features.toml"
    features.write_text("\n".join(v.to_toml() for v in VIEWS))
    proc = subprocess.Popen(
        [str(PANES), "serve", "--features", str(features), "--listen", "127.0.0.1:0",
         "--metrics", "127.0.0.1:0", "--batch-age-ms", "2", "--max-keys", "1000",
         "--backend", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"gRPC \+ Flight on (\S+), metrics on http://(\S+)/metrics", line)
    assert m, line
    yield {"grpc": m.group(1).rstrip(","), "metrics": m.group(2)}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


def events(n: int, seed: int, t0: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    amount = rng.uniform(1, 500, n).round()
    return pa.table(
        {
            "card": pa.array(rng.integers(0, 40, n), pa.int64()),
            "ts": pa.array(t0 + np.arange(n) * 5 - rng.integers(0, 300, n), pa.int64()),
            "amount": pa.array(amount, mask=rng.random(n) < 0.05),
        }
    )


NUMBERS = [f.name for f in VIEWS[0].features if f.agg != "last_n"]


def oracle(tables: list[pa.Table], keys: list[int], at_ms: int, lists: bool = False):
    """The numeric features of `keys` at `at_ms` (or, with `lists`, the DataFrame)."""
    engine = panes.Engine(VIEWS, backend="scalar")
    for t in tables:
        engine.push(t, view="cards")
    if lists:
        return engine.read(keys, view="cards", at=at_ms)
    return engine.read(keys, view="cards", at=at_ms, features=NUMBERS, as_numpy=True)


def wait_published(c: Client, version: int = 1) -> None:
    import time

    deadline = time.monotonic() + 10
    while c.get_features("cards", [0]).state_version < version:
        assert time.monotonic() < deadline, "never published"
        time.sleep(0.005)


def test_grpc_client_round_trip(server: dict[str, str]) -> None:
    t = events(5_000, 1, 10_000_000)
    with Client(server["grpc"]) as c:
        r = c.ingest("cards", t, batch_rows=1_000)
        assert r.messages == 5
        assert r.accepted + r.late == 5_000
        wait_published(c)
        keys = list(range(45))
        at = 10_000_000 + 5_000 * 5 + 1_000
        f = c.get_features("cards", keys, at_ms=at)
        assert f.names == [*NUMBERS, "amount_last_3"]
        assert f.values.shape == (45, 9)
        expected = oracle([t], keys, at)
        # The server folds on the CPU backend, the oracle on Scalar: sums agree to 1e-9.
        np.testing.assert_allclose(np.where(f.valid, f.values, np.nan)[:, :8], expected, rtol=1e-9)
        want_lists = oracle([t], keys, at, lists=True)["amount_last_3"].to_list()
        assert f.lists["amount_last_3"] == want_lists
        assert list(f.values[:, 8]) == [len(x) for x in want_lists], "values hold the lengths"
        assert want_lists[0] and want_lists[44] == []
        assert np.all(f.values[:40, 6] > 0) and np.all(f.values[40:, 6] == 0)
        assert (f.latest_event_ms[:40] > 0).all()
        assert (f.latest_event_ms[40:] == np.iinfo(np.int64).min).all()
        assert int(f.window_events.sum()) == r.accepted
        # Keys with no events: every list feature is there, with empty lists.
        f = c.get_features("cards", [41, 44], at_ms=at)
        assert f.lists == {"amount_last_3": [[], []]}

        sub = c.get_features("cards", [1, 2], features=["amount_mean_life"], at_ms=at)
        assert sub.names == ["amount_mean_life"]

        rows = c.ingest_rows(
            "users", [("ann", 1_000, []), ("bob", 2_000, []), (None, 3_000, [])], columns=[]
        )
        assert (rows.accepted, rows.rejected) == (2, 1)
        assert rows.rejections[0]["field"] == "user"

        views = c.list_features()
        assert [v["name"] for v in views] == ["cards", "users", "clicks"]
        users = c.describe_view("users")
        assert users["filter"] == "user IS NULL OR user <> 'mallory'"
        assert users["columns"] == {"initial": "upper(left(user, 1))"}
        assert users["features"][0]["filter"] == "initial <> 'Z'"
        d = c.describe_view("cards")
        assert (d["filter"], d["columns"]) == (None, {})
        assert (d["key"], d["key_kind"], d["time"]) == ("card", "int", "ts")
        assert d["features"][2]["window_ms"] == 600_000
        params = [(f["half_life_ms"], f["precision"], f["q"], f["relative_accuracy"], f["n"], f["dtype"])
                  for f in d["features"][5:]]
        assert params == [(30_000, None, None, None, None, "float64"), (None, 12, None, None, None, "int64"),
                          (None, None, 0.9, 0.01, None, "float64"), (None, None, None, None, 3, "list<float64>")]


def test_grpc_client_errors(server: dict[str, str]) -> None:
    with Client(server["grpc"]) as c:
        with pytest.raises(ServerError) as e:
            c.get_features("nope", [1])
        assert e.value.code == "INVALID_ARGUMENT"
        assert "unknown view" in str(e.value)
        with pytest.raises(ServerError) as e:
            c.get_features("cards", [1], features=["nope"])
        assert e.value.code == "INVALID_ARGUMENT"
        with pytest.raises(ServerError) as e:
            c.get_features("cards", list(range(1_001)))
        assert e.value.code == "RESOURCE_EXHAUSTED"
        with pytest.raises(ServerError) as e:
            c.ingest("nope", events(10, 2, 0))
        assert e.value.code == "INVALID_ARGUMENT"


def test_flight_do_put_and_do_get(server: dict[str, str]) -> None:
    client = flight.connect(f"grpc://{server['grpc']}")
    t = events(3_000, 3, 50_000_000)
    writer, reader = client.do_put(flight.FlightDescriptor.for_path("cards"), t.schema)
    counts = []
    for batch in t.to_batches(max_chunksize=1_000):
        writer.write_batch(batch)
        counts.append(json.loads(reader.read().to_pybytes()))
    writer.done_writing()
    writer.close()
    assert len(counts) == 3
    assert sum(c["accepted"] + c["late"] for c in counts) == 3_000

    at = 50_000_000 + 3_000 * 5 + 1_000
    with Client(server["grpc"]) as c:
        import time

        deadline = time.monotonic() + 10
        while c.get_features("cards", [0], at_ms=at).window_events[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    keys = list(range(40))
    ticket = flight.Ticket(json.dumps({"view": "cards", "keys": keys, "at_ms": at}).encode())
    got = client.do_get(ticket).read_all()
    assert got.column_names == ["card", *NUMBERS, "amount_last_3"]
    assert got.column("card").to_pylist() == keys
    assert got.schema.field("n_1m").type == pa.int64()
    assert got.schema.field("amounts_10m").type == pa.int64()
    assert got.schema.field("amount_last_3").type == pa.list_(pa.field("item", pa.float64(), nullable=False))
    assert got.column("amount_last_3").to_pylist() == oracle([t], keys, at, lists=True)["amount_last_3"].to_list()
    got = got.drop_columns(["amount_last_3"])
    # Windows of 1 m and 10 m see only this batch's minute; the lifetime mean spans
    # every test's events, so it is compared through the gRPC read instead.
    with Client(server["grpc"]) as c:
        f = c.get_features("cards", keys, at_ms=at)
    values = got.drop_columns(["card"]).to_pandas().to_numpy(dtype=np.float64)
    np.testing.assert_allclose(values, np.where(f.valid, f.values, np.nan)[:, :8], rtol=1e-12)
    one_minute = oracle([t], keys, at)[:, :3]
    np.testing.assert_allclose(values[:, :3], one_minute, rtol=1e-12)

    # Errors (INVALID_ARGUMENT, which pyarrow raises as ArrowInvalid): unknown view in
    # a ticket, bad JSON, unknown view in DoPut.
    with pytest.raises(pa.ArrowInvalid) as e:
        client.do_get(flight.Ticket(b'{"view": "nope", "keys": [1]}')).read_all()
    assert "unknown view" in str(e.value)
    with pytest.raises(pa.ArrowInvalid) as e:
        client.do_get(flight.Ticket(b"not json")).read_all()
    assert "ticket" in str(e.value)
    with pytest.raises(pa.ArrowInvalid) as e:
        w, r = client.do_put(flight.FlightDescriptor.for_path("nope"), t.schema)
        w.write_table(t)
        w.close()
    assert "unknown view" in str(e.value)
    client.close()


def test_metrics_endpoint(server: dict[str, str]) -> None:
    with Client(server["grpc"]) as c:
        c.ingest("cards", events(100, 4, 90_000_000))
        wait_published(c)
        c.get_features("cards", [1, 2, 3])
    text = urllib.request.urlopen(f"http://{server['metrics']}/metrics", timeout=10).read().decode()
    assert 'panes_backend_info{backend="cpu"} 1' in text
    accepted = float(re.search(r'^panes_events_accepted_total\{view="cards"\} (\S+)$', text, re.M).group(1))
    assert accepted >= 100
    assert re.search(r'^panes_read_duration_seconds_count\{view="cards"\} [1-9]', text, re.M)
    assert re.search(r'^panes_fold_duration_seconds_bucket\{view="cards",le="\+Inf"\} [1-9]', text, re.M)
    assert 'panes_events_rejected_total{view="users",reason="null_key"}' in text
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{server['metrics']}/other", timeout=10)
    assert e.value.code == 404


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    """The committed stubs are what grpcio-tools makes of the proto today."""
    from grpc_tools import protoc

    proto = ROOT / "engine" / "proto"
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
                        str(proto / "panes" / "v1" / "panes.proto")]) == 0
    shipped = ROOT / "python" / "panes" / "v1"
    for name in ["panes_pb2.py", "panes_pb2.pyi", "panes_pb2_grpc.py"]:
        assert (tmp_path / "panes" / "v1" / name).read_text() == (shipped / name).read_text(), name


def test_string_features_over_grpc_and_flight(server: dict[str, str]) -> None:
    rng = np.random.default_rng(8)
    n = 2_000
    words = ["books", "", "toys", "café", "b", "a"]
    t = pa.table(
        {
            "user": pa.array(rng.integers(0, 30, n), pa.int64()),
            "ts": pa.array(1_000_000 + np.arange(n) * 3, pa.int64()),
            "category": pa.array([words[i] for i in rng.integers(0, len(words), n)], mask=rng.random(n) < 0.1),
        }
    )
    keys = list(range(32))
    local = panes.Engine(VIEWS, backend="scalar")
    local.push(t, view="clicks")
    at = 1_000_000 + 3 * n
    want = local.read(keys, view="clicks", at=at)
    with Client(server["grpc"]) as c:
        c.ingest("clicks", t, batch_rows=700)
        import time

        deadline = time.monotonic() + 10
        while c.get_features("clicks", [0], at_ms=at).window_events[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        f = c.get_features("clicks", keys, at_ms=at)
        assert f.strings["first_category"] == want["first_category"].to_list()
        assert np.all(np.isnan(f.values[:, 0])), "a string's value is NaN"
        assert f.lists["recent_categories"] == want["recent_categories"].to_list()
        assert f.lists["top_categories"] == want["top_categories"].to_list()
        assert want["first_category"][31] is None and want["top_categories"][31].to_list() == []
        assert list(f.values[:, 3]) == want["categories"].to_list()
        dtypes = [x["dtype"] for x in c.describe_view("clicks")["features"]]
        assert dtypes == ["string", "list<string>", "list<string>", "int64"]
        # Typed rows carry strings too.
        r = c.ingest_rows("clicks", [(40, at, ["zz"]), (40, at + 1, [None]), (40, at + 2, ["zz"])],
                          columns=["category"])
        assert (r.accepted, r.rejected) == (3, 0)
        deadline = time.monotonic() + 10
        while c.get_features("clicks", [40], at_ms=at + 2).values[0, 3] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        f = c.get_features("clicks", [40], at_ms=at + 2)
        assert f.strings["first_category"] == ["zz"] and f.lists["recent_categories"] == [["zz", "zz"]]
        # A key with no events: its string features are null, its lists empty.
        f = c.get_features("clicks", [31], at_ms=at)
        assert f.strings["first_category"] == [None]
        assert f.lists == {"recent_categories": [[]], "top_categories": [[]]}
    client = flight.connect(f"grpc://{server['grpc']}")
    ticket = flight.Ticket(json.dumps({"view": "clicks", "keys": keys, "at_ms": at}).encode())
    got = client.do_get(ticket).read_all()
    assert got.schema.field("first_category").type == pa.string()
    assert got.schema.field("top_categories").type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert pl.from_arrow(got).drop("user").equals(want.drop("user"))


def _rows(f: panes.client.Features, keys: list) -> dict:
    """Each key's vector: values (None for null), strings and lists."""
    out = {}
    for i, k in enumerate(keys):
        out[k] = (
            # (A string feature's value is NaN: its string is in `strings`.)
            tuple(v if ok and v == v else None for v, ok in zip(f.values[i].tolist(), f.valid[i].tolist())),
            tuple(s[i] for s in f.strings.values()),
            tuple(tuple(lst[i]) for lst in f.lists.values()),
        )
    return out


def test_subscribe_follows_keys_to_their_final_vectors(server: dict[str, str]) -> None:
    """A subscriber to some keys of a view with string and list features gets their
    vectors, then each change, ending equal to a final read."""
    import threading
    import time

    keys = list(range(10))
    latest: dict = {}
    snapshot_keys: list = []
    stop = threading.Event()

    def follow() -> None:
        with Client(server["grpc"]) as c:
            updates = c.subscribe("clicks", keys, interval_ms=20)
            for u in updates:
                if u.snapshot:
                    snapshot_keys.extend(u.keys)
                latest.update(_rows(u.features, u.keys))
                if stop.is_set():
                    updates.close()
                    return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    rng = np.random.default_rng(24)
    n = 3_000
    words = ["books", "toys", "café", "b"]
    table = pa.table(
        {
            "user": pa.array(rng.integers(0, 15, n), pa.int64()),
            "ts": pa.array(5_000_000 + np.arange(n) * 7, pa.int64()),
            "category": pa.array([words[i] for i in rng.integers(0, len(words), n)], mask=rng.random(n) < 0.1),
        }
    )
    with Client(server["grpc"]) as c:
        for part in table.to_batches(max_chunksize=300):
            c.ingest("clicks", pa.Table.from_batches([part]))
        want = _rows(c.get_features("clicks", keys), keys)
    deadline = time.monotonic() + 30
    while {k: latest.get(k) for k in keys} != want:
        assert time.monotonic() < deadline, (latest, want)
        time.sleep(0.02)
    assert snapshot_keys == keys
    stop.set()
    # One more change wakes the follower, which then cancels its stream.
    with Client(server["grpc"]) as c:
        c.ingest("clicks", table.slice(0, 1))
    t.join(timeout=30)
    assert not t.is_alive()
    text = urllib.request.urlopen(f"http://{server['metrics']}/metrics", timeout=10).read().decode()
    assert re.search(r"^panes_subscription_rows_total [1-9]", text, re.M)


def test_subscribe_refusals_are_server_errors(server: dict[str, str]) -> None:
    with Client(server["grpc"]) as c:
        with pytest.raises(ServerError, match="interval_ms") as e:
            next(c.subscribe("clicks", [1], interval_ms=1))
        assert e.value.code == "INVALID_ARGUMENT"
        with pytest.raises(ServerError, match="unknown view") as e:
            next(c.subscribe("nope"))

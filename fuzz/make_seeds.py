"""Writes the fuzz targets' seed corpus (fuzz/seeds/<target>/): valid inputs of every
shape each decoder takes, for the fuzzer to mutate. Run from the repository root with
the test venv (pyarrow, grpcio, the panes package) and a built `target/debug/panes`:

    .venv/bin/python fuzz/make_seeds.py
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pyarrow as pa

from panes.v1 import panes_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
# The fuzz targets' view, as panes_engine::fuzz defines it.
FEATURES = re.search(r'const FEATURES: &str = r#"(.*?)"#;', (ROOT / "engine/src/fuzz.rs").read_text(), re.S)[1]


def write(target: str, name: str, data: bytes) -> None:
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def tables() -> dict[str, pa.Table]:
    n = 16
    ts = [i * 7_000 for i in range(n)]
    amount = [float(i) - 4.5 if i % 5 else None for i in range(n)]
    return {
        "int": pa.table({"card": pa.array([i % 5 for i in range(n)], pa.int64()), "ts": ts, "amount": amount}),
        "str": pa.table({"card": [f"c{i % 3}" for i in range(n)], "ts": pa.array(ts, pa.timestamp("ms", "UTC")), "amount": amount}),
        "dict": pa.table(
            {
                "card": pa.array([f"c{i % 3}" for i in range(n)]).dictionary_encode(),
                "ts": pa.array([f"2026-01-01T00:00:{i:02d}Z" for i in range(n)]),
                "amount": pa.array(range(n), pa.int32()),
            }
        ),
        "nulls": pa.table({"card": pa.array([1, None, 2, 3], pa.uint64()), "ts": pa.array([0, 1, None, 3], pa.int64()), "amount": [1.0, float("nan"), None, 1e308]}),
    }


def ipc_stream(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, t.schema) as w:
        for b in t.to_batches(max_chunksize=6):
            w.write_batch(b)
    return sink.getvalue()


def ipc_file(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue()


def feature_files() -> None:
    write("feature_file", "fuzz_view.toml", FEATURES.encode())
    write("feature_file", "demo.toml", (ROOT / "engine/features/demo.toml").read_bytes())
    for i, p in enumerate(sorted((ROOT / "benches").rglob("*.toml"))[:4]):
        write("feature_file", f"bench_{i}.toml", p.read_bytes())


def arrow() -> None:
    for name, t in tables().items():
        write("arrow_ipc", f"{name}.arrows", ipc_stream(t))
        write("arrow_ipc", f"{name}.arrow", ipc_file(t))


def ingest_requests() -> None:
    for name, t in tables().items():
        m = pb.IngestRequest(view="cards", arrow_ipc=ipc_stream(t))
        write("ingest_request", f"ipc_{name}.pb", m.SerializeToString())
    rows = pb.Rows(
        columns=["amount", "other"],
        rows=[
            pb.Row(int_key=1, time_ms=1_000, values=[1.5, 2.0]),
            pb.Row(int_key=2, time_ms=2_000, values=[3.0, 0.0], null_columns=[0]),
            pb.Row(time_ms=3_000, values=[1.0, 1.0]),
        ],
    )
    write("ingest_request", "rows_int.pb", pb.IngestRequest(view="cards", rows=rows).SerializeToString())
    rows = pb.Rows(columns=["amount"], rows=[pb.Row(string_key="c", time_ms=-5, values=[1e300])])
    write("ingest_request", "rows_str.pb", pb.IngestRequest(view="cards", rows=rows).SerializeToString())


def tickets() -> None:
    for i, t in enumerate(
        [
            {"view": "cards", "keys": [0, 1, 2]},
            {"view": "cards", "keys": ["c0", "c1"], "features": ["n_1m", "amount_var_10m"]},
            {"view": "cards", "keys": [18446744073709551615, -1], "at_ms": 60000},
            {"view": "cards", "keys": [], "features": None, "at_ms": None},
        ]
    ):
        write("flight_ticket", f"ticket_{i}.json", json.dumps(t).encode())


def kafka(head: int, key: bytes, value: bytes) -> bytes:
    return bytes([head]) + struct.pack("<H", len(key)) + key + value


def kafka_messages() -> None:
    json_msgs = [
        {"card": 1, "ts": 1000, "amount": 2.5},
        {"card": "c1", "ts": "2026-01-01T00:00:00Z", "amount": None},
        {"card": 3, "ts": 5, "amount": "x"},
    ]
    for i, m in enumerate(json_msgs):
        write("kafka_message", f"json_{i}", kafka(0, b"", json.dumps(m).encode()))
    # The key from the message (key_column), one partition.
    write("kafka_message", "json_keyed", kafka(0b110, b"c9", json.dumps({"ts": 1, "amount": 1}).encode()))
    for name, t in tables().items():
        # Arrow IPC payloads, over four partitions (some rows misrouted).
        write("kafka_message", f"ipc_{name}", kafka(0b0011_0001, b"", ipc_stream(t)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoints() -> None:
    from panes.client import Client

    with tempfile.TemporaryDirectory() as d:
        features = pathlib.Path(d) / "features.toml"
        features.write_text(FEATURES)
        port = free_port()
        server = subprocess.Popen(
            [str(ROOT / "target/debug/panes"), "serve", "--features", str(features), "--listen", f"127.0.0.1:{port}", "--metrics", "off", "--checkpoint-dir", f"{d}/ckpt"],
        )
        try:
            with Client(f"127.0.0.1:{port}") as c:
                for _ in range(50):
                    try:
                        c.list_features()
                        break
                    except Exception:
                        time.sleep(0.2)
                c.ingest("cards", tables()["int"])
                c.ingest("cards", tables()["str"])
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        files = sorted(pathlib.Path(d, "ckpt", "cards").glob("ckpt-*.panes"))
        write("checkpoint", "cards.panes", files[-1].read_bytes())


if __name__ == "__main__":
    feature_files()
    arrow()
    ingest_requests()
    tickets()
    kafka_messages()
    checkpoints()
    for d in sorted(SEEDS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} seeds")

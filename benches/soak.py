"""Soak: `panes serve` under a memory limit for N minutes with mixed ingest, reads and
hostile requests; samples RSS, read latency and outcomes every few seconds and plots
them over time.

    .venv/bin/python benches/soak.py --minutes 30 --out benches/results/soak

The server runs the built-in card features (release binary, `--backend cpu`) under an
address-space limit (`--limit-gib`, default 2) with its state budget at the default
(half of that) and `--max-view-keys`. Load, all at once:

- ingest: batches of 5 000 events over a steady key space (`--keys`), event time
  moving with the wall clock; every 20 s a flood of 200 000 new keys, refused past the
  key limit (``key_limit`` rejections, counted as refusals, not errors; every steady key is
  created first);
- reads: GetFeatures of 1 key and of 100 keys in a loop, latency measured by the client;
- hostile, one per second in turn: a stream claiming a 2^44-byte body, random bytes as
  Arrow IPC, a read of 30 000 features, an unknown view, a connection that never speaks.

An outcome is a *refusal* when it is the answer the limit promises (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, key_limit rejections, a silent connection closed) and an *error*
otherwise (any other status, a failed health check, a dead server). Output: soak.csv (one
row per sample), soak.json (summary), soak.png (RSS, read p99, errors and refusals over
time) in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa

from panes.client import Client, ServerError
from panes.v1 import panes_pb2 as pb
from panes.v1 import panes_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


class Stats:
    """Counters and latencies of the current sampling interval."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()
        self.total_errors: list[str] = []

    def reset(self) -> None:
        self.read_ms: list[float] = []
        self.events = 0
        self.errors = 0
        self.refusals = 0

    def error(self, what: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.total_errors) < 50:
                self.total_errors.append(what)

    def take(self) -> dict[str, Any]:
        with self.lock:
            out = {
                "reads": len(self.read_ms),
                "read_p50_ms": float(np.percentile(self.read_ms, 50)) if self.read_ms else None,
                "read_p99_ms": float(np.percentile(self.read_ms, 99)) if self.read_ms else None,
                "events": self.events,
                "errors": self.errors,
                "refusals": self.refusals,
            }
            self.reset()
            return out


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text)[1]) / 1024  # type: ignore[index]


def events(first_key: int, keys: int, n: int, ts_ms: int, rng: np.random.Generator) -> pa.Table:
    return pa.table(
        {
            "card": pa.array(first_key + rng.integers(0, keys, n), pa.int64()),
            "ts": pa.array(ts_ms - rng.integers(0, 2_000, n), pa.int64()),
            "amount": pa.array(rng.uniform(1, 500, n).round(2)),
            "items": pa.array(rng.integers(1, 6, n), pa.int64()),
        }
    )


def huge_body() -> bytes:
    """A 1-row stream whose record batch claims a body of 2^44 bytes."""
    sink = pa.BufferOutputStream()
    t = pa.table({"card": pa.array([1], pa.int64()), "ts": pa.array([1], pa.int64())})
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    data = bytearray(sink.getvalue().to_pybytes())
    schema_len = int.from_bytes(data[4:8], "little")
    batch = 8 + schema_len
    meta_len = int.from_bytes(data[batch + 4 : batch + 8], "little")
    body = len(data) - (batch + 8 + meta_len) - 8  # the body, before the end marker
    meta = data[batch + 8 : batch + 8 + meta_len]
    at = bytes(meta).rfind(body.to_bytes(8, "little"))
    data[batch + 8 + at : batch + 16 + at] = (1 << 44).to_bytes(8, "little")
    return bytes(data)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_gib * (1 << 30))

    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--metrics", "off", "--backend", "cpu",
         "--max-view-keys", str(args.max_keys), "--handshake-timeout", "2"],
        stderr=subprocess.PIPE, text=True, preexec_fn=limit_address_space,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"gRPC \+ Flight on (\S+)", line)
    assert m, line
    addr = m.group(1).rstrip(",")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    stats = Stats()
    stop = threading.Event()
    t0 = time.time()

    def ingest() -> None:
        rng = np.random.default_rng(1)
        next_flood, flood_key = time.time() + 20, 10_000_000
        with Client(addr, timeout=60) as c:
            while not stop.is_set():
                now_ms = int(time.time() * 1000)
                try:
                    if time.time() >= next_flood:
                        r = c.ingest("cards", events(flood_key, 200_000, 200_000, now_ms, rng))
                        flood_key += 200_000
                        next_flood += 20
                        with stats.lock:
                            stats.refusals += r.rejected
                            stats.events += r.accepted
                    else:
                        r = c.ingest("cards", events(0, args.keys, 5_000, now_ms, rng))
                        with stats.lock:
                            stats.events += r.accepted
                            if r.rejected:
                                stats.total_errors.append(f"steady rejections: {r.rejections[:1]}")
                                stats.errors += r.rejected
                except ServerError as e:
                    stats.error(f"ingest: {e}")
                time.sleep(0.02)

    def reads() -> None:
        rng = random.Random(2)
        with Client(addr, timeout=10) as c:
            while not stop.is_set():
                keys = [rng.randrange(args.keys) for _ in range(rng.choice((1, 100)))]
                started = time.perf_counter()
                try:
                    c.get_features("cards", keys)
                    with stats.lock:
                        stats.read_ms.append((time.perf_counter() - started) * 1000)
                except ServerError as e:
                    stats.error(f"read: {e}")

    def hostile() -> None:
        channel = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", -1)])
        stub: Any = pb_grpc.FeaturesStub(channel)  # type: ignore[no-untyped-call]
        rng = random.Random(3)
        kinds = ["huge_body", "garbage", "features", "unknown_view", "silent"]
        i = 0
        while not stop.is_set():
            kind = kinds[i % len(kinds)]
            i += 1
            expected = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
            try:
                if kind == "silent":
                    host, port = addr.rsplit(":", 1)
                    s = socket.create_connection((host, int(port)))
                    s.settimeout(10)
                    # The server's HTTP/2 settings arrive first; then, the client having
                    # sent nothing, the handshake timeout closes the connection.
                    closed = False
                    try:
                        while chunk := s.recv(4096):
                            del chunk
                        closed = True
                    except OSError:
                        pass
                    s.close()
                    if closed:
                        with stats.lock:
                            stats.refusals += 1
                    else:
                        stats.error("a silent connection stayed open")
                    continue
                if kind in ("huge_body", "garbage"):
                    payload = huge_body() if kind == "huge_body" else rng.randbytes(512)
                    stub.Ingest(iter([pb.IngestRequest(view="cards", arrow_ipc=payload)]), timeout=10)
                elif kind == "features":
                    req = pb.GetFeaturesRequest(view="cards", features=["txn_count_1m"] * 30_000)
                    req.int_keys.keys.extend(range(10_000))
                    stub.GetFeatures(req, timeout=10)
                else:
                    req = pb.GetFeaturesRequest(view="no such view")
                    req.int_keys.keys.append(1)
                    stub.GetFeatures(req, timeout=10)
                stats.error(f"hostile {kind} was answered OK")
            except grpc.RpcError as e:
                if e.code() in expected:
                    with stats.lock:
                        stats.refusals += 1
                else:
                    stats.error(f"hostile {kind}: {e.code()} {e.details()}")
            time.sleep(1.0)

    # Every steady key exists before the floods start, so that only flood keys meet
    # the key limit.
    with Client(addr, timeout=120) as c:
        warm = pa.table(
            {
                "card": pa.array(np.arange(args.keys), pa.int64()),
                "ts": pa.array(np.full(args.keys, int(time.time() * 1000) - 5_000), pa.int64()),
                "amount": pa.array(np.ones(args.keys)),
                "items": pa.array(np.ones(args.keys, dtype=np.int64)),
            }
        )
        assert c.ingest("cards", warm).accepted == args.keys
    threads = [threading.Thread(target=f, daemon=True) for f in (ingest, reads, hostile)]
    for t in threads:
        t.start()
    samples: list[dict[str, Any]] = []
    # grpc.health.v1.Health/Check with an empty request; SERVING is field 1 = 1.
    health = grpc.insecure_channel(addr).unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    deadline = t0 + args.minutes * 60
    while time.time() < deadline:
        time.sleep(args.every)
        if proc.poll() is not None:
            stats.error(f"the server exited with {proc.returncode}")
            break
        try:
            ok = health(b"", timeout=5) == b"\x08\x01"
        except grpc.RpcError as e:
            ok = False
            stats.error(f"health: {e.code()}")
        sample = {"t_s": round(time.time() - t0, 1), "rss_mib": round(rss_mib(proc.pid), 1), "serving": ok}
        sample.update(stats.take())
        samples.append(sample)
        print(json.dumps(sample), flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    write(out, args, samples, stats, alive)


def write(out: Path, args: argparse.Namespace, samples: list[dict[str, Any]], stats: Stats, alive: bool) -> None:
    cols = list(samples[0])
    with open(out / "soak.csv", "w") as f:
        f.write(",".join(cols) + "\n")
        for s in samples:
            f.write(",".join("" if s[c] is None else str(s[c]) for c in cols) + "\n")
    n = max(1, len(samples) // 6)
    head, tail = samples[:n], samples[-n:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return round(statistics.fmean(vals), 2) if vals else float("nan")

    summary = {
        "command": f".venv/bin/python benches/soak.py --minutes {args.minutes} --limit-gib {args.limit_gib} "
        f"--keys {args.keys} --max-keys {args.max_keys}",
        "minutes": args.minutes,
        "address_space_limit_gib": args.limit_gib,
        "samples": len(samples),
        "server_alive_at_end": alive,
        "always_serving": all(s["serving"] for s in samples),
        "events_accepted": sum(s["events"] for s in samples),
        "reads": sum(s["reads"] for s in samples),
        "refusals": sum(s["refusals"] for s in samples),
        "errors": sum(s["errors"] for s in samples),
        "first_errors": stats.total_errors[:10],
        "rss_mib_first_sixth": mean(head, "rss_mib"),
        "rss_mib_last_sixth": mean(tail, "rss_mib"),
        "rss_mib_max": max(s["rss_mib"] for s in samples),
        "read_p99_ms_first_sixth": mean(head, "read_p99_ms"),
        "read_p99_ms_last_sixth": mean(tail, "read_p99_ms"),
        "machine": f"{os.cpu_count()} cores",
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax[0].plot(t, [s["rss_mib"] for s in samples])
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].set_ylim(bottom=0)
    ax[1].plot(t, [s["read_p99_ms"] for s in samples], label="p99")
    ax[1].plot(t, [s["read_p50_ms"] for s in samples], label="p50")
    ax[1].set_ylabel("read latency (ms)")
    ax[1].set_ylim(bottom=0)
    ax[1].legend()
    ax[2].plot(t, [s["refusals"] for s in samples], label="refusals (limits)")
    ax[2].plot(t, [s["errors"] for s in samples], label="errors")
    ax[2].set_ylabel(f"per {args.every:g} s")
    ax[2].set_xlabel("minutes")
    ax[2].legend()
    fig.suptitle(f"panes serve soak: {args.minutes} min under a {args.limit_gib:g} GiB address-space limit")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--limit-gib", type=float, default=2.0)
    p.add_argument("--keys", type=int, default=50_000, help="the steady key space")
    p.add_argument("--max-keys", type=int, default=100_000, help="--max-view-keys of the server")
    p.add_argument("--bin", default=str(ROOT / "target" / "release" / "panes"))
    p.add_argument("--out", default=str(ROOT / "benches" / "results" / "soak"))
    run(p.parse_args())


if __name__ == "__main__":
    main()

"""`panes serve` with TLS and tokens, from Python: the gRPC client (panes.client),
pyarrow.flight and the metrics endpoint over HTTPS, each with a bearer token.
Certificates are made with the openssl command for the test."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import panes
from panes.client import Client, ServerError

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))
pytestmark = pytest.mark.skipif(not PANES.exists(), reason="the CLI is not built")

READER = "reader-token-0123456789"
PRODUCER = "producer-token-0123456789"
OPS = "ops-token-0123456789"


def make_certificates(d: Path) -> None:
    """A CA and a certificate it signed for localhost / 127.0.0.1 (server and client)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=panes test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "key.pem", "-out", "req.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    run("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    d = tmp_path_factory.mktemp("secure")
    make_certificates(d)
    view = panes.View("cards", key="card", time="ts", features=[panes.count(window="1h", name="n_1h")])
    (d / "features.toml").write_text(view.to_toml())
    (d / "tokens.toml").write_text(
        f"""
[[tokens]]
name = "model"
token = "{READER}"
scopes = ["read"]

[[tokens]]
name = "producer"
token_env = "PANES_TEST_PRODUCER_TOKEN"
scopes = ["ingest", "read"]

[[tokens]]
name = "ops"
token = "{OPS}"
scopes = ["admin"]
"""
    )
    proc = subprocess.Popen(
        [str(PANES), "serve", "--features", str(d / "features.toml"), "--listen", "127.0.0.1:0",
         "--metrics", "127.0.0.1:0", "--batch-age-ms", "2", "--backend", "cpu",
         "--tls-cert", str(d / "cert.pem"), "--tls-key", str(d / "key.pem"),
         "--tokens", str(d / "tokens.toml")],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PANES_TEST_PRODUCER_TOKEN": PRODUCER},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"gRPC \+ Flight on (\S+) \(TLS\), metrics on https://(\S+)/metrics", line)
    assert m, line
    yield {"grpc": m.group(1), "metrics": m.group(2), "ca": str(d / "ca.pem")}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


def events() -> pa.Table:
    return pa.table({"card": pa.array([1, 1, 2], pa.int64()), "ts": pa.array([1_000, 2_000, 3_000], pa.int64())})


def test_the_client_works_over_tls_with_a_token(server: dict[str, str]) -> None:
    with Client(server["grpc"], token=PRODUCER, tls_ca=server["ca"]) as c:
        assert c.ingest("cards", events()).accepted == 3
    with Client(server["grpc"], token=READER, tls_ca=Path(server["ca"]).read_bytes()) as c:
        f = c.get_features("cards", [1, 2])
        assert f.values[:, 0].tolist() == [2.0, 1.0]
        with pytest.raises(ServerError) as e:
            c.ingest("cards", events())
        assert e.value.code == "PERMISSION_DENIED" and "may not ingest" in str(e.value)
    for token in (None, "not-a-token-0123456789"):
        with Client(server["grpc"], token=token, tls_ca=server["ca"]) as c, pytest.raises(ServerError) as e:
            c.get_features("cards", [1])
        assert e.value.code == "UNAUTHENTICATED"
    # Plain text to a TLS port, or TLS that does not trust the server's CA: refused.
    for kw in ({}, {"tls": True}):
        with Client(server["grpc"], token=READER, timeout=5, **kw) as c, pytest.raises(ServerError) as e:  # type: ignore[arg-type]
            c.get_features("cards", [1])
        assert e.value.code == "UNAVAILABLE"


def test_pyarrow_flight_over_tls_with_a_token(server: dict[str, str]) -> None:
    client = flight.FlightClient(
        f"grpc+tls://{server['grpc']}", tls_root_certs=Path(server["ca"]).read_bytes()
    )
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {READER}".encode())])
    ticket = flight.Ticket(b'{"view": "cards", "keys": [1, 2, 3]}')
    table = client.do_get(ticket, options).read_all()
    assert table.column("card").to_pylist() == [1, 2, 3]
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(ticket).read_all()
    client.close()


def test_metrics_over_https_need_an_admin_token(server: dict[str, str]) -> None:
    context = ssl.create_default_context(cafile=server["ca"])
    url = f"https://{server['metrics']}/metrics"

    def get(token: str | None) -> int:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, context=context, timeout=10) as r:
                assert b"panes_events_accepted_total" in r.read()
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    assert [get(None), get(READER), get(OPS)] == [401, 403, 200]

"""The status page of `panes serve` in a real browser: headless Chromium, kept off the
network, opens the page of a server fed by the demo stream, and the test checks what it
rendered (views, a live rate, a key lookup) and that its screenshot is not blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PANES = Path(os.environ.get("PANES_BIN", ROOT / "target" / "debug" / "panes"))

pytestmark = pytest.mark.skipif(
    not PANES.exists() and "PANES_BIN" not in os.environ,
    reason="the CLI is not built (cargo build -p panes-engine); the test command always builds it",
)

# The hottest card of the demo stream (`Synth::card(1)`): always present.
HOT_CARD = 0x9E3779B9 % 1_000_000_007


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("PANES_REQUIRE_BROWSER") == "1":
        pytest.fail("no Chromium (the test command installs Debian's `chromium`)")
    pytest.skip("no Chromium; set PANES_REQUIRE_BROWSER=1 to make this a failure")


def browser(url: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on `url`, with every flag that keeps it off the network and
    quiet: no proxy lookups, no name resolution but loopback, no background services."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--metrics-recording-only",
            "--no-proxy-server",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={out / 'profile'}",
            "--window-size=1280,1000",
            "--virtual-time-budget=4000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("status")
    proc = subprocess.Popen(
        [str(PANES), "serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--backend", "cpu", "--demo-rate", "20000", "--checkpoint-dir", str(d / "ckpt"),
         "--checkpoint-interval-ms", "500"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"metrics on http://(\S+)/metrics", line)
    assert m, line
    base = f"http://{m.group(1)}"
    # Keep reading the server's log, so that it never waits on a full pipe.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    # The first status request starts the rate measurement; the browser's come later.
    get(base + "/status.json")
    time.sleep(1.5)
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_the_status_page_in_headless_chromium(server: str, tmp_path: Path) -> None:
    url = f"{server}/#lookup=cards:{HOT_CARD}"
    r = browser(url, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr
    dom = r.stdout
    assert 'id="view-cards"' in dom, dom
    assert "txn_count_1m" in dom, "the features table"
    rate = re.search(r'id="rate-cards">([\d,.]+)<', dom)
    assert rate, dom
    assert float(rate.group(1).replace(",", "")) > 0, f"events/s: {rate.group(1)}"
    # The key lookup ran from the address and shows the card's features.
    assert 'id="lookup-table"' in dom, dom
    assert 'id="lookup-error"' not in dom
    count = re.search(r'data-feature="txn_count_1m">([\d,.]+)<', dom)
    assert count and float(count.group(1).replace(",", "")) > 0, dom

    shot = tmp_path / "status.png"
    r = browser(f"{server}/", tmp_path, f"--screenshot={shot}")
    assert r.returncode == 0 and shot.exists(), r.stderr
    import matplotlib.image

    pixels = np.asarray(matplotlib.image.imread(str(shot)))[..., :3]
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 1000, pixels.shape
    # Not blank: dark header, text and charts cover a real part of the page.
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert dark > 0.02, f"{dark:.3%} dark pixels"
    assert pixels.std() > 0.1, pixels.std()
    saved = os.environ.get("PANES_SCREENSHOT")
    if saved:
        shutil.copy(shot, saved)


def test_status_json_and_lookup_errors(server: str) -> None:
    status = json.loads(get(server + "/status.json"))
    (cards,) = status["views"]
    assert cards["name"] == "cards" and cards["key"] == ["card"]
    assert cards["accepted"] > 0 and cards["keys"] > 0
    assert cards["accepted_per_second"] is not None
    assert [f["name"] for f in cards["features"]][0] == "txn_count_1m"
    found = json.loads(get(f"{server}/lookup?view=cards&key={HOT_CARD}"))
    assert found["features"]["txn_count_1m"] > 0
    for query, code in [("view=nope&key=1", 404), ("view=cards", 400), ("view=cards&key=%5B1", 400)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            get(f"{server}/lookup?{query}")
        assert e.value.code == code, query
        assert "error" in json.loads(e.value.read())

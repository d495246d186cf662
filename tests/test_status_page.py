"""The status page at ``/``: history bounds, escaping and redaction, and a real daemon's page
rendered by a real headless browser (Debian's chromium; .ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest

from replicator.log import REDACTOR
from replicator.page import History, render
from replicator.state import StateStore
from replicator.state.rpo import RpoRow
from replicator.status import BudgetStatus, PairStatus, StatusReport
from tests.conftest import write_config
from tests.daemon_helpers import DaemonProcess, wait_until
from tests.helpers import config_dict
from tests.servers import free_port

HOOK_TOKEN = "page-hook-token-4711"


def test_history_keeps_the_largest_lag_per_interval_for_the_window_only() -> None:
    h = History(interval=30, window=3600, keep=3)
    t0 = 1_000_020.0  # 1_000_020 = 33334 * 30: an interval starts here
    for i in range(30):  # one interval: lags 0..29, then back to 0
        h.add("s", "t", t0 + i, float(i))
    h.add("s", "t", t0 + 29.5, 0.0)
    assert list(h.lag[("s", "t")]) == [(t0, 29.0)], "the peak inside an interval was lost"
    for i in range(1, 500):  # 500 intervals, far more than the window holds
        h.add("s", "t", t0 + 30 * i, float(i))
    ring = h.lag[("s", "t")]
    assert len(ring) == 120 and ring[-1] == (t0 + 30 * 499, 499.0)
    now = t0 + 30 * 499 + 5
    series = h.series("s", "t", now, 7.0)
    assert series[-1] == (now, 7.0) and series[0][0] >= now - 3600
    for i in range(5):
        h.published("s", "t", f"snap{i}", t0 + i)
        h.add("s", "t", now + i, 1.0, error=f"boom {i}")
        h.add("s", "t", now + i + 0.5, 1.0, error=f"boom {i}")  # the same error again: listed once
    assert [s.snapshot for s in h.snapshots] == ["snap2", "snap3", "snap4"]
    assert [e.message for e in h.errors] == ["boom 2", "boom 3", "boom 4"]


def test_page_escapes_untrusted_text_and_masks_secrets() -> None:
    secret = "sk-live-0123456789abcdef"
    REDACTOR.add([secret])
    try:
        h = History()
        now = 1_800_000_000.0
        evil = '<script>alert("x")</script>'
        h.add("ckpt", "s3", now - 60, 5.0, error=f"PUT chunks/{evil}: key {secret} rejected")
        h.add("ckpt", "s3", now - 30, 9.0, error=f"https://user:hunter2pass@host/{evil}")
        h.published("ckpt", "s3", "0123abcd", now - 10)
        pair = PairStatus(
            "ckpt",
            "s3",
            None,
            12.0,
            10.0,
            True,
            1024,
            3,
            f"open {evil} failed with {secret}",
            held=f"deleting 90% of files under /data/{evil}",
            damaged={evil: "torn"},
        )
        budget = BudgetStatus("all", "<pace>", 0.0036, 1.5, 0.1, None)
        report = StatusReport("2027-01-15T08:00:00Z", True, [pair], [budget], "f" * 16, [f"warn {evil}"])
        html = render(report, h, now)
    finally:
        REDACTOR.values.discard(secret)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert secret not in html and "hunter2pass" not in html and "***" in html
    assert "&lt;pace&gt;" in html and "$0.0036" in html
    assert 'class="pair breached"' in html and "HELD" in html and "0123abcd" in html
    # no asset from anywhere: nothing to fetch, so it works air-gapped
    assert not re.search(r"""(src|href)\s*=|url\(|@import""", html), "the page refers to an external asset"
    points = re.search(r'<polyline class="lag" points="([^"]+)"', html)
    assert points is not None and len(points.group(1).split()) == 3  # two samples and now


# -- a real daemon in a real browser ------------------------------------------------------------


def png_colours(path: Path) -> int:
    """Distinct colours of an 8-bit RGB(A) PNG (what chromium writes), decoded here: the test
    environment has no imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format: depth {depth}, colour type {colour}"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set[bytes]()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp))
        prev = line
    return len(colours)


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",  # tests may run as root, where chromium's sandbox refuses to start
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def seed_history(state_dir: Path, now: float) -> None:
    """Three hours of lag as an earlier run of the daemon left them: ``nfs`` a sawtooth under
    a minute, ``offsite`` the same until its outage began 20 minutes ago, still pending."""
    outage = now - 1200
    state = StateStore.open(state_dir)
    try:
        for i in range(360, 0, -1):
            at = now - now % 30 - 30 * i
            state.lag_history.add("datasets", "nfs", at, (i * 30) % 600 / 10)
            state.lag_history.add(
                "datasets", "offsite", at, at - outage if at > outage else (i * 30) % 600 / 10
            )
        state.rpo.save("datasets", "offsite", RpoRow(pending_since=outage))
    finally:
        state.close()


def test_a_real_browser_renders_the_table_and_the_charts(tmp_path: Path) -> None:
    """A daemon restarted during an outage of one target: the page shows both pairs, the
    breach, and the lag of the hours before the restart (from the state store).

    docs/status-page.png is this test's screenshot: run it with ``--basetemp=/tmp/page`` and
    copy ``/tmp/page/test_a_real_browser_renders_th0/page.png``."""
    primary = tmp_path / "primary"
    primary.mkdir()
    (primary / "weights.bin").write_bytes(b"w" * 200_000)
    (tmp_path / "nfs").mkdir()
    listen = f"127.0.0.1:{free_port()}"
    nfs = {"name": "nfs", "url": str(tmp_path / "nfs")}
    # Nothing listens there: the pair's lag grows past its RPO, with an error to show.
    dead = {
        "name": "offsite",
        "url": "s3://bucket/r",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "retry": {"initial": "100ms", "max": "500ms", "give_up_after": "1s"},
    }
    source = {"name": "datasets", "url": str(primary), "rpo": "15m", "debounce": "100ms"}
    data: dict[str, Any] = config_dict(tmp_path, [source], [nfs, dead], listen=listen)
    seed_history(Path(data["state_dir"]), time.time())
    data["alerts"] = {"webhooks": [f"http://127.0.0.1:9/hooks/{HOOK_TOKEN}"]}
    data["budget"] = {"usd_per_day": 5}
    cfg = write_config(tmp_path / "r.yaml", data)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")

    def page() -> str:
        try:
            with urllib.request.urlopen(f"http://{listen}/", timeout=5) as resp:
                assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
                body: str = resp.read().decode()
                return body
        except OSError:
            return ""

    try:
        wait_until(
            lambda: (
                'class="pair breached" data-source="datasets" data-target="offsite"' in page()
                and "Recent errors" in page()
                and 'id="snapshots"' in page()
            ),
            timeout=60,
            what="a snapshot on nfs and a breach on offsite",
        )
        url = f"http://{listen}/"
        shot = tmp_path / "page.png"
        res = chromium("--window-size=1280,720", f"--screenshot={shot}", url, tmp=tmp_path)
        assert shot.exists(), res.stderr[-2000:]
        dom = chromium("--dump-dom", url, tmp=tmp_path)
        assert dom.returncode == 0, dom.stderr[-2000:]
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    html = dom.stdout
    rows = re.findall(r'<tr class="pair (\w+)" data-source="datasets" data-target="(\w+)"', html)
    assert sorted(rows) == [("breached", "offsite"), ("ok", "nfs")], rows
    charts = re.findall(r'<svg class="chart[^"]*" data-points="(\d+)"', html)
    assert len(charts) == 2 and all(int(n) >= 360 for n in charts), f"the saved history is missing: {charts}"
    lines = re.findall(r'<polyline class="lag" points="([^"]+)"', html)
    assert len(lines) == 2 and all(len(p.split()) >= 360 for p in lines)
    assert 'class="rpo"' in html, "the RPO line is missing from the charts"
    assert 'id="budgets"' in html and 'id="errors"' in html and "offsite" in html
    assert HOOK_TOKEN not in html
    assert shot.stat().st_size > 10_000
    assert png_colours(shot) > 20, "the screenshot is (nearly) blank"

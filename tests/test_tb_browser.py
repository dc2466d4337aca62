"""The Warmup tab in a real browser: headless Chromium driven by chromedriver (WebDriver over
HTTP, no client library), against a real ``tensorboard`` on 127.0.0.1 serving real monitor runs.

Checks the DOM (uPlot's canvases, a legend entry for every mark, episode rows that expand, the
deep link selecting its run, several runs overlaid) and takes screenshots. Skipped, with the
reason, where Chromium or chromedriver is not installed (``apt-get install chromium
chromium-driver``). ``WARMUP_MONITOR_SCREENSHOT=DIR`` keeps the screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import make_real_run
from test_tb_plugin import Server, _free_port

from warmup_monitor.schema import ALERTS_FILENAME
from warmup_monitor.tb_plugin import PLUGIN_NAME

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
_MISSING = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
if _MISSING:
    print(f"test_tb_browser: skipped, not installed: {', '.join(_MISSING)}")
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"no browser test: {', '.join(_MISSING)} not installed (apt-get install chromium "
    "chromium-driver)",
)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class Browser:
    """The few WebDriver commands the test needs."""

    def __init__(self, profile: Path) -> None:
        self.port = _free_port()
        self.log = open(profile.parent / "chromedriver.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}"], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1800",
            "--hide-scrollbars",
        ]  # fmt: skip
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:2000]!r}") from None

    def get(self, url: str) -> None:
        self._call("POST", self.session + "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self._call(
            "POST", self.session + "/execute/sync", {"script": script, "args": list(args)}
        )

    def wait(self, script: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.js("return document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {script!r}; page: {body[:1500]}")
            time.sleep(0.25)

    def frame(self, css: str | None) -> None:
        target: Any = None
        if css is not None:
            found = self._call(
                "POST", self.session + "/element", {"using": "css selector", "value": css}
            )
            target = {ELEMENT: found[ELEMENT]}
        self._call("POST", self.session + "/frame", {"id": target})

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self._call("GET", self.session + "/screenshot"))
        path.write_bytes(data)
        return data

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logdir = tmp_path_factory.mktemp("browser") / "logs"
    make_real_run(logdir / "spiky")  # spiky/run/version_0: two 50x loss spikes in warmup
    make_real_run(logdir / "calm", scripted=lambda s: 1.0 / (1.0 + 0.05 * s))
    make_real_run(logdir / "layered", layers=True)  # per-group statistics: net.0, net.2
    # The same spiky run, its alerts written as one episode (open record, close record).
    shutil.copytree(logdir / SPIKY, logdir / "episodes")
    end = {
        "episode": 0, "start": 12, "end": 13, "duration": 2, "count": 2,
        "kinds": ["loss_spike", "loss_trend_spike"], "peak_ratio": 50.0, "peak_step": 12,
        "recovered": True, "steps": [[12, 13]],
    }  # fmt: skip
    records = [
        {"step": 12, "kind": "loss_spike", "message": "loss 50x", "value": 50.0, "episode": 0},
        {"step": 14, "kind": "episode_end", "message": "ended", "details": end, "episode": 0},
    ]
    (logdir / "episodes" / ALERTS_FILENAME).write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    srv = Server(logdir)
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield b
    finally:
        b.close()


def _keep(path: Path) -> None:
    keep = os.environ.get("WARMUP_MONITOR_SCREENSHOT")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copyfile(path, os.path.join(keep, path.name))


SPIKY = "spiky/run/version_0"
CALM = "calm/run/version_0"
LAYERED = "layered/run/version_0"


def test_the_tab_draws_interactive_charts_with_a_legend_for_every_mark(
    server: Server, browser: Browser, tmp_path: Path
) -> None:
    link = urllib.parse.urlencode({"run": SPIKY, "overlay": CALM})
    browser.get(f"{server.url}/data/plugin_entry.html?name={PLUGIN_NAME}#{link}")
    # The deep link selects its run, and the overlay adds the other.
    focus = browser.wait("const h = document.querySelector('#wm-focus'); return h && h.textContent")
    assert focus.startswith(SPIKY + ": unstable but recovered")
    browser.wait("return document.querySelectorAll('.wm-chart canvas').length >= 4")
    charts = browser.js(
        "return [...document.querySelectorAll('.wm-chart')].map(c => c.dataset.chart)"
    )
    assert charts == ["lr", "loss", "grad_norm", "grad_cosine"]
    legend = browser.js(
        "const c = document.querySelector('.wm-chart[data-chart=loss]');"
        "return [...c.querySelectorAll('.u-legend .u-series .u-label')].map(e => e.textContent)"
    )
    for label in ("loss", "10x initial loss", "instability alert"):
        assert f"{SPIKY} {label}" in legend, legend
    assert f"{CALM} loss" in legend
    # Hover readout: moving the cursor fills the legend's values.
    values = browser.js(
        "const c = document.querySelector('.wm-chart[data-chart=loss] .u-over');"
        "const r = c.getBoundingClientRect();"
        "c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + r.width * 0.2,"
        " clientY: r.top + r.height / 2, bubbles: true}));"
        "return [...document.querySelectorAll('.wm-chart[data-chart=loss] .u-legend .u-value')]"
        ".map(e => e.textContent)"
    )
    assert any(v not in ("", "--") for v in values[1:]), values
    # Alerts grouped by episode (here one group per alert: the file has no episode ids),
    # expandable.
    rows = browser.js("return document.querySelectorAll('details.wm-episode').length")
    assert rows >= 2
    opened = browser.js(
        "const d = document.querySelector('details.wm-episode');"
        "d.querySelector('summary').click(); return [d.open, d.querySelectorAll('tbody tr').length]"
    )
    assert opened[0] is True and opened[1] >= 1
    assert browser.js("return location.hash").startswith("#run=spiky")
    shot = tmp_path / "tab_standalone.png"
    assert browser.screenshot(shot).startswith(b"\x89PNG")
    _keep(shot)


def test_episodes_are_rows_that_expand_to_their_steps(server: Server, browser: Browser) -> None:
    browser.get(f"{server.url}/data/plugin_entry.html?name={PLUGIN_NAME}#run=episodes")
    browser.wait("const h = document.querySelector('#wm-focus'); return h && h.textContent")
    rows = browser.wait(
        "const d = [...document.querySelectorAll('details.wm-episode')];"
        "return d.length && d.map(x => x.querySelector('summary').textContent)"
    )
    assert rows[0] == (
        "episode 0: steps 12-13 · 2 flagged steps · loss_spike, loss_trend_spike · "
        "peak loss 50x the initial loss, at step 12 · recovered when it closed at step 14"
    )  # the closing record above, at step 14
    expanded = browser.js(
        "const d = document.querySelector('details.wm-episode');"
        "const before = d.open; d.querySelector('summary').click();"
        "return [before, d.open, d.querySelector('p').textContent,"
        " [...d.querySelectorAll('tbody tr td:nth-child(2)')].map(t => t.textContent)]"
    )
    assert expanded == [False, True, "flagged steps: 12-13", ["loss_spike", "episode_end"]]
    # Issue 22, finding 10: neither record has a threshold: an em dash, never "nan".
    cells = browser.js(
        "const d = document.querySelector('details.wm-episode');"
        "return [...d.querySelectorAll('tbody tr td:nth-child(5)')].map(t => t.textContent)"
    )
    assert cells == ["\u2014", "\u2014"]
    text = browser.js("return document.body.innerText")
    assert "nan" not in text.lower().replace("non_finite", "").split(), text[:2000]


def test_inside_tensorboard_with_a_deep_link(
    server: Server, browser: Browser, tmp_path: Path
) -> None:
    browser.get(f"{server.url}/?wm_run={urllib.parse.quote(CALM)}#{PLUGIN_NAME}")
    browser.wait("return document.querySelector('iframe') !== null", timeout=90)
    browser.frame("iframe")
    try:
        focus = browser.wait(
            "const h = document.querySelector('#wm-focus'); return h && h.textContent"
        )
        assert focus.startswith(CALM + ": healthy")
        browser.wait("return document.querySelectorAll('.wm-chart canvas').length >= 4")
        # Choosing another run writes it into TensorBoard's URL: the link to share.
        browser.js(f"document.querySelector('tr[data-run=\"{SPIKY}\"]').click()")
        browser.wait(  # the section is rebuilt: "#wm-focus" is absent for a moment
            "const h = document.querySelector('#wm-focus');"
            f"return h !== null && h.textContent.startsWith('{SPIKY}')"
        )
        assert "wm_run=spiky" in browser.js("return window.parent.location.search")
    finally:
        browser.frame(None)
    time.sleep(1.0)
    shot = tmp_path / "tab_in_tensorboard.png"
    assert browser.screenshot(shot).startswith(b"\x89PNG")
    _keep(shot)


def test_the_heatmaps_of_a_run_with_per_group_statistics(
    server: Server, browser: Browser, tmp_path: Path
) -> None:
    link = urllib.parse.urlencode({"run": LAYERED})
    browser.get(f"{server.url}/data/plugin_entry.html?name={PLUGIN_NAME}#{link}")
    browser.wait("return document.querySelectorAll('.wm-heatmap canvas').length >= 2")
    maps = browser.js(
        "return [...document.querySelectorAll('.wm-heatmap')].map(c => c.dataset.heatmap)"
    )
    assert maps == ["grad_share", "update_ratio"]
    # The cells are painted: the canvas under the plot area holds colour, not white, at the
    # middle of each row; the rows differ (net.0 and net.2 have different shares).
    pixels = browser.js(
        "const box = document.querySelector('.wm-heatmap[data-heatmap=grad_share]');"
        "const u = box.querySelector('canvas'), o = box.querySelector('.u-over');"
        "const c = u.getBoundingClientRect(), r = o.getBoundingClientRect();"
        "const k = u.width / c.width, ctx = u.getContext('2d');"
        "const x = Math.round((r.left - c.left + 0.6 * r.width) * k);"
        "return [0.25, 0.75].map(f => [...ctx.getImageData(x,"
        " Math.round((r.top - c.top + f * r.height) * k), 1, 1).data])"
    )
    for rgba in pixels:
        assert rgba[3] == 255 and rgba[:3] != [255, 255, 255], pixels
    assert pixels[0] != pixels[1], pixels
    # Hovering a cell reads its group, step and value: the bottom of the network at the bottom.
    hover = (
        "const c = document.querySelector('.wm-heatmap[data-heatmap=grad_share]');"
        "const o = c.querySelector('.u-over'); const r = o.getBoundingClientRect();"
        "o.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + r.width * 0.5,"
        " clientY: r.top + r.height * arguments[0], bubbles: true}));"
        "return c.querySelector('.wm-readout').textContent"
    )
    bottom, top = browser.js(hover, 0.75), browser.js(hover, 0.25)
    assert bottom.startswith("net.0 · step ") and "grad share" in bottom, bottom
    assert top.startswith("net.2 · step "), top
    browser.js("document.querySelector('.wm-layers').scrollIntoView()")
    shot = tmp_path / "tab_heatmap.png"
    assert browser.screenshot(shot).startswith(b"\x89PNG")
    _keep(shot)

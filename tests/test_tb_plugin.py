"""The "Warmup" TensorBoard plugin, served by a real ``tensorboard`` started on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import SPIKE_STEPS, jsonl_by_kind, make_real_run, write_scalars

from warmup_monitor.alerts import ALERTS_FILENAME
from warmup_monitor.tb_plugin import PLUGIN_NAME
from warmup_monitor.tb_plugin.plugin import discover_runs

EVIL = "<script>alert(1)</script>"
START_TIMEOUT_S = 90
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
        cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "tensorboard.main"]
        self.log = open(logdir.parent / "tensorboard.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *cmd,
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--load_fast",
                "false",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.get("/data/plugins_listing")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        self.stop()
        self.log.seek(0)
        pytest.fail(
            f"tensorboard did not start: {self.log.read().decode(errors='replace')[-2000:]}"
        )

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get_json(self, path: str) -> tuple[int, Any]:
        status, headers, body = self.get(path)
        assert headers["Content-Type"].startswith("application/json")
        return status, json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("tb")
    logdir = base / "logs"
    run = make_real_run(logdir / "demo")  # logs/demo/run/version_0
    shutil.copytree(run, logdir / EVIL)
    with open(logdir / EVIL / ALERTS_FILENAME, "a", encoding="utf-8") as f:
        alert = {"step": 30, "kind": "transient", "message": "<img src=x onerror=alert(2)>"}
        f.write(json.dumps(alert) + "\n")
    write_scalars(logdir / "plain", {"train/loss": [(0, 1.0)]})
    outside = base / "outside"
    shutil.copytree(run, outside)
    os.symlink(outside, logdir / "link", target_is_directory=True)
    srv = Server(logdir)
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


def test_tab_is_listed(server: Server) -> None:
    status, listing = server.get_json("/data/plugins_listing")
    assert status == 200
    entry = listing[PLUGIN_NAME]
    assert entry["tab_name"] == "Warmup" and entry["enabled"] is True
    assert entry["loading_mechanism"]["module_path"] == f"/data/plugin/{PLUGIN_NAME}/index.js"


def test_runs_route(server: Server) -> None:
    status, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/runs")
    assert status == 200
    rows = {r["run"]: r for r in body["runs"]}
    assert set(rows) == {EVIL, "demo/run/version_0", "plain"}  # not the symlink outside
    demo = rows["demo/run/version_0"]
    assert demo["verdict"] == "unstable but recovered"
    counts = {k: len(v) for k, v in jsonl_by_kind(server.logdir / EVIL).items()}
    assert counts["loss_spike"] == len(SPIKE_STEPS)
    assert rows[EVIL]["alerts"] == counts  # the copy has one more transient alert
    counts["transient"] -= 1
    assert demo["alerts"] == {k: n for k, n in counts.items() if n}
    assert demo["planned_warmup"] == 20
    assert "none of the monitor's keys" in rows["plain"]["error"]


def test_run_route(server: Server) -> None:
    query = urllib.parse.urlencode({"run": "demo/run/version_0"})
    status, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?{query}")
    assert status == 200
    with open(server.logdir / "demo/run/version_0" / ALERTS_FILENAME, encoding="utf-8") as f:
        expected = [json.loads(line) for line in f]
    assert [(a["step"], a["kind"]) for a in body["alerts"]] == [
        (e["step"], e["kind"]) for e in expected
    ]
    assert [a["step"] for a in body["alerts"] if a["kind"] == "loss_spike"] == list(SPIKE_STEPS)
    assert body["summary"]["verdict"] == "unstable but recovered"
    assert "path" not in body["summary"]
    assert [p[0] for p in body["curves"]["lr"]] == list(range(60))
    assert "loss spiked twice during warmup (steps 12, 13)" in body["summary"]["advice"]


def test_names_and_texts_come_back_as_data(server: Server) -> None:
    query = urllib.parse.urlencode({"run": EVIL})
    status, headers, raw = server.get(f"/data/plugin/{PLUGIN_NAME}/run?{query}")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    body = json.loads(raw)
    assert body["run"] == EVIL
    assert body["alerts"][-1]["message"] == "<img src=x onerror=alert(2)>"


def test_index_js_sets_text_never_html(server: Server) -> None:
    status, headers, body = server.get(f"/data/plugin/{PLUGIN_NAME}/index.js")
    assert status == 200 and headers["Content-Type"].startswith("application/javascript")
    js = body.decode()
    assert "export async function render()" in js
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js


@pytest.mark.parametrize(
    "run",
    ["link", "..", "../outside", "/etc", "/etc/passwd", "demo/../../outside", "demo/run", ""],
)
def test_run_route_never_leaves_the_logdir(server: Server, run: str) -> None:
    query = urllib.parse.urlencode({"run": run})
    status, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?{query}")
    assert status == (400 if run == "" else 404)
    assert "error" in body


def test_discover_runs_skips_symlinks_outside(tmp_path: Path) -> None:
    inside = tmp_path / "logs"
    write_scalars(inside / "a", {"warmup/lr": [(0, 1.0)]})
    write_scalars(tmp_path / "elsewhere", {"warmup/lr": [(0, 1.0)]})
    os.symlink(tmp_path / "elsewhere", inside / "b")
    os.symlink(inside / "a", inside / "c")  # inside, but walk does not follow links
    assert discover_runs(str(inside)) == {"a": str((inside / "a").resolve())}
    assert discover_runs(str(tmp_path / "missing")) == {}


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_screenshot_in_headless_chromium(server: Server, tmp_path: Path) -> None:
    """A picture of the tab. Set WARMUP_MONITOR_SCREENSHOT=path to keep a copy."""
    out = tmp_path / "tab.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1400,1600",
        "--virtual-time-budget=20000",
        f"--screenshot={out}",
        f"{server.url}/?runFilter=demo#{PLUGIN_NAME}",
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    assert out.exists(), done.stderr.decode(errors="replace")[-2000:]
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    keep = os.environ.get("WARMUP_MONITOR_SCREENSHOT")
    if keep:
        shutil.copyfile(out, keep)

"""The "Warmup" TensorBoard plugin, served by a real ``tensorboard`` started on 127.0.0.1."""

from __future__ import annotations

import json
import math
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
import pytorch_lightning as pl
from conftest import fit, make_loader, tiny_module_class
from tensorboard.plugins import base_plugin
from test_report import SPIKE_STEPS, jsonl_by_kind, make_real_run, spiky_loss, write_scalars

from warmup_monitor import Detection, WarmupMonitor
from warmup_monitor.report.events import event_files
from warmup_monitor.schema import ALERTS_FILENAME
from warmup_monitor.tb_plugin import PLUGIN_NAME, WarmupPlugin
from warmup_monitor.tb_plugin.plugin import discover_runs

EVIL = "<script>alert(1)</script>"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_prefixed_run(root: Path, prefix: str) -> str:
    """A real run whose monitor logs under ``log_key_prefix=prefix``."""
    logger = pl.loggers.TensorBoardLogger(str(root), name="run", version=0)
    model = tiny_module_class(pl)(scripted=spiky_loss, warmup=20)
    monitor = WarmupMonitor(
        warmup_steps=20, log_key_prefix=prefix, detection=Detection(episodes=False)
    )
    fit(pl, root, [monitor], model=model, max_steps=40, loader=make_loader(160, 4), logger=logger)
    return str(logger.log_dir)


def make_episode_run(root: Path) -> str:
    """A real run with the monitor's defaults (episodes on): its two loss spikes make one
    episode, closed by an ``episode_end`` record (which has no threshold)."""
    logger = pl.loggers.TensorBoardLogger(str(root), name="run", version=0)
    model = tiny_module_class(pl)(scripted=spiky_loss, warmup=20)
    fit(pl, root, [WarmupMonitor(warmup_steps=20)], model=model, max_steps=60,
        loader=make_loader(240, 4), logger=logger)  # fmt: skip
    return str(logger.log_dir)


def make_plain_lightning_run(root: Path) -> str:
    """A real Lightning run with a TensorBoardLogger and no monitor."""
    logger = pl.loggers.TensorBoardLogger(str(root), name="run", version=0)
    model = tiny_module_class(pl)(scripted=spiky_loss, warmup=20)
    fit(pl, root, [], model=model, max_steps=20, loader=make_loader(80, 4), logger=logger,
        log_every_n_steps=1)  # fmt: skip
    return str(logger.log_dir)


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
    # Defect 3: a run whose event file and alerts file are links to files outside the logdir.
    (logdir / "filelink").mkdir()
    os.symlink(event_files(str(outside))[0], logdir / "filelink" / "events.out.tfevents.9.x")
    write_scalars(logdir / "filelink", {"train/loss": [(0, 1.0)]})
    os.symlink(outside / ALERTS_FILENAME, logdir / "filelink" / ALERTS_FILENAME)
    # Defect 1: one bad alerts line and an empty event file, each in a run of its own.
    shutil.copytree(run, logdir / "badline")
    with open(logdir / "badline" / ALERTS_FILENAME, "a", encoding="utf-8") as f:
        f.write('{"step": Infinity, "kind": "loss_spike"}\n' + "[" * 100_000 + "\n")
    (logdir / "empty").mkdir()
    (logdir / "empty" / "events.out.tfevents.1.x").write_bytes(b"")
    # Issue 12: a monitor logging under another prefix.
    make_prefixed_run(logdir / "prefixed", prefix="wm/")
    # Issue 22: a plain Lightning run (no monitor); a monitor run whose event file is damaged
    # from its first byte (the key is still in its bytes); a run with episodes.
    make_plain_lightning_run(logdir / "lightning")
    shutil.copytree(run, logdir / "damaged")
    (events,) = event_files(str(logdir / "damaged"))
    with open(events, "r+b") as f:
        f.write(b"\xff" * 16)
    make_episode_run(logdir / "episodes")
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
    # Not the directory link that leads outside, nor the runs without the monitor.
    assert set(rows) == {
        EVIL,
        "demo/run/version_0",
        "badline",
        "prefixed/run/version_0",
        "damaged",
        "episodes/run/version_0",
    }  # fmt: skip
    demo = rows["demo/run/version_0"]
    assert demo["verdict"] == "unstable but recovered" and demo["verdict_reason"]
    counts = {k: len(v) for k, v in jsonl_by_kind(server.logdir / EVIL).items()}
    assert counts["loss_spike"] == len(SPIKE_STEPS)
    assert rows[EVIL]["alerts"] == counts  # the copy has one more transient alert
    counts["transient"] -= 1
    assert demo["alerts"] == {k: n for k, n in counts.items() if n}
    assert demo["planned_warmup"] == 20


def test_only_runs_of_the_monitor_are_listed(server: Server) -> None:
    """Issue 22, finding 10: a plain Lightning run was listed in red as "not readable"."""
    plain = server.logdir / "lightning" / "run" / "version_0"
    assert event_files(str(plain)) and not (plain / ALERTS_FILENAME).exists()
    _, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/runs")
    rows = {r["run"]: r for r in body["runs"]}
    for other in ("lightning/run/version_0", "plain", "filelink", "empty"):
        assert other not in rows
        status, one = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?run={other}")
        assert status == 404 and one["error"] == "not a run of the monitor"
    # A run of the monitor that cannot be read is still listed, with why.
    assert rows["damaged"]["error"] and "verdict" not in rows["damaged"]
    assert all(r["error"] is None for name, r in rows.items() if name != "damaged")


def _leaves(x: Any) -> Iterator[Any]:
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def test_nothing_is_nan(server: Server) -> None:
    """Issue 22, finding 10: the ``episode_end`` row showed its threshold as "nan"."""
    run = server.logdir / "episodes" / "run" / "version_0"
    with open(run / ALERTS_FILENAME, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    ends = [r for r in records if r["kind"] == "episode_end"]
    assert ends and all(r.get("threshold", "nan") == "nan" for r in ends)
    query = urllib.parse.urlencode({"run": "episodes/run/version_0"})
    status, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?{query}")
    assert status == 200
    served = [a for a in body["alerts"] if a["kind"] == "episode_end"]
    assert [a["step"] for a in served] == [r["step"] for r in ends]
    assert all(a["threshold"] is None for a in served)
    for leaf in _leaves(body):
        assert not (isinstance(leaf, str) and leaf.lower() == "nan")
        assert not (isinstance(leaf, float) and math.isnan(leaf))
    # The tab shows a missing number as an em dash.
    _, _, js = server.get(f"/data/plugin/{PLUGIN_NAME}/index.js")
    assert "v == null ? '\\u2014'" in js.decode()


def test_one_bad_run_never_breaks_another(server: Server) -> None:
    """Issue 16, defect 1: one bad alerts line anywhere made /runs answer HTTP 500."""
    status, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/runs")
    assert status == 200
    rows = {r["run"]: r for r in body["runs"]}
    bad = rows["badline"]
    assert bad["error"] is None and bad["verdict"] == rows["demo/run/version_0"]["verdict"]
    n = len((server.logdir / "demo/run/version_0" / ALERTS_FILENAME).read_text().splitlines())
    assert bad["problems"] == [
        f"{ALERTS_FILENAME} line {n + 1}: 'step' is not finite (inf); skipped",
        f"{ALERTS_FILENAME} line {n + 2}: nested deeper than 64 levels; skipped",
    ]
    status, one = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?run=damaged")
    assert status == 422 and one["error"] == rows["damaged"]["error"]


def test_file_links_outside_the_logdir_are_not_read(server: Server) -> None:
    """Issue 16, defect 3: an event file reached through a file link was served."""
    _, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/runs")
    # Only its own file (train/loss) was read: the linked monitor file and alerts were not,
    # so it is not a run of the monitor.
    assert "filelink" not in {r["run"] for r in body["runs"]}
    status, _ = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?run=filelink")
    assert status == 404


def test_a_run_logged_under_another_prefix(server: Server) -> None:
    query = urllib.parse.urlencode({"run": "prefixed/run/version_0"})
    status, body = server.get_json(f"/data/plugin/{PLUGIN_NAME}/run?{query}")
    assert status == 200 and body["prefix"] == "wm/"
    assert [p[0] for p in body["curves"]["lr"]] == list(range(40))
    assert body["summary"]["alerts_by_kind"]["loss_spike"] == list(SPIKE_STEPS)


def test_the_tab_is_inactive_without_a_monitor_run(tmp_path: Path) -> None:
    """Issue 16, defect 7: the tab was active on any logdir, marking every run not readable."""
    write_scalars(tmp_path / "a", {"train/loss": [(0, 1.0)], "lr": [(0, 0.1)]})
    plugin = WarmupPlugin(base_plugin.TBContext(logdir=str(tmp_path)))
    assert plugin.is_active() is False
    write_scalars(tmp_path / "b", {"wm/lr": [(0, 0.1)], "wm/warmup_steps": [(0, 5.0)]})
    plugin._checked_at = -1e9  # the next call may look again
    assert plugin.is_active() is True


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

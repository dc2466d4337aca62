"""``warmup-monitor report``: output, ``--json``, ``--out``, and one exit code per problem."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import SPIKE_STEPS, jsonl_by_kind, make_real_run, write_scalars

from warmup_monitor.alerts import ALERTS_FILENAME
from warmup_monitor.cli import main
from warmup_monitor.report.events import event_files


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/run/version_0`` with two forced loss spikes and ``version_1`` without."""
    root = tmp_path_factory.mktemp("logs")
    make_real_run(root, version=0)
    make_real_run(root, version=1, scripted=None, max_steps=30)
    return root


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_table_and_advice(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(logs / "run" / "version_0")
    code, out, err = run_main(["report", run], capsys)
    assert code == 0, err
    assert "unstable but recovered" in out
    assert "loss_spike x2 @ 12, 13" in out
    assert "loss spiked twice during warmup (steps 12, 13)" in out
    for kind, steps in jsonl_by_kind(run).items():
        assert f"{kind} x{len(steps)} @ " in out
    assert err == ""


def test_json_counts_and_steps_match_the_jsonl(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = logs / "run" / "version_0"
    code, out, _ = run_main(["report", str(run), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    (summary,) = doc["runs"]
    expected: dict[str, list[int]] = {}
    lines = (run / ALERTS_FILENAME).read_text(encoding="utf-8").splitlines()
    for line in lines:
        alert = json.loads(line)
        expected.setdefault(alert["kind"], []).append(alert["step"])
    assert summary["alerts_by_kind"] == expected
    assert expected["loss_spike"] == list(SPIKE_STEPS)
    assert summary["alert_count"] == len(lines)
    assert summary["verdict"] == "unstable but recovered"
    assert summary["planned_warmup"] == 20 and summary["extensions"] == []
    assert doc["errors"] == []


def test_a_root_directory_reports_every_run_below_it(
    logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run_main(["report", str(logs), "--json", "--out", str(tmp_path)], capsys)
    assert code == 0
    doc = json.loads(out)
    names = [r["name"] for r in doc["runs"]]
    assert names == [str(logs / "run" / "version_0"), str(logs / "run" / "version_1")]
    assert doc["runs"][0]["verdict"] == "unstable but recovered"
    assert "loss_spike" not in doc["runs"][1]["alerts_by_kind"]
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("<tr><td>") == 2 and "data:image/png;base64," in page
    # The page names the runs as the picture does (what differs in their paths), the whole
    # name on hover, and says what to do in the words summarize uses for each run.
    from warmup_monitor import summarize

    for version in ("version_0", "version_1"):
        full = str(logs / "run" / version)
        assert f'<span title="{html.escape(full)}">{version}</span>' in page
        assert f"<h2>advice for {version}</h2>" in page
        assert html.escape(summarize(full).guidance) in page


def test_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run_main(["report", str(tmp_path / "nope")], capsys)
    assert code == 3
    assert "no such directory" in err and out == ""
    (tmp_path / "file").write_text("x")
    assert run_main(["report", str(tmp_path / "file")], capsys)[0] == 3


def test_no_event_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, _, err = run_main(["report", str(tmp_path / "empty")], capsys)
    assert code == 4
    assert "no TensorBoard event file" in err


def test_run_without_warmup_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_scalars(tmp_path, {"train/loss": [(0, 1.0), (1, 0.5)]})
    code, _, err = run_main(["report", str(tmp_path)], capsys)
    assert code == 5
    assert "none of the monitor's keys" in err and "warmup/lr" in err


def test_truncated_event_file_reports_what_it_can(
    logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(logs / "run" / "version_0", run)
    events = Path(event_files(str(run))[0])
    events.write_bytes(events.read_bytes()[:-10])
    code, out, err = run_main(["report", str(run)], capsys)
    assert code == 6
    assert "loss_spike x2 @ 12, 13" in out  # the report is still there
    assert "skipped:" in err and "truncated record at byte" in err


def test_bad_jsonl_line(logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(logs / "run" / "version_0", run)
    expected = jsonl_by_kind(run)
    lines = len((run / ALERTS_FILENAME).read_text(encoding="utf-8").splitlines())
    with open(run / ALERTS_FILENAME, "a", encoding="utf-8") as f:
        f.write('{"step": 40, "kind": "loss_sp')
    code, out, err = run_main(["report", str(run), "--json"], capsys)
    assert code == 6
    assert json.loads(out)["runs"][0]["alerts_by_kind"] == expected
    assert f"{ALERTS_FILENAME} line {lines + 1}: truncated or not JSON: unterminated" in err


def test_good_runs_are_reported_beside_a_bad_one(
    logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = str(logs / "run" / "version_1")
    code, out, _ = run_main(["report", good, str(tmp_path / "missing"), "--json"], capsys)
    assert code == 3
    doc = json.loads(out)
    assert [r["name"] for r in doc["runs"]] == [good]
    assert doc["errors"] and "no such directory" in doc["errors"][0]


def test_unwritable_out(logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(
        ["report", str(logs / "run" / "version_1"), "--out", str(blocker)], capsys
    )
    assert code == 7
    assert "could not write the report" in err


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["report"], capsys)[0] == 2
    assert run_main(["frobnicate"], capsys)[0] == 2
    code, out, _ = run_main(["report", "--help"], capsys)
    assert code == 0 and "exit codes" in out


def test_console_script(logs: Path) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "warmup-monitor")
    if not os.path.exists(script):
        pytest.skip("the console script is not installed (pip install -e .)")
    done = subprocess.run(
        [script, "report", str(logs / "nope")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3 and "no such directory" in done.stderr


# ---------------------------------------------------------------------------------- issue 16


def test_bad_alert_values_never_crash_the_report(
    logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Defect 1: `"step": Infinity` (or 1e400) gave an OverflowError traceback, 100,000 nested
    `[` a RecursionError, 1e23 stretched the picture, 7.9 became 7."""
    run = tmp_path / "run"
    shutil.copytree(logs / "run" / "version_0", run)
    expected = jsonl_by_kind(run)
    n = len((run / ALERTS_FILENAME).read_text(encoding="utf-8").splitlines())
    bad = [
        '{"step": Infinity, "kind": "loss_spike"}',
        '{"step": 1e400, "kind": "loss_spike"}',
        '{"step": 1e23, "kind": "loss_spike"}',
        '{"step": 7.9, "kind": "loss_spike"}',
        "[" * 100_000,
        '{"step": 900000000, "kind": "loss_spike"}',  # < 2**53, far beyond the run's 60 steps
    ]
    with open(run / ALERTS_FILENAME, "a", encoding="utf-8") as f:
        f.write("\n".join(bad) + "\n")
    code, out, err = run_main(["report", str(run), "--json", "--out", str(tmp_path / "o")], capsys)
    assert code == 6
    assert "Traceback" not in err and "Error" not in err
    assert json.loads(out)["runs"][0]["alerts_by_kind"] == expected
    for i, why in enumerate(
        [
            "'step' is not finite",
            "'step' is not finite",
            "'step' 1e+23 is beyond 2**53",
            "'step' 7.9 is not a whole",
        ]
    ):
        assert f"{ALERTS_FILENAME} line {n + 1 + i}: {why}" in err
    assert f"{ALERTS_FILENAME} line {n + 5}: nested deeper than 64 levels; skipped" in err
    assert "1 alerts at steps beyond" in err
    assert (tmp_path / "o" / "report.png").stat().st_size > 10_000


def test_control_characters_are_never_printed(
    logs: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Defect 2: ESC sequences in a run directory name or an alert kind reached the terminal."""
    esc = "\x1b]0;pwned\x07\x1b[2J"
    run = tmp_path / f"run{esc}"
    shutil.copytree(logs / "run" / "version_0", run)
    with open(run / ALERTS_FILENAME, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 30, "kind": f"odd{esc}", "message": f"m{esc}"}) + "\n")
        f.write('{"step": 31, "kind": "x"' + esc + "\n")  # a bad line quoting the sequence
    code, out, err = run_main(["report", str(run)], capsys)
    assert code == 6
    assert "odd]0;pwned[2J" in out  # the kind is shown, without its control characters
    for text in (out, err):
        assert not any(c in text for c in "\x1b\x07\x9b"), repr(text[:200])


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty (0 bytes)"),
        (bytes(range(256)) * 8, "not a TensorBoard event file"),
        (None, "first record header fails its checksum"),  # a real file, byte 0 flipped
    ],
)
def test_broken_event_files_are_diagnosed(
    logs: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: bytes | None,
    why: str,
) -> None:
    """Defect 6: all three said "hold none of the monitor's keys; was WarmupMonitor in the
    Trainer's callbacks?"."""
    run = tmp_path / "run"
    shutil.copytree(logs / "run" / "version_0", run)
    (path,) = event_files(str(run))
    if content is None:
        raw = bytearray(Path(path).read_bytes())
        raw[0] ^= 0xFF
        content = bytes(raw)
    Path(path).write_bytes(content)
    code, _, err = run_main(["report", str(run)], capsys)
    assert code == 4
    assert why in err and "none of the monitor's keys" not in err


def test_one_version_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 22 item 8: the package, its metadata and ``warmup-monitor --version`` say 0.2.0,
    from one place (``warmup_monitor.__version__``, read by ``pyproject.toml``)."""
    from importlib.metadata import version

    import warmup_monitor
    from warmup_monitor import cli

    assert warmup_monitor.__version__ == "0.2.0"
    assert version("warmup_monitor") == warmup_monitor.__version__
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "warmup-monitor 0.2.0"


def test_the_table_fits_100_columns_and_wide_allows_more(
    logs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22, finding 9: the table wrapped badly at 160 columns; it now fits 100 by default,
    with ``--wide`` for more. Runs are named by what differs in their paths."""
    monkeypatch.delenv("COLUMNS", raising=False)  # not a terminal: the default widths
    code, out, err = run_main(["report", str(logs)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0] == f"runs: {logs.as_posix()}/run/<run>"
    rows = [line.split()[0] for line in lines if line.startswith("version_")]
    assert rows == ["version_0", "version_1"]
    expected = jsonl_by_kind(logs / "run" / "version_0")
    for kind, steps in expected.items():  # each kind on one line, never folded
        shown = ", ".join(str(s) for s in steps[:2]) + (
            f" +{len(steps) - 2}" if len(steps) > 2 else ""
        )
        assert f"{kind} x{len(steps)} @ {shown}" in out
    code, wide, err = run_main(["report", str(logs), "--wide"], capsys)
    assert code == 0, err
    widths = [len(line) for line in wide.splitlines()]
    assert 100 < max(widths) <= 160
    for head in ("peak grad", "extended"):  # two of the wide table's extra columns
        assert head in wide and head not in out
    for kind, steps in expected.items():
        shown = ", ".join(str(s) for s in steps[:4]) + (
            f" +{len(steps) - 4}" if len(steps) > 4 else ""
        )
        assert f"{kind} x{len(steps)} @ {shown}" in wide

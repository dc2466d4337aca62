"""The demo's report tells the truth: alert counts and steps equal the alerts file's."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest
from conftest import load_example

from warmup_monitor import cli


def test_report_of_a_demo_run_matches_its_alerts_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("char_transformer.py")
    # The demo's optimisation (AdamW, peak lr 1.0, 20-step warmup, adaptive) on a tiny model,
    # long enough to pass the extended warmup (a shorter run is "too short to judge").
    run_dir = example.main(
        [
            *("--log-dir", str(tmp_path), "--max-steps", "70", "--d-model", "32"),
            *("--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "8"),
            *("--max-chars", "200000", "--val-every", "1000", "--quiet", "--no-report"),
            *("--monitor-kwargs", '{"adaptive": true}'),
        ]
    )
    capsys.readouterr()
    assert cli.main(["report", run_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["runs"][0]
    with open(os.path.join(run_dir, "warmup_alerts.jsonl")) as f:
        alerts = [json.loads(line) for line in f]
    assert alerts, "the demo's lr is meant to raise alerts"
    steps = collections.defaultdict(list)
    for a in alerts:
        steps[a["kind"]].append(a["step"])
    assert {k: sorted(v) for k, v in report["alerts_by_kind"].items()} == {
        k: sorted(v) for k, v in steps.items()
    }
    extended = [a for a in alerts if a["kind"] == "warmup_extended"]
    assert report["extensions"] == [
        {
            "step": a["step"],
            "old": a["details"]["old_warmup_steps"],
            "new": a["details"]["new_warmup_steps"],
        }
        for a in extended
    ]
    if extended:
        new_end = extended[-1]["details"]["new_warmup_steps"]
        assert report["effective_warmup"] == new_end
        assert any(f"at least {new_end} warmup steps" in line for line in report["advice"])
    assert report["verdict_reason"]
    assert report["instability_steps"] == sorted(set(report["instability_steps"]))
    # The report's lr advice and the controller's own alert give the same number.
    for a in alerts:
        if a["kind"] == "warmup_exhausted" and a["details"].get("recommended_lr") is not None:
            assert report["recommended_peak_lr"] == pytest.approx(
                a["details"]["recommended_lr"], rel=1e-12
            )
            assert f"{a['details']['recommended_lr']:.3g}" in " ".join(report["advice"])

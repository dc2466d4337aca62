"""The new user's healthy run of issue 20, as a test: an MLP on scikit-learn's digits, AdamW,
batch 32, the user's own LambdaLR warmup then cosine decay, 235 steps (5 epochs).

On the main of session 3 (b62443e) the watch-only monitor flagged about 75 % of its steps
(one episode 36-149, verdict "unstable but recovered", advice to lower the lr) and
``adaptive=True`` backed off four times, rolled back three times and ended at a training loss
3.7x the unmonitored run's. Here: no instability alert, the verdict "healthy", no controller
action, and the final parameters and loss bit-identical to the unmonitored run's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from digits_run import run

from warmup_monitor import WarmupMonitor
from warmup_monitor.alerts import is_instability
from warmup_monitor.report import HEALTHY, summarize
from warmup_monitor.report.runs import load_run

pytest.importorskip("sklearn")

CASES = [(3e-3, 50), (1e-3, 50), (3e-3, 100)]


@pytest.fixture(scope="module")
def references() -> dict[tuple[float, int], dict[str, Any]]:
    """The unmonitored runs."""
    return {case: run(lr=case[0], warmup=case[1]) for case in CASES}


@pytest.mark.parametrize(("lr", "warmup"), CASES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["watch", "adaptive"])
def test_the_users_healthy_run_stays_quiet_and_untouched(
    lr: float,
    warmup: int,
    adaptive: bool,
    references: dict[tuple[float, int], dict[str, Any]],
    tmp_path: Path,
) -> None:
    seen: list[Any] = []
    monitor = WarmupMonitor(warmup_steps=warmup, adaptive=adaptive, on_alert=seen.append)
    out = run(lr=lr, warmup=warmup, monitor=monitor, root=str(tmp_path))
    ref = references[(lr, warmup)]
    assert len(out["losses"]) == 235
    assert [a for a in seen if is_instability(a.kind)] == []
    assert [a.kind_name for a in seen] == [
        k for k in (a.kind_name for a in seen) if k in ("grad_norm_spike", "grad_norm_rise")
    ]  # nothing but notices: no episode, no action
    summary = summarize(load_run(out["trainer"].log_dir))
    assert summary.verdict == HEALTHY, summary.verdict_reason
    assert set(summary.actions) <= {"grad_norm_spike", "grad_norm_rise"}  # notices only
    # Watch-only and an adaptive monitor that never acts leave the run bit-identical.
    assert out["losses"] == ref["losses"]
    assert all(torch.equal(a, b) for a, b in zip(out["params"], ref["params"], strict=True))
    assert out["final_loss"] == ref["final_loss"]

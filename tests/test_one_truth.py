"""One truth about a run (issue 20): the verdict, the episode records, the console's
"recovered" and ``warmup/unstable`` follow one rule over flagged steps. Each case here failed on
the main of session 3 (b62443e)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import fit, make_loader, read_scalars, tiny_module_class
from test_report import _alert, synthetic_run

from warmup_monitor import Detection, WarmupMonitor
from warmup_monitor.loop import LoopMonitor
from warmup_monitor.report import HEALTHY, RECOVERED, UNSTABLE, summarize
from warmup_monitor.report.runs import load_run


def test_steps_flagged_inside_an_episode_count_for_the_verdict() -> None:
    """The digits case: one episode 36-149 whose last 15 logged steps were all flagged, sent as
    an opening line and an ``episode_end`` record listing the ranges; the verdict said "no
    instability alert in the last 15 logged steps" (it saw step 36 only)."""
    opening = _alert(36, "loss_trend_spike", episode=1)
    end = _alert(
        169,
        "episode_end",
        episode=1,
        start=36,
        end=149,
        recovered=False,
        steps=[[36, 100], [102, 149]],
    )
    r = summarize(synthetic_run(n=150, warmup=50, alerts=[opening, end]))
    assert r.verdict == UNSTABLE
    assert r.instability_steps == [*range(36, 101), *range(102, 150)]
    assert r.verdict_reason.startswith("an instability alert at step 149, within the last 15")
    (episode,) = r.episodes
    assert episode.recovered is False  # the record and the verdict agree


def test_a_dead_run_is_not_called_recovered_on_the_console(
    ns: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loss that blows up at step 3 and then sits at its initial level: the episode went
    quiet, and the console said "episode 1 ... recovered" while the report said "not
    recovered"."""

    def loss(step: int) -> float:
        return 60.0 if step == 3 else (2.3 - 0.05 * step if step < 3 else 2.31)

    model = tiny_module_class(ns)(scripted=loss)
    monitor = WarmupMonitor(warmup_steps=5, detection=Detection(episode_quiet_steps=5))
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        trainer = fit(ns, tmp_path, [monitor], model=model, max_steps=30)
    ends = [r.getMessage() for r in caplog.records if "episode_end" in r.getMessage()]
    assert len(ends) == 1 and "did not recover" in ends[0], ends
    assert " recovered" not in ends[0].replace("did not recover", "")
    r = summarize(load_run(trainer.log_dir))
    assert r.verdict == UNSTABLE
    assert r.episodes[0].recovered is False


def test_a_run_resumed_into_a_new_version_is_not_healthy_while_it_lists_an_episode(
    ns: ModuleType, tmp_path: Path
) -> None:
    """Lightning writes the resumed half to ``version_1``; its ``episode_end`` record lists the
    episode's steps from ``version_0``, and that half was judged "healthy"."""

    def loss(step: int) -> float:
        return 80.0 if 10 <= step <= 14 else 2.0 / (1 + 0.05 * step)

    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=14)
    detection = Detection(episode_quiet_steps=5)
    first = fit(
        ns,
        tmp_path,
        [WarmupMonitor(warmup_steps=5, detection=detection), ckpt],
        model=tiny_module_class(ns)(scripted=loss, batch_from_step=True),
        max_steps=14,
        enable_checkpointing=True,
        loader=make_loader(n=256),
    )
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    second = fit(
        ns,
        tmp_path,
        [WarmupMonitor(warmup_steps=5, detection=detection)],
        model=tiny_module_class(ns)(scripted=loss, batch_from_step=True),
        max_steps=60,
        logger=ns.loggers.TensorBoardLogger(str(tmp_path), name="run", version=1),
        ckpt_path=str(path),
        loader=make_loader(n=256),
    )
    assert first.log_dir != second.log_dir
    resumed = summarize(load_run(second.log_dir))
    assert [e.start for e in resumed.episodes] == [10]
    assert resumed.verdict != HEALTHY
    assert resumed.verdict == RECOVERED  # the loss falls again after the episode
    assert 10 in resumed.instability_steps
    # The monitor wrote where the run came from: the report reads both halves as one run.
    assert resumed.first_step == 0 and resumed.last_step == 59
    assert any(
        n.startswith(f"continues {first.log_dir} (resumed at step 14)") for n in resumed.notes
    )
    (episode,) = resumed.episodes  # the first half's close of the episode is not a second one
    assert episode.recovered is True
    # Without the first half on disk the resumed half is still not "healthy".
    import shutil

    shutil.rmtree(first.log_dir)
    alone = summarize(load_run(second.log_dir))
    assert alone.verdict == RECOVERED and alone.first_step == 14


def test_a_gradient_norm_spike_alone_is_a_notice_not_instability(tmp_path: Path) -> None:
    """A single ``grad_norm_spike`` at the last step of a plain loop made the verdict "unstable
    ... not recovered", though gradient-norm evidence alone never acts."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    log_dir = str(tmp_path / "plain")
    writer = SummaryWriter(log_dir)
    monitor = LoopMonitor(
        opt,
        warmup_steps=10,
        writer=writer,
        alerts_file=os.path.join(log_dir, "warmup_alerts.jsonl"),
        window=None,
    )
    steps = 40
    for step in range(steps):
        idx = torch.arange(step * 6, step * 6 + 6) % 256
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        if step == steps - 1:  # the gradient 1000x, the loss unchanged
            for p in model.parameters():
                p.grad.mul_(1000.0)  # type: ignore[union-attr]
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()
    monitor.close()
    writer.close()
    run = load_run(log_dir)
    kinds = {a.kind_name for a in run.alerts}
    assert "grad_norm_spike" in kinds  # shown ...
    r = summarize(run)
    assert r.verdict == HEALTHY  # ... but not instability
    assert max(read_scalars(log_dir)["warmup/unstable"].values()) == 0.0


def test_a_healthy_run_says_which_flagged_steps_it_excused_and_lists_no_unstable_episode() -> None:
    """The ``long`` arm of the demo cell: a 4-step divergence at 49-52 that recovered at once
    (a ``transient`` alert at 53), closed at 72 by a record that judged it "not recovered"
    (the loss was not yet 5 % below the initial one). The verdict excuses it and said "no
    instability alert up to step 249"; the picture's caption said "1 unstable episode(s)"."""
    from warmup_monitor.report.figure import _spans, caption

    alerts = [
        _alert(49, "loss_divergence", episode=1),
        _alert(53, "transient", episode_start=49, episode_steps=4, kinds=["loss_divergence"]),
        _alert(
            72,
            "episode_end",
            episode=1,
            start=49,
            end=52,
            count=4,
            recovered=False,
            outcome="not_recovered",
            steps=[[49, 52]],
        ),
    ]
    r = summarize(synthetic_run(n=250, warmup=100, alerts=alerts))
    assert r.verdict == HEALTHY and r.instability_steps == []
    assert "steps 49-52 flagged, then recovered at once (transient)" in r.verdict_reason
    assert not r.verdict_reason.startswith("no instability alert up to")
    (episode,) = r.episodes
    assert "recovered at once (transient): not counted by the verdict" in episode.facts()
    assert "not recovered" not in episode.facts()
    text = caption(r, "long")
    assert "0 unstable episodes" in text and "1 episode recovered at once" in text
    assert _spans(r) == []  # no bar or shading of an "unstable episode" in the pictures


def test_an_episode_says_when_its_recovery_was_judged() -> None:
    """The demo's short run: its episode closed at step 50 "not recovered", and the run, judged
    at its end, is "unstable but recovered" (its loss came back later). The tab's row said only
    "not recovered" next to that verdict; it now says when that was judged."""
    opening = _alert(28, "loss_divergence", episode=1)
    end = _alert(50, "episode_end", episode=1, start=28, end=30, recovered=False, steps=[[28, 30]])
    r = summarize(synthetic_run(n=250, warmup=10, alerts=[opening, end]))
    assert r.verdict == RECOVERED
    (episode,) = r.episodes
    assert episode.facts()[-1] == "not recovered when it closed at step 50"

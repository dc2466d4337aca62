"""WarmupMonitor in real Lightning training: logged values against independent computations."""

from __future__ import annotations

import json
import logging
import math
import os
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    fit,
    make_loader,
    read_accumulator,
    read_scalars,
    recorder_class,
    ten_x_only,
    tiny_module_class,
)

from warmup_monitor import Alert, Detection, Statistics, WarmupMonitor, Window
from warmup_monitor.alerts import ALERTS_FILENAME, read_alerts


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _check_against_recorder(scalars: dict, rec: object, n_steps: int) -> None:
    grads, before, after, lrs = rec.grads, rec.before, rec.after, rec.lrs  # type: ignore[attr-defined]
    assert len(grads) == n_steps
    for t in range(n_steps):
        expected_norm = torch.nn.utils.get_total_norm(grads[t]).item()
        assert scalars["warmup/grad_norm"][t] == pytest.approx(expected_norm, rel=1e-5)
        assert scalars["warmup/lr"][t] == pytest.approx(lrs[t], rel=1e-6)
        delta = _flat(after[t]) - _flat(before[t])
        expected_ratio = (delta.norm() / _flat(before[t]).norm()).item()
        assert scalars["warmup/update_ratio"][t] == pytest.approx(expected_ratio, rel=1e-4)
        if t == 0:
            assert 0 not in scalars["warmup/grad_cosine"]
        else:
            expected_cos = F.cosine_similarity(_flat(grads[t]), _flat(grads[t - 1]), dim=0).item()
            assert scalars["warmup/grad_cosine"][t] == pytest.approx(expected_cos, abs=1e-5)


@pytest.mark.parametrize(
    "case",
    ["plain", "accumulate", "clip", "bf16"],
)
def test_logged_statistics_match_independent_computation(
    ns: ModuleType, tmp_path: os.PathLike, case: str
) -> None:
    rec = recorder_class(ns)()
    kwargs: dict = {}
    if case == "accumulate":
        kwargs["accumulate_grad_batches"] = 2
    if case == "clip":
        kwargs["gradient_clip_val"] = 0.05  # far below the norms: clipping is active
    if case == "bf16":
        kwargs["precision"] = "bf16-mixed"
    model = tiny_module_class(ns)(lr=0.05, warmup=4)
    n_steps = 6
    trainer = fit(
        ns, tmp_path, [WarmupMonitor(warmup_steps=4), rec], model=model, max_steps=n_steps, **kwargs
    )
    scalars = read_scalars(trainer.log_dir)
    _check_against_recorder(scalars, rec, n_steps)

    # The loss is the mean of the step's micro-batch losses, not divided by accumulation.
    per_step: dict[int, list[float]] = {}
    for step, loss in model.batch_losses:
        per_step.setdefault(step, []).append(loss)
    initial = sum(per_step[0]) / len(per_step[0])
    for t in range(n_steps):
        expected = sum(per_step[t]) / len(per_step[t])
        assert len(per_step[t]) == kwargs.get("accumulate_grad_batches", 1)
        assert scalars["warmup/loss"][t] == pytest.approx(expected, rel=1e-5)
        assert scalars["warmup/loss_ratio"][t] == pytest.approx(expected / initial, rel=1e-5)

    if case == "clip":
        # The logged norm is the pre-clip one: the update used clipped gradients, so plain
        # SGD-with-momentum arithmetic on the *recorded* gradients would not reproduce it;
        # the norm logged is above the clip value at every step.
        assert all(scalars["warmup/grad_norm"][t] > 0.05 for t in range(n_steps))


def test_every_key_and_the_layout_reach_tensorboard(ns: ModuleType, tmp_path: os.PathLike) -> None:
    trainer = fit(
        ns,
        tmp_path,
        [WarmupMonitor(warmup_steps=4, window=Window(post_warmup_steps=2, log_every_n_steps=2))],
        max_steps=9,
    )
    scalars = read_scalars(trainer.log_dir)
    logged_steps = [0, 2, 4]  # every 2nd step in warmup and in the 2 post-warmup steps
    for key in ["lr", "loss", "loss_ratio", "grad_norm", "update_ratio", "warmup_steps"]:
        assert sorted(scalars[f"warmup/{key}"]) == logged_steps, key
    assert sorted(scalars["warmup/grad_cosine"]) == [2, 4]
    assert scalars["warmup/warmup_steps"][0] == 4.0
    acc = read_accumulator(trainer.log_dir)
    # The custom-scalars layout is a tensor summary of the custom_scalars plugin.
    layout_tags = acc.PluginTagToContent("custom_scalars")
    assert layout_tags, "no custom-scalars layout written"
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout_event = acc.Tensors(next(iter(layout_tags)))[0]
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["Warmup"]
    titles = [chart.title for chart in layout.category[0].chart]
    for title in ["learning rate", "loss", "gradient norm (pre-clip)", "update / weight ratio"]:
        assert title in titles


def _scripted(values: dict[int, float]) -> object:
    return lambda step: values.get(step, 1.0)


def _alert_texts(log_dir: str) -> list[tuple[int, str]]:
    acc = read_accumulator(log_dir)
    tag = "warmup/alerts/text_summary"  # SummaryWriter.add_text appends /text_summary
    if tag not in acc.Tags()["tensors"]:
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


@pytest.mark.parametrize(("factor", "expected"), [(10.5, 1), (9.5, 0)])
def test_ten_x_rule_alerts_once_in_every_sink(
    tmp_path: os.PathLike, caplog: pytest.LogCaptureFixture, factor: float, expected: int
) -> None:
    import pytorch_lightning as pl

    hooked: list[Alert] = []
    model = tiny_module_class(pl)(scripted=_scripted({5: factor}))
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        trainer = fit(
            pl,
            tmp_path,
            [WarmupMonitor(warmup_steps=8, on_alert=hooked.append, detection=ten_x_only())],
            model=model,
        )
    jsonl = os.path.join(trainer.log_dir, ALERTS_FILENAME)
    spikes = [a for a in read_alerts(jsonl)] if os.path.exists(jsonl) else []
    spikes = [a for a in spikes if a.kind == "loss_spike"]
    assert [a.step for a in spikes] == [5] * expected
    if expected:
        assert spikes[0].value == pytest.approx(factor)
        assert spikes[0].threshold == pytest.approx(10.0)
        with open(jsonl) as f:
            raw = json.loads(f.readline())
        assert {"step", "kind", "message", "value", "threshold"} <= set(raw)
    assert [a.step for a in hooked if a.kind == "loss_spike"] == [5] * expected
    logged = [r for r in caplog.records if "loss_spike" in r.getMessage()]
    assert len(logged) == expected
    texts = [(s, t) for s, t in _alert_texts(trainer.log_dir) if "loss_spike" in t]
    assert [s for s, _ in texts] == [5] * expected
    scalars = read_scalars(trainer.log_dir)
    assert scalars["warmup/loss_ratio"][5] == pytest.approx(factor, rel=1e-5)
    assert scalars["warmup/unstable"][5] == float(expected)


def test_non_finite_loss_alerts_and_training_goes_on(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    hooked: list[Alert] = []
    model = tiny_module_class(pl)(scripted=_scripted({3: math.nan}))
    trainer = fit(
        pl, tmp_path, [WarmupMonitor(warmup_steps=8, on_alert=hooked.append)], model=model
    )
    assert trainer.global_step == 8  # not crashed by the monitor
    non_finite = [a for a in hooked if a.kind == "non_finite"]
    # The scripted NaN is in the loss's value only; the gradients stay finite.
    assert [a.step for a in non_finite] == [3]
    assert "loss is nan" in non_finite[0].message


def test_non_finite_gradient_alerts(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    hooked: list[Alert] = []
    model = tiny_module_class(pl)(inf_grad_at=3)
    trainer = fit(
        pl, tmp_path, [WarmupMonitor(warmup_steps=8, on_alert=hooked.append)], model=model
    )
    assert trainer.global_step == 8  # not crashed by the monitor
    non_finite = [a for a in hooked if a.kind == "non_finite"]
    assert [a.step for a in non_finite] == [3]
    assert "gradient norm is inf" in non_finite[0].message
    # The cosine is undefined next to a non-finite gradient: never logged as NaN.
    scalars = read_scalars(trainer.log_dir)
    assert 3 not in scalars["warmup/grad_cosine"] and 4 not in scalars["warmup/grad_cosine"]
    assert 5 in scalars["warmup/grad_cosine"]
    on_disk = read_alerts(os.path.join(trainer.log_dir, ALERTS_FILENAME))
    assert [a.step for a in on_disk if a.kind == "non_finite"] == [3]
    assert all(math.isfinite(v) for v in scalars["warmup/grad_cosine"].values())


def test_a_raising_hook_hides_nothing_and_does_not_stop_training(
    tmp_path: os.PathLike, caplog: pytest.LogCaptureFixture
) -> None:
    import pytorch_lightning as pl

    def hook(alert: Alert) -> None:
        raise RuntimeError("pager is down")

    model = tiny_module_class(pl)(scripted=_scripted({2: 50.0}))
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        trainer = fit(
            pl,
            tmp_path,
            [WarmupMonitor(warmup_steps=8, on_alert=hook, detection=ten_x_only())],
            model=model,
        )
    assert trainer.global_step == 8
    assert [a.step for a in read_alerts(os.path.join(trainer.log_dir, ALERTS_FILENAME))] == [2]
    assert any("pager is down" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert [s for s, _ in _alert_texts(trainer.log_dir)] == [2]


def test_initial_loss_is_mean_of_first_k_finite_losses(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    hooked: list[Alert] = []
    values = {0: 1.0, 1: math.nan, 2: 3.0, 5: 21.0}  # initial = mean(1, 3) = 2; 21 > 20
    model = tiny_module_class(pl)(scripted=_scripted(values), lr=0.0)
    fit(
        pl,
        tmp_path,
        [
            WarmupMonitor(
                warmup_steps=8,
                detection=Detection(initial_loss_steps=2, episodes=False),
                on_alert=hooked.append,
            )
        ],
        model=model,
    )
    spikes = [a for a in hooked if a.kind == "loss_spike"]
    assert [a.step for a in spikes] == [5]
    assert spikes[0].details["initial_loss"] == pytest.approx(2.0)


def test_no_logger_and_monitoring_window(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    hooked: list[Alert] = []
    model = tiny_module_class(pl)(scripted=_scripted({1: 20.0, 7: 20.0}))
    monitor = WarmupMonitor(
        warmup_steps=3,
        window=Window(post_warmup_steps=2),
        on_alert=hooked.append,
        detection=ten_x_only(),
    )
    trainer = fit(pl, tmp_path, [monitor], model=model, logger=False)
    assert trainer.global_step == 8
    # Step 7 is past warmup (3) + post-warmup (2): not monitored.
    assert [a.step for a in hooked] == [1]
    assert os.path.exists(os.path.join(str(tmp_path), ALERTS_FILENAME))
    assert monitor.state_dict()["steps"] == {0: 8}


def test_skipped_batches_and_frozen_parameters(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    rec = recorder_class(pl)()
    model = tiny_module_class(pl)(none_at=(1,))
    model.net[0].bias.requires_grad_(False)
    trainer = fit(pl, tmp_path, [WarmupMonitor(warmup_steps=6), rec], model=model, max_steps=6)
    scalars = read_scalars(trainer.log_dir)
    # Lightning counts the skipped batch as step 1; the monitor logs nothing for it, raises no
    # alert, and the cosine at step 2 compares with step 0's gradient, the last real one.
    real = [0, 2, 3, 4, 5]
    assert sorted(scalars["warmup/loss"]) == real
    assert sorted(scalars["warmup/grad_norm"]) == real
    assert not os.path.exists(os.path.join(trainer.log_dir, ALERTS_FILENAME))
    for t in real:
        expected = torch.nn.utils.get_total_norm(rec.grads[t]).item()
        assert scalars["warmup/grad_norm"][t] == pytest.approx(expected, rel=1e-5)
    expected_cos = F.cosine_similarity(_flat(rec.grads[2]), _flat(rec.grads[0]), dim=0).item()
    assert scalars["warmup/grad_cosine"][2] == pytest.approx(expected_cos, abs=1e-5)


def test_resume_from_checkpoint_restores_state(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    # 8 batches per epoch. Initial loss 1.0; the resumed part's first loss is 2.0, so a 15.0
    # is a spike only against the *restored* initial loss (15 > 10 x 1, but 15 < 10 x 2).
    values = {8: 2.0, 10: 15.0, 3: 12.0}
    loader = make_loader(n=32, batch_size=4)
    ckpt_dir = os.path.join(str(tmp_path), "ckpt")
    first = WarmupMonitor(warmup_steps=8, detection=ten_x_only())
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
    model = tiny_module_class(pl)(scripted=_scripted(values))
    fit(
        pl,
        tmp_path,
        [first, checkpoint],
        model=model,
        max_steps=8,
        loader=loader,
        enable_checkpointing=True,
    )
    saved = torch.load(os.path.join(ckpt_dir, "last.ckpt"), weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("WarmupMonitor"))
    assert state["steps"] == {0: 8}
    assert state["alert_count"] == 1  # the 12.0 at step 3

    hooked: list[Alert] = []
    second = WarmupMonitor(warmup_steps=8, on_alert=hooked.append, detection=ten_x_only())
    trainer = fit(
        pl,
        tmp_path,
        [second, pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir)],
        model=tiny_module_class(pl)(scripted=_scripted(values)),
        max_steps=12,
        loader=loader,
        enable_checkpointing=True,
        ckpt_path=os.path.join(ckpt_dir, "last.ckpt"),
    )
    assert [(a.step, a.kind.value) for a in hooked] == [(10, "loss_spike")]
    assert second.engine.detector.initial_loss == pytest.approx(1.0)
    scalars = read_scalars(trainer.log_dir)
    assert scalars["warmup/alerts"][10] == 2.0
    # The reference gradient is not saved: no cosine at the first step after resume.
    assert 8 not in scalars["warmup/grad_cosine"]
    assert 9 in scalars["warmup/grad_cosine"]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"warmup_steps": 0}, ValueError, "warmup_steps"),
        ({"warmup_steps": -5}, ValueError, "warmup_steps"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"warmup_steps": "100"}, TypeError, "warmup_steps"),
        ({"warmup_steps": True}, TypeError, "warmup_steps"),
        ({"warmup_steps": 10, "on_alert": "print"}, TypeError, "on_alert"),
        ({"warmup_steps": 10, "alerts_file": 3}, TypeError, "alerts_file"),
        ({"warmup_steps": 10, "log_key_prefix": None}, TypeError, "log_key_prefix"),
    ],
)
def test_bad_configuration_is_rejected_by_name(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        WarmupMonitor(**kwargs)


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        WarmupMonitor(100)  # type: ignore[misc]


def test_key_prefix_and_bf16_reference(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    rec = recorder_class(pl)()
    monitor = WarmupMonitor(
        warmup_steps=5, log_key_prefix="wm/", statistics=Statistics(reference_dtype="bfloat16")
    )
    trainer = fit(pl, tmp_path, [monitor, rec], max_steps=5)
    scalars = read_scalars(trainer.log_dir)
    assert not any(k.startswith("warmup/") for k in scalars)
    for t in range(1, 5):
        expected = F.cosine_similarity(_flat(rec.grads[t]), _flat(rec.grads[t - 1]), dim=0).item()
        assert scalars["wm/grad_cosine"][t] == pytest.approx(expected, abs=1e-2)


def test_warns_when_training_is_shorter_than_warmup(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    with pytest.warns(
        UserWarning, match="warmup_steps=16 is longer than the Trainer's max_steps=4"
    ):
        trainer = fit(pl, tmp_path, [WarmupMonitor(warmup_steps=16)], max_steps=4)
    assert sorted(read_scalars(trainer.log_dir)["warmup/loss"]) == [0, 1, 2, 3]


def test_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    values = {0: 1.0, 9: 30.0, 11: 12.0}
    scripted = _scripted(values)

    def run(root: str, max_steps: int, ckpt: str | None, hooked: list[Alert]) -> dict:
        ckpt_dir = os.path.join(root, "ckpt")
        monitor = WarmupMonitor(warmup_steps=12, on_alert=hooked.append, detection=ten_x_only())
        with pytest.warns(UserWarning, match="longer than") if max_steps < 12 else _nullcontext():
            trainer = fit(
                pl,
                root,
                [monitor, pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                model=tiny_module_class(pl)(scripted=scripted, batch_from_step=True),
                max_steps=max_steps,
                loader=make_loader(n=32, batch_size=4),
                enable_checkpointing=True,
                ckpt_path=ckpt,
            )
        return read_scalars(trainer.log_dir)

    whole_alerts: list[Alert] = []
    whole = run(os.path.join(str(tmp_path), "whole"), 12, None, whole_alerts)
    part_root = os.path.join(str(tmp_path), "parts")
    run(part_root, 8, None, [])
    resumed_alerts: list[Alert] = []
    resumed = run(part_root, 12, os.path.join(part_root, "ckpt", "last.ckpt"), resumed_alerts)
    for key in ["lr", "loss", "loss_ratio", "grad_norm", "update_ratio", "alerts", "unstable"]:
        for step in range(8, 12):
            assert resumed[f"warmup/{key}"][step] == pytest.approx(
                whole[f"warmup/{key}"][step], rel=1e-6
            ), (key, step)
    for step in range(9, 12):
        assert resumed["warmup/grad_cosine"][step] == pytest.approx(
            whole["warmup/grad_cosine"][step], abs=1e-6
        )
    assert [(a.step, a.kind) for a in resumed_alerts] == [
        (a.step, a.kind) for a in whole_alerts if a.step >= 8
    ]
    assert [a.step for a in whole_alerts] == [9, 11]


def _nullcontext() -> Any:
    import contextlib

    return contextlib.nullcontext()


def test_sketch_cosine_in_training(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    rec = recorder_class(pl)()
    monitor = WarmupMonitor(warmup_steps=6, statistics=Statistics(cosine="sketch"))
    trainer = fit(pl, tmp_path, [monitor, rec])
    scalars = read_scalars(trainer.log_dir)
    for t in range(1, 6):
        expected = F.cosine_similarity(_flat(rec.grads[t]), _flat(rec.grads[t - 1]), dim=0).item()
        assert scalars["warmup/grad_cosine"][t] == pytest.approx(expected, abs=0.1)
        expected_norm = torch.nn.utils.get_total_norm(rec.grads[t]).item()
        assert scalars["warmup/grad_norm"][t] == pytest.approx(expected_norm, rel=1e-5)

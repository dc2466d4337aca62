"""The curvature probe inside real Lightning training."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    fit,
    make_loader,
    read_scalars,
    recorder_class,
    ten_x_only,
    tiny_module_class,
)

from warmup_monitor import Alert, CurvatureProbe, WarmupMonitor
from warmup_monitor.curvature import EdgeOfStabilityRule, stability_threshold


def test_probe_logs_sharpness_and_margin_and_leaves_training_alone(
    tmp_path: os.PathLike,
) -> None:
    runs = {}
    for name, probe in (("plain", False), ("probed", True)):
        rec = recorder_class(pl)()
        model = tiny_module_class(pl)(optimizer="plain_sgd", lr=0.05)
        monitor = WarmupMonitor(
            warmup_steps=6,
            curvature=CurvatureProbe(every_n_steps=2) if probe else False,
            detection=ten_x_only(),
        )
        trainer = fit(pl, os.path.join(str(tmp_path), name), [monitor, rec], model=model)
        runs[name] = (rec, read_scalars(trainer.log_dir), model)
    # Training is bit for bit the same with the probe.
    plain, probed = runs["plain"][0], runs["probed"][0]
    for a, b in zip(plain.after, probed.after, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    scalars = runs["probed"][1]
    assert sorted(scalars["warmup/sharpness"]) == [0, 2, 4, 6]
    assert scalars["warmup/sharpness_converged"] == {0: 1.0, 2: 1.0, 4: 1.0, 6: 1.0}
    # Independent check at every probe, the cold one (step 0) and the warm-started ones on
    # the parameters training has moved since: the dense Hessian of the loss on the probe
    # batch (the first batch) with the weights after that step, and SGD's threshold 2 / lr.
    model = runs["probed"][2]
    x, y = next(iter(make_loader()))  # the probe batch: the first training batch
    names = [n for n, _ in model.net.named_parameters()]
    numel = [p.numel() for p in model.net.parameters()]
    shapes = [p.shape for p in model.net.parameters()]

    def flat_loss(v: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, v.split(numel), shapes, strict=True)}
        out = torch.func.functional_call(model.net, params, (x.double(),))
        return torch.nn.functional.mse_loss(out, y.double())

    tops = {}
    for step in (0, 2, 4, 6):
        flat = torch.cat([p.reshape(-1) for p in probed.after[step]]).double()
        hessian = torch.autograd.functional.hessian(flat_loss, flat)
        tops[step] = torch.linalg.eigvalsh(hessian).max().item()
        assert scalars["warmup/sharpness"][step] == pytest.approx(tops[step], rel=1e-2)
        margin = scalars["warmup/stability_margin"][step]
        assert margin == pytest.approx(tops[step] * 0.05 / 2, rel=1e-2)
    assert len({round(v, 4) for v in tops.values()}) == 4  # the parameters did move


def test_edge_rule_needs_two_probes_in_a_row() -> None:
    rule = EdgeOfStabilityRule()
    assert rule.update(0, 1.5) is None
    assert rule.update(2, 0.5) is None
    assert rule.update(4, 1.2) is None
    alert = rule.update(6, 1.3)
    assert alert is not None and alert.kind.value == "edge_of_stability" and alert.step == 6
    assert rule.update(8, 1.4) is None  # once per run above the edge
    state = rule.state_dict()
    other = EdgeOfStabilityRule()
    other.load_state_dict(state)
    assert other.update(10, 0.9) is None and other.update(12, 2.0) is None


def test_a_too_high_lr_is_past_the_edge_and_extends_warmup(tmp_path: os.PathLike) -> None:
    hooked: list[Alert] = []
    model = tiny_module_class(pl)(optimizer="plain_sgd", lr=3.0)
    monitor = WarmupMonitor(
        warmup_steps=6,
        curvature=CurvatureProbe(every_n_steps=1),
        schedule="linear",
        adaptive=True,
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=6)
    scalars = read_scalars(trainer.log_dir)
    margins = scalars["warmup/stability_margin"]
    kinds = [a.kind.value for a in hooked]
    assert "edge_of_stability" in kinds
    edge = next(a for a in hooked if a.kind.value == "edge_of_stability")
    assert margins[edge.step] > 1 and margins[edge.step - 1] > 1
    assert "warmup_extended" in kinds


def test_unsupported_optimizer_turns_the_probe_off_with_an_alert(tmp_path: os.PathLike) -> None:
    base = tiny_module_class(pl)

    class Adagrad(base):  # type: ignore[misc,valid-type]
        def configure_optimizers(self) -> Any:
            return torch.optim.Adagrad(self.parameters(), lr=0.1)

    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=4, curvature=CurvatureProbe(every_n_steps=1), on_alert=hooked.append
    )
    with pytest.warns(UserWarning, match="curvature probe is turned off"):
        fit(pl, tmp_path, [monitor], model=Adagrad(), max_steps=4)
    assert [a.kind.value for a in hooked if a.kind.value == "monitor"] == ["monitor"]
    assert stability_threshold(torch.optim.SGD([torch.zeros(1)], lr=0.5)) == pytest.approx(4.0)


def test_manual_optimization_without_a_probe_loss_is_refused_before_any_step(
    tmp_path: os.PathLike,
) -> None:
    """Issue 15 item 5: the probe used to call ``training_step``, which steps the optimizer."""
    base = tiny_module_class(pl)
    steps: list[int] = []

    class Manual(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            opt = self.optimizers()
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            steps.append(batch_idx)
            return loss

    model = Manual()
    before = [p.detach().clone() for p in model.parameters()]
    monitor = WarmupMonitor(warmup_steps=4, curvature=True)
    with pytest.raises(ValueError, match=r"manual optimization.*loss_fn"):
        fit(pl, tmp_path, [monitor], model=model, max_steps=4)
    assert steps == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _bn_dropout_module(ns: Any, dropout: float, optimizer: str = "adamw", lr: float = 1e-3) -> Any:
    """``Linear(bias=True)`` -> batch norm -> tanh -> dropout -> linear, as a LightningModule:
    in train mode the batch norm cancels the first bias (its gradient is 0, Adam's ``v`` ~ 0)."""

    class BNDrop(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 16),
                torch.nn.BatchNorm1d(16),
                torch.nn.Tanh(),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(16, 1),
            )
            self.draws: list[tuple[float, float, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_train_batch_end(self, *args: Any) -> None:
            # Training's own draws from every global RNG a probe could touch, after the
            # monitor's hook (Lightning runs the callbacks' hooks before the module's).
            self.draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))

        def configure_optimizers(self) -> Any:
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=lr)
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return BNDrop()


def test_batch_norm_adamw_margin_is_read_in_train_mode(tmp_path: os.PathLike) -> None:
    """Issue 15 item 4: in eval mode the bias before the batch norm has curvature while Adam's
    preconditioner there is eps: the margin read ~400 and edge_of_stability fired at step 2 on
    a stable run. The function being trained has no such direction."""
    hooked: list[Alert] = []
    model = _bn_dropout_module(pl, dropout=0.0)
    monitor = WarmupMonitor(
        warmup_steps=8,
        curvature=CurvatureProbe(every_n_steps=1),
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=8)
    margins = read_scalars(trainer.log_dir)["warmup/stability_margin"]
    assert sorted(margins) == list(range(8))
    assert max(margins.values()) < 1.0
    assert [a for a in hooked if a.kind.value == "edge_of_stability"] == []


def test_dropout_and_batch_norm_training_is_bit_identical_with_the_probe(
    tmp_path: os.PathLike,
) -> None:
    """The probe runs the train-mode forward (batch statistics, dropout), so it draws dropout
    masks and updates running statistics: both are put back, and training does not move."""
    runs = {}
    for name, probe in (("plain", False), ("probed", True)):
        rec = recorder_class(pl)()
        model = _bn_dropout_module(pl, dropout=0.5)
        monitor = WarmupMonitor(
            warmup_steps=8,
            curvature=CurvatureProbe(every_n_steps=1) if probe else False,
            detection=ten_x_only(),
        )
        random.seed(0)
        np.random.seed(0)
        trainer = fit(pl, os.path.join(str(tmp_path), name), [monitor, rec], model=model)
        runs[name] = (rec, model, read_scalars(trainer.log_dir))
    (plain, plain_model, _), (probed, probed_model, scalars) = runs["plain"], runs["probed"]
    assert len(scalars["warmup/sharpness"]) == 8  # it did probe, after every step
    assert len(plain.after) == len(probed.after) == 8
    for a, b in zip(plain.after, probed.after, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for (n, a), (_, b) in zip(
        plain_model.state_dict().items(), probed_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n  # running statistics included
    assert plain_model.draws == probed_model.draws


def test_a_probe_loss_that_draws_from_random_and_numpy_leaves_training_alone(
    tmp_path: os.PathLike,
) -> None:
    """Issue 15 item 9: Python's and NumPy's global RNG states are restored after a probe."""

    def noisy_loss(module: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        jitter = random.gauss(0.0, 1e-3) + float(np.random.normal(0.0, 1e-3))
        return torch.nn.functional.mse_loss(module.net(x), y) + jitter

    runs = {}
    for name, probe in (("plain", False), ("probed", True)):
        model = _bn_dropout_module(pl, dropout=0.5, optimizer="sgd", lr=0.05)
        monitor = WarmupMonitor(
            warmup_steps=8,
            curvature=CurvatureProbe(every_n_steps=1, loss_fn=noisy_loss) if probe else False,
            detection=ten_x_only(),
        )
        random.seed(0)
        np.random.seed(0)
        fit(pl, os.path.join(str(tmp_path), name), [monitor], model=model)
        runs[name] = model
    assert len(runs["plain"].draws) == 8
    assert runs["plain"].draws == runs["probed"].draws
    for a, b in zip(runs["plain"].parameters(), runs["probed"].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["probe_loss_fn", "training_step"])
def test_a_first_batch_without_a_loss_does_not_turn_the_probe_off(
    tmp_path: os.PathLike, where: str
) -> None:
    """Issue 15 item 8: the probe takes the first batch that gives a loss."""
    first_x = next(iter(make_loader()))[0]
    base = tiny_module_class(pl)

    def no_loss_on_the_first_batch(module: Any, batch: Any) -> torch.Tensor | None:
        x, y = batch
        if torch.equal(x, first_x):
            return None
        return torch.nn.functional.mse_loss(module.net(x), y)

    class SkipsFirst(base):  # type: ignore[misc,valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if where == "training_step" and self.trainer.global_step > 0:
                return no_loss_on_the_first_batch(self, batch)  # the probe's call
            return super().training_step(batch, batch_idx)

    hooked: list[Alert] = []
    custom = no_loss_on_the_first_batch if where == "probe_loss_fn" else None
    monitor = WarmupMonitor(
        warmup_steps=8,
        curvature=CurvatureProbe(every_n_steps=4, loss_fn=custom),
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    trainer = fit(pl, tmp_path, [monitor], model=SkipsFirst(optimizer="plain_sgd"))
    assert [a.kind.value for a in hooked if a.kind.value == "monitor"] == []
    assert sorted(read_scalars(trainer.log_dir)["warmup/sharpness"]) == [1, 4]

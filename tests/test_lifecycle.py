"""The monitor's life cycle in the ways people train (issue 15 items 1, 2, 3, 6, 7, 14b): a
callback reused by a new Trainer, several fits, resumes through real checkpoint files (with the
resume-equality matrix), manual optimization, misuse of ``LoopMonitor``, and where the alerts
file goes."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, make_loader, read_scalars, ten_x_only, tiny_module_class

from warmup_monitor import Alert, WarmupMonitor, Window


class LrProbe(pl.Callback):
    """Records the lr each update really uses: a step pre-hook registered after the monitor's
    own (``on_train_start`` comes after ``on_fit_start``), so it sees any factor applied."""

    def __init__(self) -> None:
        self.lrs: list[tuple[int, float]] = []
        self._handles: list[Any] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        def pre(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.lrs.append((trainer.global_step, float(optimizer.param_groups[0]["lr"])))

        self._handles = [opt.register_step_pre_hook(pre) for opt in trainer.optimizers]

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for h in self._handles:
            h.remove()


def _warns_short() -> Any:
    return pytest.warns(UserWarning, match="longer than the Trainer's max_steps")


# ------------------------------------------------------------------------------- item 1


def test_a_callback_reused_by_a_new_trainer_starts_warmup_afresh(tmp_path: os.PathLike) -> None:
    monitor = WarmupMonitor(warmup_steps=10, schedule="linear")
    factors = []
    for run in range(2):
        probe = LrProbe()
        model = tiny_module_class(pl)(optimizer="plain_sgd", lr=0.05)
        with _warns_short():
            fit(pl, os.path.join(str(tmp_path), f"r{run}"), [monitor, probe], model=model,
                max_steps=5)  # fmt: skip
        factors.append([lr / 0.05 for _, lr in probe.lrs])
    # The linear shape (t + 1) / 10 from t = 0 in both Trainers (before: 0.6 ... 1.0).
    expected = [(t + 1) / 10 for t in range(5)]
    assert factors[0] == pytest.approx(expected)
    assert factors[1] == pytest.approx(expected)


def test_a_reused_callback_watches_the_new_run_from_its_own_first_step(
    tmp_path: os.PathLike,
) -> None:
    monitor = WarmupMonitor(warmup_steps=10, window=Window(post_warmup_steps=0),
                            detection=ten_x_only())  # fmt: skip
    # Run 0 starts at loss 1.0, run 1 at loss 4.0: each run's loss_ratio is against its own.
    losses = [{0: 1.0, 1: 2.0, 2: 2.0}, {0: 4.0, 1: 2.0, 2: 1.0}]
    for run in range(2):
        model = tiny_module_class(pl)(scripted=lambda s, v=losses[run]: v.get(s, 1.0))
        with _warns_short():
            trainer = fit(pl, os.path.join(str(tmp_path), f"r{run}"), [monitor], model=model,
                          max_steps=3)  # fmt: skip
        scalars = read_scalars(trainer.log_dir)
        assert sorted(scalars["warmup/loss"]) == [0, 1, 2]
        for step in range(3):
            assert scalars["warmup/loss_ratio"][step] == pytest.approx(
                losses[run][step] / losses[run][0]
            )
    assert monitor.state_dict()["steps"] == {0: 3}


def test_several_fits_on_one_trainer_keep_counting(tmp_path: os.PathLike) -> None:
    monitor = WarmupMonitor(warmup_steps=10, schedule="linear")
    probe = LrProbe()
    model = tiny_module_class(pl)(optimizer="plain_sgd", lr=0.05)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[monitor, probe],
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with _warns_short():
        trainer.fit(model, make_loader())
    trainer.fit_loop.epoch_loop.max_steps = 6
    with _warns_short():
        trainer.fit(model, make_loader())
    assert [s for s, _ in probe.lrs] == list(range(6))
    assert [lr / 0.05 for _, lr in probe.lrs] == pytest.approx([(t + 1) / 10 for t in range(6)])
    assert sorted(read_scalars(trainer.log_dir)["warmup/loss"]) == list(range(6))


# ------------------------------------------------------------------------------- item 6


def _skipping_module_class(ns: ModuleType, style: str) -> type:
    """One optimizer, manual optimization, and the usual guard: skip the update on a NaN loss.

    ``style``: ``"return"`` returns before backward; ``"zero_grad"`` back-propagates, then drops
    the gradients (``zero_grad`` without ``step``); ``"backward"`` back-propagates and returns,
    the next batch's ``zero_grad`` drops them.
    """

    class Skipping(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self, nan_at: int) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.net = torch.nn.Linear(4, 1)
            self.nan_at = nan_at
            self.stepped: list[tuple[int, float]] = []  # (optimizer step, loss back-propagated)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            opt = self.optimizers()
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if batch_idx == self.nan_at:
                loss = loss * float("nan")
            if style == "backward":
                opt.zero_grad()
                self.manual_backward(loss)
                if not torch.isfinite(loss):
                    return loss
            elif not torch.isfinite(loss):
                if style == "zero_grad":
                    self.manual_backward(loss)
                    opt.zero_grad()
                return loss
            else:
                opt.zero_grad()
                self.manual_backward(loss)
            self.stepped.append((len(self.stepped), float(loss.detach())))
            opt.step()
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Skipping


@pytest.mark.parametrize("style", ["return", "zero_grad", "backward"])
def test_a_batch_that_skips_the_update_does_not_leak_its_loss(
    tmp_path: os.PathLike, style: str
) -> None:
    hooked: list[Alert] = []
    monitor = WarmupMonitor(warmup_steps=5, on_alert=hooked.append)
    model = _skipping_module_class(pl, style)(nan_at=2)
    trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=5)
    scalars = read_scalars(trainer.log_dir)
    # Batch 2 took no step: optimizer steps 0..4 are batches 0, 1, 3, 4, 5, each logging the
    # loss that was back-propagated for it, and nothing non-finite.
    assert [s for s, _ in model.stepped] == list(range(5))
    assert sorted(scalars["warmup/loss"]) == list(range(5))
    for step, loss in model.stepped:
        assert scalars["warmup/loss"][step] == pytest.approx(loss, rel=1e-6)
    assert not [a for a in hooked if a.kind == "non_finite"]


def _two_paced_optimizers_class(ns: ModuleType) -> type:
    """Two optimizers, the second stepping every other batch: their windows end at different
    batches. Each loss is recorded with the optimizer step it was back-propagated for."""

    class TwoPaced(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.body = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 1)
            self.losses: dict[int, list[float]] = {0: [], 1: []}
            self.grads: dict[int, list[torch.Tensor]] = {0: [], 1: []}

        def _step(self, idx: int, opt: Any, x: Any, y: Any) -> Any:
            loss = torch.nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)
            opt.zero_grad()
            self.manual_backward(loss)
            params = [p for g in opt.param_groups for p in g["params"]]
            self.grads[idx].append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
            self.losses[idx].append(float(loss.detach()))
            opt.step()
            return loss.detach()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            opt_a, opt_b = self.optimizers()
            x, y = batch
            loss = self._step(0, opt_a, x, y)
            if batch_idx % 2 == 1:
                self._step(1, opt_b, x * 0.5, y)  # a different loss from opt_a's
            return loss

        def configure_optimizers(self) -> Any:
            return [
                torch.optim.SGD(self.body.parameters(), lr=0.1),
                torch.optim.SGD(self.head.parameters(), lr=0.1),
            ]

    return TwoPaced


def test_two_optimizers_log_each_their_own_loss(tmp_path: os.PathLike) -> None:
    # Monitored: each optimizer's steps 0..2 (warmup 3, nothing after). Optimizer 0 takes its
    # steps 0..2 in batches 0..2; optimizer 1 in batches 1, 3, 5, after optimizer 0's window.
    monitor = WarmupMonitor(warmup_steps=3, window=Window(post_warmup_steps=0))
    model = _two_paced_optimizers_class(pl)()
    loader = make_loader(n=32, batch_size=4)
    trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=9, loader=loader)
    scalars = read_scalars(trainer.log_dir)
    assert sorted(scalars["warmup/loss"]) == [0, 1, 2]
    assert sorted(scalars["warmup/opt1/loss"]) == [0, 1, 2]
    for step in range(3):
        assert scalars["warmup/loss"][step] == pytest.approx(model.losses[0][step], rel=1e-6)
        assert scalars["warmup/opt1/loss"][step] == pytest.approx(model.losses[1][step], rel=1e-6)
    for step in (1, 2):  # optimizer 1's cosines outlive optimizer 0's window
        g = model.grads[1]
        cos = torch.nn.functional.cosine_similarity(g[step], g[step - 1], dim=0).item()
        assert scalars["warmup/opt1/grad_cosine"][step] == pytest.approx(cos, abs=1e-5)

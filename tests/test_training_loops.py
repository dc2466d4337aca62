"""Training-loop variety: AMP-skipped steps, manual optimization, several fits, the CLI, plain
PyTorch."""

from __future__ import annotations

import os
import textwrap
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import (
    fit,
    load_example,
    make_loader,
    read_scalars,
    recorder_class,
    ten_x_only,
    tiny_module_class,
)

from warmup_monitor import AdaptiveWarmup, Alert, CurvatureProbe, Detection, WarmupMonitor, Window
from warmup_monitor.alerts import ALERTS_FILENAME, read_alerts
from warmup_monitor.loop import LoopMonitor


def test_steps_skipped_by_the_grad_scaler_are_counted_apart(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision

    scales: list[float] = []

    class ScaleRecorder(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            scales.append(trainer.precision_plugin.scaler.get_scale())

    hooked: list[Alert] = []
    monitor = WarmupMonitor(warmup_steps=8, on_alert=hooked.append)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    model = tiny_module_class(pl)(inf_grad_at=3)
    trainer = fit(pl, tmp_path, [monitor, ScaleRecorder()], model=model, plugins=[plugin])
    # The scaler halves its scale on every step it skips: that is the independent count.
    skipped = [i for i in range(1, len(scales)) if scales[i] < scales[i - 1]]
    skipped += [0] if scales[0] < 65536.0 else []
    assert 3 in skipped
    assert monitor.engine.amp_skipped_steps == len(skipped)
    # A skipped step is not an instability and logs nothing.
    assert not [a for a in hooked if a.kind == "non_finite"]
    logged = sorted(read_scalars(trainer.log_dir)["warmup/loss"])
    assert logged == [s for s in range(8) if s not in skipped]


def manual_module_class(ns: ModuleType) -> type:
    class TwoOptimizers(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.encoder = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            opt_a, opt_b = self.optimizers()
            x, y = batch
            loss_a = torch.nn.functional.mse_loss(self.head(torch.tanh(self.encoder(x))), y)
            opt_a.zero_grad()
            self.manual_backward(loss_a)
            opt_a.step()
            loss_b = torch.nn.functional.mse_loss(self.head(torch.tanh(self.encoder(x))), y)
            opt_b.zero_grad()
            self.manual_backward(loss_b)
            opt_b.step()
            return loss_a

        def configure_optimizers(self) -> Any:
            return [
                torch.optim.SGD(self.encoder.parameters(), lr=0.1),
                torch.optim.Adam(self.head.parameters(), lr=0.01),
            ]

    return TwoOptimizers


def test_manual_optimization_with_two_optimizers(ns: ModuleType, tmp_path: os.PathLike) -> None:
    per_opt: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    class Recorder(ns.Callback):  # type: ignore[name-defined,misc]
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            idx = 0 if optimizer is trainer.optimizers[0] else 1
            params = [p for g in optimizer.param_groups for p in g["params"]]
            per_opt[idx].append(torch.nn.utils.get_total_norm([p.grad for p in params]))

    monitor = WarmupMonitor(warmup_steps=5)
    model = manual_module_class(ns)()
    trainer = fit(ns, tmp_path, [monitor, Recorder()], model=model, max_steps=10)
    scalars = read_scalars(trainer.log_dir)
    # Lightning counts both optimizers' steps in global_step; each optimizer counts its own.
    assert sorted(scalars["warmup/grad_norm"]) == list(range(5))
    assert sorted(scalars["warmup/opt1/grad_norm"]) == list(range(5))
    for step in range(5):
        assert scalars["warmup/grad_norm"][step] == pytest.approx(float(per_opt[0][step]), rel=1e-5)
        assert scalars["warmup/opt1/grad_norm"][step] == pytest.approx(
            float(per_opt[1][step]), rel=1e-5
        )
    assert scalars["warmup/lr"][0] == pytest.approx(0.1)
    assert scalars["warmup/opt1/lr"][0] == pytest.approx(0.01)
    assert 1 in scalars["warmup/opt1/grad_cosine"]
    assert monitor.state_dict()["steps"] == {0: 5, 1: 5}


def test_several_fits_on_one_trainer_continue(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    hooked: list[Alert] = []
    values = {0: 1.0, 6: 12.0}
    model = tiny_module_class(pl)(scripted=lambda s: values.get(s, 2.0))
    monitor = WarmupMonitor(warmup_steps=8, on_alert=hooked.append, detection=ten_x_only())
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[monitor],
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with pytest.warns(UserWarning, match="longer than"):
        trainer.fit(model, make_loader())
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model, make_loader())
    assert trainer.global_step == 8
    # The initial loss (1.0) from the first fit still holds: 12 > 10 x 1.
    assert [(a.step, a.kind.value) for a in hooked] == [(6, "loss_spike")]
    assert sorted(read_scalars(trainer.log_dir)["warmup/loss"]) == list(range(8))


def test_validation_is_not_counted(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    base = tiny_module_class(pl)

    class WithValidation(base):  # type: ignore[misc,valid-type]
        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    monitor = WarmupMonitor(warmup_steps=8)
    trainer = pl.Trainer(
        max_steps=8,
        val_check_interval=2,
        callbacks=[monitor],
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(WithValidation(), make_loader(), make_loader(n=8))
    assert sorted(read_scalars(trainer.log_dir)["warmup/loss"]) == list(range(8))
    assert monitor.state_dict()["steps"] == {0: 8}


def _cli_model(ns: ModuleType) -> type:
    class CLIModel(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)
            self.lr = lr

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def train_dataloader(self) -> Any:
            return make_loader()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return CLIModel


def test_lightning_cli_yaml_config(ns: ModuleType, tmp_path: os.PathLike) -> None:
    cli_mod = pytest.importorskip(f"{ns.__name__}.cli")
    config = os.path.join(str(tmp_path), "config.yaml")
    with open(config, "w") as f:
        f.write(
            textwrap.dedent(f"""\
            trainer:
              max_steps: 4
              accelerator: cpu
              enable_progress_bar: false
              enable_checkpointing: false
              logger:
                class_path: {ns.__name__}.loggers.TensorBoardLogger
                init_args: {{save_dir: {tmp_path}, name: cli, version: 0}}
              callbacks:
                - class_path: warmup_monitor.WarmupMonitor
                  init_args:
                    warmup_steps: 4
                    schedule: linear
                    log_key_prefix: "cli/"
                    adaptive:
                      class_path: warmup_monitor.AdaptiveWarmup
                      init_args: {{backoff: 0.5, max_extensions: 2}}
                    curvature:
                      class_path: warmup_monitor.CurvatureProbe
                      init_args: {{every_n_steps: 2, max_iters: 5}}
                    detection:
                      spike_factor: 5.0
                      trend_sigmas: 6.0
                    window:
                      post_warmup_steps: 2
            """)
        )
    cli = cli_mod.LightningCLI(
        _cli_model(ns), args=["fit", "--config", config], save_config_callback=None
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, WarmupMonitor)]
    assert len(monitors) == 1
    config = monitors[0].config
    assert config.adaptive == AdaptiveWarmup(backoff=0.5, max_extensions=2)
    assert config.curvature == CurvatureProbe(every_n_steps=2, max_iters=5)
    assert config.detection == Detection(spike_factor=5.0, trend_sigmas=6.0)
    assert config.window == Window(post_warmup_steps=2)
    assert monitors[0].engine.detector.loss_ratio_rule.spike_factor == 5.0
    assert monitors[0].engine.controller.backoff == 0.5  # type: ignore[union-attr]
    scalars = read_scalars(cli.trainer.log_dir)
    assert sorted(scalars["cli/grad_norm"]) == [0, 1, 2, 3]
    assert sorted(scalars["cli/sharpness"]) == [0, 2]  # probed every 2 steps


def test_plain_pytorch_loop(tmp_path: os.PathLike) -> None:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    hooked: list[Alert] = []
    alerts_file = os.path.join(str(tmp_path), ALERTS_FILENAME)
    monitor = LoopMonitor(
        opt,
        warmup_steps=6,
        writer=writer,
        alerts_file=alerts_file,
        on_alert=hooked.append,
        detection=ten_x_only(),
    )
    loader = make_loader()
    norms, grads = [], []
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step == 4:
            loss = loss - loss.detach() + 50.0  # a scripted spike, gradients unchanged
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()
    monitor.close()
    writer.close()
    scalars = read_scalars(str(tmp_path))
    for step in range(6):
        assert scalars["warmup/grad_norm"][step] == pytest.approx(float(norms[step]), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(grads[2], grads[1], dim=0)
    assert scalars["warmup/grad_cosine"][2] == pytest.approx(float(cos), abs=1e-5)
    assert [(a.step, a.kind.value) for a in hooked] == [(4, "loss_spike")]
    assert [a.step for a in read_alerts(alerts_file)] == [4]


def test_plain_pytorch_example_runs(tmp_path: os.PathLike) -> None:
    module = load_example("plain_pytorch.py")
    log_dir = module.main(["--log-dir", str(tmp_path), "--lr", "3", "--steps", "40"])
    alerts = read_alerts(os.path.join(log_dir, ALERTS_FILENAME))
    # With episodes, the spike may be folded into an episode another kind opened: its kinds
    # are in the opening line's episode_kinds or the closing line's kinds.
    kinds = {a.kind_name for a in alerts} | {
        k for a in alerts for key in ("episode_kinds", "kinds") for k in a.details.get(key, [])
    }
    assert "loss_spike" in kinds


def test_recorder_sees_what_the_monitor_sees(tmp_path: os.PathLike) -> None:
    """check_every_n_steps batches host reads without changing any logged value."""
    import pytorch_lightning as pl

    rec = recorder_class(pl)()
    monitor = WarmupMonitor(
        warmup_steps=8, window=Window(log_every_n_steps=4, check_every_n_steps=4)
    )
    trainer = fit(pl, tmp_path, [monitor, rec], max_steps=8)
    scalars = read_scalars(trainer.log_dir)
    assert sorted(scalars["warmup/grad_norm"]) == [0, 4]
    for t in (0, 4):
        expected = torch.nn.utils.get_total_norm(rec.grads[t]).item()
        assert scalars["warmup/grad_norm"][t] == pytest.approx(expected, rel=1e-5)

"""Shared fixtures: a tiny real model in both Lightning namespaces, and readers of real logs."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as lightning_pytorch
except ImportError:  # pragma: no cover - the dev extras install it
    lightning_pytorch = None

NAMESPACES = [pytorch_lightning] + ([lightning_pytorch] if lightning_pytorch is not None else [])

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
os.environ.setdefault("PL_DISABLE_FORK", "1")


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(filename: str) -> ModuleType:
    """Import ``examples/<filename>`` as a module (once; its dataclasses need sys.modules)."""
    import importlib.util
    import sys

    name = "example_" + filename.removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, filename))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ten_x_only(**kwargs: Any) -> Any:
    """A detector with the 10x-initial-loss and non-finite rules only: tests of the foundation's
    sinks and state pin exact alert lists, which the trend and persistence rules would add to."""
    from warmup_monitor import InstabilityDetector

    return InstabilityDetector(
        loss_trend_spike=False,
        loss_divergence=False,
        grad_norm_spike=False,
        grad_norm_rise=False,
        oscillation=False,
        persistence=False,
        **kwargs,
    )


def make_data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).tanh() + 0.1 * torch.randn(
        n, 1, generator=g
    )
    return TensorDataset(x, y)


def make_loader(n: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


def tiny_module_class(ns: ModuleType) -> type:
    """A two-layer regression model as a LightningModule of namespace ``ns``.

    ``scripted(step) -> float`` rescales the loss to an exact value at each optimizer step
    (gradients keep their direction); ``warmup`` adds a linear LambdaLR warmup at interval=step.
    """

    class Tiny(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(
            self,
            lr: float = 0.05,
            scripted: Callable[[int], float] | None = None,
            warmup: int = 0,
            optimizer: str = "sgd",
            none_at: tuple[int, ...] = (),
            inf_grad_at: int | None = None,
            batch_from_step: bool = False,
        ) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
            )
            self.lr = lr
            self.scripted = scripted
            self.warmup = warmup
            self.optimizer_name = optimizer
            self.none_at = none_at
            self.inf_grad_at = inf_grad_at
            # Draw each batch from the global step instead of the loader: data stays aligned
            # with the step across a resume, whatever the loops' epoch bookkeeping does.
            self.batch_from_step = batch_from_step
            self.batch_losses: list[tuple[int, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx in self.none_at:
                return None
            x, y = batch
            if self.batch_from_step:
                data = make_data(n=len(x), seed=1000 + self.trainer.global_step)
                x, y = data.tensors
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.scripted is not None:
                # The value is scripted; the gradient stays that of the real loss.
                value = self.scripted(self.trainer.global_step)
                loss = loss - loss.detach() + value
            self.batch_losses.append((self.trainer.global_step, float(loss.detach())))
            return loss

        def on_after_backward(self) -> None:
            if self.trainer.global_step == self.inf_grad_at:
                self.net[0].weight.grad[0, 0] = float("inf")

        def configure_optimizers(self) -> Any:
            if self.optimizer_name == "adamw":
                opt: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
            elif self.optimizer_name == "plain_sgd":
                opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            else:
                opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
            if not self.warmup:
                return opt
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / self.warmup)
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Tiny


def recorder_class(ns: ModuleType) -> type:
    class Recorder(ns.Callback):  # type: ignore[name-defined,misc]
        """Records what an independent observer sees at each optimizer step."""

        def __init__(self) -> None:
            self.grads: list[list[torch.Tensor]] = []
            self.before: list[list[torch.Tensor]] = []
            self.after: list[list[torch.Tensor]] = []
            self.lrs: list[float] = []
            self._stepped = False

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            params = list(pl_module.parameters())
            self.grads.append(
                [
                    p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                    for p in params
                ]
            )
            self.before.append([p.detach().clone() for p in params])
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))
            self._stepped = True

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if self._stepped:
                self.after.append([p.detach().clone() for p in pl_module.parameters()])
                self._stepped = False

    return Recorder


def fit(
    ns: ModuleType,
    root: str | os.PathLike[str],
    callbacks: list[Any],
    model: Any | None = None,
    max_steps: int = 8,
    loader: DataLoader | None = None,
    logger: Any = True,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """Fit a real Trainer of namespace ``ns`` on CPU; return it."""
    if logger is True:
        logger = ns.loggers.TensorBoardLogger(str(root), name="run", version=0)
    trainer = ns.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        accelerator="cpu",
        devices=1,
        **trainer_kwargs,
    )
    model = model if model is not None else tiny_module_class(ns)()
    trainer.fit(model, loader if loader is not None else make_loader(), ckpt_path=ckpt_path)
    return trainer


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """Every scalar in the run's event files, read with TensorBoard's own reader."""
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_accumulator(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(params=NAMESPACES, ids=lambda m: m.__name__)
def ns(request: pytest.FixtureRequest) -> ModuleType:
    """Each Lightning namespace: ``pytorch_lightning`` and ``lightning.pytorch``."""
    return request.param

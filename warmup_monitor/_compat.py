"""Every Lightning detail the adapter needs, in one place (some reach into Lightning's internals).

Each function is tested through the callback's tests in both namespaces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from warmup_monitor.tensorboard import split_layer_keys, write_scalars_event

__all__ = [
    "LoggersSink",
    "callback_bases",
    "extract_loss",
    "is_fsdp1",
    "log_dir",
    "rank_zero_warn",
    "silenced_logging",
    "tensorboard_writers",
    "unscaled",
    "warn_averaging_before",
    "warn_short_run",
]

log = logging.getLogger("warmup_monitor")


def callback_bases() -> tuple[type, ...]:
    """``pytorch_lightning.Callback``, plus ``lightning.pytorch.Callback`` when installed.

    Deriving from both lets ``LightningCLI`` of either namespace accept the callback in a config.
    """
    bases: list[type] = [pl.Callback]
    try:
        import lightning.pytorch as lp
    except ImportError:
        return tuple(bases)
    if lp.Callback is not pl.Callback:
        bases.append(lp.Callback)
    return tuple(bases)


def _tensorboard_logger_types() -> tuple[type, ...]:
    from pytorch_lightning.loggers import TensorBoardLogger

    types: list[type] = [TensorBoardLogger]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger as LTensorBoardLogger
    except ImportError:
        return tuple(types)
    types.append(LTensorBoardLogger)
    return tuple(types)


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the Trainer (either namespace)."""
    types = _tensorboard_logger_types()
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, types)]  # type: ignore[attr-defined]


def log_dir(trainer: Any, alerts_file: str | None = None) -> str:
    """The run's log directory: the Trainer's ``log_dir``, or its ``default_root_dir`` when no
    logger has one (``logger=False`` included). Then, where a relative ``alerts_file`` goes is
    said once, at WARNING, so that the alerts file is never silently elsewhere.

    Every rank must call it (``trainer.log_dir`` broadcasts from rank zero).
    """
    path = trainer.log_dir
    no_dir = path is None or not trainer.loggers
    if path is None:
        path = trainer.default_root_dir
    if no_dir and trainer.is_global_zero and alerts_file and not os.path.isabs(alerts_file):
        log.warning(
            "warmup_monitor: the Trainer has no logger with a log_dir; WarmupMonitor.alerts_file "
            "goes to the Trainer's default_root_dir: %s (pass an absolute path, or None for no "
            "file)",
            os.path.abspath(os.path.join(str(path), alerts_file)),
        )
    return str(path)


def warn_short_run(trainer: Any, warmup_steps: int) -> None:
    """Warn when the run's optimizer steps (``max_steps``, or
    ``trainer.estimated_stepping_batches``: epochs, batches and accumulation) end before
    ``warmup_steps`` do."""
    if 0 < trainer.max_steps < warmup_steps:
        rank_zero_warn(
            f"WarmupMonitor: warmup_steps={warmup_steps} is longer than the "
            f"Trainer's max_steps={trainer.max_steps}: training ends during warmup."
        )
        return
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # no estimate (an iterable dataset without a length): nothing to say
        return
    if total < warmup_steps:
        rank_zero_warn(
            f"WarmupMonitor: WarmupMonitor.warmup_steps={warmup_steps} is longer than the run: "
            f"it has {int(total)} optimizer steps (trainer.estimated_stepping_batches: "
            f"max_epochs={trainer.max_epochs}, accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}), so training ends during warmup."
        )


def warn_lr_monitor(trainer: Any, config: Any) -> None:
    """Warn when a ``LearningRateMonitor`` (either namespace) watches an optimizer whose lr the
    monitor scales (``schedule`` set, or adaptive warmup on): it logs the lr the scheduler
    set, not the one the update used (the factor, back-offs included, is applied inside
    ``optimizer.step`` and taken off after it)."""
    if config.schedule is None and config.adaptive is None:
        return  # watch-only: the lr the scheduler set is the lr used
    found = [
        cb
        for cb in getattr(trainer, "callbacks", [])
        if any(k.__name__ == "LearningRateMonitor" for k in type(cb).__mro__)
    ]
    if not found:
        return
    why = (
        f"WarmupMonitor.schedule={config.schedule!r}"
        if config.schedule is not None
        else "WarmupMonitor.adaptive"
    )
    prefix = config.log_key_prefix
    rank_zero_warn(
        "WarmupMonitor: LearningRateMonitor logs the lr your scheduler set, not the lr the "
        f"updates used: with {why} the monitor multiplies it by its factor inside "
        "optimizer.step (its back-offs too), which LearningRateMonitor never sees. The lr "
        f"used is the `{prefix}lr` key (the factor: `{prefix}lr_factor`)."
    )


def is_fsdp1(trainer: Any) -> bool:
    """Whether gradients are FSDP1 flat shards on each rank (``FSDPStrategy``, GPU only)."""
    return type(trainer.strategy).__name__ == "FSDPStrategy"


def warn_averaging_before(trainer: Any, callback: Any) -> None:
    """Warn when a weight-averaging callback is listed before ``callback``: with several
    optimizers a rollback comes in ``on_train_batch_end``, after that callback averaged the
    damaged weights."""
    callbacks = list(getattr(trainer, "callbacks", []))
    mine = next((i for i, c in enumerate(callbacks) if c is callback), len(callbacks))
    for cb in callbacks[:mine]:
        if any("WeightAveraging" in k.__name__ for k in type(cb).__mro__):
            rank_zero_warn(
                f"WarmupMonitor: {type(cb).__name__} is listed before the monitor and there "
                "are several optimizers, so a rollback comes in on_train_batch_end, after "
                "that callback averaged the damaged weights: list WarmupMonitor first"
            )
            return


def unscaled(trainer: Any, loss: Tensor) -> Tensor:
    """``loss`` as given to ``on_before_backward``, divided by the GradScaler's scale (fp16
    AMP scales it before the hook); on the device, no host sync."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return loss.detach()
    scale = scaler._scale  # the device tensor behind get_scale(), which would sync
    return loss.detach() if scale is None else loss.detach() / scale.to(loss.device)


def extract_loss(outputs: Any) -> Tensor | None:
    """The loss tensor in ``training_step``'s output (a tensor, or a dict with ``"loss"``)."""
    if isinstance(outputs, Tensor):
        return outputs if outputs.numel() == 1 else None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
        if isinstance(loss, Tensor) and loss.numel() == 1:
            return loss
    return None


@contextmanager
def silenced_logging(module: Any) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside (the probe's ``training_step``)."""
    names = ("log", "log_dict")
    for name in names:
        setattr(module, name, lambda *a, **k: None)
    try:
        yield
    finally:
        for name in names:
            module.__dict__.pop(name, None)


class LoggersSink:
    """A metrics sink that logs through every logger of the Trainer."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        # Per-group keys go to a TensorBoard logger as one event (see write_scalars_event).
        layers, rest = split_layer_keys(metrics)
        types: tuple[type, ...] = _tensorboard_logger_types() if layers else ()
        for logger in self.loggers:
            bulk = layers and isinstance(logger, types) and not getattr(logger, "_prefix", "")
            self._log(logger, rest if bulk else metrics, layers if bulk else {}, step)

    @staticmethod
    def _log(logger: Any, metrics: dict[str, float], bulk: dict[str, float], step: int) -> None:
        logger.log_metrics(metrics, step=step)
        if bulk:
            write_scalars_event(logger.experiment, bulk, step)

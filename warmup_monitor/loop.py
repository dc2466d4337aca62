"""The monitor in a hand-written PyTorch training loop, without Lightning.

Example::

    from torch.utils.tensorboard import SummaryWriter
    from warmup_monitor.loop import LoopMonitor

    monitor = LoopMonitor(optimizer, warmup_steps=200, writer=SummaryWriter("runs/x"),
                          alerts_file="runs/x/warmup_alerts.jsonl")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        monitor.before_step()          # after backward (and scaler.unscale_), before clipping
        optimizer.step()
        monitor.after_step(loss)       # after the step: logs, detects, alerts
        optimizer.zero_grad()
    monitor.close()

The same keys, alerts and files as the Lightning callback; this module imports no Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from warmup_monitor._checks import check_choice, check_int
from warmup_monitor.alerts import Alert, AlertDispatcher
from warmup_monitor.detectors import InstabilityDetector
from warmup_monitor.engine import MonitorEngine
from warmup_monitor.tensorboard import write_layout

__all__ = ["LoopMonitor"]


class LoopMonitor:
    """Drive :class:`~warmup_monitor.engine.MonitorEngine` from a plain loop.

    Args:
        optimizers: The optimizer, or a sequence of them (index ``K >= 1`` logs as ``optK``).
        warmup_steps: Planned warmup length in optimizer steps.
        writer: A TensorBoard ``SummaryWriter`` for the scalars, the dashboard layout and the
            alert texts; ``None`` logs no scalars.
        alerts_file: Path of the alerts JSONL; ``None`` writes none.
        on_alert: Called with each alert after the other sinks; exceptions are logged.
        detector: A configured :class:`~warmup_monitor.InstabilityDetector`.
        log_every_n_steps: Logging interval during warmup.
        check_every_n_steps: Host-read interval on steps that do not log.
        post_warmup_steps: Steps monitored after warmup (``-1``: all).
        cosine: ``"exact"`` or ``"off"``.
        update_ratio: Measure the update/weight ratio on logging steps.
        log_key_prefix: Prefix of every key.

    Raises:
        TypeError, ValueError: a bad argument, named in the message.
    """

    def __init__(
        self,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        warmup_steps: int,
        writer: Any | None = None,
        alerts_file: str | os.PathLike[str] | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        detector: InstabilityDetector | None = None,
        log_every_n_steps: int = 1,
        check_every_n_steps: int = 1,
        post_warmup_steps: int = 100,
        cosine: str = "exact",
        update_ratio: bool = True,
        log_key_prefix: str = "warmup/",
    ) -> None:
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise TypeError("`optimizers` must be a torch optimizer or a sequence of them")
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"`on_alert` must be callable or None, got {type(on_alert).__name__}")
        self.engine = MonitorEngine(
            warmup_steps=check_int("warmup_steps", warmup_steps, minimum=1),
            log_every_n_steps=check_int("log_every_n_steps", log_every_n_steps, minimum=1),
            check_every_n_steps=check_int("check_every_n_steps", check_every_n_steps, minimum=1),
            post_warmup_steps=check_int("post_warmup_steps", post_warmup_steps, minimum=-1),
            post_warmup_log_every_n_steps=log_every_n_steps,
            detector=detector if detector is not None else InstabilityDetector(),
            cosine=check_choice("cosine", cosine, ("exact", "sketch", "off")),  # type: ignore[arg-type]
            update_ratio=update_ratio,
            key_prefix=log_key_prefix,
        )
        self.engine.attach(opts)
        self.writer = writer
        writers = [writer] if writer is not None else []
        for w in writers:
            write_layout(w, log_key_prefix)
        self._dispatcher = AlertDispatcher(
            jsonl_path=alerts_file,
            text_writers=writers,
            on_alert=on_alert,
            text_tag=f"{log_key_prefix}alerts",
        )
        self.engine.alert_sinks.append(self._dispatcher.dispatch)
        if writer is not None:
            self.engine.metrics_sinks.append(self._write_scalars)

    def before_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Measure the gradients of ``optimizer`` (default: the first) before it steps."""
        self.engine.before_step(optimizer if optimizer is not None else self.engine_optimizer)

    def after_step(self, loss: Tensor | None) -> None:
        """Complete the step(s) taken since :meth:`before_step` with the batch's loss."""
        self.engine.add_loss(loss)
        self.engine.end_batch()

    def close(self) -> None:
        """Process what is still kept on the device, and close the alerts file."""
        self.engine.detach()
        self._dispatcher.close()
        if self.writer is not None:
            self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        """The engine's state, to save with your checkpoint."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.engine.load_state_dict(state)

    @property
    def engine_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizers[0]

    def _write_scalars(self, metrics: dict[str, float], step: int) -> None:
        assert self.writer is not None
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

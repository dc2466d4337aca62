"""Apply an lr factor for the update only, so that the user's scheduler never sees it.

A factor written into ``param_group["lr"]`` and left there is compounded by chainable
schedulers (``ExponentialLR``, ``StepLR``, ``MultiplicativeLR`` read the current lr). Like
pytorch_warmup's ``dampening()``, :class:`LrFactor` multiplies the lr just before
``optimizer.step`` (a step pre-hook) and restores the scheduler's value just after it (a post
hook): the scheduler keeps being the source of truth.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LrFactor"]


class LrFactor:
    """Multiply every param group's lr by ``factor()`` for the duration of ``optimizer.step``.

    Args:
        optimizer: A torch optimizer.
        factor: Returns the factor of the update about to be taken.

    A step skipped by a ``GradScaler`` calls no hook: nothing to undo.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self._saved: list[float] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    @property
    def active(self) -> bool:
        """Whether the factor is applied right now (inside ``optimizer.step``)."""
        return self._saved is not None

    def scheduler_lrs(self) -> list[float]:
        """The lrs as the scheduler set them (without the factor), even inside the step."""
        if self._saved is not None:
            return list(self._saved)
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        f = float(self.factor())
        self._saved = [g["lr"] for g in self.optimizer.param_groups]
        if f != 1.0:
            for g, lr in zip(self.optimizer.param_groups, self._saved, strict=True):
                g["lr"] = lr * f

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is not None:
            for g, lr in zip(self.optimizer.param_groups, self._saved, strict=True):
                g["lr"] = lr
            self._saved = None

    def remove(self) -> None:
        """Remove the hooks (restoring the lr if a step is in flight)."""
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles = []

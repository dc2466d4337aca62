"""Apply an lr factor for the update only, so that the user's scheduler never sees it.

A factor written into ``param_group["lr"]`` and left there is compounded by chainable
schedulers (``ExponentialLR``, ``StepLR``, ``MultiplicativeLR`` read the current lr). Like
pytorch_warmup's ``dampening()``, :class:`LrFactor` multiplies the lr just before
``optimizer.step`` (a step pre-hook) and restores the scheduler's value just after it (a step
post-hook): the scheduler stays the source of truth, and its lr sequence is the same, bit for
bit, with or without the factor.

This module imports no Lightning.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LrFactor"]

# The LrFactor attached to each optimizer: two would restore each other's values.
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, LrFactor] = weakref.WeakKeyDictionary()


class LrFactor:
    """Multiply every param group's lr by ``factor()`` for the duration of ``optimizer.step``.

    ``factor`` is called once per ``optimizer.step``, in the pre-hook: in Lightning that is
    before the closure (forward and backward) runs, which is fine since only the update uses
    the lr. A factor of exactly 1 touches nothing. A step skipped by a ``GradScaler`` calls no
    hook: nothing to undo. If ``optimizer.step`` raises, the post-hook does not run; the next
    step (or :meth:`remove`) restores the scheduler's lr first, so a factor is never compounded.
    Tensor lrs (for fused or capturable optimizers) are replaced by a scaled tensor and the
    original tensor object is put back.

    Example:
        >>> w = torch.zeros(1, requires_grad=True)
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> hooks = LrFactor(opt, lambda: 0.25)
        >>> w.grad = torch.ones(1)
        >>> opt.step()
        >>> w.item(), opt.param_groups[0]["lr"]  # updated with lr 0.25; the lr is 1 again
        (-0.25, 1.0)
        >>> hooks.remove()

    Args:
        optimizer: A torch optimizer (the raw one, not a Lightning wrapper).
        factor: Returns the factor of the update about to be taken: finite and > 0.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer, or ``factor`` is not callable.
        ValueError: the optimizer already has an :class:`LrFactor` (``remove()`` it first); at
            step time, a factor that is not finite and > 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not callable(factor):
            raise TypeError(f"`factor` must be callable, got {type(factor).__name__}")
        if optimizer in _ATTACHED:
            raise ValueError(
                f"`optimizer` ({type(optimizer).__name__}) already has an LrFactor: remove() it "
                "first (two would restore each other's lr)"
            )
        self.optimizer = optimizer
        self.factor = factor
        self._saved: list[Any] | None = None  # the scheduler's lrs while a step is in flight
        self._written: list[Any] = []  # what the pre-hook wrote, to recognise it
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        _ATTACHED[optimizer] = self

    @property
    def active(self) -> bool:
        """Whether a factor other than 1 is applied right now (inside ``optimizer.step``)."""
        return self._saved is not None

    def scheduler_lrs(self) -> list[float]:
        """The lrs as the scheduler set them (without the factor), even inside the step."""
        lrs = (
            self._saved
            if self._saved is not None
            else [g["lr"] for g in self.optimizer.param_groups]
        )
        return [float(lr) for lr in lrs]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore(late=True)  # a previous step that raised left its factor in place
        f = float(self.factor())
        if not (math.isfinite(f) and f > 0.0):
            raise ValueError(f"the lr factor must be finite and > 0, got {f}")
        if f == 1.0:
            return
        groups = self.optimizer.param_groups
        self._saved = [g["lr"] for g in groups]
        for g, lr in zip(groups, self._saved, strict=True):
            g["lr"] = lr * f  # a new float or tensor: the scheduler's object is kept aside
        self._written = [g["lr"] for g in groups]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restore(late=False)

    def _restore(self, *, late: bool) -> None:
        """Put the scheduler's lrs back. ``late`` (after a step that raised): only where the lr
        is still the one the pre-hook wrote; a value set since then is the scheduler's."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for g, lr, written in zip(self.optimizer.param_groups, saved, self._written, strict=False):
            if not late or g["lr"] is written:
                g["lr"] = lr
        self._written = []

    def remove(self) -> None:
        """Remove the hooks, restoring the lr if a step is in flight. Idempotent."""
        self._restore(late=True)
        for h in self._handles:
            h.remove()
        self._handles = []
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]

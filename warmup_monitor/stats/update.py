"""UpdateRatio: the relative size of an optimizer step.

``||theta_new - theta_old|| / ||theta_old||`` over one optimizer's parameters.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from warmup_monitor._checks import check_choice
from warmup_monitor.stats.plans import Flat, Kernels, Plan, local_tensor, make_plans


class UpdateRatio:
    """``||theta_new - theta_old|| / ||theta_old||`` over one optimizer's parameters.

    :meth:`snapshot` copies the parameters into a preallocated flat buffer before the optimizer
    step; :meth:`local_sums` afterwards returns ``[||delta||^2, ||theta_old||^2]`` for this rank.
    The buffer costs one parameter-sized copy and is only written on steps that log. Per call,
    one pass over the parameters and the buffer (blocked plan on the CPU, as in
    :class:`~warmup_monitor.stats.GradientStats`; foreach kernels elsewhere).

    Args:
        params: The parameters of the optimizer.
        kernels: ``"auto"``, ``"blocked"`` or ``"foreach"``, as for
            :class:`~warmup_monitor.stats.GradientStats`.
    """

    def __init__(self, params: Sequence[Tensor], *, kernels: Kernels = "auto") -> None:
        self.params = list(params)
        self.kernels: Kernels = check_choice("kernels", kernels, ("auto", "blocked", "foreach"))  # type: ignore[assignment]
        locals_ = [local_tensor(p) for p in self.params]
        self._dtensor = any(loc is not p for loc, p in zip(locals_, self.params, strict=True))
        self.device = locals_[0].device if locals_ else torch.device("cpu")
        self._plans = make_plans(locals_, self.kernels)
        self._bufs: list[Flat] = []  # one per plan, allocated at the first snapshot
        self._old_sq: Tensor | None = None

    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot is waiting for :meth:`local_sums`."""
        return self._old_sq is not None

    @property
    def memory_bytes(self) -> int:
        """Bytes of the snapshot buffer held now."""
        return sum(b.nbytes for b in self._bufs)

    def _tensors(self, plan: Plan) -> list[Tensor]:
        if self._dtensor:
            return [local_tensor(self.params[i].detach()) for i in plan.index]
        return [self.params[i] for i in plan.index]

    def _sum(self, parts: list[Tensor]) -> Tensor:
        if not parts:
            return torch.zeros((), device=self.device)
        return torch.stack([t.to(device=self.device, dtype=torch.float32) for t in parts]).sum()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current parameters (call before the optimizer step)."""
        if not self._bufs:
            self._bufs = [p.flat(p.dtype) for p in self._plans]
        parts = [
            p.copy_sq(self._tensors(p), buf) for p, buf in zip(self._plans, self._bufs, strict=True)
        ]
        self._old_sq = self._sum(parts)

    @torch.no_grad()
    def local_sums(self) -> Tensor | None:
        """``[||delta||^2, ||theta_old||^2]`` on this rank, or ``None`` without a snapshot."""
        if self._old_sq is None:
            return None
        parts = [
            p.diff_sq(self._tensors(p), buf) for p, buf in zip(self._plans, self._bufs, strict=True)
        ]
        out = torch.stack([self._sum(parts), self._old_sq])
        self._old_sq = None
        return out

    def release(self) -> None:
        """Free the snapshot buffer."""
        self._bufs = []
        self._old_sq = None

    @staticmethod
    def finish(sums: Tensor) -> Tensor:
        """Reduced ``[||delta||^2, ||theta_old||^2]`` to the ratio (NaN if the weights are 0)."""
        old = sums[1].sqrt()
        return torch.where(old > 0, sums[0].sqrt() / old, torch.full_like(old, float("nan")))

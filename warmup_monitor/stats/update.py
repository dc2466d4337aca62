"""UpdateRatio: the relative size of an optimizer step.

``||theta_new - theta_old|| / ||theta_old||`` over one optimizer's parameters.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from warmup_monitor._checks import check_choice
from warmup_monitor.stats.layers import Groups, attach_groups
from warmup_monitor.stats.plans import Flat, Kernels, Plan, local_tensor, make_plans


class UpdateRatio:
    """``||theta_new - theta_old|| / ||theta_old||`` over one optimizer's parameters.

    :meth:`snapshot` copies the parameters into a preallocated flat buffer before the optimizer
    step; :meth:`local_sums` afterwards returns ``[||delta||^2, ||theta_old||^2]`` for this rank.
    The buffer costs one parameter-sized copy and is only written on steps that log. Per call,
    one pass over the parameters and the buffer (blocked plan on the CPU, as in
    :class:`~warmup_monitor.stats.GradientStats`; foreach kernels elsewhere).

    With ``groups``, ``snapshot(groups=True)`` makes the next :meth:`local_sums` also return
    each group's ``||delta||^2`` and then each group's ``||theta_old||^2``, from the same passes.

    Args:
        params: The parameters of the optimizer.
        kernels: ``"auto"``, ``"blocked"`` or ``"foreach"``, as for
            :class:`~warmup_monitor.stats.GradientStats`.
        groups: Parameter groups (:func:`~warmup_monitor.stats.layers.layer_groups`).
    """

    def __init__(
        self, params: Sequence[Tensor], *, kernels: Kernels = "auto", groups: Groups | None = None
    ) -> None:
        self.params = list(params)
        self.kernels: Kernels = check_choice("kernels", kernels, ("auto", "blocked", "foreach"))  # type: ignore[assignment]
        locals_ = [local_tensor(p) for p in self.params]
        self._dtensor = any(loc is not p for loc, p in zip(locals_, self.params, strict=True))
        self.device = locals_[0].device if locals_ else torch.device("cpu")
        self._plans = make_plans(locals_, self.kernels)
        self._bufs: list[Flat] = []  # one per plan, allocated at the first snapshot
        self._old_sq: Tensor | None = None
        self.groups = groups
        self._old_groups: Tensor | None = None
        if groups is not None:
            for plan in self._plans:
                attach_groups(plan, groups.of_param, len(groups))

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

    def _group_sum(self) -> Tensor:
        parts = [
            p.group_sums.to(device=self.device, dtype=torch.float32)
            for p in self._plans
            if p.group_sums is not None
        ]
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)

    @torch.no_grad()
    def snapshot(self, groups: bool = False) -> None:
        """Copy the current parameters (call before the optimizer step); with ``groups``, the
        next :meth:`local_sums` is per group as well."""
        if not self._bufs:
            self._bufs = [p.flat(p.dtype) for p in self._plans]
        per_group = groups and self.groups is not None
        parts = [
            p.copy_sq(self._tensors(p), buf, per_group)
            for p, buf in zip(self._plans, self._bufs, strict=True)
        ]
        self._old_sq = self._sum(parts)
        self._old_groups = self._group_sum() if per_group else None

    @torch.no_grad()
    def local_sums(self) -> Tensor | None:
        """``[||delta||^2, ||theta_old||^2]`` on this rank, or ``None`` without a snapshot;
        after ``snapshot(groups=True)`` followed by ``||delta_g||^2`` and ``||theta_old,g||^2``
        of each group ``g``."""
        if self._old_sq is None:
            return None
        old_groups = self._old_groups
        parts = [
            p.diff_sq(self._tensors(p), buf, old_groups is not None)
            for p, buf in zip(self._plans, self._bufs, strict=True)
        ]
        out = torch.stack([self._sum(parts), self._old_sq])
        if old_groups is not None:
            out = torch.cat([out, self._group_sum(), old_groups])
        self._old_sq = None
        self._old_groups = None
        return out

    def release(self) -> None:
        """Free the snapshot buffer."""
        self._bufs = []
        self._old_sq = None
        self._old_groups = None

    @staticmethod
    def finish(sums: Tensor) -> Tensor:
        """Reduced ``[||delta||^2, ||theta_old||^2]`` to the ratio (NaN if the weights are 0)."""
        old = sums[1].sqrt()
        return torch.where(old > 0, sums[0].sqrt() / old, torch.full_like(old, float("nan")))

"""Gradient statistics on the device: global norm, consecutive-gradient cosine, update ratio.

The hot path is a handful of ``torch._foreach_*`` kernels over tensor lists built once, writing
into preallocated flat buffers. Nothing here reads a value back to the host: every result is a
device tensor, and the caller decides when to pay for one batched read.

Sharded gradients (FSDP2 ``DTensor``) are handled by computing *local* sums of squares and dot
products on each shard; the caller reduces those few numbers across ranks (a sum) and then
calls ``finish``. Whole gradients are never gathered.

This module imports no Lightning.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CosineMode", "GradientStats", "UpdateRatio", "local_tensor"]

CosineMode = Literal["exact", "off"]

#: A function that sums a small float32 tensor across the ranks holding shards (identity if none).
Reducer = Callable[[Tensor], Tensor]


def local_tensor(t: Tensor) -> Tensor:
    """The locally held part of ``t``: the shard of a ``DTensor``, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class _FlatViews:
    """One contiguous buffer per (device, dtype), with a view shaped like each tensor.

    Built once; afterwards the views are written in place by foreach kernels and the flat
    buffers are reduced by single kernels (one ``sum`` instead of one per tensor).
    """

    def __init__(self, like: Sequence[Tensor], dtype: torch.dtype | None = None) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, t in enumerate(like):
            groups[(t.device, dtype or t.dtype)].append(i)
        self.flats: list[Tensor] = []
        self.views: list[Tensor] = [torch.empty(0)] * len(like)
        for (device, dt), idx in groups.items():
            flat = torch.zeros(sum(like[i].numel() for i in idx), device=device, dtype=dt)
            offset = 0
            for i in idx:
                n = like[i].numel()
                self.views[i] = flat[offset : offset + n].view_as(like[i])
                offset += n
            self.flats.append(flat)

    def dot_sum(self, device: torch.device) -> Tensor:
        """Sum of all elements of all buffers, in float32, on ``device``."""
        parts = [f.sum(dtype=torch.float32).to(device) for f in self.flats]
        return torch.stack(parts).sum() if parts else torch.zeros((), device=device)

    def sq_sum(self, device: torch.device) -> Tensor:
        """Sum of squares of all buffers, in float32, on ``device``."""
        parts = [
            torch.linalg.vector_norm(f, dtype=torch.float32).square().to(device) for f in self.flats
        ]
        return torch.stack(parts).sum() if parts else torch.zeros((), device=device)


def _sum_sq(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Sum of squares over a list of tensors, in float32, with one foreach kernel per dtype."""
    if not tensors:
        return torch.zeros((), device=device)
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_key[(t.device, t.dtype)].append(t)
    parts = []
    for (dev, _), ts in by_key.items():
        norms = torch._foreach_norm(ts, 2.0)
        parts.append(torch.stack(norms).float().square().sum().to(device))
        del dev
    return torch.stack(parts).sum()


class GradientStats:
    """Global gradient norm and the cosine between consecutive optimizer steps' gradients.

    One instance watches one optimizer's parameters. Per step:

    .. math::

        \\|g_t\\| = \\sqrt{\\textstyle\\sum_i \\|g_{t,i}\\|^2}, \\qquad
        \\cos_t = \\frac{\\langle g_t, g_{t-1} \\rangle}{\\|g_t\\|\\,\\|g_{t-1}\\|}

    over all parameters ``i`` together (one whole-model gradient vector). A parameter without a
    gradient counts as a zero gradient. The cosine is undefined (NaN here, never logged) on the
    first step, after :meth:`forget`, and when either gradient is zero or non-finite.

    In ``"exact"`` mode one flat reference buffer of the gradients' size (in ``reference_dtype``,
    default the parameters' dtype) holds the previous gradient. Per step the cost is one norm
    kernel over the gradients, one in-place product and one sum over the reference, and one copy
    of the gradients into it.

    Args:
        params: The parameters whose ``.grad`` is read (frozen ones may be included: they are
            skipped while their ``.grad`` is ``None``).
        cosine: ``"exact"`` keeps the previous gradient; ``"off"`` computes only the norm.
        reference_dtype: dtype of the reference buffer, e.g. ``torch.bfloat16`` to halve its
            memory (the cosine then carries bf16 rounding, about 1e-3 relative).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        cosine: CosineMode = "exact",
        reference_dtype: torch.dtype | None = None,
    ) -> None:
        self.params = list(params)
        self.cosine = cosine
        self.reference_dtype = reference_dtype
        self.device = local_tensor(self.params[0]).device if self.params else torch.device("cpu")
        self._ref: _FlatViews | None = None
        self._prev_sq = torch.zeros((), device=self.device)
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)
        self._skipped = False
        #: How many parameters had a gradient at the last :meth:`local_sums` call.
        self.last_grad_count = 0

    def forget(self) -> None:
        """Drop the reference gradient: the next cosine is undefined (used after resume)."""
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)

    def release(self) -> None:
        """Free the reference buffer (it is rebuilt, and the cosine restarts, if used again)."""
        self._ref = None
        self.forget()

    def local_sums(self) -> Tensor:
        """This rank's ``[sum of squares, dot with previous gradient]`` (float32, on device).

        Also writes the current gradient into the reference buffer. Call exactly once per
        optimizer step, after backward (and unscaling) and before clipping, then reduce the
        result across shard holders (if any) and pass it to :meth:`finish`.
        """
        grads: list[Tensor] = []
        refs: list[Tensor] = []
        missing: list[Tensor] = []
        want_ref = self.cosine == "exact"
        if want_ref and self._ref is None:
            self._ref = _FlatViews(
                [local_tensor(p) for p in self.params], dtype=self.reference_dtype
            )
            self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None or g.is_sparse:
                if want_ref:
                    missing.append(self._ref.views[i])  # type: ignore[union-attr]
                continue
            grads.append(local_tensor(g))
            if want_ref:
                refs.append(self._ref.views[i])  # type: ignore[union-attr]
        self.last_grad_count = len(grads)
        self._skipped = not grads
        if not grads:
            # No gradient at all (a skipped batch): leave the reference as it is, so the next
            # cosine compares with the last real gradient.
            return torch.zeros(2, device=self.device)
        sq = _sum_sq(grads, self.device)
        if not want_ref:
            return torch.stack([sq, torch.zeros_like(sq)])
        assert self._ref is not None
        if missing:
            torch._foreach_zero_(missing)
        if all(g.dtype == r.dtype for g, r in zip(grads, refs, strict=True)):
            torch._foreach_mul_(refs, grads)
            dot = self._ref.dot_sum(self.device)
        else:  # reference in another dtype (bf16): products in float32, one kernel per tensor
            prods = [(g.float() * r.float()).sum() for g, r in zip(grads, refs, strict=True)]
            dot = torch.stack(prods).sum()
        torch._foreach_copy_(refs, grads)
        return torch.stack([sq, dot])

    def finish(self, sums: Tensor) -> Tensor:
        """Turn globally reduced ``[sum_sq, dot]`` into ``[grad_norm, cosine]`` (device tensor).

        The cosine is NaN where it is undefined. Remembers this step's squared norm as the
        reference's for the next step.
        """
        sq, dot = sums[0], sums[1]
        if self._skipped:
            return torch.stack([sq, torch.full_like(dot, float("nan"))])
        norm = sq.sqrt()
        denom = (sq * self._prev_sq).sqrt()
        valid = self._prev_valid & torch.isfinite(denom) & (denom > 0) & torch.isfinite(dot)
        cos = torch.where(valid, (dot / denom).clamp(-1.0, 1.0), torch.full_like(dot, float("nan")))
        if self.cosine == "exact":
            self._prev_sq = sq.detach().clone()
            self._prev_valid = torch.isfinite(sq) & (sq > 0)
        return torch.stack([norm, cos])


class UpdateRatio:
    """``||theta_new - theta_old|| / ||theta_old||`` over one optimizer's parameters.

    :meth:`snapshot` copies the parameters into a preallocated flat buffer before the optimizer
    step; :meth:`local_sums` afterwards returns ``[||delta||^2, ||theta_old||^2]`` for this rank.
    The buffer costs one parameter-sized copy and is only written on steps that log.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.device = local_tensor(self.params[0]).device if self.params else torch.device("cpu")
        self._buf: _FlatViews | None = None
        self._old_sq: Tensor | None = None

    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot is waiting for :meth:`local_sums`."""
        return self._old_sq is not None

    def snapshot(self) -> None:
        """Copy the current parameters (call before the optimizer step)."""
        locals_ = [local_tensor(p.detach()) for p in self.params]
        if self._buf is None:
            self._buf = _FlatViews(locals_)
        torch._foreach_copy_(self._buf.views, locals_)
        self._old_sq = self._buf.sq_sum(self.device)

    def local_sums(self) -> Tensor | None:
        """``[||delta||^2, ||theta_old||^2]`` on this rank, or ``None`` without a snapshot."""
        if self._buf is None or self._old_sq is None:
            return None
        locals_ = [local_tensor(p.detach()) for p in self.params]
        torch._foreach_sub_(self._buf.views, locals_)
        delta_sq = self._buf.sq_sum(self.device)
        out = torch.stack([delta_sq, self._old_sq])
        self._old_sq = None
        return out

    def release(self) -> None:
        """Free the snapshot buffer."""
        self._buf = None
        self._old_sq = None

    @staticmethod
    def finish(sums: Tensor) -> Tensor:
        """Reduced ``[||delta||^2, ||theta_old||^2]`` to the ratio (NaN if the weights are 0)."""
        old = sums[1].sqrt()
        return torch.where(old > 0, sums[0].sqrt() / old, torch.full_like(old, float("nan")))

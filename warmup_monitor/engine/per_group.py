"""Per-group statistics in the engine's step: which groups, the reduced sums, the values.

On a logging step with ``Statistics.layers``, ``GradientStats.local_sums`` returns each group's
gradient sum of squares after the two global sums, and ``UpdateRatio.local_sums`` each group's
update and old-weight sums after its two. The step's flat tensor (its one all-reduce) carries
them after the global values: ``[loss, sq, dot, delta sq, old sq, G grad sq, G delta sq, G old
sq]``; :func:`values` turns the reduced sums into the logged values, on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from warmup_monitor.stats.layers import Groups, layer_groups


def groups_of(
    layers: Any, module: torch.nn.Module | None, params: Sequence[Tensor]
) -> Groups | None:
    """The groups of one optimizer's ``params`` (``None``: per-group statistics off, no
    module, or no group holds a parameter)."""
    if layers == "off" or module is None or not params:
        return None
    return layer_groups(module, params, layers)


def every(setting: int | None, groups: Groups | None) -> int:
    """Steps between per-group statistics (0: none): ``Statistics.layers_every_n_steps``, or
    by default ``max(10, ceil(groups / 4))``: a step with them costs about 0.05 ms a group on
    a CPU (most of it writing 3 scalars a group), so the cost per step stays bounded however
    many groups the model has."""
    if groups is None:
        return 0
    return setting if setting is not None else max(10, -(-len(groups) // 4))


def step_sums(
    share: Tensor, sums: Tensor, upd: Tensor | None, device: torch.device
) -> tuple[Tensor, int]:
    """The step's flat tensor (before the reduction) and its group count (0: none this step).

    ``sums``: the gradient's ``[sq, dot]`` and, on a per-group step, the groups' sums of
    squares; ``upd``: the update's ``[delta sq, old sq]`` (after a per-group snapshot, and the
    groups' deltas and olds), ``None`` without a snapshot.
    """
    upd_t = upd.to(device) if upd is not None else torch.full((2,), math.nan, device=device)
    n = sums.numel() - 2
    parts = [share.reshape(1), sums[:2], upd_t[:2]]
    if n:
        parts.append(sums[2:])
        if upd_t.numel() == 2 + 2 * n:
            parts.append(upd_t[2:])
        else:  # no per-group update ratio (``Statistics.update_ratio`` off)
            parts.append(torch.full((2 * n,), math.nan, device=device))
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in parts) else sums.dtype
    return torch.cat([t.to(dtype) for t in parts]), n


def values(head: Tensor, flat: Tensor, n: int) -> Tensor:
    """A record's values: ``head`` (``[loss, norm, cosine, update ratio]``), then with ``n``
    groups each group's gradient norm, share of the global norm, and update ratio (NaN where
    undefined), from the reduced ``flat`` of :func:`step_sums`."""
    if not n:
        return head
    g_sq, d_sq, o_sq = flat[5 : 5 + n], flat[5 + n : 5 + 2 * n], flat[5 + 2 * n : 5 + 3 * n]
    total_sq = flat[1]
    nan = torch.full_like(g_sq, math.nan)
    share = torch.where(total_sq > 0, (g_sq / total_sq).sqrt(), nan)
    ratio = torch.where(o_sq > 0, (d_sq / o_sq).sqrt(), nan)
    return torch.cat([head.to(flat.dtype), g_sq.sqrt(), share, ratio])

"""Warmup shapes as pure functions, and helpers to pick a warmup length and build a scheduler.

``step`` always counts the optimizer steps already taken: 0 for the first update. Every shape
returns a factor in ``[0, 1]`` that multiplies the peak learning rate, is non-decreasing in
``step``, and is 1 from ``warmup_steps`` on (``exponential`` approaches 1 instead, as in
pytorch_warmup).

This module imports no Lightning.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch

from warmup_monitor._checks import check_choice, check_float, check_int

__all__ = [
    "SHAPES",
    "Shape",
    "max_increment",
    "scale_for_batch_size",
    "untuned_warmup_steps",
    "warmup_factor",
    "warmup_then_decay",
]

Shape = Literal[
    "linear", "cosine", "exponential", "geometric", "smoothstep", "polynomial", "step", "constant"
]
SHAPES: tuple[str, ...] = get_args(Shape)


def warmup_factor(shape: str, step: int, warmup_steps: int, **kw: Any) -> float:
    """The warmup factor of the update at ``step`` (0 for the first update).

    With :math:`x = \\min(1, (\\text{step} + 1) / W)` and :math:`W` = ``warmup_steps``:

    .. math::

        \\text{linear}: x \\qquad
        \\text{cosine}: \\tfrac12 (1 - \\cos \\pi x) \\qquad
        \\text{smoothstep}: 3x^2 - 2x^3 \\qquad
        \\text{polynomial}: x^p

        \\text{exponential}: 1 - e^{-(\\text{step}+1)/\\tau} \\qquad
        \\text{geometric}: s^{\\,1 - \\text{step}/(W-1)} \\qquad
        \\text{step}: \\lceil k x \\rceil / k \\qquad
        \\text{constant}: c \\text{ before } W, \\text{ then } 1

    ``linear`` is pytorch_warmup's ``LinearWarmup`` and ``exponential`` its
    ``ExponentialWarmup`` with ``warmup_period`` = ``tau``.

    Args:
        shape: One of :data:`SHAPES`.
        step: Optimizer steps already taken (>= 0).
        warmup_steps: Warmup length ``W`` (>= 1).
        **kw: ``tau`` (exponential, default ``W / 5``), ``start_factor`` (geometric, default
            0.01), ``power`` (polynomial, default 2), ``stairs`` (step, default 4), ``factor``
            (constant, default 0.1).

    Raises:
        ValueError: unknown shape, out-of-range arguments, or a keyword the shape does not take.
        TypeError: wrong argument types.
    """
    check_choice("shape", shape, SHAPES)
    check_int("step", step, minimum=0)
    w = check_int("warmup_steps", warmup_steps, minimum=1)
    allowed = {
        "exponential": {"tau"},
        "geometric": {"start_factor"},
        "polynomial": {"power"},
        "step": {"stairs"},
        "constant": {"factor"},
    }.get(shape, set())
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"shape {shape!r} takes no argument(s) {sorted(unknown)}")
    x = min(1.0, (step + 1) / w)
    if shape == "linear":
        return x
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    if shape == "smoothstep":
        return x * x * (3.0 - 2.0 * x)
    if shape == "polynomial":
        return x ** check_float("power", kw.get("power", 2.0), above=0.0)
    if shape == "exponential":
        tau = check_float("tau", kw.get("tau", w / 5.0), above=0.0)
        return 1.0 - math.exp(-(step + 1) / tau)
    if shape == "geometric":
        start = check_float("start_factor", kw.get("start_factor", 0.01), above=0.0)
        if start > 1.0:
            raise ValueError(f"`start_factor` must be <= 1, got {start}")
        if step >= w - 1:
            return 1.0
        return start ** (1.0 - step / (w - 1))
    if shape == "step":
        k = check_int("stairs", kw.get("stairs", 4), minimum=1)
        return min(1.0, math.ceil(k * x - 1e-12) / k)
    # constant
    c = check_float("factor", kw.get("factor", 0.1), minimum=0.0)
    if c > 1.0:
        raise ValueError(f"`factor` must be <= 1, got {c}")
    return 1.0 if step >= w else c


def max_increment(shape: str, warmup_steps: int, **kw: Any) -> float:
    """The largest one-step increase of ``warmup_factor`` over the warmup (for checks)."""
    prev = 0.0
    largest = 0.0
    for step in range(warmup_steps + 1):
        f = warmup_factor(shape, step, warmup_steps, **kw)
        largest = max(largest, f - prev)
        prev = f
    return largest


def untuned_warmup_steps(beta2: float) -> int:
    """Warmup length for Adam without tuning: :math:`2 / (1 - \\beta_2)` (Ma and Yarats, 2019).

    ``beta2=0.999`` gives 2000 steps, pytorch_warmup's ``UntunedLinearWarmup``.
    """
    b = check_float("beta2", beta2, minimum=0.0)
    if b >= 1.0:
        raise ValueError(f"`beta2` must be < 1, got {beta2}")
    return max(1, math.ceil(2.0 / (1.0 - b) - 1e-9))


def scale_for_batch_size(
    lr: float, warmup_steps: int, batch_size: int, reference_batch_size: int
) -> tuple[float, int]:
    """The linear scaling rule: lr and warmup length scaled by ``batch / reference batch``.

    Goyal et al. (2017) scale the lr with the batch size and warm up to it; a larger lr needs a
    proportionally longer ramp, so the warmup length is scaled by the same ratio (rounded, at
    least 1 step).

    Returns:
        ``(scaled_lr, scaled_warmup_steps)``.
    """
    check_float("lr", lr, above=0.0)
    check_int("warmup_steps", warmup_steps, minimum=1)
    b = check_int("batch_size", batch_size, minimum=1)
    ref = check_int("reference_batch_size", reference_batch_size, minimum=1)
    k = b / ref
    return lr * k, max(1, round(warmup_steps * k))


def warmup_then_decay(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    shape: str = "linear",
    decay: Literal["cosine", "linear", "constant"] = "cosine",
    min_factor: float = 0.0,
    **shape_kw: Any,
) -> torch.optim.lr_scheduler.LambdaLR:
    """One ``LRScheduler``: warmup of ``shape`` over ``warmup_steps``, then decay to
    ``min_factor`` x peak at ``total_steps``. Step it once per optimizer step.

    Raises:
        ValueError: ``total_steps < warmup_steps``, unknown shape or decay, ``min_factor``
            outside ``[0, 1]``.
    """
    check_choice("shape", shape, SHAPES)
    check_choice("decay", decay, ("cosine", "linear", "constant"))
    w = check_int("warmup_steps", warmup_steps, minimum=1)
    total = check_int("total_steps", total_steps, minimum=1)
    if total < w:
        raise ValueError(f"`total_steps` ({total}) must be >= `warmup_steps` ({w})")
    lo = check_float("min_factor", min_factor, minimum=0.0)
    if lo > 1.0:
        raise ValueError(f"`min_factor` must be <= 1, got {min_factor}")
    warmup_factor(shape, 0, w, **shape_kw)  # validate the shape's keywords now

    def factor(step: int) -> float:
        if step < w:
            return warmup_factor(shape, step, w, **shape_kw)
        if decay == "constant" or total == w:
            return 1.0
        progress = min(1.0, (step - w + 1) / (total - w))
        if decay == "linear":
            return lo + (1.0 - lo) * (1.0 - progress)
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Warmup shapes as pure functions, and helpers to pick a warmup length and build a scheduler.

``step`` always counts the optimizer steps already taken: 0 for the first update. Every shape
returns a factor in ``(0, 1]`` that multiplies the peak learning rate, is non-decreasing in
``step``, and is exactly 1 from ``warmup_steps`` on (most shapes reach 1 at the last warmup
update, ``warmup_steps - 1``, as pytorch_warmup's ``LinearWarmup`` does; ``exponential`` and
``constant`` reach it at ``warmup_steps``).

This module imports no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch

from warmup_monitor._checks import check_choice, check_float, check_int

__all__ = [
    "SHAPES",
    "RecordedRamp",
    "Shape",
    "least_time",
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

# The keyword arguments each shape takes, with their defaults (``None``: depends on W).
_KEYWORDS: dict[str, dict[str, Any]] = {
    "exponential": {"tau": None},
    "geometric": {"start_factor": 0.01},
    "polynomial": {"power": 2.0},
    "step": {"stairs": 4},
    "constant": {"factor": 0.1},
}
# Shapes that reach 1 at step W (the others at W - 1).
_ONE_AT_W = frozenset({"exponential", "constant"})
# ``ceil`` tolerance of the step shape: (step + 1) * k / W lands on an integer up to rounding.
_STAIR_EPS = 1e-9


def shape_params(shape: str, warmup_steps: int, kw: Mapping[str, Any]) -> dict[str, float]:
    """Validate a shape's keyword arguments and fill in the defaults.

    Raises:
        ValueError: unknown shape, a keyword the shape does not take, or a value out of range.
        TypeError: a value of the wrong type.
    """
    check_choice("shape", shape, SHAPES)
    w = check_int("warmup_steps", warmup_steps, minimum=1)
    allowed = _KEYWORDS.get(shape, {})
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        takes = ", ".join(f"`{k}`" for k in allowed) or "no keyword arguments"
        raise ValueError(f"shape {shape!r} takes {takes}, got {unknown}")
    params: dict[str, float] = {}
    if shape == "exponential":
        tau = kw.get("tau")
        params["tau"] = w / 5.0 if tau is None else check_float("tau", tau, above=0.0)
    elif shape == "geometric":
        start = check_float("start_factor", kw.get("start_factor", 0.01), above=0.0)
        if start > 1.0:
            raise ValueError(f"`start_factor` must be in (0, 1], got {start}")
        params["start_factor"] = start
    elif shape == "polynomial":
        params["power"] = check_float("power", kw.get("power", 2.0), above=0.0)
    elif shape == "step":
        params["stairs"] = float(check_int("stairs", kw.get("stairs", 4), minimum=1))
    elif shape == "constant":
        c = check_float("factor", kw.get("factor", 0.1), above=0.0)
        if c > 1.0:
            raise ValueError(f"`factor` must be in (0, 1], got {c}")
        params["factor"] = c
    return params


def full_at(shape: str, warmup_steps: int) -> int:
    """The first step at which ``shape`` is exactly 1: ``W - 1``, or ``W`` for ``exponential``
    and ``constant``."""
    return warmup_steps if shape in _ONE_AT_W else warmup_steps - 1


def shape_value(shape: str, u: float, warmup_steps: int, params: Mapping[str, float]) -> float:
    """The shape at a real step ``u >= -1`` (no validation; ``params`` from :func:`shape_params`).

    The continuous extension of :func:`warmup_factor` that the adaptive controller uses to
    stretch a shape in time: non-decreasing in ``u``, equal to :func:`warmup_factor` at integer
    steps, 1 from :func:`full_at` on.
    """
    w = warmup_steps
    if u >= full_at(shape, w):
        return 1.0
    x = max(0.0, (u + 1.0) / w)
    if shape == "linear":
        return x
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    if shape == "smoothstep":
        return x * x * (3.0 - 2.0 * x)
    if shape == "polynomial":
        return x ** params["power"]
    if shape == "exponential":
        return 1.0 - math.exp(-(u + 1.0) / params["tau"])
    if shape == "geometric":
        return params["start_factor"] ** (1.0 - u / max(w - 1, 1))
    if shape == "step":
        k = params["stairs"]
        return min(1.0, math.ceil(k * x - _STAIR_EPS) / k)
    return params["factor"]  # constant


class RecordedRamp:
    """The lrs a user's own scheduler set for the first updates, as a function of real step.

    The adaptive controller stretches this recorded ramp instead of a guessed shape, so that a
    scheduler that ramps as ``step / W`` (Hugging Face's ``get_linear_schedule_with_warmup``,
    ``get_cosine_schedule_with_warmup``) is modelled as exactly as one that ramps as
    ``(step + 1) / W``. :meth:`record` keeps the lr of each update ``0..length`` (``length + 1``
    floats at most); :meth:`value` interpolates linearly between recorded steps and holds the
    end values outside them.

    Example:
        >>> ramp = RecordedRamp(4)
        >>> for step in range(5):
        ...     ramp.record(step, 0.1 * step / 4)  # step / W: the first update gets lr 0
        >>> round(ramp.value(1.5), 6), ramp.first_positive()
        (0.0375, 0.025)

    Args:
        length: The declared warmup length ``W``; steps ``0..W`` are kept.
    """

    def __init__(self, length: int) -> None:
        self.length = check_int("length", length, minimum=1)
        self.values: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def record(self, step: int, lr: float) -> None:
        """Keep the lr of the update at ``step``. Steps past ``length``, and values that are
        not finite and >= 0, are ignored; a step skipped is filled with the value before it."""
        if step < 0 or step > self.length or not (math.isfinite(lr) and lr >= 0.0):
            return
        if step < len(self.values):
            self.values[step] = float(lr)
            return
        fill = self.values[-1] if self.values else float(lr)
        self.values.extend([fill] * (step - len(self.values)))
        self.values.append(float(lr))

    def value(self, u: float) -> float:
        """The recorded lr at real step ``u`` (linear between steps; needs one record)."""
        v = self.values
        if u <= 0.0:
            return v[0]
        if u >= len(v) - 1:
            return v[-1]
        lo = math.floor(u)
        w = u - lo
        return v[lo] if w == 0.0 else v[lo] + (v[lo + 1] - v[lo]) * w

    def flat(self) -> bool:
        """Whether at least two lrs are recorded and none is above the first (no warmup ramp).

        The adaptive controller stretches a ramp that rises. One that does not (a constant
        lr, ``ReduceLROnPlateau``, ``ExponentialLR``, ``CosineAnnealingWarmRestarts``) could
        never be stretched below its lowest lr, so there the plan is a factor on your lr
        instead: at the peak of ``AdaptiveWarmup.user_schedule`` until the first action,
        backing off and re-warming along that shape over ``warmup_steps`` (a factor rise of
        at most one ``warmup_steps``-step ramp's per update); the recording then stops, so
        the choice holds.
        """
        return len(self.values) > 1 and max(self.values) <= self.values[0]

    def first_positive(self) -> float | None:
        """The lowest recorded lr above 0 (a back-off never goes below it)."""
        positive = [x for x in self.values if x > 0.0]
        return min(positive) if positive else None


def least_time(f: Any, target: float, lo: float, hi: float) -> float:
    """The least ``u`` in ``[lo, hi]`` with ``f(u) >= target`` for a non-decreasing ``f`` with
    ``f(hi) >= target``, to float precision (bisection)."""
    if f(lo) >= target:
        return lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def warmup_factor(shape: str, step: int, warmup_steps: int, **kw: Any) -> float:
    """The warmup factor of the update at ``step`` (0 for the first update).

    With :math:`W` = ``warmup_steps`` and :math:`x = (\\text{step} + 1) / W`, before the step
    where the shape reaches 1:

    .. math::

        \\text{linear}: x \\qquad
        \\text{cosine}: \\tfrac12 (1 - \\cos \\pi x) \\qquad
        \\text{smoothstep}: 3x^2 - 2x^3 \\qquad
        \\text{polynomial}: x^p

        \\text{exponential}: 1 - e^{-(\\text{step}+1)/\\tau} \\qquad
        \\text{geometric}: s^{\\,1 - \\text{step}/(W-1)} \\qquad
        \\text{step}: \\lceil k x \\rceil / k \\qquad
        \\text{constant}: c

    and 1 from step :math:`W - 1` (``exponential``, ``constant``: from step :math:`W`) on.
    ``linear`` is pytorch_warmup's ``LinearWarmup(warmup_period=W)`` exactly;
    ``exponential`` is its ``ExponentialWarmup(warmup_period=tau)`` before step ``W`` (that one
    approaches 1 for ever; this one ends warmup at ``W``: with the default ``tau = W / 5`` the
    last factor before 1 is :math:`1 - e^{-5} = 0.993`). ``geometric`` grows by the constant
    ratio :math:`s^{-1/(W-1)}` per step from ``start_factor`` :math:`s` at step 0 to 1 at step
    :math:`W - 1`. ``step`` with ``stairs=W`` is ``linear``. ``constant`` is Goyal et al.'s
    warmup: a low factor for ``W`` steps, then 1.

    Example:
        >>> warmup_factor("linear", 0, 4), warmup_factor("linear", 3, 4)
        (0.25, 1.0)
        >>> round(warmup_factor("exponential", 0, 100, tau=10), 4)
        0.0952

    Args:
        shape: One of :data:`SHAPES`.
        step: Optimizer steps already taken (>= 0).
        warmup_steps: Warmup length ``W`` (>= 1).
        **kw: ``tau`` (exponential, > 0, default ``W / 5``), ``start_factor`` (geometric, in
            (0, 1], default 0.01), ``power`` (polynomial, > 0, default 2), ``stairs`` (step,
            >= 1, default 4), ``factor`` (constant, in (0, 1], default 0.1).

    Raises:
        ValueError: unknown shape, out-of-range arguments, or a keyword the shape does not take.
        TypeError: wrong argument types.
    """
    params = shape_params(shape, warmup_steps, kw)
    check_int("step", step, minimum=0)
    return shape_value(shape, float(step), warmup_steps, params)


def max_increment(shape: str, warmup_steps: int, **kw: Any) -> float:
    """The largest one-step increase of :func:`warmup_factor`, counting the first factor as an
    increase from 0 (``1 / W`` for ``linear``). Costs ``W`` evaluations."""
    params = shape_params(shape, warmup_steps, kw)
    prev = 0.0
    largest = 0.0
    for step in range(full_at(shape, warmup_steps) + 1):
        f = shape_value(shape, float(step), warmup_steps, params)
        largest = max(largest, f - prev)
        prev = f
    return largest


def untuned_warmup_steps(beta2: float) -> int:
    """Warmup length for Adam without tuning: :math:`2 / (1 - \\beta_2)` (Ma and Yarats, 2019).

    Truncated to an int like pytorch_warmup's ``UntunedLinearWarmup``, but without its binary
    rounding loss: ``int(2 / (1 - 0.999))`` is 1999 there (``1 - 0.999`` is not exact in
    binary), 2000 here, as in the paper. pytorch_warmup's ``UntunedExponentialWarmup`` uses
    ``tau = 1 / (1 - beta2)``: half of this, for the ``exponential`` shape.

    Example:
        >>> untuned_warmup_steps(0.999), untuned_warmup_steps(0.98)
        (2000, 100)

    Raises:
        ValueError: ``beta2`` outside ``[0, 1)``.
        TypeError: ``beta2`` is not a number.
    """
    b = check_float("beta2", beta2, minimum=0.0)
    if b >= 1.0:
        raise ValueError(f"`beta2` must be in [0, 1), got {beta2}")
    # Rounded to 6 decimals first: 1999.9999999999982 is the float for 2000.
    return max(1, math.floor(round(2.0 / (1.0 - b), 6)))


def scale_for_batch_size(
    lr: float, warmup_steps: int, batch_size: int, reference_batch_size: int
) -> tuple[float, int]:
    """The linear scaling rule: lr and warmup length both scaled by ``batch / reference batch``.

    Goyal et al. (2017) scale the lr linearly with the batch size and warm up to it. A larger
    peak lr needs a proportionally longer ramp for the same lr increase per step, so the
    warmup length in optimizer steps is scaled by the same ratio (rounded, at least 1). (Goyal
    et al. kept 5 *epochs* of warmup, which is fewer steps at a larger batch; use this helper
    when your warmup is tuned in steps.)

    Example:
        >>> scale_for_batch_size(0.1, 500, batch_size=1024, reference_batch_size=256)
        (0.4, 2000)

    Returns:
        ``(scaled_lr, scaled_warmup_steps)``.

    Raises:
        ValueError: a value out of range (lr <= 0, lengths or batch sizes < 1).
        TypeError: a value of the wrong type.
    """
    lr = check_float("lr", lr, above=0.0)
    w = check_int("warmup_steps", warmup_steps, minimum=1)
    b = check_int("batch_size", batch_size, minimum=1)
    ref = check_int("reference_batch_size", reference_batch_size, minimum=1)
    k = b / ref
    return lr * k, max(1, round(w * k))


def warmup_then_decay(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    shape: Shape = "linear",
    decay: Literal["cosine", "linear", "constant"] = "cosine",
    min_factor: float = 0.0,
    **shape_kw: Any,
) -> torch.optim.lr_scheduler.LambdaLR:
    """One ``LRScheduler``: a warmup of ``shape`` over ``warmup_steps``, then a decay to
    ``min_factor`` x the peak lr at the last step, ``total_steps - 1``.

    Step it once per optimizer step (Lightning: ``"interval": "step"``). The factor of the
    update at step ``t`` is :func:`warmup_factor` for ``t < W``, then, with
    :math:`q = \\min(1, (t - W + 1) / (T - W))` and :math:`m` = ``min_factor``:

    .. math::

        \\text{cosine}: m + (1 - m)\\,\\tfrac12 (1 + \\cos \\pi q) \\qquad
        \\text{linear}: m + (1 - m)(1 - q) \\qquad
        \\text{constant}: 1

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = warmup_then_decay(opt, warmup_steps=10, total_steps=100)
        >>> round(opt.param_groups[0]["lr"], 12)  # the first update's lr: 0.1 / 10
        0.01

    Raises:
        ValueError: ``total_steps < warmup_steps``, an unknown shape or decay, bad shape
            keywords, ``min_factor`` outside ``[0, 1]``.
        TypeError: a value of the wrong type.
    """
    check_choice("decay", decay, ("cosine", "linear", "constant"))
    w = check_int("warmup_steps", warmup_steps, minimum=1)
    params = shape_params(shape, w, shape_kw)
    total = check_int("total_steps", total_steps, minimum=1)
    if total < w:
        raise ValueError(f"`total_steps` ({total}) must be >= `warmup_steps` ({w})")
    lo = check_float("min_factor", min_factor, minimum=0.0)
    if lo > 1.0:
        raise ValueError(f"`min_factor` must be in [0, 1], got {min_factor}")

    def factor(step: int) -> float:
        if step < w:
            return shape_value(shape, float(step), w, params)
        if decay == "constant" or total == w:
            return 1.0
        q = min(1.0, (step - w + 1) / (total - w))
        if decay == "linear":
            return lo + (1.0 - lo) * (1.0 - q)
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * q))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

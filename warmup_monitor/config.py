"""The monitor's configuration: one frozen dataclass per capability, validated on construction.

``WarmupMonitor`` and ``LoopMonitor`` take the same objects::

    from warmup_monitor import AdaptiveWarmup, CurvatureProbe, Detection, WarmupMonitor

    WarmupMonitor(
        warmup_steps=500,
        adaptive=AdaptiveWarmup(backoff=0.5),        # or True: the defaults
        curvature=CurvatureProbe(every_n_steps=50),  # or True
        detection=Detection(trend_sigmas=6.0),
    )

Every object checks each of its fields when it is built and names the field (``Class.field``),
the allowed values and the value given; it pickles, prints a readable ``repr`` and loads from
LightningCLI YAML (``class_path``/``init_args``). :class:`MonitorConfig` gathers them with the
warmup plan and checks what depends on more than one object, once, for both adapters.

This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from warmup_monitor._checks import check_choice, check_float, check_int, check_int_or_off
from warmup_monitor.schedules import SHAPES, Shape, shape_params

__all__ = [
    "AdaptiveWarmup",
    "CurvatureProbe",
    "Detection",
    "MonitorConfig",
    "Statistics",
    "Window",
    "check_sinks",
]

#: A check of one field: ``check(public_name, value) -> normalised value``; raises on a bad one.
Check = Callable[[str, Any], Any]


def _int(minimum: int) -> Check:
    return lambda name, value: check_int(name, value, minimum=minimum)


def _float(
    *, above: float | None = None, minimum: float | None = None, maximum: float | None = None
) -> Check:
    return lambda name, value: check_float(
        name, value, above=above, minimum=minimum, maximum=maximum
    )


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _choice(*choices: str) -> Check:
    return lambda name, value: check_choice(name, value, choices)


def _optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def _callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be callable or None, got {value!r}")
    return value


def _dtype_name(name: str, value: Any) -> str | None:
    floating = ("float16", "bfloat16", "float32", "float64")
    if value is None:
        return None
    text = str(value).removeprefix("torch.")  # accepts torch.bfloat16 as well as "bfloat16"
    if text not in floating:
        allowed = ", ".join(repr(f) for f in floating)
        raise ValueError(f"`{name}` must be None or one of {allowed}, got {value!r}")
    return text


def _layers(name: str, value: Any) -> str | tuple[str, ...]:
    """``"off"``, ``"auto"``, a regular expression, or a non-empty list of them (a tuple)."""
    import re

    if isinstance(value, str):
        patterns: list[Any] = [value]
    elif isinstance(value, (list, tuple)):
        patterns = list(value)
        if not patterns:
            raise ValueError(
                f"`{name}` must be 'off', 'auto', a module-name pattern or a non-empty list "
                "of them, got an empty list"
            )
    else:
        raise TypeError(
            f"`{name}` must be 'off', 'auto', a module-name pattern or a list of them, got "
            f"{value!r} ({type(value).__name__})"
        )
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"`{name}` patterns must be non-empty strings, got {p!r}")
        if isinstance(value, str) and p in ("off", "auto"):
            return p
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"`{name}`: {p!r} is not a regular expression ({err})") from None
    return value if isinstance(value, str) else tuple(patterns)


def _spec(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


class _Validated:
    """Runs every field's check on construction (frozen dataclasses: normalised in place)."""

    def __post_init__(self) -> None:
        cls = type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            check: Check | None = f.metadata.get("check")
            if check is not None:
                value = check(f"{cls}.{f.name}", getattr(self, f.name))
                object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """Checks across fields (none by default)."""

    def __repr__(self) -> str:
        # Only what differs from the defaults: ``AdaptiveWarmup(backoff=0.5)``.
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)  # type: ignore[arg-type]
            if f.repr and getattr(self, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


# ---------------------------------------------------------------------------------------------
# Detection rules
# ---------------------------------------------------------------------------------------------


def _cosine(name: str, value: Any) -> float:
    value = _float(minimum=-1.0)(name, value)
    if value >= 0.0:
        raise ValueError(f"`{name}` must be in [-1, 0), got {value!r}")
    return float(value)


@dataclass(frozen=True, repr=False)
class Detection(_Validated):
    """The instability rules and their thresholds (:class:`~warmup_monitor.InstabilityDetector`),
    and how their alerts are grouped into episodes (:class:`~warmup_monitor.detectors.Episodes`).

    Every rule sees every optimizer step from the first; each can be turned off. The spike rules
    are noise-relative: a value more than ``*_sigmas`` noise scales above its forecast, and at
    least ``*_min_ratio`` times it, is a spike; before the noise is known (the first
    ``noise_samples`` values) the ``*_early_ratio`` floors apply instead. The loss rules'
    defaults were chosen on the calibration split of the corpus of real runs
    (``benchmarks/corpus/replay.py --calibrate``, ``benchmarks/README_corpus.md``); the
    gradient-norm and oscillation rules raise notices, which never count as instability.
    """

    spike_factor: float = _spec(10.0, _float(above=1.0))
    """A loss above this multiple of the initial loss raises ``loss_spike`` (> 1)."""
    initial_loss_steps: int = _spec(1, _int(1))
    """The initial loss is the mean of this many first finite losses (>= 1)."""
    loss_spike: bool = _spec(True, _bool)
    """Turn the initial-loss rule on."""
    loss_trend_spike: bool = _spec(True, _bool)
    """Turn the trend rule on the loss on."""
    trend_sigmas: float = _spec(5.7, _float(above=0.0))
    """A loss above its recent level x exp(this many noise scales) is a spike, the noise scale
    being the 95th percentile of the recent absolute log residuals (> 0)."""
    trend_min_ratio: float = _spec(1.1, _float(above=1.0))
    """Least ratio to the loss trend that makes a spike once the noise is known (> 1)."""
    trend_early_ratio: float = _spec(3.0, _float(above=1.0))
    """Least ratio to the loss trend that makes a spike while the noise is unknown (> 1)."""
    grad_norm_spike: bool = _spec(True, _bool)
    """Turn the gradient-norm rule on."""
    grad_norm_sigmas: float = _spec(5.7, _float(above=0.0))
    """A gradient norm above its trend x (1 + this many robust noise scales) is a spike
    (> 0)."""
    grad_norm_min_ratio: float = _spec(1.1, _float(above=1.0))
    """Least ratio to the gradient-norm trend that makes a spike once the noise is known (> 1)."""
    grad_norm_early_ratio: float = _spec(3.0, _float(above=1.0))
    """Least ratio to the gradient-norm trend that makes a spike while the noise is unknown
    (> 1)."""
    grad_norm_zscore_window: int = _spec(
        128, lambda name, value: check_int_or_off(name, value, minimum=8)
    )
    """OLMo-core's rule as well, on the gradient norm: once half this many norms are kept, a
    norm more than ``grad_norm_zscore_sigmas`` standard deviations above the mean of the last
    this many is a spike (0: off; else >= 8)."""
    grad_norm_zscore_sigmas: float = _spec(6.0, _float(above=0.0))
    """Standard deviations above the window's mean for ``grad_norm_zscore_window`` (> 0)."""
    noise_samples: int = _spec(10, _int(1))
    """Values a rule needs before its noise scale is trusted: until then the early ratios
    apply and the rise rules stay silent (>= 1)."""
    rebaseline_steps: int = _spec(20, _int(1))
    """Consecutive spikes after which a trend accepts the new level (>= 1)."""
    loss_divergence: bool = _spec(True, _bool)
    """Turn the slow-divergence rule on (``loss_divergence``)."""
    divergence_min_ratio: float = _spec(1.25, _float(above=1.0))
    """Least ratio of the smoothed loss to its low within ``rise_window`` that makes a
    divergence (> 1)."""
    divergence_sigmas: float = _spec(5.0, _float(above=0.0))
    """Least margin of a divergence above the low, in noise scales of one loss (> 0)."""
    grad_norm_rise: bool = _spec(True, _bool)
    """Turn the rising-gradient-norm rule on (``grad_norm_rise``)."""
    grad_norm_rise_ratio: float = _spec(3.0, _float(above=1.0))
    """Least ratio of the smoothed gradient norm to its low within ``rise_window`` (> 1)."""
    grad_norm_rise_sigmas: float = _spec(5.0, _float(above=0.0))
    """Least margin of a gradient-norm rise above the low, in noise scales (> 0)."""
    rise_window: int = _spec(100, _int(5))
    """Steps over which the rise rules take the low; the level must also have climbed by half
    the margin within the last fifth of it (>= 5)."""
    non_finite: bool = _spec(True, _bool)
    """Turn the non-finite rule on (NaN or inf loss or gradient norm)."""
    oscillation: bool = _spec(True, _bool)
    """Turn the oscillation rule on."""
    oscillation_cosine: float = _spec(-0.5, _cosine)
    """Mean consecutive-gradient cosine below which gradients oscillate, in [-1, 0)."""
    oscillation_steps: int = _spec(5, _int(1))
    """Consecutive negative cosines the oscillation rule needs (>= 1)."""
    persistence: bool = _spec(True, _bool)
    """Turn the ``transient`` / ``persistent_instability`` rule on."""
    persist_steps: int = _spec(5, _int(1))
    """Flagged steps in a row that make an episode persistent (>= 1)."""
    repeat_count: int = _spec(3, _int(2))
    """Episodes within ``repeat_window`` steps that make instability repeated (>= 2)."""
    repeat_window: int = _spec(100, _int(1))
    """Window of ``repeat_count``, in steps (>= 1)."""
    episodes: bool = _spec(True, _bool)
    """Group instability alerts into episodes for the sinks: one record when an episode opens,
    one (``episode_end``) when it ends; the rules and the controller still see every step."""
    episode_quiet_steps: int = _spec(20, _int(1))
    """Steps without an instability alert that end an episode (>= 1)."""


# ---------------------------------------------------------------------------------------------
# Adaptive warmup
# ---------------------------------------------------------------------------------------------

#: The alert kinds that can be evidence of instability, what ``trigger_kinds`` may hold: the
#: instability kinds and the notices (opt-in corroboration). Not ``transient`` (an excursion
#: that recovered at once), ``episode_end`` (a summary), ``monitor`` (the monitor's own trouble)
#: nor the controller's own actions.
_TRIGGER_KINDS = (
    "loss_spike",
    "loss_trend_spike",
    "grad_norm_spike",
    "non_finite",
    "oscillation",
    "persistent_instability",
    "edge_of_stability",
    "loss_divergence",
    "grad_norm_rise",
)


def _kinds(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`{name}` must be a collection of alert kinds or None, got {value!r}")
    out = []
    for k in value:
        kind = str(getattr(k, "value", k))
        if kind not in _TRIGGER_KINDS:
            allowed = ", ".join(repr(c) for c in _TRIGGER_KINDS)
            raise ValueError(
                f"`{name}` must hold alert kinds that can be evidence of instability, among "
                f"{allowed}, got {k!r}"
            )
        out.append(kind)
    if not out:
        raise ValueError(
            f"`{name}` must hold at least one alert kind, got an empty collection (the controller "
            "would never act); None: every instability kind"
        )
    return tuple(sorted(set(out)))


@dataclass(frozen=True, repr=False)
class AdaptiveWarmup(_Validated):
    """Act on instability during warmup (:class:`~warmup_monitor.controller.WarmupController`):
    lower the lr to a fraction of the one that broke, re-warm over a longer warmup, and (with
    ``rollback``) restore the model and optimizer to a snapshot taken before the episode began.
    Every action is announced as an alert; the lr never jumps up.

    ``WarmupMonitor(adaptive=True)`` means ``AdaptiveWarmup()``. The defaults are the policy
    that won ``benchmarks/adaptive_warmup.py`` (see ``benchmarks/README_adaptive.md``).
    """

    extend_fraction: float = _spec(1.0, _float(above=0.0))
    """Each extension adds this fraction of the current planned warmup past its end (or past
    the current step, in the grace window) (> 0; 1 doubles it: repeated trouble gets a
    geometrically longer warmup)."""
    extend_steps: int | None = _spec(None, _optional(_int(1)))
    """Or this many steps (>= 1; overrides ``extend_fraction``)."""
    max_extensions: int = _spec(4, _int(0))
    """At most this many actions (extensions, each with its back-off and rollback) (>= 0)."""
    max_warmup_steps: int | None = _spec(None, _optional(_int(1)))
    """The planned warmup never passes this (>= ``warmup_steps``; default 10 x ``warmup_steps``)."""
    cooldown_steps: int | None = _spec(None, _optional(_int(0)))
    """Steps after an action during which instability does not act again (>= 0; default
    ``max(5, warmup_steps // 10)``)."""
    grace_steps: int | None = _spec(None, _optional(_int(0)))
    """Instability this many steps after the planned warmup ends still acts (>= 0; default
    ``max(20, warmup_steps)``: trouble often starts only after the peak is reached, measured
    at 0.7-1.3 x ``warmup_steps`` after it in ``benchmarks/adaptive_warmup.py``)."""
    min_alerts: int = _spec(2, _int(1))
    """Steps flagged by one-step spike kinds within ``window_steps`` that act (>= 1)."""
    window_steps: int | None = _spec(None, _optional(_int(1)))
    """The window of ``min_alerts`` (>= 1; default ``max(20, warmup_steps // 2)``)."""
    backoff: float = _spec(0.5, _float(above=0.0, maximum=1.0))
    """At an action, re-warm from this times the factor that broke, in (0, 1] (1: no drop)."""
    rewarm_from: float = _spec(1.0, _float(above=0.0, maximum=1.0))
    """At an action, re-warm from at most this fraction of the peak, in (0, 1] (1: no cap)."""
    on_exhausted: Literal["warn", "stop", "raise"] = _spec("warn", _choice("warn", "stop", "raise"))
    """When the caps are hit and training is still unstable, after the ``warmup_exhausted``
    alert: ``"warn"``, ``"stop"`` (training stops) or ``"raise"``
    (:class:`~warmup_monitor.controller.WarmupExhaustedError`)."""
    trigger_kinds: tuple[str, ...] | None = _spec(None, _kinds)
    """Alert kinds that count as instability (default: every instability kind; the notices
    ``grad_norm_spike``, ``grad_norm_rise`` and ``oscillation`` may be added; ``transient``,
    ``episode_end``, ``monitor`` and the controller's own actions are refused)."""
    user_schedule: Shape = _spec("linear", _choice(*SHAPES))
    """With ``schedule=None`` the monitor stretches the lrs your scheduler actually set (it
    records them); this shape over ``warmup_steps`` is the model of a
    :class:`~warmup_monitor.controller.WarmupController` driven by hand without
    ``record_user_lr``, and the shape of the re-warm after a back-off when your scheduler does
    not ramp up (constant, decaying or restarting lrs: the back-off is then a factor on its
    lr)."""
    rollback: bool = _spec(True, _bool)
    """On a severe episode (non-finite values, a loss far above its trend, persistent
    instability, a sustained loss rise), also restore the model, the optimizer state and the
    detectors to the last snapshot taken before the episode began (the step count, the lr
    schedule, the data stream and the random generators go on). On by default: in the
    benchmark, a back-off alone once turned a spike into a divergence that rollback prevented.
    Costs two copies of the model and optimizer state in host memory
    (``snapshot_device="cpu"``; with AdamW 3x the parameters' bytes each, 6x in all) during
    warmup and its grace window, and one snapshot in each checkpoint taken then; carried out
    by the Lightning callback and by ``LoopMonitor(model=...)`` (without ``model=`` the loop
    turns it off and says so once)."""
    snapshot_every_n_steps: int | None = _spec(None, _optional(_int(1)))
    """With ``rollback``: a snapshot every this many optimizer steps during warmup and its grace
    window; the last two are kept (>= 1; default ``max(1, warmup_steps // 10)``)."""
    anchor_step: int | None = _spec(None, _optional(_int(0)))
    """With ``rollback``: also keep the snapshot taken before this update (for example 2) for
    the whole watch, the **anchor**, so that an episode that began before both recent
    snapshots (a collapse found late) can return to it; one more snapshot of memory (3x the
    parameters' bytes with AdamW); ``None``: no anchor."""
    snapshot_device: Literal["cpu", "same"] = _spec("cpu", _choice("cpu", "same"))
    """Where snapshots live: ``"cpu"`` (host memory) or ``"same"`` (each tensor's device)."""
    rollback_loss_ratio: float = _spec(2.0, _float(above=1.0))
    """A ``loss_trend_spike`` is severe (rolls back) from this ratio to the trend (> 1)."""

    def resolved(self, warmup_steps: int) -> dict[str, int]:
        """The options whose default depends on ``warmup_steps`` (W0), resolved: ``max_warmup_
        steps`` 10 W0, ``cooldown_steps`` max(5, W0 // 10), ``grace_steps`` max(20, W0),
        ``window_steps`` max(20, W0 // 2), ``snapshot_every_n_steps`` max(1, W0 // 10)."""
        w0 = warmup_steps
        defaults = {
            "max_warmup_steps": 10 * w0,
            "cooldown_steps": max(5, w0 // 10),
            "grace_steps": max(20, w0),
            "window_steps": max(20, w0 // 2),
            "snapshot_every_n_steps": max(1, w0 // 10),
        }
        given = {k: getattr(self, k) for k in defaults}
        return {k: defaults[k] if v is None else v for k, v in given.items()}


# ---------------------------------------------------------------------------------------------
# The curvature probe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class CurvatureProbe(_Validated):
    """Probe the sharpness (top Hessian eigenvalue, Adam-preconditioned for Adam/AdamW) on a
    fixed probe batch during the monitored window, and log ``sharpness``,
    ``stability_margin`` (lr x sharpness / the optimizer's stability threshold; above 1 is past
    the edge), ``sharpness_residual`` and ``sharpness_converged`` (1 or 0; an unconverged probe
    never feeds ``edge_of_stability``).

    The probe differentiates the loss as training computes it: each submodule in its training
    mode (batch norm on the probe batch's statistics, dropout on) with one fixed dropout mask
    (torch seeded with 0 before every evaluation of the loss); modes, gradients, buffers and
    the RNG states of torch, Python and NumPy are restored afterwards.

    ``WarmupMonitor(curvature=True)`` means ``CurvatureProbe()``.
    """

    every_n_steps: int = _spec(250, _int(1))
    """Probe interval in optimizer steps, from step 0. A warm-started probe costs about 30
    training steps on the example transformer (11 Hessian-vector products): every 250 steps
    that is about 12 % while the probe runs (benchmarks/README_curvature.md)."""
    max_iters: int = _spec(20, _int(1))
    """Hessian-vector products per probe at most (>= 1); a probe that needs more is logged
    with ``sharpness_converged = 0``."""
    loss_fn: Callable[..., Any] | None = _spec(None, _callable)
    """``loss_fn(module, batch) -> loss`` for the probe; default: the module's
    ``training_step`` (Lightning) or the ``loss_fn`` given to ``LoopMonitor.probe``."""
    feeds_controller: bool = _spec(True, _bool)
    """Whether ``edge_of_stability`` counts as instability for adaptive warmup."""


# ---------------------------------------------------------------------------------------------
# Gradient statistics and the monitoring window
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Statistics(_Validated):
    """What is measured over the gradients each optimizer step."""

    cosine: Literal["exact", "sketch", "off"] = _spec("exact", _choice("exact", "sketch", "off"))
    """``"exact"`` keeps the previous gradient in one gradient-sized buffer; ``"sketch"`` keeps
    a count sketch of it (``sketch_fraction`` of the gradients' memory); ``"off"``: no cosine."""
    reference_dtype: str | None = _spec(None, _dtype_name)
    """dtype of the exact reference buffer (``"bfloat16"`` halves it); default the
    parameters' dtype."""
    sketch_fraction: float = _spec(0.02, _float(above=0.0, maximum=1.0))
    """Memory of the sketch as a fraction of the gradients' bytes, in (0, 1]."""
    update_ratio: bool = _spec(True, _bool)
    """Log ``update_ratio`` (one parameter copy on logging steps)."""
    layers: str | tuple[str, ...] = _spec("off", _layers)
    r"""Statistics per group of layers on logging steps (``warmup/layers/<group>/grad_norm``,
    ``grad_share``, ``update_ratio``): ``"off"``; ``"auto"``, the model's top-level blocks in
    depth order (embeddings, each block of the trunk, the head); or a regular expression, or a
    list of them, matched in full against module names (``r"transformer\.h\.\d+"``), the
    parameters no pattern names forming the group ``_other``. Needs the model:
    ``LoopMonitor(model=...)``."""
    layers_every_n_steps: int | None = _spec(None, _optional(_int(1)))
    """Per-group statistics on the logging steps that are multiples of this (step 0 always);
    ``None``: every ``max(10, ceil(groups / 4))`` steps (a 3-group model every 10th step, a
    200-group one every 50th): each such step costs about 0.05 ms a group on a CPU, so the
    cost per step stays bounded (``benchmarks/README_overhead.md``); ``1``: every logging
    step."""


@dataclass(frozen=True, repr=False)
class Window(_Validated):
    """Which steps are monitored, logged and read back to the host."""

    log_every_n_steps: int = _spec(1, _int(1))
    """Log every this many optimizer steps during warmup (detection still sees every step)."""
    check_every_n_steps: int = _spec(1, _int(1))
    """On steps that do not log, read the kept values back to the host every this many steps;
    a decision comes at most ``check_every_n_steps - 1`` steps late."""
    post_warmup_steps: int = _spec(100, _int(-1))
    """Keep monitoring this many optimizer steps after warmup ends; ``-1``: until the end."""
    post_warmup_log_every_n_steps: int | None = _spec(None, _optional(_int(1)))
    """Logging interval after warmup (default: ``log_every_n_steps``)."""

    @property
    def post_log_every(self) -> int:
        """The logging interval after warmup, default resolved."""
        if self.post_warmup_log_every_n_steps is None:
            return self.log_every_n_steps
        return self.post_warmup_log_every_n_steps


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------


def _object(cls: type, name: str, value: Any, *, allow_bool: bool) -> Any:
    """``value`` as a ``cls``: an instance, a plain mapping of its fields (built, so the
    class's own checks name ``Class.field``) or, with ``allow_bool``, ``True``/``False``/None."""
    if allow_bool and isinstance(value, bool):
        return cls() if value else None
    if value is None and allow_bool:
        return None
    if isinstance(value, Mapping):
        known = [f.name for f in fields(cls)]
        for key in value:
            if key not in known:
                raise TypeError(
                    f"`{cls.__name__}.{key}` is no field of {cls.__name__} (given in `{name}`); "
                    f"its fields: {', '.join(known)}"
                )
        return cls(**value)
    if not isinstance(value, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        kinds = f"{article} {cls.__name__}, a mapping of its fields"
        kinds += ", True or False" if allow_bool else ""
        raise TypeError(f"`{name}` must be {kinds}, got {value!r}")
    return value


@dataclass(frozen=True)
class MonitorConfig:
    """The whole configuration of one monitor, checked as a whole once.

    Built by ``WarmupMonitor`` and ``LoopMonitor`` from their arguments (``True``/``False`` for
    ``adaptive`` and ``curvature`` become an object with the defaults or ``None``; a plain mapping
    of fields is built into its object).

    Raises:
        TypeError: an argument or field has the wrong type (named in the message).
        ValueError: a value is out of range or inconsistent with another (both named).
    """

    warmup_steps: int
    schedule: Shape | None = None
    schedule_kwargs: Mapping[str, Any] | None = None
    adaptive: AdaptiveWarmup | None = None
    detection: Detection = field(default_factory=Detection)
    curvature: CurvatureProbe | None = None
    statistics: Statistics = field(default_factory=Statistics)
    window: Window = field(default_factory=Window)
    log_key_prefix: str = "warmup/"
    owner: str = field(default="WarmupMonitor", repr=False, compare=False)
    """The adapter whose arguments these are: errors name them ``owner.argument``."""

    def __post_init__(self) -> None:
        o = self.owner
        w0 = _int(1)(f"{o}.warmup_steps", self.warmup_steps)
        if self.schedule is not None:
            _choice(*SHAPES)(f"{o}.schedule", self.schedule)
        kwargs = self.schedule_kwargs
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"`{o}.schedule_kwargs` must be a dict or None, got {kwargs!r}")
        set_ = object.__setattr__
        objects = {"adaptive": AdaptiveWarmup, "detection": Detection, "curvature": CurvatureProbe,
                   "statistics": Statistics, "window": Window}  # fmt: skip
        for name, cls in objects.items():
            value, optional = getattr(self, name), name in ("adaptive", "curvature")
            if value is None and not optional:
                value = cls()
            set_(self, name, _object(cls, f"{o}.{name}", value, allow_bool=optional))
        if not isinstance(self.log_key_prefix, str):
            raise TypeError(f"`{o}.log_key_prefix` must be a str, got {self.log_key_prefix!r}")
        shape = self.schedule or (self.adaptive.user_schedule if self.adaptive else None)
        if kwargs:
            if shape is None:
                raise ValueError(
                    f"`{o}.schedule_kwargs` was given without `{o}.schedule` (or "
                    f"`AdaptiveWarmup.user_schedule`) to apply to, got {dict(kwargs)!r}"
                )
            try:
                shape_params(shape, w0, kwargs)
            except (TypeError, ValueError) as err:
                raise type(err)(f"`{o}.schedule_kwargs`: {err}") from None
        cap = self.adaptive.max_warmup_steps if self.adaptive else None
        if cap is not None and cap < w0:
            raise ValueError(
                f"`AdaptiveWarmup.max_warmup_steps` must be >= `{o}.warmup_steps` ({w0}), got {cap}"
            )


def check_sinks(*, on_alert: Any, alerts_file: Any, owner: str = "WarmupMonitor") -> None:
    """Check the adapters' sink options: ``on_alert`` and ``alerts_file`` (named
    ``owner.argument`` in errors).

    Raises:
        TypeError: ``on_alert`` is not callable, or ``alerts_file`` is not a path.
        ValueError: ``alerts_file`` is empty.
    """
    _callable(f"{owner}.on_alert", on_alert)
    if alerts_file is None:
        return
    if not isinstance(alerts_file, (str, os.PathLike)):
        raise TypeError(f"`{owner}.alerts_file` must be a file path or None, got {alerts_file!r}")
    if os.fspath(alerts_file) == "":
        raise ValueError(f"`{owner}.alerts_file` must be a file path or None, got ''")

"""The configuration objects: every field validated by name, pickling, repr, and the adapters.

The bad-value table is checked against the fields themselves: a new field (of a config object,
of ``WarmupMonitor`` or of ``LoopMonitor``) without a bad-value case fails
``test_every_field_has_a_bad_value_case``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import pickle
import re
from typing import Any

import pytest
import torch
from conftest import fit, read_scalars

from warmup_monitor import (
    AdaptiveWarmup,
    CurvatureProbe,
    Detection,
    Statistics,
    WarmupMonitor,
    Window,
)
from warmup_monitor.loop import LoopMonitor

CONFIGS = (AdaptiveWarmup, CurvatureProbe, Detection, Statistics, Window)
NAN = math.nan

#: Bad values per field: each must raise ValueError or TypeError naming ``Class.field``.
BAD: dict[type, dict[str, list[Any]]] = {
    Detection: {
        "spike_factor": [1.0, 0.5, "10", NAN],
        "initial_loss_steps": [0, 1.5, True],
        "loss_spike": [1, "yes"],
        "loss_trend_spike": [1, None],
        "trend_sigmas": [0.0, -1.0, math.inf],
        "trend_min_ratio": [1.0, 0.5],
        "grad_norm_spike": ["no"],
        "grad_norm_sigmas": [0, "8"],
        "grad_norm_min_ratio": [NAN, 1.0],
        "rebaseline_steps": [0],
        "non_finite": [0],
        "oscillation": ["on"],
        "oscillation_cosine": [0.1, -2.0, 0.0],
        "oscillation_steps": [0, 2.0],
        "persistence": [None],
        "persist_steps": [0],
        "repeat_count": [1],
        "repeat_window": [0],
        "trend_early_ratio": [1.0, "2"],
        "grad_norm_early_ratio": [0.5],
        "grad_norm_zscore_window": [-1, 4, 128.0],
        "grad_norm_zscore_sigmas": [0.0, "6"],
        "noise_samples": [0, 2.5],
        "loss_divergence": ["yes"],
        "divergence_min_ratio": [1.0, NAN],
        "divergence_sigmas": [0.0, -1.0],
        "grad_norm_rise": [1],
        "grad_norm_rise_ratio": [0.9],
        "grad_norm_rise_sigmas": [0],
        "rise_window": [4, 10.0],
        "episodes": ["on"],
        "episode_quiet_steps": [0],
    },
    AdaptiveWarmup: {
        "extend_fraction": [0, -0.5, NAN, "1"],
        "extend_steps": [0, 2.5],
        "max_extensions": [-1, 1.0],
        "max_warmup_steps": [0, 20.0],
        "cooldown_steps": [-1],
        "grace_steps": [-3, "5"],
        "min_alerts": [0],
        "window_steps": [0],
        "backoff": ["half", 0, 1.5, NAN],
        "rewarm_from": [5, 0.0],
        "on_exhausted": ["halt", None],
        "trigger_kinds": [["spike"], "loss_spike", ["warmup_extended"], 3, [], ()],
        "user_schedule": ["linar", None],
        "rollback": ["yes", 1],
        "snapshot_every_n_steps": [0, 2.5],
        "anchor_step": [-1, 2.5, "2"],
        "snapshot_device": ["gpu", None],
        "rollback_loss_ratio": [1.0, NAN, "2"],
    },
    CurvatureProbe: {
        "every_n_steps": [0, 2.5],
        "max_iters": [0],
        "loss_fn": ["loss", 3],
        "feeds_controller": ["no", 1],
    },
    Statistics: {
        "cosine": ["fast", None],
        "reference_dtype": ["int8", 16],
        "sketch_fraction": [0.0, 1.5, NAN],
        "update_ratio": ["no", 1],
        "layers": ["", "(", [], ["x", "[a"], 3, [3], None],
        "layers_every_n_steps": [0, 2.5, "10"],
    },
    Window: {
        "log_every_n_steps": [0, 1.5],
        "check_every_n_steps": [0],
        "post_warmup_steps": [-2, "100"],
        "post_warmup_log_every_n_steps": [0],
    },
}

#: The adapters' own arguments: (bad value, the name the message must hold).
_OPT = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
ADAPTER_BAD: dict[str, list[tuple[Any, str]]] = {
    "warmup_steps": [(0, "warmup_steps"), (2.5, "warmup_steps"), (True, "warmup_steps")],
    "schedule": [("linar", "schedule"), (3, "schedule")],
    "schedule_kwargs": [("tau=50", "schedule_kwargs"), ({"tau": 3}, "schedule_kwargs")],
    "adaptive": [("yes", "adaptive"), (Detection(), "adaptive")],
    "detection": [(True, "detection"), (AdaptiveWarmup(), "detection")],
    "curvature": [("on", "curvature"), (1, "curvature")],
    "statistics": [("exact", "statistics")],
    "window": [("every", "window"), (2, "window")],
    "on_alert": [("print", "on_alert")],
    "alerts_file": [(5, "alerts_file"), ("", "alerts_file")],
    "log_key_prefix": [(5, "log_key_prefix"), (None, "log_key_prefix")],
    "progress_bar": [("yes", "progress_bar"), (1, "progress_bar")],
    # LoopMonitor only
    "optimizers": [("x", "optimizers"), ([_OPT, _OPT], "optimizers"), ([], "optimizers")],
    "writer": [(object(), "writer")],
    "model": [(_OPT, "model"), ("net", "model")],
}


def _adapter_params(cls: type) -> set[str]:
    sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    return {n for n in sig.parameters if n != "self"}


def test_every_field_has_a_bad_value_case() -> None:
    for cls in CONFIGS:
        assert set(BAD[cls]) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
    covered = set(ADAPTER_BAD)
    assert _adapter_params(WarmupMonitor) <= covered
    assert _adapter_params(LoopMonitor) <= covered
    assert covered == _adapter_params(WarmupMonitor) | _adapter_params(LoopMonitor)


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        (cls, name, v)
        for cls, table in BAD.items()
        for name, values in table.items()
        for v in values
    ],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
def test_each_bad_field_value_names_the_field(cls: type, name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=rf"`{cls.__name__}\.{name}`"):
        cls(**{name: value})


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [(n, v, shown) for n, cases in ADAPTER_BAD.items() for v, shown in cases],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
@pytest.mark.parametrize("adapter", ["WarmupMonitor", "LoopMonitor"])
def test_each_bad_adapter_argument_is_named(
    name: str, value: Any, shown: str, adapter: str
) -> None:
    # Whatever the other options: no schedule, adaptive off, curvature off (the defaults).
    if adapter == "WarmupMonitor":
        if name not in _adapter_params(WarmupMonitor):
            pytest.skip("a LoopMonitor argument")
        kwargs: dict[str, Any] = {"warmup_steps": 10, name: value}
        with pytest.raises((ValueError, TypeError), match=rf"`WarmupMonitor\.{shown}`"):
            WarmupMonitor(**kwargs)
    else:
        if name not in _adapter_params(LoopMonitor):
            pytest.skip("a WarmupMonitor argument")
        args: dict[str, Any] = {"optimizers": _OPT, "warmup_steps": 10, name: value}
        with pytest.raises((ValueError, TypeError), match=rf"`LoopMonitor\.{shown}`"):
            LoopMonitor(**args)


def test_a_bad_field_fails_whatever_the_other_options_are() -> None:
    # The options of a capability that is off are still checked where they are given.
    with pytest.raises(ValueError, match=r"`AdaptiveWarmup\.max_extensions`"):
        WarmupMonitor(warmup_steps=5, adaptive=AdaptiveWarmup(max_extensions=-1))
    match = r"`AdaptiveWarmup\.max_warmup_steps` must be >= `WarmupMonitor\.warmup_steps` \(5\)"
    with pytest.raises(ValueError, match=match):
        WarmupMonitor(warmup_steps=5, adaptive=AdaptiveWarmup(max_warmup_steps=4))
    with pytest.raises(ValueError, match=r"`WarmupMonitor\.schedule_kwargs`"):
        WarmupMonitor(warmup_steps=5, schedule_kwargs={"tau": 3})  # nothing to apply them to


def test_true_and_false_mean_the_defaults_and_off() -> None:
    on = WarmupMonitor(warmup_steps=5, adaptive=True, curvature=True)
    assert on.config.adaptive == AdaptiveWarmup() and on.config.curvature == CurvatureProbe()
    off = WarmupMonitor(warmup_steps=5)
    assert off.config.adaptive is None and off.config.curvature is None
    assert off.engine.controller is None and off.engine.prober is None


def test_repr_shows_the_configuration() -> None:
    assert repr(AdaptiveWarmup(backoff=0.25)) == "AdaptiveWarmup(backoff=0.25)"
    assert repr(Detection()) == "Detection()"
    m = WarmupMonitor(warmup_steps=5, schedule="linear", adaptive=AdaptiveWarmup(backoff=0.25))
    assert repr(m) == (
        "WarmupMonitor(warmup_steps=5, schedule='linear', adaptive=AdaptiveWarmup(backoff=0.25))"
    )
    w = WarmupMonitor(warmup_steps=5, window=Window(log_every_n_steps=10))
    assert repr(w) == "WarmupMonitor(warmup_steps=5, window=Window(log_every_n_steps=10))"


def test_config_objects_are_frozen_and_pickle() -> None:
    a = AdaptiveWarmup(backoff=0.25, trigger_kinds=["loss_spike", "non_finite"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.backoff = 0.1  # type: ignore[misc]
    for obj in (a, Detection(trend_sigmas=6.0), Window(post_warmup_steps=-1), Statistics()):
        assert pickle.loads(pickle.dumps(obj)) == obj
        assert copy.deepcopy(obj) == obj


class _Pickler:
    """Pickles (and deep-copies) the monitor from inside the fit, after the third batch."""

    def __init__(self, monitor: WarmupMonitor) -> None:
        self.monitor = monitor
        self.copies: list[WarmupMonitor] = []

    def on_train_batch_end(self, *args: Any) -> None:
        if len(self.copies) == 0 and self.monitor.engine.steps_taken(0) == 3:
            self.copies.append(pickle.loads(pickle.dumps(self.monitor)))
            self.copies.append(copy.deepcopy(self.monitor))


def test_warmup_monitor_pickles_before_inside_and_after_a_fit(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    monitor = WarmupMonitor(
        warmup_steps=5, schedule="linear", adaptive=AdaptiveWarmup(backoff=0.25)
    )
    before = pickle.loads(pickle.dumps(monitor))
    assert repr(before) == repr(monitor) and before.config == monitor.config
    pickler = _Pickler(monitor)
    spy = type("Spy", (pl.Callback,), {"on_train_batch_end": pickler.on_train_batch_end})()
    fit(pl, tmp_path, [monitor, spy], max_steps=6)
    inside = pickler.copies
    assert len(inside) == 2
    for c in inside:  # the state at the moment of the copy travels
        assert c.state_dict()["steps"] == {0: 3}
    after = pickle.loads(pickle.dumps(monitor))
    assert after.state_dict() == monitor.state_dict()
    assert copy.deepcopy(monitor).state_dict() == monitor.state_dict()


def test_loop_monitor_pickles_before_inside_and_after(tmp_path: os.PathLike) -> None:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = LoopMonitor(opt, warmup_steps=4, writer=SummaryWriter(str(tmp_path)))
    copies = [pickle.loads(pickle.dumps(monitor))]
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for t in range(6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()
        if t == 2:
            copies.append(pickle.loads(pickle.dumps(monitor)))
            copies.append(copy.deepcopy(monitor))
    monitor.close()
    copies.append(pickle.loads(pickle.dumps(monitor)))
    assert [c.state_dict()["steps"] for c in copies] == [{0: 0}, {0: 3}, {0: 3}, {0: 6}]
    # A copy made inside the loop watches its own copy of the optimizer.
    assert copies[1].engine.optimizers[0] is not opt
    assert isinstance(copies[1].engine.optimizers[0], torch.optim.SGD)
    assert read_scalars(str(tmp_path))["warmup/loss"].keys() == set(range(6))


# ------------------------------------------------------------------ issue 22, item 7: errors


def test_a_wrong_object_is_named_with_the_right_article() -> None:
    with pytest.raises(TypeError, match=r"`WarmupMonitor\.adaptive` must be an AdaptiveWarmup"):
        WarmupMonitor(warmup_steps=10, adaptive=Detection())
    with pytest.raises(TypeError, match=r"`WarmupMonitor\.detection` must be a Detection"):
        WarmupMonitor(warmup_steps=10, detection=AdaptiveWarmup())
    with pytest.raises(TypeError, match=r"`LoopMonitor\.window` must be a Window"):
        LoopMonitor(_OPT, warmup_steps=10, window="every")


@pytest.mark.parametrize("adapter", ["WarmupMonitor", "LoopMonitor"])
def test_plain_mappings_build_the_config_objects(adapter: str) -> None:
    mappings: dict[str, Any] = {
        "adaptive": {"backoff": 0.3},
        "detection": {"trend_sigmas": 6.0},
        "curvature": {"every_n_steps": 50},
        "statistics": {"cosine": "sketch"},
        "window": {"log_every_n_steps": 5},
    }
    expected = {
        "adaptive": AdaptiveWarmup(backoff=0.3),
        "detection": Detection(trend_sigmas=6.0),
        "curvature": CurvatureProbe(every_n_steps=50),
        "statistics": Statistics(cosine="sketch"),
        "window": Window(log_every_n_steps=5),
    }
    if adapter == "WarmupMonitor":
        monitor: Any = WarmupMonitor(warmup_steps=10, **mappings)
    else:
        monitor = LoopMonitor(_OPT, warmup_steps=10, model=torch.nn.Linear(1, 1), **mappings)
    for name, obj in expected.items():
        assert getattr(monitor.config, name) == obj
    # The class's own errors: a bad value or an unknown key names `Class.field`.
    with pytest.raises(ValueError, match=r"`AdaptiveWarmup\.backoff`"):
        WarmupMonitor(warmup_steps=10, adaptive={"backoff": 1.5})
    with pytest.raises(TypeError, match=r"`Window\.log_every_n_step` is no field of Window"):
        WarmupMonitor(warmup_steps=10, window={"log_every_n_step": 5})


@pytest.mark.parametrize(
    "kind",
    ["transient", "monitor", "episode_end", "warmup_extended", "lr_backoff", "rollback",
     "warmup_exhausted"],
)  # fmt: skip
def test_trigger_kinds_refuse_what_is_never_instability_evidence(kind: str) -> None:
    with pytest.raises(ValueError, match=r"`AdaptiveWarmup\.trigger_kinds` .*'loss_spike'") as err:
        AdaptiveWarmup(trigger_kinds=["loss_spike", kind])
    assert "'transient'," not in str(err.value)  # the allowed kinds do not list it
    # The notices are opt-in corroboration.
    kinds = ("grad_norm_spike", "grad_norm_rise", "oscillation")
    assert AdaptiveWarmup(trigger_kinds=kinds).trigger_kinds == tuple(sorted(kinds))


@pytest.mark.parametrize(
    ("old", "value", "home"),
    [
        ("log_every_n_steps", 5, "window=Window(log_every_n_steps=5)"),
        ("check_every_n_steps", 2, "window=Window(check_every_n_steps=2)"),
        ("post_warmup_steps", 50, "window=Window(post_warmup_steps=50)"),
        ("post_warmup_log_every_n_steps", 5, "window=Window(post_warmup_log_every_n_steps=5)"),
        ("spike_factor", 5.0, "detection=Detection(spike_factor=5.0)"),
        ("initial_loss_steps", 3, "detection=Detection(initial_loss_steps=3)"),
        ("detector", None, "detection=Detection(...)"),
        ("cosine", "off", "statistics=Statistics(cosine='off')"),
        ("cosine_reference_dtype", "float64", "statistics=Statistics(reference_dtype='float64')"),
        ("update_ratio", False, "statistics=Statistics(update_ratio=False)"),
        ("on_exhausted", "stop", "adaptive=AdaptiveWarmup(on_exhausted='stop')"),
        ("extend_fraction", 0.5, "adaptive=AdaptiveWarmup(extend_fraction=0.5)"),
        ("max_extensions", 2, "adaptive=AdaptiveWarmup(max_extensions=2)"),
        ("max_warmup_steps", 99, "adaptive=AdaptiveWarmup(max_warmup_steps=99)"),
        ("grace_steps", 9, "adaptive=AdaptiveWarmup(grace_steps=9)"),
        ("backoff", 0.3, "adaptive=AdaptiveWarmup(backoff=0.3)"),
        ("rewarm_from", 0.2, "adaptive=AdaptiveWarmup(rewarm_from=0.2)"),
        ("user_schedule", "cosine", "adaptive=AdaptiveWarmup(user_schedule='cosine')"),
        ("curvature_every_n_steps", 50, "curvature=CurvatureProbe(every_n_steps=50)"),
        ("curvature_iters", 5, "curvature=CurvatureProbe(max_iters=5)"),
        ("curvature_loss", None, "curvature=CurvatureProbe(loss_fn=None)"),
        ("curvature_feeds_controller", False, "curvature=CurvatureProbe(feeds_controller=False)"),
    ],
)
@pytest.mark.parametrize("adapter", ["WarmupMonitor", "LoopMonitor"])
def test_an_old_keyword_names_its_new_home(old: str, value: Any, home: str, adapter: str) -> None:
    with pytest.raises(TypeError, match=rf"{adapter}: `{old}` moved .* pass {re.escape(home)}$"):
        if adapter == "WarmupMonitor":
            WarmupMonitor(warmup_steps=10, **{old: value})
        else:
            LoopMonitor(_OPT, warmup_steps=10, **{old: value})
    # Several at once: grouped by their new home.
    with pytest.raises(TypeError, match=re.escape("window=Window(log_every_n_steps=5, post_")):
        WarmupMonitor(warmup_steps=10, log_every_n_steps=5, post_warmup_steps=7)
    # An unknown keyword keeps Python's own error; the signature is the constructor's.
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        WarmupMonitor(warmup_steps=10, nonsense=1)
    assert "warmup_steps" in inspect.signature(WarmupMonitor).parameters

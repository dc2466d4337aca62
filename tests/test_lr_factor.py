"""LrFactor: a factor applied for the update only, with real torch optimizers and schedulers.

The parameter is one float64 scalar, set to 0 before each step, with gradient 1: plain SGD
(no momentum, no weight decay) then leaves it at exactly ``-lr_applied``, so the lr each
update used is read off the parameter itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from warmup_monitor.lr_factor import LrFactor

LR = 0.1
F = 0.3

Sched = torch.optim.lr_scheduler.LRScheduler

SCHEDULERS: dict[str, tuple[Callable[[torch.optim.Optimizer], Sched], Callable[[int], float]]] = {
    # name: (factory, the documented lr after t scheduler steps, computed independently)
    "ExponentialLR": (
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
        lambda t: LR * 0.9**t,
    ),
    "StepLR": (
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda t: LR * 0.5 ** (t // 2),
    ),
    "LambdaLR": (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 5)),
        lambda t: LR * min(1.0, (t + 1) / 5),
    ),
    "MultiplicativeLR": (
        lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda t: 0.8),
        lambda t: LR * 0.8**t,
    ),
}


def scalar() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, requires_grad=True)


def update(opt: torch.optim.Optimizer, w: torch.Tensor, closure: Any = None) -> float:
    """One optimizer step from w = 0 with gradient 1: the lr the update applied."""
    with torch.no_grad():
        w.zero_()
    w.grad = torch.ones_like(w)
    opt.step(closure)
    return -w.item()


def train(
    name: str, factor: float | None, steps: int = 10, skip: frozenset[int] = frozenset()
) -> dict[str, list[Any]]:
    """A plain loop: optimizer step (unless skipped), then scheduler step."""
    w = scalar()
    opt = torch.optim.SGD([w], lr=LR)
    sched = SCHEDULERS[name][0](opt)
    hooks = None if factor is None else LrFactor(opt, lambda: factor)
    rec: dict[str, list[Any]] = {"group": [], "last": [], "applied": [], "inside": []}
    rec["group"].append(opt.param_groups[0]["lr"])
    rec["last"].append(sched.get_last_lr())

    def closure() -> None:  # runs inside optimizer.step, after the pre-hook
        rec["inside"].append(
            (opt.param_groups[0]["lr"], None if hooks is None else hooks.scheduler_lrs())
        )

    for t in range(steps):
        if t in skip:
            rec["applied"].append(None)
        else:
            rec["applied"].append(update(opt, w, closure))
        sched.step()
        rec["group"].append(opt.param_groups[0]["lr"])
        rec["last"].append(sched.get_last_lr())
    if hooks is not None:
        hooks.remove()
    return rec


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_scheduler_never_sees_the_factor(name: str) -> None:
    plain = train(name, None)
    damped = train(name, F)
    expected = [SCHEDULERS[name][1](t) for t in range(11)]
    # The scheduler alone follows its documented formula ...
    assert plain["group"] == pytest.approx(expected, rel=1e-12)
    assert [lrs[0] for lrs in plain["last"]] == pytest.approx(expected, rel=1e-12)
    assert plain["applied"] == pytest.approx(expected[:10], rel=1e-12)
    # ... and with the factor its sequence is the same, bit for bit: nothing compounded.
    assert damped["group"] == plain["group"]
    assert damped["last"] == plain["last"]
    # Each update applied the scheduler's lr times the factor, exactly.
    assert damped["applied"] == [lr * F for lr in plain["group"][:10]]
    # Inside the step: the param group holds the damped lr, scheduler_lrs() the scheduler's.
    assert damped["inside"] == [(lr * F, [lr]) for lr in plain["group"][:10]]


@pytest.mark.parametrize("name", ["ExponentialLR", "StepLR"])
def test_without_the_restore_a_chainable_scheduler_would_compound(name: str) -> None:
    """What LrFactor prevents: a factor left in param_group["lr"] is read back by chainable
    schedulers, so their lr collapses by 0.3 every step."""
    w = scalar()
    opt = torch.optim.SGD([w], lr=LR)
    sched = SCHEDULERS[name][0](opt)
    for _ in range(3):
        opt.param_groups[0]["lr"] *= F  # the naive way: dampen and leave it
        update(opt, w)
        sched.step()
    naive = opt.param_groups[0]["lr"]
    assert naive == pytest.approx(SCHEDULERS[name][1](3) * F**3, rel=1e-12)
    assert train(name, F, steps=3)["group"][-1] == pytest.approx(SCHEDULERS[name][1](3), rel=1e-12)


@pytest.mark.parametrize("name", ["ExponentialLR", "StepLR", "LambdaLR"])
def test_a_skipped_step_leaves_the_lr_untouched(name: str) -> None:
    skip = frozenset({2, 3, 7})
    plain = train(name, None, skip=skip)
    damped = train(name, F, skip=skip)
    assert damped["group"] == plain["group"] and damped["last"] == plain["last"]
    assert damped["applied"] == [
        None if t in skip else lr * F for t, lr in enumerate(plain["group"][:10])
    ]
    assert len(damped["inside"]) == 10 - len(skip)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_step_skipped_by_a_grad_scaler_calls_no_factor_and_changes_no_lr() -> None:
    w = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([w], lr=LR)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    calls: list[int] = []

    def factor() -> float:
        calls.append(1)
        return F

    hooks = LrFactor(opt, factor)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for g in (math.inf, 1.0):
        opt.zero_grad()
        scaler.scale(w * g).backward()
        scaler.step(opt)  # skipped for the inf gradient: optimizer.step is not called
        scaler.update()
        sched.step()
        assert not hooks.active
    assert calls == [1]  # the factor was asked once, for the step that ran
    assert w.item() == pytest.approx(-LR * 0.9 * F, rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.9**2, rel=1e-12)
    hooks.remove()


def test_the_factor_is_called_once_per_step_before_the_closure() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=LR)
    events: list[str] = []
    factors = iter([0.5, 0.25, 2.0])

    def factor() -> float:
        events.append("factor")
        return next(factors)

    hooks = LrFactor(opt, factor)
    applied = [update(opt, w, lambda: events.append("closure")) for _ in range(3)]
    assert events == ["factor", "closure"] * 3
    assert applied == [LR * 0.5, LR * 0.25, LR * 2.0]  # any finite factor > 0, even > 1
    assert opt.param_groups[0]["lr"] == LR
    hooks.remove()


def test_scheduler_lrs_outside_and_inside_the_step_and_active() -> None:
    a, b = scalar(), scalar()
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    hooks = LrFactor(opt, lambda: 0.1)
    assert hooks.scheduler_lrs() == [1.0, 0.5] and not hooks.active
    seen = []

    def closure() -> None:
        seen.append(([g["lr"] for g in opt.param_groups], hooks.scheduler_lrs(), hooks.active))

    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step(closure)
    assert seen == [([1.0 * 0.1, 0.5 * 0.1], [1.0, 0.5], True)]
    assert (a.item(), b.item()) == (-0.1, -0.5 * 0.1)  # every group, its own lr x factor
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5] and not hooks.active
    assert hooks.scheduler_lrs() == [1.0, 0.5]
    hooks.remove()


def test_hooks_registered_after_it_see_the_damped_lr_then_the_restored_one() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=1.0)
    hooks = LrFactor(opt, lambda: F)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kw: seen.append(o.param_groups[0]["lr"]))
    opt.register_step_post_hook(lambda o, args, kw: seen.append(o.param_groups[0]["lr"]))
    update(opt, w)
    # Hooks run in registration order: LrFactor's pre-hook dampens before the user's pre-hook,
    # and its post-hook restores before the user's post-hook.
    assert seen == [F, 1.0]
    hooks.remove()


def test_remove_restores_the_plain_optimizer() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=LR)
    hooks = LrFactor(opt, lambda: F)
    assert update(opt, w) == LR * F
    hooks.remove()
    assert opt.param_groups[0]["lr"] == LR
    assert update(opt, w) == LR  # no factor any more
    hooks.remove()  # idempotent
    again = LrFactor(opt, lambda: 0.5)  # a new one may attach after remove()
    assert update(opt, w) == LR * 0.5
    again.remove()


def test_remove_during_a_step_restores_the_lr() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=LR)
    hooks = LrFactor(opt, lambda: F)
    assert update(opt, w, hooks.remove) == LR  # removed in the closure, before the update
    assert opt.param_groups[0]["lr"] == LR and not hooks.active
    assert update(opt, w) == LR


def test_factor_one_touches_nothing() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=0.7)
    lr_object = opt.param_groups[0]["lr"]
    seen = []
    hooks = LrFactor(opt, lambda: 1.0)
    assert update(opt, w, lambda: seen.append(hooks.active)) == 0.7
    assert seen == [False]
    assert opt.param_groups[0]["lr"] is lr_object
    hooks.remove()


def test_a_second_lr_factor_on_one_optimizer_is_refused() -> None:
    opt = torch.optim.SGD([scalar()], lr=1.0)
    hooks = LrFactor(opt, lambda: 0.5)
    with pytest.raises(ValueError, match=r"`optimizer` \(SGD\) already has an LrFactor"):
        LrFactor(opt, lambda: 0.5)
    other = LrFactor(torch.optim.SGD([scalar()], lr=1.0), lambda: 0.5)  # another optimizer: fine
    other.remove()
    hooks.remove()


def test_a_step_that_raises_does_not_leave_the_factor_in_place() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=1.0)
    hooks = LrFactor(opt, lambda: 0.5)

    def failing_closure() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure)  # the post-hook never runs
    assert opt.param_groups[0]["lr"] == 0.5 and hooks.active
    assert hooks.scheduler_lrs() == [1.0]
    assert update(opt, w) == 0.5  # restores 1.0 first, then applies 0.5 to it: not 0.25
    assert opt.param_groups[0]["lr"] == 1.0
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure)
    hooks.remove()  # restores too
    assert opt.param_groups[0]["lr"] == 1.0


def test_a_scheduler_step_after_a_failed_step_is_kept() -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=1.0)
    hooks = LrFactor(opt, lambda: 0.5)
    with pytest.raises(RuntimeError):
        opt.step(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    opt.param_groups[0]["lr"] = 0.2  # set by someone since: the scheduler's value now
    assert update(opt, w) == 0.2 * 0.5
    assert opt.param_groups[0]["lr"] == 0.2
    hooks.remove()


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -0.5])
def test_a_bad_factor_raises_at_step_time_and_leaves_the_lr(bad: float) -> None:
    w = scalar()
    opt = torch.optim.SGD([w], lr=1.0)
    hooks = LrFactor(opt, lambda: bad)
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match=f"the lr factor must be finite and > 0, got {bad}"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 1.0 and w.item() == 0.0 and not hooks.active
    hooks.remove()


def test_bad_arguments_name_the_argument() -> None:
    opt = torch.optim.SGD([scalar()], lr=1.0)
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer, got obj"):
        LrFactor(object(), lambda: 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`factor` must be callable, got float"):
        LrFactor(opt, 0.5)  # type: ignore[arg-type]
    LrFactor(opt, lambda: 1.0).remove()  # nothing left attached by the failures


def test_tensor_lr_is_scaled_and_the_original_tensor_put_back() -> None:
    w = torch.zeros(2, requires_grad=True)
    lr = torch.tensor(0.4)
    opt = torch.optim.Adam([w], lr=lr)
    hooks = LrFactor(opt, lambda: 0.5)
    w.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.4)
    # Adam's first step moves each weight by lr x sign(grad) (up to eps): 0.4 x 0.5.
    assert w.detach().tolist() == pytest.approx([-0.2, -0.2], rel=1e-4)
    assert hooks.scheduler_lrs() == [pytest.approx(0.4)]
    hooks.remove()

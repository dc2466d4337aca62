"""Stability thresholds of SGD, Adam and AdamW, Adam's preconditioner, and the margin.

Along an eigenvector of the Hessian with eigenvalue ``lambda``, the update of each optimizer on
a quadratic is a linear recurrence, stable while ``lambda < threshold = c / lr``; the margin is
``sharpness / threshold`` (above 1: past the edge of stability). ``c`` is read from each param
group, for ``torch.optim.SGD`` exactly as it updates (``buf = beta * buf + (1 - dampening) *
g``; ``p -= lr * buf``, or ``p -= lr * (g + beta * buf)`` with ``nesterov=True``, which torch
allows only with ``dampening = 0``):

.. math::

    c = \\begin{cases}
        2 & \\text{SGD, no momentum} \\\\
        \\dfrac{2 + 2\\beta}{1 - \\text{dampening}}
            & \\text{SGD, heavy-ball momentum } \\beta
              \\ (\\infty \\text{ when dampening} \\ge 1) \\\\
        \\dfrac{2 + 2\\beta}{1 + 2\\beta} & \\text{SGD, Nesterov momentum } \\beta \\\\
        \\dfrac{2 + 2\\beta_1}{1 - \\beta_1}
            & \\text{Adam, AdamW, on } \\lambda_{\\max}(P^{-1} H),
              \\ P = \\sqrt{\\hat v} + \\epsilon
    \\end{cases}

Heavy ball: ``x' = x - lr (1 - d) lambda x + beta (x - x_prev)`` is stable iff ``lr (1 - d)
lambda < 2 + 2 beta``. Nesterov: ``x' = x - lr lambda ((1 + beta) x - beta x_prev) + beta (x -
x_prev)`` is stable iff ``lr lambda < (2 + 2 beta) / (1 + 2 beta)``. Adam: ``c = 38`` at ``beta1
= 0.9`` (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"), with ``v_hat``
the bias-corrected second moment of the optimizer's state (frozen over the probe). These are
the linear-stability limits of each update rule on a quadratic; the optimizers' weight decay
is not part of the curvature (SGD's L2 term would add ``weight_decay`` to every eigenvalue),
the first SGD step (``buf = g``, undampened) does not change the limit, and Adam's
first-moment bias correction, large in the first few dozen steps, is ignored as in the paper.
``tests/test_curvature.py`` checks the SGD rows against ``torch.optim.SGD`` itself: it stays
bounded at 0.9x and 0.98x the threshold and blows up at 1.02x and 1.1x.

This module imports no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from warmup_monitor.curvature.lanczos import SharpnessResult, top_hessian_eigenvalue

__all__ = [
    "StabilityEstimate",
    "adam_preconditioner",
    "estimate_stability",
    "stability_margin",
    "stability_threshold",
]


@dataclass(frozen=True)
class StabilityEstimate:
    """The outcome of :func:`estimate_stability`.

    Attributes:
        sharpness: ``lambda_max(H)`` for SGD, ``lambda_max(P^-1 H)`` for Adam/AdamW (with
            several param groups, scaled to the reference group: see :func:`estimate_stability`).
        threshold: The sharpness at which the update rule turns unstable: ``c / lr`` of the
            reference group (``inf`` when every lr is 0).
        margin: ``sharpness / threshold``; above 1 means past the edge of stability.
        lr: The reference group's lr.
        preconditioned: Whether ``sharpness`` is of ``P^-1 H`` (Adam-type optimizers).
        result: The eigenvalue computation itself (iterations, convergence, time).
    """

    sharpness: float
    threshold: float
    margin: float
    lr: float
    preconditioned: bool
    result: SharpnessResult


def _is_adam(optimizer: Any) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer (unwrap LightningOptimizer), "
            f"got {type(optimizer).__name__}"
        )
    if not (_is_adam(optimizer) or isinstance(optimizer, torch.optim.SGD)):
        raise TypeError(
            f"stability thresholds are known for SGD, Adam and AdamW (and subclasses), "
            f"got {type(optimizer).__name__}: use top_hessian_eigenvalue directly"
        )
    return optimizer


def _group(optimizer: torch.optim.Optimizer, param_group: Any) -> dict[str, Any]:
    if isinstance(param_group, dict):
        if not any(param_group is g for g in optimizer.param_groups):
            raise ValueError("`param_group` is a dict that is not one of optimizer.param_groups")
        return param_group
    n = len(optimizer.param_groups)
    if isinstance(param_group, bool) or not isinstance(param_group, int):
        raise TypeError(
            f"`param_group` must be an index or one of optimizer.param_groups, got {param_group!r}"
        )
    if not 0 <= param_group < n:
        raise ValueError(f"`param_group` must be in [0, {n}), got {param_group}")
    return optimizer.param_groups[param_group]


def _threshold_coefficient(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """``c`` in ``threshold = c / lr`` for one param group."""
    if group.get("maximize", False):
        raise ValueError("optimizers with `maximize=True` are not supported")
    if _is_adam(optimizer):
        beta1 = float(group["betas"][0])
        return (2.0 + 2.0 * beta1) / (1.0 - beta1)
    beta = float(group.get("momentum", 0.0))
    if beta == 0.0:
        return 2.0
    if group.get("nesterov", False):
        return (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta)
    dampening = float(group.get("dampening", 0.0))
    if dampening >= 1.0:
        return math.inf  # the momentum buffer never sees a gradient: nothing moves
    return (2.0 + 2.0 * beta) / (1.0 - dampening)


def stability_threshold(optimizer: torch.optim.Optimizer, param_group: Any = 0) -> float:
    """The sharpness above which ``optimizer``'s update is unstable, for one param group.

    ``c / lr`` with ``c`` from the module's table: ``2 / lr`` for plain SGD, ``(2 + 2 beta) /
    ((1 - dampening) lr)`` for SGD with heavy-ball momentum ``beta``, ``(2 + 2 beta) / ((1 + 2
    beta) lr)`` with Nesterov momentum, and ``(2 + 2 beta1) / ((1 - beta1) lr)`` for Adam and
    AdamW (38 / lr at ``beta1 = 0.9``), the last on the *preconditioned* sharpness
    ``lambda_max(P^-1 H)``.

    Args:
        optimizer: A ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (or a subclass).
        param_group: The group's index in ``optimizer.param_groups``, or the group itself.

    Returns:
        The threshold; ``inf`` when the group's lr is 0.

    Raises:
        TypeError: ``optimizer`` is not one of the supported optimizers, or ``param_group`` is
            neither an index nor a group.
        ValueError: ``param_group`` is out of range, or the group uses ``maximize=True``.
    """
    opt = _check_optimizer(optimizer)
    group = _group(opt, param_group)
    lr = float(group["lr"])
    c = _threshold_coefficient(opt, group)
    return math.inf if lr <= 0.0 else c / lr


def stability_margin(sharpness: float, threshold: float) -> float:
    """``sharpness / threshold``: 1 at the edge of stability, above 1 past it.

    Equal to ``lr * sharpness / 2`` for plain SGD. 0 when ``threshold`` is infinite (lr = 0).

    Raises:
        TypeError: an argument is not a real number.
        ValueError: ``threshold`` is not positive, or ``sharpness`` is NaN.
    """
    for name, value in (("sharpness", sharpness), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` must be a number, got {value!r}")
    if math.isnan(sharpness):
        raise ValueError("`sharpness` is NaN")
    if not threshold > 0:
        raise ValueError(f"`threshold` must be > 0, got {threshold}")
    if math.isinf(threshold):
        return 0.0
    return float(sharpness) / float(threshold)


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Adam's diagonal preconditioner ``P = sqrt(v_hat) + eps`` for each parameter.

    ``v_hat = exp_avg_sq / (1 - beta2 ** step)`` from the optimizer's state (``max_exp_avg_sq``
    with ``amsgrad=True``), with the group's ``betas`` and ``eps``: the denominator that
    ``torch.optim.Adam`` and ``AdamW`` divide the update by. Computed on the device, no host read.

    Args:
        optimizer: A ``torch.optim.Adam`` or ``AdamW`` (or a subclass).
        params: The parameters to return it for (default: every parameter of every group that
            requires grad).

    Returns:
        One tensor per parameter, shaped like it.

    Raises:
        TypeError: ``optimizer`` is not Adam or AdamW.
        ValueError: a parameter has no state yet (the optimizer has not stepped it), or is not
            one of the optimizer's.
    """
    if not _is_adam(optimizer):
        raise TypeError(
            f"`optimizer` must be torch.optim.Adam or AdamW, got {type(optimizer).__name__}"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    out = []
    for i, p in enumerate(params):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"`params[{i}]` is not a parameter of the optimizer")
        state = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if key not in state or "step" not in state:
            raise ValueError(
                f"the optimizer has no `{key}` for `params[{i}]` yet: the preconditioned "
                "sharpness is defined from the first optimizer step on"
            )
        beta2 = float(group["betas"][1])
        step = state["step"]
        step = step.to(device=p.device, dtype=torch.float32) if isinstance(step, Tensor) else step
        v = state[key].detach().to(torch.float32)
        out.append((v / (1.0 - beta2**step)).sqrt_().add_(float(group["eps"])))
    return out


def estimate_stability(
    loss_fn: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    init: Tensor | None = None,
    explore: int | None = None,
    return_vector: bool = False,
    n_vectors: int = 3,
    reorthogonalize: bool = True,
    distributed: bool = False,
    process_group: Any = None,
) -> StabilityEstimate:
    """Sharpness, stability threshold and margin of ``optimizer`` on the loss of ``loss_fn``.

    The parameters are those of the optimizer that require grad. For Adam and AdamW the
    sharpness is preconditioned with :func:`adam_preconditioner` (so the optimizer must have
    stepped at least once). The lr and momentum are read from ``param_groups`` as they are now:
    call it where they hold the values of the next update.

    With several param groups, each group's parameters are scaled by its step size relative to
    the group that steps hardest: ``s_g = lr_g / c_g``, ``ref = argmax s_g``, and the operator is
    ``(s_g / s_ref) P^-1 H``. Its top eigenvalue is ``sharpness``, the threshold is the reference
    group's, and the margin is exact for the joint update when every group has the same momentum
    (groups that differ only in lr or weight decay, the usual case). Groups with lr 0 do not
    move and are left out; when every lr is 0 the sharpness is unscaled and the margin is 0.

    Args:
        loss_fn: Recomputes the scalar loss on the fixed probe batch (see
            :func:`top_hessian_eigenvalue`).
        optimizer: A ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (or a subclass).
        max_iters: See :func:`top_hessian_eigenvalue`.
        tol: See :func:`top_hessian_eigenvalue`.
        seed: See :func:`top_hessian_eigenvalue`.
        init: See :func:`top_hessian_eigenvalue` (a previous ``result.vectors``).
        explore: See :func:`top_hessian_eigenvalue`.
        return_vector: See :func:`top_hessian_eigenvalue`.
        n_vectors: See :func:`top_hessian_eigenvalue`.
        reorthogonalize: See :func:`top_hessian_eigenvalue`.
        distributed: See :func:`top_hessian_eigenvalue`.
        process_group: See :func:`top_hessian_eigenvalue`.

    Returns:
        A :class:`StabilityEstimate`.

    Raises:
        TypeError: ``optimizer`` is not supported (see :func:`stability_threshold`).
        ValueError: Adam has not stepped yet, the optimizer has no parameter that requires
            grad, or as in :func:`top_hessian_eigenvalue`.
    """
    opt = _check_optimizer(optimizer)
    steps = []  # (group, s_g, params)
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            lr = float(group["lr"])
            steps.append((group, lr / _threshold_coefficient(opt, group), params))
    if not steps:
        raise ValueError("the optimizer has no parameter that requires grad")
    s_ref = max(s for _, s, _ in steps)
    if s_ref > 0:
        ref_group = next(g for g, s, _ in steps if s == s_ref)
        steps = [(g, s / s_ref, ps) for g, s, ps in steps if s > 0]
    else:  # every lr is 0: nothing moves; report the unscaled sharpness, margin 0
        ref_group = steps[0][0]
        steps = [(g, 1.0, ps) for g, _, ps in steps]
    params = [p for _, _, ps in steps for p in ps]
    preconditioned = _is_adam(opt)
    base = adam_preconditioner(opt, params) if preconditioned else None
    precond: list[Tensor] | None = None
    if preconditioned or any(ratio != 1.0 for _, ratio, _ in steps):
        precond = []
        k = 0
        for _, ratio, ps in steps:
            for p in ps:
                d = base[k] if base is not None else torch.ones_like(p, dtype=torch.float32)
                precond.append(d / ratio if ratio != 1.0 else d)
                k += 1
    result = top_hessian_eigenvalue(
        loss_fn,
        params,
        max_iters=max_iters,
        tol=tol,
        preconditioner=precond,
        seed=seed,
        init=init,
        explore=explore,
        return_vector=return_vector,
        n_vectors=n_vectors,
        reorthogonalize=reorthogonalize,
        distributed=distributed,
        process_group=process_group,
    )
    threshold = stability_threshold(opt, ref_group)
    margin = stability_margin(result.value, threshold) if math.isfinite(result.value) else math.nan
    return StabilityEstimate(
        sharpness=result.value,
        threshold=threshold,
        margin=margin,
        lr=float(ref_group["lr"]),
        preconditioned=preconditioned,
        result=result,
    )

"""Curvature probe: the sharpness (top Hessian eigenvalue) and the stability margin of the lr.

Gradient descent on a quadratic with Hessian ``H`` is stable only while ``lr * lambda_max(H) <
2``; momentum and Adam move that edge. This package measures the sharpness on a fixed probe
batch with Hessian-vector products (a Lanczos-type method, warm-started from the previous
probe's leading Ritz vectors plus a random Krylov space), and turns it into a margin:
``sharpness / threshold``, above 1 past the edge. A probe differentiates the function being
trained (train-mode forward, one fixed dropout mask) and leaves no trace on training.

- :mod:`~warmup_monitor.curvature.lanczos`: :func:`top_hessian_eigenvalue`, the largest
  (algebraic) eigenvalue of ``H`` or of ``P^-1/2 H P^-1/2`` for any loss closure.
- :mod:`~warmup_monitor.curvature.stability`: :func:`stability_threshold` of SGD (with
  momentum, dampening, Nesterov), Adam and AdamW, :func:`adam_preconditioner`,
  :func:`stability_margin` and :func:`estimate_stability`, which reads all of them from a
  torch optimizer.
- :mod:`~warmup_monitor.curvature.probe`: :func:`probe_guard` (a probe leaves no trace on
  training), :class:`EdgeOfStabilityRule` and the engine's :class:`CurvatureProber`.

Example::

    probe_batch = next(iter(loader))  # fixed: the same batch at every probe

    with probe_guard(model):
        est = estimate_stability(lambda: loss_of(model, probe_batch), optimizer)
    print(est.sharpness, est.margin)  # margin > 1: past the edge of stability

This package imports no Lightning.
"""

from warmup_monitor.curvature.lanczos import SharpnessResult, top_hessian_eigenvalue
from warmup_monitor.curvature.probe import CurvatureProber, EdgeOfStabilityRule, probe_guard
from warmup_monitor.curvature.stability import (
    StabilityEstimate,
    adam_preconditioner,
    estimate_stability,
    stability_margin,
    stability_threshold,
)

__all__ = [
    "CurvatureProber",
    "EdgeOfStabilityRule",
    "SharpnessResult",
    "StabilityEstimate",
    "adam_preconditioner",
    "estimate_stability",
    "probe_guard",
    "stability_margin",
    "stability_threshold",
    "top_hessian_eigenvalue",
]

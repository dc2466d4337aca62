"""The curvature probe against dense Hessians, and the guard's promise to leave training alone."""

from __future__ import annotations

import copy
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import warmup_monitor.curvature
from warmup_monitor import CurvatureProbe
from warmup_monitor.curvature import (
    CurvatureProber,
    SharpnessResult,
    adam_preconditioner,
    estimate_stability,
    probe_guard,
    stability_margin,
    stability_threshold,
    top_hessian_eigenvalue,
)

# ------------------------------------------------------------------------------- helpers


def _quadratic(eigs: list[float], seed: int = 0) -> tuple[Tensor, list[Tensor], Callable]:
    """A quadratic loss with Hessian ``Q diag(eigs) Q^T`` over two parameter tensors."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    hessian = (q * torch.tensor(eigs, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    h32, b32 = hessian.float(), b.float()
    w = torch.randn(n - 3, generator=g).requires_grad_()
    v = torch.randn(3, generator=g).requires_grad_()

    def loss() -> Tensor:
        x = torch.cat([w, v])
        return 0.5 * x @ h32 @ x + b32 @ x

    return hessian, [w, v], loss


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1))
    model = model.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 4, generator=g, dtype=dtype)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(64, 1, generator=g, dtype=dtype)
    return model, x, y


def _dense_hessian(
    model: nn.Module, loss_of: Callable[[Callable[[Tensor], Tensor]], Tensor]
) -> Tensor:
    """The full Hessian of ``loss_of(forward)`` over ``model``'s parameters, in float64."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model64 = copy.deepcopy(model).double()

    def f(flat: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return loss_of(lambda x: torch.func.functional_call(model64, params, (x.double(),)))

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------- eigenvalue


def test_quadratic_with_known_hessian_matches_to_1e_3() -> None:
    eigs = [7.0, 5.5, 3.0, 1.0, 0.5, 0.1, -0.3, -2.0]
    _, params, loss = _quadratic(eigs)
    result = top_hessian_eigenvalue(loss, params, max_iters=20, tol=1e-4)
    assert isinstance(result, SharpnessResult)
    assert result.converged
    assert _rel(result.value, 7.0) < 1e-3
    assert result.iterations <= 8  # an 8-dimensional Krylov space is the whole space
    assert result.elapsed > 0
    assert all(p.grad is None for p in params)  # nothing accumulated


def test_top_algebraic_eigenvalue_when_a_negative_one_dominates() -> None:
    # Power iteration would return -20; the lr is bounded by the largest algebraic eigenvalue.
    eigs = [-20.0, -5.0, 0.2, 1.0, 2.5, 3.0]
    _, params, loss = _quadratic(eigs, seed=3)
    result = top_hessian_eigenvalue(loss, params, tol=1e-5)
    assert _rel(result.value, 3.0) < 1e-3
    low_memory = top_hessian_eigenvalue(loss, params, tol=1e-5, reorthogonalize=False)
    assert _rel(low_memory.value, 3.0) < 1e-3


def test_small_mlp_matches_dense_hessian_to_1e_2() -> None:
    model, x, y = _mlp()
    params = list(model.parameters())
    result = top_hessian_eigenvalue(lambda: F.mse_loss(model(x), y), params, max_iters=30)
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
    expected = torch.linalg.eigvalsh(hessian)[-1].item()
    assert result.converged
    assert _rel(result.value, expected) < 1e-2
    assert _rel(result.value, expected) < 2e-3  # in practice much better than the contract


def test_attention_model_runs_on_the_math_kernel() -> None:
    """``scaled_dot_product_attention``'s CPU flash kernel has no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(12, 4, generator=g) / 2).requires_grad_()
    bias = torch.zeros(12).requires_grad_()
    x = torch.randn(2, 5, 4, generator=g)

    def loss(w: Tensor, b: Tensor) -> Tensor:
        q, k, v = F.linear(x.to(w.dtype), w, b).view(2, 5, 3, 2, 2).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).square().mean()

    result = top_hessian_eigenvalue(lambda: loss(weight, bias), [weight, bias], tol=1e-5)
    flat0 = torch.cat([weight.detach().reshape(-1), bias.detach()]).double()
    with sdpa_kernel([SDPBackend.MATH]):
        hessian = torch.autograd.functional.hessian(
            lambda f: loss(f[:48].view(12, 4), f[48:]), flat0, vectorize=True
        )
    assert _rel(result.value, torch.linalg.eigvalsh(hessian)[-1].item()) < 1e-2


def test_warm_start_and_seed() -> None:
    model, x, y = _mlp(seed=2)
    params = list(model.parameters())

    def loss() -> Tensor:
        return F.mse_loss(model(x), y)

    cold = top_hessian_eigenvalue(loss, params, max_iters=30, tol=1e-4, return_vector=True)
    assert cold.vector is not None and cold.vector.shape == (sum(p.numel() for p in params),)
    warm = top_hessian_eigenvalue(loss, params, max_iters=30, tol=1e-4, init=cold.vector)
    assert warm.iterations < cold.iterations
    assert _rel(warm.value, cold.value) < 1e-3
    again = top_hessian_eigenvalue(loss, params, max_iters=30, tol=1e-4)
    assert again.value == cold.value and again.iterations == cold.iterations  # deterministic


def test_warm_block_and_leading_ritz_vectors() -> None:
    model, x, y = _mlp(seed=2)
    params = list(model.parameters())

    def loss() -> Tensor:
        return F.mse_loss(model(x), y)

    cold = top_hessian_eigenvalue(loss, params, max_iters=30, tol=1e-4, return_vector=True)
    assert cold.vectors is not None and cold.vectors.shape == (3, 71)
    gram = cold.vectors @ cold.vectors.T
    torch.testing.assert_close(gram, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal rows
    assert cold.vector is not None and torch.equal(cold.vector, cold.vectors[0])
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double())).float()
    ritz = torch.diag(cold.vectors @ hessian @ cold.vectors.T)
    expected = torch.linalg.eigvalsh(hessian.double())[-3:].flip(0).float()
    assert _rel(float(ritz[0]), float(expected[0])) < 1e-3  # the top pair converged
    assert bool((ritz <= expected * (1 + 1e-5)).all())  # Ritz values interlace from below
    assert bool((ritz[:-1] >= ritz[1:]).all())  # in order
    # Warm-started from the block (and a random vector): fewer products, the same value.
    warm = top_hessian_eigenvalue(loss, params, max_iters=30, tol=1e-4, init=cold.vectors)
    assert warm.converged and warm.iterations < cold.iterations
    assert _rel(warm.value, cold.value) < 1e-4


def test_convergence_waits_for_the_random_krylov_floor() -> None:
    """The residual test passes after ~9 products here (a well separated top eigenvalue), but a
    converged cold probe must also hold 12 dimensions of its random vector's Krylov space."""
    model, x, y = _mlp(seed=2)
    params = list(model.parameters())

    def loss() -> Tensor:
        return F.mse_loss(model(x), y)

    quick = top_hessian_eigenvalue(loss, params, tol=1e-2, explore=1)
    cold = top_hessian_eigenvalue(loss, params, tol=1e-2)
    assert quick.converged and quick.iterations < 12
    assert cold.converged and 12 <= cold.iterations <= 14  # (round-off may add a direction)
    assert _rel(cold.value, quick.value) < 1e-2
    short = top_hessian_eigenvalue(loss, params, tol=1e-2, max_iters=10)  # floor capped at 10
    assert short.converged and short.iterations == 10


def test_budget_exhausted_is_reported_not_converged() -> None:
    eigs = [1.0 + 0.01 * i for i in range(40)]  # clustered: slow to separate
    _, params, loss = _quadratic(eigs, seed=1)
    result = top_hessian_eigenvalue(loss, params, max_iters=2, tol=1e-9)
    assert result.iterations == 2 and not result.converged
    assert result.value <= max(eigs) + 1e-5  # a Ritz value: from below
    assert math.isfinite(result.residual)


def test_linear_loss_has_zero_sharpness() -> None:
    w = torch.randn(5, requires_grad=True)
    result = top_hessian_eigenvalue(lambda: (3.0 * w).sum(), [w])
    assert result.value == 0.0 and result.converged and result.iterations == 0


# ------------------------------------------------------------------------------- preconditioned


def test_preconditioned_matches_dense_symmetric_form() -> None:
    model, x, y = _mlp(seed=4)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(9)
    precond = [torch.rand(p.shape, generator=g) * 3 + 0.05 for p in params]
    result = top_hessian_eigenvalue(
        lambda: F.mse_loss(model(x), y), params, preconditioner=precond, max_iters=40, tol=1e-5
    )
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
    d = torch.cat([p.reshape(-1) for p in precond]).double().rsqrt()
    expected = torch.linalg.eigvalsh(d[:, None] * hessian * d[None, :])[-1].item()
    assert _rel(result.value, expected) < 1e-2
    assert _rel(result.value, expected) < 2e-3


def _adam_after_steps(opt_cls: type, steps: int = 5, **kw: object):
    model, x, y = _mlp(seed=5)
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    return model, x, y, opt


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_preconditioned_sharpness_threshold_and_margin(opt_cls: type) -> None:
    model, x, y, opt = _adam_after_steps(opt_cls, betas=(0.9, 0.99), eps=1e-6)
    params = list(model.parameters())
    precond = adam_preconditioner(opt)
    for p, d in zip(params, precond, strict=True):
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
        torch.testing.assert_close(d, v_hat.sqrt() + 1e-6)

    est = estimate_stability(lambda: F.mse_loss(model(x), y), opt, max_iters=40, tol=1e-5)
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
    dinv = torch.cat([d.reshape(-1) for d in precond]).double().rsqrt()
    expected = torch.linalg.eigvalsh(dinv[:, None] * hessian * dinv[None, :])[-1].item()
    assert est.preconditioned
    assert _rel(est.sharpness, expected) < 1e-2
    assert est.threshold == pytest.approx(38.0 / 1e-2)  # (2 + 2 * 0.9) / (0.1 * lr)
    assert est.margin == pytest.approx(est.sharpness * 1e-2 / 38.0)
    assert est.lr == 1e-2


def test_amsgrad_uses_max_exp_avg_sq() -> None:
    model, _, _, opt = _adam_after_steps(torch.optim.Adam, amsgrad=True)
    p = next(model.parameters())
    state = opt.state[p]
    v_hat = state["max_exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
    torch.testing.assert_close(adam_preconditioner(opt, [p])[0], v_hat.sqrt() + 1e-8)


def test_sgd_margin_and_per_group_lr() -> None:
    model, x, y = _mlp(seed=6)
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.SGD(
        [{"params": first, "lr": 0.05}, {"params": rest, "lr": 0.2}], lr=0.1, momentum=0.9
    )
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
    est = estimate_stability(lambda: F.mse_loss(model(x), y), opt, max_iters=40, tol=1e-5)
    # Joint update: x <- x - diag(lr) (momentum) H x; its edge is lambda_max(diag(lr) H) = 3.8.
    n_first = sum(p.numel() for p in first)
    lrs = torch.cat([torch.full((n_first,), 0.05), torch.full((len(hessian) - n_first,), 0.2)])
    s = lrs.double().sqrt()
    expected_margin = torch.linalg.eigvalsh(s[:, None] * hessian * s[None, :])[-1].item() / 3.8
    assert est.lr == 0.2 and not est.preconditioned
    assert est.threshold == pytest.approx(3.8 / 0.2)
    assert _rel(est.margin, expected_margin) < 1e-2


def test_all_zero_lr_gives_zero_margin() -> None:
    model, x, y = _mlp(seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    est = estimate_stability(lambda: F.mse_loss(model(x), y), opt, max_iters=30)
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
    assert est.threshold == math.inf and est.margin == 0.0
    assert _rel(est.sharpness, torch.linalg.eigvalsh(hessian)[-1].item()) < 1e-2


@pytest.mark.parametrize(
    ("kwargs", "coefficient"),
    [
        ({}, 2.0),
        ({"momentum": 0.9}, 3.8),
        ({"momentum": 0.5, "dampening": 0.5}, 6.0),
        ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8),
    ],
)
def test_sgd_thresholds(kwargs: dict, coefficient: float) -> None:
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, **kwargs)
    assert stability_threshold(opt) == pytest.approx(coefficient / 0.1)
    assert stability_threshold(opt, opt.param_groups[0]) == pytest.approx(coefficient / 0.1)


def test_sgd_threshold_is_the_edge_of_the_real_optimizer() -> None:
    """On a quadratic, torch's SGD stays bounded along curvatures just below the threshold and
    blows up along curvatures just above it: the table is the optimizer's, not a paper's."""
    factors = torch.tensor([0.9, 0.98, 1.02, 1.1])
    cases: list[dict[str, Any]] = [
        {},
        {"momentum": 0.9},
        {"momentum": 0.5, "dampening": 0.5},  # (2 + 2 beta) / (1 - dampening) = 6
        {"momentum": 0.9, "dampening": 0.3},
        {"momentum": 0.9, "nesterov": True},  # (2 + 2 beta) / (1 + 2 beta)
    ]
    for kwargs in cases:
        w = torch.ones(4, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1, **kwargs)
        curvatures = factors * stability_threshold(opt)  # one decoupled direction per factor
        for _ in range(300):
            opt.zero_grad()
            (0.5 * curvatures * w.square()).sum().backward()
            opt.step()
        assert (w.detach().abs() < 1.0).tolist() == [True, True, False, False], (kwargs, w)


def test_stability_margin() -> None:
    assert stability_margin(100.0, 20.0) == 5.0
    assert stability_margin(100.0, math.inf) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        stability_margin(1.0, 0.0)
    with pytest.raises(TypeError, match="sharpness"):
        stability_margin("1", 2.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- the guard


class _BNDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.frozen_bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.frozen_bn(self.drop(torch.tanh(self.bn(self.fc1(x))))))


def _snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_ids": {n: id(b) for n, b in model.named_buffers()},
        "params": [p.detach().clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modes"] == before["modes"]
    for g_after, g_before, v_before in zip(
        after["grads"], before["grads"], before["grad_values"], strict=True
    ):
        assert g_after is g_before  # the very same tensor object (or None)
        if v_before is not None:
            assert torch.equal(g_after, v_before)
    assert after["buffer_ids"] == before["buffer_ids"]
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name
    for p_after, p_before in zip(after["params"], before["params"], strict=True):
        assert torch.equal(p_after, p_before)
    assert torch.equal(after["rng"], before["rng"])
    assert after["python_rng"] == before["python_rng"]
    assert np.array_equal(after["numpy_rng"], before["numpy_rng"])


@pytest.mark.parametrize("mode", ["keep", "eval", "train"])
def test_guard_leaves_training_bit_identical(mode: str) -> None:
    torch.manual_seed(0)
    model = _BNDropNet()
    model.train()
    model.frozen_bn.eval()  # a submodule mode that model.train() would overwrite
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    F.mse_loss(model(x), y).backward()  # gradients exist, as in on_before_optimizer_step
    model.fc2.bias.grad = None  # ... and one parameter has none
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = _snapshot(model)

    seen: dict = {}

    def loss() -> Tensor:
        seen["training"] = model.training
        seen["frozen"] = model.frozen_bn.training
        seen["grads"] = [p.grad for p in model.parameters()]
        random.random()  # a probe may draw from every global RNG
        np.random.rand()
        return F.mse_loss(model(x), y)

    with probe_guard(model, mode=mode):  # type: ignore[arg-type]
        est = estimate_stability(loss, opt, max_iters=10)
    assert math.isfinite(est.sharpness) and est.sharpness > 0
    assert seen["training"] is (mode != "eval")
    assert seen["frozen"] is (mode == "train")  # "keep": the modes training uses
    assert all(g is None for g in seen["grads"])  # the probe saw no gradient
    _assert_same(model, before)
    # The next training step draws the dropout mask it would have drawn without the probe.
    torch.manual_seed(1)
    expected = model.drop(torch.ones(8, 16))
    torch.manual_seed(1)
    with probe_guard(model):
        top_hessian_eigenvalue(lambda: F.mse_loss(model(x), y), list(model.parameters()))
    assert torch.equal(model.drop(torch.ones(8, 16)), expected)


def test_guard_restores_after_a_misbehaving_probe_and_an_error() -> None:
    torch.manual_seed(0)
    model = _BNDropNet()
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    F.mse_loss(model(x), y).backward()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), probe_guard(model, mode="train"):
        F.mse_loss(model(x), y).backward()  # writes .grad
        model.bn.running_mean.add_(1.0)  # type: ignore[union-attr]  # in place
        model.bn.running_var = torch.zeros(16)  # re-assigned
        torch.randn(100)  # consumes the RNGs
        random.seed(5)
        np.random.seed(5)
        model.fc1.eval()
        raise RuntimeError("boom")
    _assert_same(model, before)


def test_guard_enables_autograd_under_no_grad_and_inference_mode() -> None:
    model, x, y = _mlp()
    params = list(model.parameters())
    with torch.inference_mode(), probe_guard(model):
        value = top_hessian_eigenvalue(lambda: F.mse_loss(model(x), y), params).value
    with torch.no_grad(), probe_guard(model):
        again = top_hessian_eigenvalue(lambda: F.mse_loss(model(x), y), params).value
    assert value == again > 0


def test_guard_seeds_torch_for_one_dropout_mask() -> None:
    model = _BNDropNet()
    masks = []
    for _ in range(2):
        torch.randn(3)  # training moves the global RNG between probes
        with probe_guard(model):
            masks.append(model.drop(torch.ones(8, 16)))
    torch.manual_seed(0)
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], model.drop(torch.ones(8, 16)))  # seed 0 by default
    with probe_guard(model, seed=None):
        unseeded = model.drop(torch.ones(8, 16))
    assert not torch.equal(unseeded, masks[0])


def test_probe_does_not_touch_global_rng_or_grads_without_guard() -> None:
    model, x, y = _mlp()
    rng = torch.get_rng_state()
    top_hessian_eigenvalue(lambda: F.mse_loss(model(x), y), list(model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------- bad arguments


def test_bad_arguments_name_the_argument() -> None:
    model, x, y = _mlp()
    params = list(model.parameters())

    def loss() -> Tensor:
        return F.mse_loss(model(x), y)

    cases: list[tuple[type[Exception], str, Callable[[], object]]] = [
        (ValueError, "max_iters", lambda: top_hessian_eigenvalue(loss, params, max_iters=0)),
        (TypeError, "max_iters", lambda: top_hessian_eigenvalue(loss, params, max_iters=2.0)),  # type: ignore[arg-type]
        (ValueError, "tol", lambda: top_hessian_eigenvalue(loss, params, tol=0.0)),
        (ValueError, "seed", lambda: top_hessian_eigenvalue(loss, params, seed=-1)),
        (TypeError, "loss_fn", lambda: top_hessian_eigenvalue(3.0, params)),  # type: ignore[arg-type]
        (TypeError, "params", lambda: top_hessian_eigenvalue(loss, params[0])),  # type: ignore[arg-type]
        (ValueError, "params", lambda: top_hessian_eigenvalue(loss, [])),
        (ValueError, r"params\[0\]", lambda: top_hessian_eigenvalue(loss, [params[0] * 2])),
        (ValueError, "listed twice", lambda: top_hessian_eigenvalue(loss, params + params[:1])),
        (
            ValueError,
            "preconditioner",
            lambda: top_hessian_eigenvalue(loss, params, preconditioner=[torch.ones(1)]),
        ),
        (
            ValueError,
            r"preconditioner\[0\]",
            lambda: top_hessian_eigenvalue(
                loss, params, preconditioner=[torch.ones(2)] * len(params)
            ),
        ),
        (
            ValueError,
            "positive",
            lambda: top_hessian_eigenvalue(
                loss, params, preconditioner=[torch.zeros_like(p) for p in params]
            ),
        ),
        (ValueError, "init", lambda: top_hessian_eigenvalue(loss, params, init=torch.ones(3))),
        (ValueError, "init", lambda: top_hessian_eigenvalue(loss, params, init=torch.ones(2, 3))),
        (
            ValueError,
            "several rows",
            lambda: top_hessian_eigenvalue(
                loss, params, init=torch.eye(2, 71), reorthogonalize=False
            ),
        ),
        (ValueError, "explore", lambda: top_hessian_eigenvalue(loss, params, explore=-1)),
        (TypeError, "explore", lambda: top_hessian_eigenvalue(loss, params, explore=2.0)),  # type: ignore[arg-type]
        (ValueError, "n_vectors", lambda: top_hessian_eigenvalue(loss, params, n_vectors=0)),
        (
            ValueError,
            "return_vector",
            lambda: top_hessian_eigenvalue(loss, params, return_vector=True, reorthogonalize=False),
        ),
        (TypeError, "scalar", lambda: top_hessian_eigenvalue(lambda: model(x), params)),
        (TypeError, "Tensor", lambda: top_hessian_eigenvalue(lambda: 1.0, params)),  # type: ignore[arg-type,return-value]
        (
            RuntimeError,
            "does not require grad",
            lambda: top_hessian_eigenvalue(lambda: loss().detach(), params),
        ),
        (TypeError, "module", lambda: probe_guard(3).__enter__()),  # type: ignore[arg-type]
        (ValueError, "mode", lambda: probe_guard(model, mode="test").__enter__()),  # type: ignore[arg-type]
        (ValueError, "seed", lambda: probe_guard(model, seed=-1).__enter__()),
        (TypeError, "seed", lambda: probe_guard(model, seed=1.0).__enter__()),  # type: ignore[arg-type]
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert all(p.grad is None for p in params)


def test_bad_optimizers_and_groups() -> None:
    model, x, y = _mlp()

    def loss() -> Tensor:
        return F.mse_loss(model(x), y)

    rms = torch.optim.RMSprop(model.parameters())
    with pytest.raises(TypeError, match="SGD, Adam and AdamW"):
        estimate_stability(loss, rms)
    with pytest.raises(TypeError, match="optimizer"):
        stability_threshold(object())  # type: ignore[arg-type]
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="first optimizer step"):
        estimate_stability(loss, adam)  # no state before the first step
    with pytest.raises(TypeError, match="Adam"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="param_group"):
        stability_threshold(adam, 1)
    with pytest.raises(ValueError, match="param_group"):
        stability_threshold(adam, {"params": [], "lr": 0.1})
    with pytest.raises(ValueError, match="maximize"):
        stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))


# ------------------------------------------------------------------------------- distributed


_WORKER = r"""
import sys, types
import torch
import torch.distributed as dist
import torch.nn.functional as F

# Load warmup_monitor.curvature without the package's __init__ (which imports Lightning): the
# two ranks start in seconds. The code under test is the same file.
package = types.ModuleType("warmup_monitor")
package.__path__ = [sys.argv[4]]
sys.modules["warmup_monitor"] = package
from warmup_monitor.curvature import top_hessian_eigenvalue

rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
g = torch.Generator().manual_seed(1)
x = torch.randn(64, 4, generator=g)
y = torch.sin(x.sum(1, keepdim=True))
xs, ys = x[rank::world], y[rank::world]  # each rank its own half of the batch
result = top_hessian_eigenvalue(
    lambda: F.mse_loss(model(xs), ys), list(model.parameters()), distributed=True
)
print(repr(result.value))
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_distributed_hvp_gives_the_global_batch_value_on_every_rank(tmp_path: Path) -> None:
    package_dir = os.path.dirname(os.path.dirname(warmup_monitor.curvature.__file__))
    init_file = str(tmp_path / "init")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(rank), "2", init_file, package_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    values = [float(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert values[0] == values[1]  # bit-identical on every rank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    single = top_hessian_eigenvalue(lambda: F.mse_loss(model(x), y), list(model.parameters()))
    # The mean of the two half-batch losses is the full-batch loss: the same Hessian.
    assert _rel(values[0], single.value) < 1e-3


# ------------------------------------------------------------------------------- the prober


def test_a_probe_without_a_loss_reports_nothing_and_asks_for_the_next_batch() -> None:
    """Issue 15 item 8: a loss function returning None must not turn the probe off."""
    model, x, y = _mlp(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prober = CurvatureProber(CurvatureProbe(every_n_steps=5))
    assert prober.due(0) and not prober.due(1) and not prober.accepts_batch
    assert prober.probe(0, opt, lambda: None, model, lr_factor=1.0, distributed=False) == ({}, [])
    assert not prober.disabled and prober.accepts_batch
    assert prober.due(1)  # again at the next step, on the batch the adapter offers next
    metrics, alerts = prober.probe(
        1, opt, lambda: F.mse_loss(model(x), y), model, lr_factor=1.0, distributed=False
    )
    assert alerts == [] and not prober.accepts_batch
    assert prober.estimate is not None and prober.estimate.sharpness == metrics["sharpness"]
    hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
    assert _rel(metrics["sharpness"], torch.linalg.eigvalsh(hessian)[-1].item()) < 1e-2
    assert [s for s in range(2, 12) if prober.due(s)] == [5, 10]  # back on the interval


class _BiasBNDropNet(nn.Module):
    """``Linear(bias=True)`` then batch norm (which cancels that bias in train mode), tanh,
    dropout and a linear head: the model of issue 15 item 4."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _reference_loss(
    flat: Tensor, model: _BiasBNDropNet, x: Tensor, y: Tensor, mask: Tensor | None
) -> Tensor:
    """The train-mode loss written out again in float64: batch statistics (biased variance, as
    batch norm normalises with), then ``mask`` in place of dropout (None: no dropout)."""
    shapes = [p.shape for p in model.parameters()]
    w1, b1, gamma, beta, w2, b2 = (
        t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True)
    )
    h = x.double() @ w1.T + b1
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = torch.tanh((h - mean) / torch.sqrt(var + model.bn.eps) * gamma + beta)
    if mask is not None:
        h = h * mask
    return F.mse_loss(h @ w2.T + b2, y.double())


def _adam_scaling(opt: torch.optim.Optimizer, model: nn.Module) -> Tensor:
    """``P^-1/2`` of AdamW, from the optimizer's state, written out again."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    parts = []
    for p in model.parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
        parts.append((v_hat.sqrt() + eps).rsqrt().reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_prober_differentiates_the_train_mode_function_with_one_dropout_mask(
    dropout: float,
) -> None:
    """Issue 15 item 4: the probe reads the function being trained (batch statistics, the
    dropout mask it drew), Adam-preconditioned, against a dense float64 Hessian."""
    model = _BiasBNDropNet(dropout)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    masks: list[Tensor] = []
    model.drop.register_forward_hook(lambda m, i, out: masks.append((out != 0).double()))
    prober = CurvatureProber(CurvatureProbe(every_n_steps=1))
    metrics, alerts = {}, []
    for step in (4, 5):  # two probes: the second one warm-started
        metrics, alerts = prober.probe(
            step, opt, lambda: F.mse_loss(model(x), y), model, lr_factor=1.0, distributed=False
        )
    assert alerts == [] and not prober.disabled
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])  # one mask, at every probe
    mask = masks[0] / (1 - dropout) if dropout else None
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    d = _adam_scaling(opt, model)
    hessian = torch.autograd.functional.hessian(
        lambda f: _reference_loss(f, model, x, y, mask), flat0
    )
    expected = torch.linalg.eigvalsh(d[:, None] * hessian * d[None, :])[-1].item()
    assert metrics["sharpness_converged"] == 1.0
    assert _rel(metrics["sharpness"], expected) < 1e-2
    assert metrics["stability_margin"] == pytest.approx(metrics["sharpness"] * 1e-3 / 38.0)
    # The eval-mode function (running statistics, no dropout) is another one: its
    # preconditioned sharpness is orders of magnitude larger (the bias is not cancelled).
    with probe_guard(model, mode="eval"):
        eval_mode = estimate_stability(lambda: F.mse_loss(model(x), y), opt, max_iters=30)
    assert eval_mode.sharpness > 100 * expected


def test_warm_probe_finds_the_top_eigenvalue_after_the_top_two_swap() -> None:
    """Issue 15 item 11: warm-started from the previous top eigenvector, which is still an
    eigenvector but now the second, a lone warm start converged at once on the second
    eigenvalue (a zero residual) and reported it as converged."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    w = torch.zeros(40, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    prober = CurvatureProber(CurvatureProbe(every_n_steps=1))
    bulk = torch.linspace(0.1, 5.0, 38, dtype=torch.float64).tolist()
    for step, (first, second) in enumerate([(10.0, 8.0), (7.0, 11.0)]):  # u1, u2 swap
        hessian = ((q * torch.tensor([first, second, *bulk], dtype=torch.float64)) @ q.T).float()
        metrics, _ = prober.probe(
            step,
            opt,
            lambda h=hessian: 0.5 * w @ h @ w,
            None,
            lr_factor=1.0,
            distributed=False,
        )
        assert metrics["sharpness_converged"] == 1.0
        assert _rel(metrics["sharpness"], max(first, second)) < 1e-3
        assert metrics["stability_margin"] == pytest.approx(metrics["sharpness"] * 0.1 / 2)
    old_style = estimate_stability(
        lambda: 0.5 * w @ hessian @ w, opt, tol=1e-2, init=prober.vectors[1], explore=0
    )
    assert old_style.result.converged and _rel(old_style.sharpness, 7.0) < 1e-3  # the trap


def _gd_edge_of_stability_run(
    every: int, steps: int, lr: float = 0.3
) -> list[tuple[int, float, dict[str, float]]]:
    """Full-batch gradient descent on a small tanh MLP (253 parameters, MSE on random targets)
    through the edge of stability (Cohen et al. 2021: the sharpness rises to 2 / lr and
    hovers there), probed as the monitor does, with the dense Hessian's top eigenvalue."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(128, 6, generator=g), torch.randn(128, 1, generator=g)
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    prober = CurvatureProber(CurvatureProbe(every_n_steps=every))  # the defaults otherwise
    rows = []
    for step in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if prober.due(step):
            metrics, _ = prober.probe(
                step,
                opt,
                lambda: F.mse_loss(model(x), y),
                model,
                lr_factor=1.0,
                distributed=False,
            )
            hessian = _dense_hessian(model, lambda fwd: F.mse_loss(fwd(x), y.double()))
            rows.append((step, torch.linalg.eigvalsh(hessian)[-1].item(), metrics))
    return rows


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small dense algebra runs fastest on one thread (and on a shared machine, by far)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_probe_follows_full_batch_gd_through_the_edge_of_stability_within_2_percent() -> None:
    """Issue 15 item 11: every probe from step 0 to the plateau within 2% of the dense Hessian,
    warm-started as in the monitor; a lone warm-start vector missed the top by 4.8% at step
    680 of this run (and reported converged)."""
    lr = 0.3
    rows = _gd_edge_of_stability_run(every=10, steps=800, lr=lr)
    assert len(rows) == 80
    for step, top, metrics in rows:
        assert metrics["sharpness_converged"] == 1.0, step
        assert _rel(metrics["sharpness"], top) < 0.02, (step, metrics["sharpness"], top)
        assert metrics["sharpness_residual"] <= 1e-2 * metrics["sharpness"]
        assert metrics["stability_margin"] == pytest.approx(metrics["sharpness"] * lr / 2)
    # The run does go through the edge: it starts well below 2 / lr and hovers at it.
    assert rows[0][1] < 0.6 * 2 / lr
    plateau = sorted(top for step, top, _ in rows if step >= 400)
    assert 0.95 < plateau[len(plateau) // 2] * lr / 2 < 1.15


def test_an_unconverged_probe_never_feeds_the_edge_rule() -> None:
    model, x, y = _mlp(seed=1)
    hooked = {}
    for max_iters in (1, 20):
        opt = torch.optim.SGD(model.parameters(), lr=50.0)  # far past the edge
        prober = CurvatureProber(CurvatureProbe(every_n_steps=1, max_iters=max_iters))
        runs = [
            prober.probe(
                step,
                opt,
                lambda: F.mse_loss(model(x), y),
                model,
                lr_factor=1.0,
                distributed=False,
            )
            for step in range(3)
        ]
        hooked[max_iters] = runs
    for metrics, alerts in hooked[1]:  # one product: never converged, never an alert
        assert metrics["sharpness_converged"] == 0.0 and metrics["stability_margin"] > 1
        assert metrics["sharpness_residual"] > 1e-2 * metrics["sharpness"]
        assert alerts == []
    kinds = [[a.kind.value for a in alerts] for _, alerts in hooked[20]]
    assert kinds == [[], ["edge_of_stability"], []]
    assert all(metrics["sharpness_converged"] == 1.0 for metrics, _ in hooked[20])

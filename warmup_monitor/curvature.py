"""Curvature probe: the sharpness (top Hessian eigenvalue) and the stability margin of the lr.

Gradient descent on a quadratic with Hessian ``H`` is stable only while ``lr * lambda_max(H) <
2``; momentum and Adam move that edge. This module measures the sharpness on a fixed probe batch
with Hessian-vector products (double backward, nothing accumulated into ``.grad``) and the
Lanczos method, and turns it into a margin: ``sharpness / threshold``, above 1 past the edge.

.. math::

    \\text{margin} = \\frac{\\lambda_{\\max}}{c / \\mathrm{lr}}, \\qquad
    c = \\begin{cases}
        2 & \\text{SGD} \\\\
        (2 + 2\\beta) / (1 - \\text{dampening}) & \\text{SGD, heavy-ball momentum } \\beta \\\\
        (2 + 2\\beta) / (1 + 2\\beta) & \\text{SGD, Nesterov momentum } \\beta \\\\
        (2 + 2\\beta_1) / (1 - \\beta_1) & \\text{Adam, AdamW, on } \\lambda_{\\max}(P^{-1} H)
    \\end{cases}

For Adam ``P = diag(sqrt(v_hat) + eps)`` with ``v_hat`` the bias-corrected second moment in the
optimizer's state; ``c = 38`` at ``beta1 = 0.9`` (Cohen et al. 2022, "Adaptive gradient methods
at the edge of stability"). These are the linear-stability limits of each update rule on a
quadratic; the optimizers' weight decay is not part of the curvature (SGD's L2 term would add
``weight_decay`` to every eigenvalue), and Adam's first-moment bias correction, large in the
first few dozen steps, is ignored as in the paper.

Entry points:

- :func:`top_hessian_eigenvalue`: the largest (algebraic) eigenvalue of ``H`` or of
  ``P^-1/2 H P^-1/2`` for any loss closure and parameter list.
- :func:`estimate_stability`: sharpness, threshold and margin for a torch optimizer, reading the
  preconditioner, lr and momentum from it.
- :class:`ProbeBudget`: when to probe so that probes cost at most a given fraction of training
  time (a fixed interval cannot promise that: the probe/step ratio depends on the model).
- :func:`probe_guard`: a context manager under which a probe leaves no trace on training: module
  modes, ``.grad``, buffers (batch-norm statistics) and the CPU/CUDA RNG states are restored
  exactly.

Example::

    probe_batch = next(iter(loader))  # fixed: the same batch at every probe

    with probe_guard(model):
        est = estimate_stability(lambda: loss_of(model, probe_batch), optimizer)
    print(est.sharpness, est.margin)  # margin > 1: past the edge of stability

Supported: one device, dense parameters, single process or data parallel (DDP: pass
``distributed=True`` and call the *unwrapped* module in ``loss_fn``). Not supported: sharded
parameters (FSDP, ``DTensor``: raises ``NotImplementedError``), parameters spread over several
devices (``ValueError``), compiled modules (``torch.compile`` graphs have no double backward).

This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from warmup_monitor._checks import check_choice, check_float, check_int
from warmup_monitor.alerts import Alert, AlertKind

__all__ = [
    "ProbeBudget",
    "SharpnessResult",
    "StabilityEstimate",
    "adam_preconditioner",
    "estimate_stability",
    "probe_guard",
    "stability_margin",
    "stability_threshold",
    "top_hessian_eigenvalue",
]

ProbeMode = Literal["eval", "train"]

# A Lanczos step whose new direction is this small relative to the largest Ritz value has found
# an invariant subspace (float32 round-off after reorthogonalisation is ~1e-7 relative).
_BREAKDOWN = 1e-6


@dataclass(frozen=True)
class SharpnessResult:
    """The outcome of :func:`top_hessian_eigenvalue`.

    Attributes:
        value: The largest Ritz value: an estimate (from below) of the largest algebraic
            eigenvalue of the (preconditioned) Hessian.
        iterations: Hessian-vector products computed (one per Lanczos step).
        converged: ``residual <= tol * |value|``, or the Krylov space became invariant.
        elapsed: Wall-clock seconds of the whole call, the loss evaluation included.
        residual: ``||A y - value * y||`` for the Ritz vector ``y`` (``A`` the operator): some
            eigenvalue of ``A`` lies within ``residual`` of ``value``.
        vector: The unit Ritz vector, flat and in the order of ``params``, when asked for with
            ``return_vector=True`` (to warm-start the next probe through ``init``); else None.
    """

    value: float
    iterations: int
    converged: bool
    elapsed: float
    residual: float
    vector: Tensor | None = field(default=None, repr=False, compare=False)


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


# --------------------------------------------------------------------------------------------
# The eigenvalue
# --------------------------------------------------------------------------------------------


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    preconditioner: Sequence[Tensor] | None = None,
    seed: int = 0,
    init: Tensor | None = None,
    return_vector: bool = False,
    reorthogonalize: bool = True,
    distributed: bool = False,
    process_group: Any = None,
) -> SharpnessResult:
    """The largest eigenvalue of the Hessian of ``loss_fn()`` w.r.t. ``params``, by Lanczos.

    ``loss_fn`` is called once; its graph is differentiated twice (``torch.autograd.grad`` with
    ``create_graph=True``): each Lanczos step is one Hessian-vector product on that graph, so the
    operator is fixed even if the forward pass is random (one dropout mask for the whole call).
    Nothing is accumulated into ``.grad`` and the global RNG is not used: the start vector comes
    from a private ``torch.Generator`` seeded with ``seed``. Attention through
    ``F.scaled_dot_product_attention`` runs on its math kernel during ``loss_fn`` (the fused
    kernels have no double backward).

    Lanczos returns the largest *algebraic* eigenvalue, the one that bounds the lr (a negative
    eigenvalue of larger magnitude, which power iteration would find, is not reported). With a
    preconditioner ``P`` (the diagonal of a positive diagonal matrix, one tensor per parameter)
    the operator is the symmetric ``P^-1/2 H P^-1/2``, which has the eigenvalues of ``P^-1 H``.

    .. math::

        T_k = Q_k^\\top A Q_k, \\quad \\theta = \\lambda_{\\max}(T_k), \\quad
        \\|A y - \\theta y\\| = \\beta_k |s_k| \\le \\mathrm{tol}\\,|\\theta| \\Rightarrow
        \\text{converged}

    Cost: one forward and backward with graph, then ``iterations`` double-backward passes (each
    about 2-3x a backward) and one host read per step. Memory: the double-backward graph, plus
    one parameter-sized float32 vector per step taken with ``reorthogonalize=True`` (full
    reorthogonalisation: exact Ritz values, a Ritz vector) or 3 without (the classic three-term
    recurrence: the top Ritz value stays accurate, spurious copies of it may appear; no vector).

    Args:
        loss_fn: Recomputes the scalar loss on the fixed probe batch, with autograd enabled.
        params: The parameters (leaf tensors requiring grad, on one device).
        max_iters: The most Lanczos steps (Hessian-vector products), >= 1.
        tol: Relative tolerance on the residual, > 0 (1e-3: the value is within 0.1% of an
            eigenvalue).
        preconditioner: ``P``: positive finite tensors shaped like ``params``, or None.
        seed: Seed of the random start vector (the same seed gives the same value on every rank).
        init: A flat start vector (e.g. the previous probe's ``vector``) instead of a random one.
        return_vector: Keep the Ritz vector in the result (needs ``reorthogonalize=True``).
        reorthogonalize: Full reorthogonalisation of the Lanczos basis (see Memory above).
        distributed: Average every Hessian-vector product over the ranks of ``process_group``:
            each rank passes its own probe batch and every rank gets the sharpness of the mean
            loss, the same value everywhere. A no-op when ``torch.distributed`` is not
            initialised.
        process_group: The group for ``distributed`` (default: the world).

    Returns:
        A :class:`SharpnessResult`.

    Raises:
        TypeError: an argument has the wrong type, or ``loss_fn`` returns no scalar tensor.
        ValueError: an argument is out of range, ``params`` is empty, not leaves or on several
            devices, or the preconditioner does not match ``params``.
        NotImplementedError: a parameter is sharded (``DTensor``).
        RuntimeError: the loss does not depend on ``params`` through autograd.
    """
    start_time = time.perf_counter()
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    plist = _check_params(params)
    max_iters = check_int("max_iters", max_iters, minimum=1)
    tol = check_float("tol", tol, above=0.0)
    seed = check_int("seed", seed, minimum=0)
    for name, flag in (
        ("return_vector", return_vector),
        ("reorthogonalize", reorthogonalize),
        ("distributed", distributed),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}")
    if return_vector and not reorthogonalize:
        raise ValueError("`return_vector=True` needs `reorthogonalize=True` (the Lanczos basis)")

    device = plist[0].device
    work_dtype = torch.float64 if any(p.dtype == torch.float64 for p in plist) else torch.float32
    sizes = [p.numel() for p in plist]
    n = sum(sizes)
    scale = None
    if preconditioner is not None:
        scale = _flat_preconditioner(preconditioner, plist, work_dtype).rsqrt_()
    start = _start_vector(init, n, seed, device, work_dtype)
    world = _world_size(process_group) if distributed else 1

    with _double_backward_kernels():
        loss = loss_fn()
    if not isinstance(loss, Tensor):
        raise TypeError(f"`loss_fn` must return a Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise TypeError(f"`loss_fn` must return a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise RuntimeError(
            "the loss returned by `loss_fn` does not require grad: call it with autograd enabled "
            "(not under torch.no_grad or inference_mode) on parameters that require grad"
        )
    grads = torch.autograd.grad(loss.reshape(()), plist, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        # Every gradient is constant: the loss is linear in `params`, H = 0.
        return SharpnessResult(0.0, 0, True, time.perf_counter() - start_time, 0.0)
    outputs = [grads[i] for i in live]
    zeros = [torch.zeros(s, device=device, dtype=work_dtype) for s in sizes]

    def operator(v: Tensor) -> Tensor:
        x = v * scale if scale is not None else v
        parts = x.split(sizes)
        tangents = [parts[i].view_as(plist[i]).to(plist[i].dtype) for i in live]
        hv = torch.autograd.grad(
            outputs, plist, grad_outputs=tangents, retain_graph=True, allow_unused=True
        )
        out = torch.cat(
            [zeros[i] if h is None else h.reshape(-1).to(work_dtype) for i, h in enumerate(hv)]
        )
        if world > 1:
            torch.distributed.all_reduce(out, group=process_group)
            out.div_(world)
        if scale is not None:
            out.mul_(scale)
        return out

    value, residual, iterations, converged, vector = _lanczos(
        operator, start, max_iters, tol, reorthogonalize, return_vector
    )
    return SharpnessResult(
        value=value,
        iterations=iterations,
        converged=converged,
        elapsed=time.perf_counter() - start_time,
        residual=residual,
        vector=vector,
    )


def _lanczos(
    operator: Callable[[Tensor], Tensor],
    q: Tensor,
    max_iters: int,
    tol: float,
    reorthogonalize: bool,
    return_vector: bool,
) -> tuple[float, float, int, bool, Tensor | None]:
    """Lanczos on a symmetric ``operator`` from the unit vector ``q``.

    Returns ``(top Ritz value, residual bound, steps, converged, Ritz vector or None)``.
    """
    # The basis grows one vector per step (memory: the steps taken, not max_iters).
    basis: list[Tensor] | None = [q] if reorthogonalize else None
    alphas: list[float] = []
    betas: list[float] = []
    q_prev: Tensor | None = None
    theta, residual, converged = 0.0, math.inf, False
    ritz = torch.ones(1, dtype=torch.float64)
    steps = 0
    for j in range(max_iters):
        w = operator(q)
        if q_prev is not None:
            w.sub_(q_prev, alpha=betas[-1])
        alpha = torch.dot(q, w)
        w.sub_(alpha * q)
        if basis is not None:
            # Full reorthogonalisation, twice ("twice is enough", Parlett).
            for _ in range(2):
                coeffs = torch.stack([torch.dot(b, w) for b in basis])
                for c, b in zip(coeffs.unbind(), basis, strict=True):
                    w.sub_(b * c)
        beta = torch.linalg.vector_norm(w)
        a, b = torch.stack([alpha, beta]).tolist()  # the one host read of this step
        steps = j + 1
        if not (math.isfinite(a) and math.isfinite(b)):
            theta, residual = math.nan, math.nan
            break
        alphas.append(a)
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        theta = float(evals[-1])
        ritz = evecs[:, -1]
        residual = b * abs(float(ritz[-1]))
        spread = float(evals.abs().max())
        if residual <= tol * abs(theta) or b <= _BREAKDOWN * spread or b == 0.0:
            converged = True
            break
        if j + 1 == max_iters:
            break
        betas.append(b)
        q_prev, q = q, w.div_(b)
        if basis is not None:
            basis.append(q)
    vector = None
    if return_vector and basis is not None and math.isfinite(theta):
        vector = torch.zeros_like(q)
        for c, b in zip(ritz.tolist(), basis[:steps], strict=True):
            vector.add_(b, alpha=c)
        vector.div_(torch.linalg.vector_norm(vector))
    return theta, residual, steps, converged, vector


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def _check_params(params: Any) -> list[Tensor]:
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(
            f"`params` must be a sequence of tensors (e.g. list(model.parameters())), "
            f"got {type(params).__name__}"
        )
    plist = list(params)
    if not plist:
        raise ValueError("`params` is empty: nothing to probe")
    seen: set[int] = set()
    for i, p in enumerate(plist):
        if not isinstance(p, Tensor):
            raise TypeError(f"`params[{i}]` must be a Tensor, got {type(p).__name__}")
        if _is_sharded(p):
            raise NotImplementedError(
                "sharded parameters (FSDP / DTensor) are not supported by the curvature probe"
            )
        if not (p.is_leaf and p.requires_grad):
            raise ValueError(f"`params[{i}]` must be a leaf tensor that requires grad")
        if not p.is_floating_point():
            raise ValueError(f"`params[{i}]` must be floating point, got {p.dtype}")
        if p.device != plist[0].device:
            raise ValueError(
                f"`params` must be on one device, got {plist[0].device} and {p.device} "
                "(model parallelism is not supported)"
            )
        if id(p) in seen:
            raise ValueError(f"`params[{i}]` is listed twice (tied weights are one parameter)")
        seen.add(id(p))
    return plist


def _is_sharded(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _flat_preconditioner(
    preconditioner: Sequence[Tensor], params: list[Tensor], dtype: torch.dtype
) -> Tensor:
    if isinstance(preconditioner, Tensor) or not isinstance(preconditioner, Sequence):
        raise TypeError(
            f"`preconditioner` must be a sequence of tensors shaped like `params`, "
            f"got {type(preconditioner).__name__}"
        )
    if len(preconditioner) != len(params):
        raise ValueError(
            f"`preconditioner` must have one tensor per parameter ({len(params)}), "
            f"got {len(preconditioner)}"
        )
    for i, (d, p) in enumerate(zip(preconditioner, params, strict=True)):
        if not isinstance(d, Tensor):
            raise TypeError(f"`preconditioner[{i}]` must be a Tensor, got {type(d).__name__}")
        if d.shape != p.shape:
            raise ValueError(
                f"`preconditioner[{i}]` must have the shape of `params[{i}]` "
                f"{tuple(p.shape)}, got {tuple(d.shape)}"
            )
    device = params[0].device
    flat = torch.cat(
        [d.detach().reshape(-1).to(device=device, dtype=dtype) for d in preconditioner]
    )
    if not bool(torch.all(torch.isfinite(flat) & (flat > 0))):  # one host read
        raise ValueError("`preconditioner` must be positive and finite everywhere")
    return flat


def _start_vector(
    init: Tensor | None, n: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    if init is not None:
        if not isinstance(init, Tensor):
            raise TypeError(f"`init` must be a Tensor or None, got {type(init).__name__}")
        if init.numel() != n:
            raise ValueError(
                f"`init` must have one entry per parameter element ({n}), got {init.numel()}"
            )
        v = init.detach().reshape(-1).to(device=device, dtype=dtype, copy=True)
        norm = float(torch.linalg.vector_norm(v))
        if math.isfinite(norm) and norm > 0:
            return v.div_(norm)
    # Drawn on the CPU from a private generator: the same vector on every device and rank.
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=generator, dtype=dtype).to(device)
    return v.div_(torch.linalg.vector_norm(v))


def _world_size(process_group: Any) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(process_group))


@contextlib.contextmanager
def _double_backward_kernels() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to its math kernel (the only one with a double
    backward: flash attention raises ``derivative ... not implemented``)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# --------------------------------------------------------------------------------------------
# Optimizers: preconditioner and threshold
# --------------------------------------------------------------------------------------------


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
    lr`` for SGD with heavy-ball momentum ``beta`` (divided by ``1 - dampening``), ``(2 + 2
    beta) / ((1 + 2 beta) lr)`` with Nesterov momentum, and ``(2 + 2 beta1) / ((1 - beta1) lr)``
    for Adam and AdamW (38 / lr at ``beta1 = 0.9``), the last on the *preconditioned*
    sharpness ``lambda_max(P^-1 H)``.

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


# --------------------------------------------------------------------------------------------
# Optimizer-level estimate
# --------------------------------------------------------------------------------------------


def estimate_stability(
    loss_fn: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    init: Tensor | None = None,
    return_vector: bool = False,
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
        init: See :func:`top_hessian_eigenvalue` (a previous ``result.vector``).
        return_vector: See :func:`top_hessian_eigenvalue`.
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
        return_vector=return_vector,
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


# --------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def probe_guard(module: nn.Module, *, mode: ProbeMode = "eval") -> Iterator[nn.Module]:
    """Run a probe on ``module`` without leaving a trace on training.

    Inside the block the module is in ``mode`` (``"eval"``: dropout off, batch norm on its
    running statistics, a deterministic loss; ``"train"``: the loss the optimizer sees, batch
    statistics and one dropout mask), every parameter's ``.grad`` is detached (set to None) and
    autograd is on (also inside ``torch.no_grad`` or ``inference_mode``). On exit, however the
    block ends:

    - each submodule's ``training`` flag is what it was (per submodule, so a frozen batch norm
      in eval mode inside a training model stays in eval mode);
    - each parameter's ``.grad`` is the very tensor object it was before (or None), untouched
      whatever the probe did to ``.grad``; no gradient is left behind;
    - every buffer (batch-norm ``running_mean``, ``running_var``, ``num_batches_tracked``...) has
      its values, and its tensor object if the probe re-assigned it;
    - the CPU RNG state is restored, and when CUDA is initialised, the RNG state of the current
      CUDA device and of every device holding the module's tensors.

    Parameters are not restored: a probe must not write them (the functions here never do).
    Costs one copy of the buffers (small for batch norm); gradients are not copied.

    Args:
        module: The model (the unwrapped one under DDP).
        mode: ``"eval"`` (default) or ``"train"``.

    Yields:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``mode`` is not one of the allowed values.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    train = check_choice("mode", mode, ("eval", "train")) == "train"
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    buffers = []
    for owner in module.modules():
        for name, buf in owner._buffers.items():
            if buf is not None:
                buffers.append((owner, name, buf, buf.detach().clone()))
    cpu_rng = torch.get_rng_state()
    cuda_rng = [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(module)]
    try:
        for p, _ in grads:
            p.grad = None
        module.train(train)
        with torch.inference_mode(False), torch.enable_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, grad in grads:
            p.grad = grad
        with torch.no_grad():
            for owner, name, buf, saved in buffers:
                owner._buffers[name] = buf
                buf.copy_(saved)
        torch.set_rng_state(cpu_rng)
        for device, state in cuda_rng:
            torch.cuda.set_rng_state(state, device)


def _cuda_devices(module: nn.Module) -> list[int]:
    """The CUDA devices whose RNG a probe of ``module`` can draw from: those of its tensors and
    the current one (not every GPU of the node: that would create a context on each)."""
    if not torch.cuda.is_initialized():
        return []
    devices = {torch.cuda.current_device()}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_cuda and t.device.index is not None:
            devices.add(t.device.index)
    return sorted(devices)


# --------------------------------------------------------------------------------------------
# When to probe
# --------------------------------------------------------------------------------------------


class ProbeBudget:
    r"""Space probes so that they cost at most ``budget`` of the training time on average.

    A probe costs ``1 + k * (2 to 3)`` training steps for ``k`` Lanczos steps (about 12-17 steps
    for the example transformer), so the interval that keeps the overhead under a budget
    depends on the model, the hardware and how fast Lanczos converges. This schedule measures
    instead of guessing: after a probe that took ``probe_seconds`` while a training step takes
    ``step_seconds``, the next probe waits

    .. math::

        \text{interval} = \left\lceil \frac{\text{probe\_seconds}}
            {\text{budget} \cdot \text{step\_seconds}} \right\rceil

    steps, clamped to ``[min_interval, max_interval]``: each probe is paid for by the steps
    after it. Pure arithmetic on numbers the caller measures (``SharpnessResult.elapsed`` and a
    mean step time). Under DDP the probe is collective: every rank must decide alike, so the
    caller broadcasts :attr:`next_step` from rank zero after :meth:`record`.

    Args:
        budget: Fraction of training time the probes may take on average, in (0, 1].
        min_interval: The fewest steps between two probes, >= 1.
        max_interval: The most steps between two probes (None: no limit).
        first_step: The step (optimizer steps taken) of the first probe; 1 lets Adam's state
            exist.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example::

        budget = ProbeBudget(0.05)
        if budget.due(step):
            est = estimate_stability(...)
            budget.record(step, est.result.elapsed, mean_step_seconds)
    """

    def __init__(
        self,
        budget: float = 0.05,
        *,
        min_interval: int = 1,
        max_interval: int | None = None,
        first_step: int = 1,
    ) -> None:
        self.budget = check_float("budget", budget, above=0.0)
        if self.budget > 1.0:
            raise ValueError(f"`budget` must be <= 1, got {budget}")
        self.min_interval = check_int("min_interval", min_interval, minimum=1)
        if max_interval is not None:
            check_int("max_interval", max_interval, minimum=self.min_interval)
        self.max_interval = max_interval
        self.next_step = check_int("first_step", first_step, minimum=0)

    def due(self, step: int) -> bool:
        """Whether a probe should run at ``step`` (optimizer steps taken)."""
        return step >= self.next_step

    def record(self, step: int, probe_seconds: float, step_seconds: float) -> int:
        """Account for a probe run at ``step``; return the step of the next one.

        Args:
            step: The step the probe ran at.
            probe_seconds: How long the probe took.
            step_seconds: How long one training step takes (a mean over recent steps).

        Raises:
            TypeError: an argument has the wrong type.
            ValueError: an argument is negative or not finite.
        """
        step = check_int("step", step, minimum=0)
        probe_seconds = check_float("probe_seconds", probe_seconds, minimum=0.0)
        step_seconds = check_float("step_seconds", step_seconds, minimum=0.0)
        if step_seconds > 0:
            interval = max(1, math.ceil(probe_seconds / (self.budget * step_seconds)))
        else:
            interval = self.max_interval or self.min_interval
        interval = max(interval, self.min_interval)
        if self.max_interval is not None:
            interval = min(interval, self.max_interval)
        self.next_step = step + interval
        return self.next_step

    def state_dict(self) -> dict[str, Any]:
        """``{"next_step": int}``: the only state (the options come from the constructor)."""
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing key keeps the current value."""
        self.next_step = int(state.get("next_step", self.next_step))


class EdgeOfStabilityRule:
    """Alert ``edge_of_stability`` when the stability margin stays above 1.

    A freshly initialised model is often sharp for a step or two, so one probe above the edge
    is not enough: the rule fires when ``consecutive`` probes in a row read a margin above
    ``threshold`` (default: two probes above 1), once per such run.

    Args:
        threshold: The margin that counts as past the edge (> 0).
        consecutive: Probes in a row needed (>= 1).
    """

    def __init__(self, *, threshold: float = 1.0, consecutive: int = 2) -> None:
        if not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"`threshold` must be a number > 0, got {threshold!r}")
        if isinstance(consecutive, bool) or not isinstance(consecutive, int) or consecutive < 1:
            raise ValueError(f"`consecutive` must be an int >= 1, got {consecutive!r}")
        self.threshold = float(threshold)
        self.consecutive = consecutive
        self.reset()

    def reset(self) -> None:
        self._run = 0

    def update(self, step: int, margin: float) -> Alert | None:
        """Feed one probe's margin (NaN is ignored: the non-finite rule covers it)."""
        if not math.isfinite(margin):
            return None
        if margin <= self.threshold:
            self._run = 0
            return None
        self._run += 1
        if self._run != self.consecutive:
            return None
        return Alert(
            step=step,
            kind=AlertKind.EDGE_OF_STABILITY,
            message=(
                f"the lr is past the edge of stability: margin lr x sharpness / threshold = "
                f"{margin:.3g} on {self.consecutive} probes in a row (above 1 means unstable)"
            ),
            value=margin,
            threshold=self.threshold,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"run": self._run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run = int(state.get("run", 0))

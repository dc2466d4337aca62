"""The top eigenvalue of a Hessian by Lanczos on Hessian-vector products.

:func:`top_hessian_eigenvalue` differentiates a loss twice (``torch.autograd.grad`` with
``create_graph=True``, nothing accumulated into ``.grad``) and runs Lanczos with full
reorthogonalisation on the (optionally diagonally preconditioned) Hessian. Supported: one
device, dense parameters, single process or data parallel (``distributed=True``). Not
supported: sharded parameters (FSDP, ``DTensor``: ``NotImplementedError``), parameters spread
over several devices (``ValueError``), compiled modules (no double backward).

This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from warmup_monitor._checks import check_float, check_int

__all__ = ["SharpnessResult", "top_hessian_eigenvalue"]

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

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

# The random Krylov dimension a probe needs before its residual test may count as converged:
# from a cold start; from warm-start vectors that no longer span a nearly invariant subspace
# (their top Ritz residual above _STALE x the Ritz value: the operator moved since they were
# computed); and from warm-start vectors that still do. Chosen on the edge-of-stability runs
# of benchmarks/curvature.py (README_curvature.md).
# A random Krylov direction with no more than this fraction outside the subspace is inside it.
_INSIDE = 1e-3
_EXPLORE_COLD = 12
_EXPLORE_STALE = 6
_EXPLORE_FRESH = 2
_STALE = 0.1


@dataclass(frozen=True)
class SharpnessResult:
    """The outcome of :func:`top_hessian_eigenvalue`.

    Attributes:
        value: The largest Ritz value: an estimate (from below) of the largest algebraic
            eigenvalue of the (preconditioned) Hessian.
        iterations: Hessian-vector products computed (one per start vector and per step).
        converged: ``residual <= tol * |value|``, or the subspace became invariant.
        elapsed: Wall-clock seconds of the whole call, the loss evaluation included.
        residual: ``||A y - value * y||`` for the Ritz vector ``y`` (``A`` the operator): some
            eigenvalue of ``A`` lies within ``residual`` of ``value``.
        vector: The unit Ritz vector, flat and in the order of ``params``, when asked for with
            ``return_vector=True``; else None.
        vectors: The ``n_vectors`` leading Ritz vectors as orthonormal rows (the first is
            ``vector``), with ``return_vector=True``: the next probe's warm start (``init``).
    """

    value: float
    iterations: int
    converged: bool
    elapsed: float
    residual: float
    vector: Tensor | None = field(default=None, repr=False, compare=False)
    vectors: Tensor | None = field(default=None, repr=False, compare=False)


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    preconditioner: Sequence[Tensor] | None = None,
    seed: int = 0,
    init: Tensor | None = None,
    explore: int | None = None,
    return_vector: bool = False,
    n_vectors: int = 3,
    reorthogonalize: bool = True,
    distributed: bool = False,
    process_group: Any = None,
) -> SharpnessResult:
    """The largest eigenvalue of the Hessian of ``loss_fn()`` w.r.t. ``params``, by Lanczos.

    ``loss_fn`` is called once; its graph is differentiated twice (``torch.autograd.grad`` with
    ``create_graph=True``): each step is one Hessian-vector product on that graph, so the
    operator is fixed even if the forward pass is random (one dropout mask for the whole call).
    Nothing is accumulated into ``.grad`` and the global RNG is not used: random start vectors
    come from a private ``torch.Generator`` seeded with ``seed``. Attention through
    ``F.scaled_dot_product_attention`` runs on its math kernel during ``loss_fn`` (the fused
    kernels have no double backward).

    The method is Rayleigh-Ritz on a growing subspace, one product per new direction. It
    starts from the rows of ``init`` (the previous probe's leading Ritz vectors, ``vectors``)
    and a random vector, and grows by the residual of the top Ritz pair while that fails the
    residual test, then along the Krylov space of the random vector until the subspace holds
    ``explore`` of its dimensions. From a random start alone this is Lanczos with full
    reorthogonalisation. The warm rows are in the subspace exactly, so an eigenvector in their
    span is found even when the top eigenvalues have swapped, which one warm-start vector misses
    (it converges on the eigenvalue it tracked, now second, and its residual test cannot tell);
    the random Krylov space finds what the warm rows do not hold.

    It returns the largest *algebraic* Ritz value, which bounds the lr (a negative eigenvalue of
    larger magnitude, which power iteration would find, is not reported), from below. With a
    preconditioner ``P`` (the diagonal of a positive diagonal matrix, one tensor per parameter)
    the operator is the symmetric ``P^-1/2 H P^-1/2``, which has the eigenvalues of ``P^-1 H``.

    .. math::

        M = Q^\\top A Q, \\quad \\theta = \\lambda_{\\max}(M), \\quad y = Q z, \\quad
        \\|A y - \\theta y\\| \\le \\mathrm{tol}\\,|\\theta| \\Rightarrow \\text{converged}

    The residual test proves that *some* eigenvalue lies within ``tol * |theta|`` of ``theta``,
    not that it is the top one: that rests on the subspace, hence ``converged`` also asks for
    ``explore`` random Krylov dimensions. The default (None) is 12 from a cold start, 6 when the
    warm rows no longer span a nearly invariant subspace (their top Ritz residual above 10% of
    the Ritz value: the operator moved since they were computed) and 2 when they still do
    (all capped by ``max_iters``); on the edge-of-stability runs of
    ``benchmarks/curvature.py`` no converged value was more than 2% below the top eigenvalue.

    Cost: one forward and backward with graph, then ``iterations`` double-backward passes (each
    about 2-3x a backward) and two or three host reads per product. Memory: the
    double-backward graph, plus two parameter-sized vectors (the basis and its image) per
    product with ``reorthogonalize=True`` (``2 * max_iters`` at most), or 3 vectors without
    (the classic three-term recurrence from one start vector, ``explore`` ignored: the top Ritz
    value stays accurate, spurious copies of it may appear; no vectors, no block start).

    Args:
        loss_fn: Recomputes the scalar loss on the fixed probe batch, with autograd enabled.
        params: The parameters (leaf tensors requiring grad, on one device).
        max_iters: The most Hessian-vector products, >= 1 (the start vectors' included).
        tol: Relative tolerance on the residual, > 0 (1e-3: the value is within 0.1% of an
            eigenvalue).
        preconditioner: ``P``: positive finite tensors shaped like ``params``, or None.
        seed: Seed of the random start vector (the same seed gives the same value on every
            rank).
        init: A flat start vector, or a block of them as rows (e.g. the previous probe's
            ``vectors``), or None (a cold start).
        explore: The random Krylov dimensions ``converged`` needs (>= 0; 0 with ``init``: no
            random vector at all), or None for the default above.
        return_vector: Keep the top Ritz vector and the leading ones in the result (needs
            ``reorthogonalize=True``).
        n_vectors: How many leading Ritz vectors ``vectors`` keeps (>= 1).
        reorthogonalize: Keep the whole basis (see Memory above).
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
            devices, the preconditioner or ``init`` does not match ``params``.
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
    if explore is not None:
        explore = check_int("explore", explore, minimum=0)
    n_vectors = check_int("n_vectors", n_vectors, minimum=1)
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
    warm = _warm_rows(init, n, device, work_dtype)
    random = _random_vector(n, seed, device, work_dtype)
    if not reorthogonalize and len(warm) > 1:
        raise ValueError("`init` with several rows needs `reorthogonalize=True`")
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

    vectors = None
    if reorthogonalize:
        keep = n_vectors if return_vector else 0
        value, residual, iterations, converged, vectors = _rayleigh_ritz(
            operator, warm, random, max_iters, tol, keep, explore
        )
    else:
        value, residual, iterations, converged = _three_term_lanczos(
            operator, warm[0] if len(warm) else random, max_iters, tol
        )
    return SharpnessResult(
        value=value,
        iterations=iterations,
        converged=converged,
        elapsed=time.perf_counter() - start_time,
        residual=residual,
        vector=None if vectors is None else vectors[0],
        vectors=vectors,
    )


def _explore_floor(explore: int | None, warm: int, stale: bool, max_iters: int) -> int:
    """The random Krylov dimension a probe needs before it may count as converged."""
    if explore is None:
        explore = _EXPLORE_COLD if warm == 0 else _EXPLORE_STALE if stale else _EXPLORE_FRESH
    return min(explore, max(max_iters - warm, 1))


def _rayleigh_ritz(
    operator: Callable[[Tensor], Tensor],
    warm: Tensor,
    random: Tensor,
    max_iters: int,
    tol: float,
    keep: int,
    explore: int | None,
) -> tuple[float, float, int, bool, Tensor | None]:
    """The top eigenpair of a symmetric ``operator`` by Rayleigh-Ritz on a growing subspace.

    The subspace holds the rows of ``warm`` and, unless ``explore == 0``, the Krylov space of
    ``random``; it grows by the residual of the top Ritz pair while that fails the residual
    test, and along the Krylov space of ``random`` while the subspace holds fewer of its
    dimensions than the floor (:func:`_explore_floor`). From a random start alone this is
    Lanczos with full reorthogonalisation (the residual spans the next Krylov direction, and
    the exploration finds it already there, at no cost). Returns ``(top Ritz value, its
    residual norm, products, converged, the top `keep` Ritz vectors as rows)``.
    """
    # The basis and its images grow one vector per product (memory: the products taken).
    basis: list[Tensor] = []  # orthonormal
    images: list[Tensor] = []  # operator(basis[i])
    proj = torch.zeros(max_iters, max_iters, dtype=torch.float64)  # basis A basis^T
    m = 0  # products so far

    def expand(v: Tensor, inside: float = _BREAKDOWN) -> bool | None:
        """Orthonormalise ``v`` against the basis (twice: "twice is enough") and add it with
        its image: True; False when no more than ``inside`` of it is left; None when it would
        need a product beyond ``max_iters``."""
        nonlocal m
        before = torch.linalg.vector_norm(v)
        for _ in range(2 if m else 0):
            for c, b in zip(_dots(basis, v).unbind(), basis, strict=True):
                v.sub_(b * c)
        after = torch.linalg.vector_norm(v)
        norms = torch.stack([before, after]).tolist()  # host read
        if not (math.isfinite(norms[1]) and norms[1] > inside * norms[0]):
            return False
        if m == max_iters:
            return None
        basis.append(v.div_(norms[1]))
        images.append(operator(v))
        row = _dots(basis, images[m]).double().cpu()  # host read
        proj[m, : m + 1] = row
        proj[: m + 1, m] = row
        m += 1
        return True

    def top_pair() -> tuple[float, float, Tensor, Tensor]:
        """Top Ritz value, its residual norm and vector, and every Ritz vector's coefficients."""
        evals, coeffs = torch.linalg.eigh(proj[:m, :m])
        theta = float(evals[-1])
        z = coeffs[:, -1].tolist()
        resid = _combine(z, images).sub_(_combine(z, basis), alpha=theta)
        return theta, float(torch.linalg.vector_norm(resid)), resid, coeffs  # host read

    for v in warm[:max_iters]:
        expand(v.clone())
    stale = False
    if m and explore != 0:
        # Is the previous probe's subspace still nearly invariant? Its top Ritz residual says.
        theta, residual, _, _ = top_pair()
        stale = not residual <= _STALE * abs(theta)
    floor = _explore_floor(explore, m, stale, max_iters)
    # The Krylov space of `random`, by Lanczos on it alone: `chain` holds its orthonormal
    # vectors as coefficients in the basis (they lie in the subspace), so the image of the
    # newest one is a combination of the images already computed.
    chain: list[Tensor] = []
    if (explore != 0 or m == 0) and m < max_iters and expand(random.clone()):
        chain.append(_dots(basis, random).double().cpu())
    theta, residual, converged = math.nan, math.nan, False
    coeffs = torch.ones(1, 1, dtype=torch.float64)
    while m:
        if not bool(torch.isfinite(proj[:m, :m]).all()):
            theta, residual = math.nan, math.nan
            break
        theta, residual, resid, coeffs = top_pair()
        # A small residual, even a zero one, proves an eigenpair, not the top one: explore on.
        if residual <= tol * abs(theta) and len(chain) >= floor:
            converged = True
            break
        if residual > tol * abs(theta):
            if not expand(resid):  # converge the top pair
                break  # the budget is spent, or round-off took over
            continue
        extended = _extend_chain(chain, basis, images, expand) if chain else False
        if extended is None:
            break  # the budget is spent
        if not extended:
            floor = 0  # the random Krylov space is exhausted (invariant): nothing left to find
    vectors = None
    if keep and m and math.isfinite(theta):
        top = coeffs[:, -min(keep, m) :].flip(1).T.tolist()
        vectors = torch.stack([_combine(z, basis) for z in top])
    return theta, residual, m, converged, vectors


def _extend_chain(
    chain: list[Tensor],
    basis: list[Tensor],
    images: list[Tensor],
    expand: Callable[[Tensor, float], bool | None],
) -> bool | None:
    """One Lanczos step on the random vector alone: the image of its newest vector (free: a
    combination of ``images``), orthogonalised against its earlier ones, added to the subspace
    (one product if it points outside it): True. False when nothing new is left; None when
    the product is beyond the budget."""
    pad = [torch.nn.functional.pad(a, (0, len(basis) - len(a))) for a in chain]
    w = _combine(pad[-1].tolist(), images)
    inside = _dots(basis, w).double().cpu()  # host read
    before = float(torch.linalg.vector_norm(w))
    for _ in range(2):  # against the chain's own vectors, in the basis' coordinates
        h = torch.stack([a @ inside for a in pad])
        shift = (h[:, None] * torch.stack(pad)).sum(0)
        w = w.sub_(_combine(shift.tolist(), basis))
        inside = inside - shift
    norm = float(torch.linalg.vector_norm(w))  # host read
    if not (math.isfinite(norm) and norm > _BREAKDOWN * before):
        return False
    # Inside the subspace up to float32 round-off of the images: explored, at no cost.
    if expand(w.div_(norm).clone(), _INSIDE) is None:
        return None
    chain.append(_dots(basis, w).double().cpu())  # host read
    return True


def _dots(rows: list[Tensor], v: Tensor) -> Tensor:
    """``[r . v for r in rows]`` on the device."""
    return torch.stack([torch.dot(r, v) for r in rows])


def _combine(coeffs: list[float], rows: list[Tensor]) -> Tensor:
    """``sum(c * r)`` over ``coeffs`` and ``rows``."""
    out = torch.zeros_like(rows[0])
    for c, r in zip(coeffs, rows, strict=True):
        out.add_(r, alpha=c)
    return out


def _three_term_lanczos(
    operator: Callable[[Tensor], Tensor], q: Tensor, max_iters: int, tol: float
) -> tuple[float, float, int, bool]:
    """Lanczos without reorthogonalisation (three vectors of memory) from the unit vector
    ``q``: ``(top Ritz value, residual bound, steps, converged)``."""
    alphas: list[float] = []
    betas: list[float] = []
    q_prev: Tensor | None = None
    theta, residual, converged = 0.0, math.inf, False
    steps = 0
    for j in range(max_iters):
        w = operator(q)
        if q_prev is not None:
            w.sub_(q_prev, alpha=betas[-1])
        alpha = torch.dot(q, w)
        w.sub_(alpha * q)
        beta = torch.linalg.vector_norm(w)
        a, b = torch.stack([alpha, beta]).tolist()  # the one host read of this step
        steps = j + 1
        if not (math.isfinite(a) and math.isfinite(b)):
            theta, residual = math.nan, math.nan
            break
        alphas.append(a)
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        theta = float(evals[-1])
        residual = b * abs(float(evecs[-1, -1]))
        spread = float(evals.abs().max())
        if residual <= tol * abs(theta) or b <= _BREAKDOWN * spread or b == 0.0:
            converged = True
            break
        if j + 1 == max_iters:
            break
        betas.append(b)
        q_prev, q = q, w.div_(b)
    return theta, residual, steps, converged


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


def _warm_rows(init: Tensor | None, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The rows of ``init`` as unit vectors (zero or non-finite rows dropped)."""
    if init is None:
        return torch.empty(0, n, device=device, dtype=dtype)
    if not isinstance(init, Tensor):
        raise TypeError(f"`init` must be a Tensor or None, got {type(init).__name__}")
    if init.dim() not in (1, 2) or init.shape[-1] != n:
        raise ValueError(
            f"`init` must be a vector or rows with one entry per parameter element ({n}), "
            f"got shape {tuple(init.shape)}"
        )
    rows = init.detach().reshape(-1, n).to(device=device, dtype=dtype, copy=True)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    usable = (torch.isfinite(norms) & (norms > 0)).squeeze(1)
    return rows[usable] / norms[usable]  # one host sync


def _random_vector(n: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
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

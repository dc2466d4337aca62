"""GradientStats: global gradient norm and consecutive-gradient cosine, on the device.

Nothing here reads a value back from a device: every result is a device tensor, and the caller
decides when to pay for one batched read (the CPU plan reads one float of host memory per step
to guard against overflow: no device is involved). Parameter lists, buffers and the kernel plan
are built once per fit; a step runs a few kernels over them.

Sharded gradients (FSDP2 ``DTensor``) are handled by computing *local* sums on each shard; the
caller reduces those two numbers across ranks (a sum) and then calls ``finish``. Whole gradients
are never gathered.

This module imports no Lightning.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Sequence
from itertools import repeat
from typing import Literal

import torch
from torch import Tensor

from warmup_monitor._checks import check_choice, check_float, check_int
from warmup_monitor.stats.layers import Groups, attach_groups
from warmup_monitor.stats.plans import (
    Kernels,
    Plan,
    accumulate_dtype,
    local_tensor,
    make_plans,
    sq_norms,
)
from warmup_monitor.stats.reference import ExactReference, NoReference, SketchReference

CosineMode = Literal["exact", "sketch", "off"]

_Reference = ExactReference | SketchReference | NoReference


class GradientStats:
    """Global gradient norm and the cosine between consecutive optimizer steps' gradients.

    One instance watches one optimizer's parameters. Per step:

    .. math::

        \\|g_t\\| = \\sqrt{\\textstyle\\sum_i \\|g_{t,i}\\|^2}, \\qquad
        \\cos_t = \\frac{\\langle g_t, g_{t-1} \\rangle}{\\|g_t\\|\\,\\|g_{t-1}\\|}

    over all parameters ``i`` together (one whole-model gradient vector). A parameter without a
    gradient counts as a zero gradient. The cosine is undefined (NaN here, never logged) on the
    first step, after :meth:`forget`, and when either gradient is zero or non-finite.

    Cosine modes:

    - ``"exact"`` keeps the previous gradient in one flat buffer of the gradients' size (in
      ``reference_dtype``, default the parameters' dtype; ``torch.bfloat16`` halves it at about
      1e-3 of cosine error). Per step: the dot product with the reference, the sum of squares,
      and a copy of the gradient into the reference, in one pass on the CPU (blocked plan) or
      four foreach/flat kernels on an accelerator (which subtract a bf16 reference from bf16
      gradients in bf16: about 1e-4 of cosine error).
    - ``"sketch"`` keeps a count sketch of the previous gradient instead: extra memory of
      ``sketch_fraction`` of the gradients' bytes (default 2%). On real gradients of the
      example's 0.8M-parameter transformer (about 5,000 buckets) the cosine is off by 0.005 on
      average and by 0.03 at most (59 consecutive training steps x 16 seeds); larger models
      get more buckets and smaller errors. Choose it when one more gradient-sized buffer
      does not fit (large models, sharded or not); choose ``"exact"`` otherwise: it is exact,
      and on small models it is also faster (the sketch runs one multiply-add per round, and
      there are about 160 rounds whatever the model's size).
    - ``"off"`` computes only the norm and keeps no buffer.

    The sketch (how it is built: :class:`~warmup_monitor.stats.reference.SketchReference`)
    sends each element of the gradient to one of ``k`` buckets with a pseudo-random sign, and
    estimates the cosine by the cosine of the two sketches; its error is of the order of
    ``(1 - cos^2) / sqrt(k)``. ``k`` is chosen so that the current and previous sketch and the
    sign table (13 bytes a bucket) take ``sketch_fraction`` of the gradients' bytes, with at
    least :data:`~warmup_monitor.stats.reference.MIN_BUCKETS` buckets (a group of at most that
    many elements is sketched one element a bucket: exactly).

    Range. The float32 square of a finite gradient overflows from about 1.8e19 (a loss scaled
    by 1e20 gets there), so sums are kept in float64 and computed so that finite gradients give
    a finite norm and cosine: the foreach plan sums squares in float64 inside its norm kernel
    and takes the dot product from ``||g_t - g_{t-1}||^2``; the CPU plan scales its float32
    blocks by a power of two set from the previous step's norm, and sums again in float64 a
    step that overflowed anyway (details in :mod:`warmup_monitor.stats.plans`).

    Shards: each rank sketches only its local shard, so the sketch is block-diagonal across
    ranks. :meth:`local_sums` returns this rank's ``[sum_sq, dot]`` where in sketch mode ``dot``
    is ``||g_t|| ||g_{t-1}|| cos_sketch`` over the local shard: those add across ranks into an
    estimate of the global dot product, so the caller's reduction is a sum of two numbers in
    every mode. (Under DTensors the rank is added to ``sketch_seed`` so that shards' errors are
    independent.)

    Args:
        params: The parameters whose ``.grad`` is read (frozen ones may be included: they are
            skipped while their ``.grad`` is ``None``).
        cosine: ``"exact"``, ``"sketch"`` or ``"off"`` (above).
        reference_dtype: dtype of the exact reference buffer, e.g. ``torch.bfloat16`` to halve
            its memory (the cosine then carries bf16 rounding, about 1e-3).
        sketch_fraction: Memory of the sketch as a fraction of the gradients' bytes, in (0, 1].
        sketch_seed: Seed of the sketch's signs and offsets.
        kernels: ``"blocked"`` (CPU), ``"foreach"`` (accelerators) or ``"auto"``: blocked for
            parameters on the CPU, foreach elsewhere. Both give the same values.
        groups: Parameter groups (:func:`~warmup_monitor.stats.layers.layer_groups`): then
            ``local_sums(groups=True)`` also returns each group's sum of squares, from the same
            pass.

    Raises:
        ValueError: a choice or fraction out of range, or a non-floating ``reference_dtype``.
        TypeError: ``reference_dtype`` is not a ``torch.dtype``.

    Example::

        stats = GradientStats(model.parameters(), cosine="sketch")
        loss.backward()
        norm, cosine = stats.finish(stats.local_sums()).tolist()  # NaN cosine at first
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        cosine: CosineMode = "exact",
        reference_dtype: torch.dtype | None = None,
        sketch_fraction: float = 0.02,
        sketch_seed: int = 0,
        kernels: Kernels = "auto",
        groups: Groups | None = None,
    ) -> None:
        self.params = list(params)
        self.cosine: CosineMode = check_choice("cosine", cosine, ("exact", "sketch", "off"))  # type: ignore[assignment]
        if reference_dtype is not None:
            if not isinstance(reference_dtype, torch.dtype):
                raise TypeError(
                    f"`reference_dtype` must be a torch.dtype or None, got {reference_dtype!r}"
                )
            if not reference_dtype.is_floating_point:
                raise ValueError(
                    f"`reference_dtype` must be a floating dtype, got {reference_dtype}"
                )
        self.reference_dtype = reference_dtype
        self.sketch_fraction = check_float("sketch_fraction", sketch_fraction, above=0.0)
        if self.sketch_fraction > 1.0:
            raise ValueError(f"`sketch_fraction` must be <= 1, got {sketch_fraction}")
        self.sketch_seed = check_int("sketch_seed", sketch_seed, minimum=0)
        self.kernels: Kernels = check_choice("kernels", kernels, ("auto", "blocked", "foreach"))  # type: ignore[assignment]

        locals_ = [local_tensor(p) for p in self.params]
        self._dtensor = any(loc is not p for loc, p in zip(locals_, self.params, strict=True))
        self.device = locals_[0].device if locals_ else torch.device("cpu")
        self._acc = accumulate_dtype(self.device)
        self._plans = make_plans(locals_, self.kernels)
        self.groups = groups
        if groups is not None:
            if len(groups.of_param) != len(self.params):
                raise ValueError(
                    f"`groups` gives {len(groups.of_param)} parameters a group, there are "
                    f"{len(self.params)}"
                )
            for plan in self._plans:
                attach_groups(plan, groups.of_param, len(groups))
        # A single group covering every parameter in order needs no per-step re-indexing.
        self._identity = len(self._plans) == 1 and self._plans[0].index == list(
            range(len(self.params))
        )
        self._refs: list[_Reference] = []  # one per plan, built at the first step
        self._sparse: list[int] = []
        self._layout_missing = -1  # missing-gradient count when layouts were last checked
        self._prev_sq = torch.zeros((), dtype=self._acc, device=self.device)
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)
        self._skipped = False
        #: How many parameters had a gradient at the last :meth:`local_sums` call.
        self.last_grad_count = 0

    # ------------------------------------------------------------------ memory

    @property
    def grad_bytes(self) -> int:
        """Bytes of this rank's gradients (all watched parameters' local shards)."""
        return sum(p.numel * p.dtype.itemsize for p in self._plans)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the buffers this instance holds now (reference or sketch state)."""
        return sum(r.nbytes for r in self._refs)

    @property
    def sketch_buckets(self) -> int:
        """Total sketch buckets (0 before the first step and outside sketch mode)."""
        return sum(r.buckets for r in self._refs if isinstance(r, SketchReference))

    # ------------------------------------------------------------------ lifecycle

    def forget(self) -> None:
        """Drop the reference gradient: the next cosine is undefined (used after resume)."""
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)

    def release(self) -> None:
        """Free the buffers (they are rebuilt, and the cosine restarts, if used again)."""
        self._refs = []
        self.forget()

    def _build(self) -> None:
        rank_offset = 0
        if (
            self._dtensor
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank_offset = torch.distributed.get_rank()
        self._refs = [self._reference(p, self.sketch_seed + rank_offset) for p in self._plans]
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)

    def _reference(self, plan: Plan, seed: int) -> _Reference:
        if self.cosine == "exact":
            return ExactReference(plan, self.reference_dtype or plan.dtype)
        if self.cosine == "sketch":
            return SketchReference(plan, self.sketch_fraction, seed)
        return NoReference()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def local_sums(self, groups: bool = False) -> Tensor:
        """This rank's ``[sum of squares, dot with previous gradient]`` on the device.

        With ``groups`` (and ``groups`` given at construction), followed by each group's sum of
        squares (``2 + len(groups)`` values), computed in the same pass; they add across shards
        like the first two.

        In float64 (float32 on MPS, which has none): finite gradients give finite sums (see
        Range in the class docstring); the caller's reduction adds them in that dtype. Also
        stores the current gradient (or its sketch) as the next step's reference. Call
        exactly once per optimizer step, after backward (and unscaling) and before clipping,
        then reduce the result across shard holders (if any) and pass it to :meth:`finish`.
        In sketch mode the dot product is the sketch's estimate (see the class docstring).
        """
        grads: list[Tensor | None] = [p.grad for p in self.params]
        missing = sum(map(operator.is_, grads, repeat(None)))
        self.last_grad_count = len(grads) - missing
        self._skipped = missing == len(grads)
        per_group = groups and self.groups is not None
        if self._skipped:
            # No gradient at all (a skipped batch): leave the reference as it is, so the next
            # cosine compares with the last real gradient.
            n = 2 + (len(self.groups) if per_group and self.groups is not None else 0)
            return torch.zeros(n, dtype=self._acc, device=self.device)
        if not self._refs:
            self._build()
        if self._dtensor:
            grads = [None if g is None else local_tensor(g) for g in grads]
        if missing != self._layout_missing:
            # Sparse gradients (``Embedding(sparse=True)``) are densified. A parameter's layout
            # does not change between steps: look again only when the set of gradients does.
            self._sparse = [i for i, g in enumerate(grads) if g is not None and g.is_sparse]
            self._layout_missing = missing
        for i in self._sparse:
            g = grads[i]
            if g is not None and g.is_sparse:
                grads[i] = g.to_dense()
        sq_parts, dot_parts = [], []
        for plan, ref in zip(self._plans, self._refs, strict=True):
            gs = grads if self._identity else [grads[i] for i in plan.index]
            sq, dot = plan.grad_sums(gs, missing > 0, ref, per_group)
            sq_parts.append(sq.to(device=self.device, dtype=self._acc))
            dot_parts.append(dot.to(device=self.device, dtype=self._acc))
        if len(sq_parts) == 1:
            out = torch.stack([sq_parts[0], dot_parts[0]])
        else:
            out = torch.stack([torch.stack(sq_parts).sum(), torch.stack(dot_parts).sum()])
        if not per_group:
            return out
        group_parts = [
            p.group_sums.to(device=self.device, dtype=self._acc)
            for p in self._plans
            if p.group_sums is not None
        ]
        total = group_parts[0] if len(group_parts) == 1 else torch.stack(group_parts).sum(0)
        return torch.cat([out, total])

    def finish(self, sums: Tensor) -> Tensor:
        """Turn globally reduced ``[sum_sq, dot]`` into ``[grad_norm, cosine]`` (device tensor).

        The cosine is NaN where it is undefined. Remembers this step's squared norm as the
        reference's for the next step.
        """
        sq, dot = sums.unbind()
        nan = torch.full_like(dot, float("nan"))
        if self._skipped:
            return torch.stack([sq, nan])
        # The previous squared norm is finite and positive where `_prev_valid`; then the ratio is
        # finite exactly when this step's norm is non-zero and everything is finite.
        finite = sq.isfinite()
        cos = dot / (sq * self._prev_sq).sqrt()
        valid = self._prev_valid & finite & cos.isfinite()
        cos = torch.where(valid, cos.clamp(-1.0, 1.0), nan)
        if self.cosine != "off":
            self._prev_sq = sq.clone()
            self._prev_valid = finite & (sq > 0)
        norm = sq.sqrt()
        return torch.stack([norm, cos])

    # ------------------------------------------------------------------ per-tensor norms

    @torch.no_grad()
    def per_tensor_sq_norms(self) -> Tensor:
        """Squared norm of each parameter's local gradient, ``0`` where it has none.

        A float32 tensor of ``len(params)`` values on the device, in parameter order. Reads the
        current gradients: call it in the same hook as :meth:`local_sums` (before clipping).
        Under sharding the values are local: sum them across shard holders, then take the
        square root. Costs one norm kernel per tensor: meant for logging steps.
        """
        out = torch.zeros(len(self.params), device=self.device)
        index, present = [], []
        for i, p in enumerate(self.params):
            if p.grad is not None:
                g = local_tensor(p.grad)
                index.append(i)
                present.append(g.to_dense() if g.is_sparse else g)
        if present:
            by_device: dict[torch.device, list[int]] = defaultdict(list)
            for j, t in enumerate(present):
                by_device[t.device].append(j)
            for js in by_device.values():
                vals = sq_norms([present[j] for j in js], torch.float32).to(self.device)
                out[torch.tensor([index[j] for j in js], device=self.device)] = vals
        return out

"""Gradient statistics on the device: global norm, consecutive-gradient cosine, update ratio.

Nothing here reads a value back to the host: every result is a device tensor, and the caller
decides when to pay for one batched read. Parameter lists, buffers and the kernel plan are
built once per fit; a step runs a few kernels over them.

Two kernel plans compute the same numbers:

- ``"foreach"`` (accelerators): a handful of ``torch._foreach_*`` kernels over the gradient list
  and single kernels over flat buffers. On a GPU a foreach kernel is one launch for the whole
  list.
- ``"blocked"`` (CPU): on the CPU a foreach kernel is a C++ loop of one kernel per tensor, and
  each kernel is a separate pass over memory. The blocked plan instead walks the gradients in
  blocks of :data:`BLOCK` elements (small tensors flattened together, large ones cut in chunks)
  and runs every operation of a block while the block is in cache: per element, the gradient
  and the reference are read from memory once and the reference is written once (the floor,
  one copy of the gradients, reads and writes as much).

Sharded gradients (FSDP2 ``DTensor``) are handled by computing *local* sums on each shard; the
caller reduces those two numbers across ranks (a sum) and then calls ``finish``. Whole gradients
are never gathered.

This module imports no Lightning.
"""

from __future__ import annotations

import operator
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from typing import Literal, cast

import torch
from torch import Tensor

# One C++ call that flattens and concatenates a list of tensors (what DDP and apex use).
from torch._utils import _flatten_dense_tensors as _flatten

from warmup_monitor._checks import check_choice, check_float, check_int

__all__ = ["CosineMode", "GradientStats", "Kernels", "UpdateRatio", "local_tensor"]

CosineMode = Literal["exact", "sketch", "off"]
Kernels = Literal["auto", "blocked", "foreach"]

#: Elements per block of the CPU plan. A block of gradient and one of reference (float32, 1 MiB
#: together) stay in cache between the operations on the block; each operation costs a few
#: microseconds of dispatch, a small part of a block's memory time.
BLOCK = 1 << 17
#: Alignment in bytes (a cache line) of each tensor or unit in the flat reference buffer.
#: Unaligned views cost about a third more time per pass on the CPU (measured).
_ALIGN_BYTES = 64
#: Fewest buckets of a sketch. A group with at most this many elements gets one bucket per
#: element, which makes its sketch cosine exact.
MIN_BUCKETS = 1024
#: Bytes of sketch state per bucket: current and previous sketch plus 1.25 signs, all float32.
_SKETCH_BYTES_PER_BUCKET = 13


def local_tensor(t: Tensor) -> Tensor:
    """The locally held part of ``t``: the shard of a ``DTensor``, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat_sq(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum of squares of a 1-D tensor, accumulated in ``dtype``.

    On the CPU one norm kernel accumulates a whole tensor in a single pass (0.7% off at 50M
    float32 elements, measured), so the CPU sums dot products of ``BLOCK``-element chunks
    (about 3e-8 off at 50M).
    """
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dtype=dtype).square()
    parts = [torch.dot(c, c) for c in (x if x.dtype == dtype else x.to(dtype)).split(BLOCK)]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=dtype)


def _sq_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Squared L2 norm of each tensor of a non-empty same-device list (1-D, in ``dtype``)."""
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()
    big = [t.numel() > BLOCK for t in tensors]
    small = [t for t, b in zip(tensors, big, strict=True) if not b]
    small_sq = iter(
        torch.stack(torch._foreach_norm(small, 2, dtype=dtype)).square().unbind() if small else ()
    )
    return torch.stack(
        [
            _flat_sq(t.reshape(-1), dtype) if b else next(small_sq)
            for t, b in zip(tensors, big, strict=True)
        ]
    )


def _sum_sq(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Sum of squares of a non-empty list of same-device tensors."""
    return _sq_norms(tensors, dtype).sum()


@dataclass
class _Unit:
    """Consecutive tensors of a group handled together by the blocked plan.

    Either a run of whole tensors (flattened into one block) or one large tensor cut into
    ``BLOCK``-element chunks (one block each, views of the gradient: no copy).
    """

    first: int
    stop: int
    chunked: bool
    spans: list[tuple[int, int]]  # (virtual start, length) of each block


@dataclass
class _Piece:
    """A contiguous stretch of a block that lands in one contiguous range of sketch buckets."""

    start: int  # offset in the block
    length: int
    whole: bool  # the piece is the whole block
    cur: Tensor  # view of the current sketch
    sign: Tensor  # view of the sign table


@dataclass
class _RoundItem:
    """One tensor's (or part of a tensor's) contribution to a sketch round (foreach plan)."""

    index: int  # group-local tensor index
    part: slice | None  # None: the whole tensor
    cur: Tensor  # view of the current sketch (shaped like the tensor when whole)
    sign: Tensor


@dataclass
class _Group:
    """The local parameters of one device and dtype, as one virtual flat vector.

    Layout order: tensors of at most a block first, then the larger ones; ``ref`` holds the
    exact reference (GradientStats) or the snapshot (UpdateRatio) in that order.
    """

    index: list[int]  # positions in GradientStats.params, in layout order
    shapes: list[torch.Size]
    sizes: list[int]
    offsets: list[int]
    device: torch.device
    dtype: torch.dtype
    blocked: bool
    block: int
    units: list[_Unit] = field(default_factory=list)
    # Exact mode.
    ref: Tensor | None = None
    ref_views: list[Tensor] = field(default_factory=list)  # shaped like the tensors (foreach)
    ref_blocks: list[Tensor] = field(default_factory=list)  # one flat view per block (blocked)
    lossless: bool = True  # the reference dtype holds the gradient dtype exactly
    # Sketch mode.
    buckets: int = 0
    cur: Tensor | None = None
    prev: Tensor | None = None
    signs: Tensor | None = None
    pieces: list[list[_Piece]] = field(default_factory=list)  # per block (blocked plan)
    rounds: list[list[_RoundItem]] = field(default_factory=list)  # foreach plan
    prev_sq: Tensor | None = None  # previous step's local sum of squares of this group
    prev_sketch_sq: Tensor | None = None

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def compute_dtype(self) -> torch.dtype:
        return _compute_dtype(self.dtype)

    def buffer_bytes(self) -> int:
        tensors = [self.ref, self.cur, self.prev, self.signs]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _plan_units(sizes: list[int], block: int) -> list[_Unit]:
    """Cut a group into units: runs of small tensors up to ``block`` elements, chunked big ones."""
    units: list[_Unit] = []
    offset = 0
    run_first, run_len = 0, 0

    def close_run(stop: int) -> None:
        if stop > run_first:
            units.append(_Unit(run_first, stop, False, [(offset - run_len, run_len)]))

    for i, n in enumerate(sizes):
        if n > block:
            close_run(i)
            spans = [(offset + a, min(block, n - a)) for a in range(0, n, block)]
            units.append(_Unit(i, i + 1, True, spans))
            offset += n
            run_first, run_len = i + 1, 0
            continue
        if run_len + n > block:
            close_run(i)
            run_first, run_len = i, 0
        run_len += n
        offset += n
    close_run(len(sizes))
    return units


def _make_groups(locals_: list[Tensor], kernels: str, block: int) -> list[_Group]:
    """Group local tensors by (device, dtype); choose each group's plan and layout order."""
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(locals_):
        by_key[(t.device, t.dtype)].append(i)
    groups = []
    for (device, dtype), index in by_key.items():
        # Layout order: tensors of at most a block first (they are flattened together in runs),
        # then the large ones (cut in chunks). Fewer, fuller blocks.
        index = sorted(index, key=lambda i: locals_[i].numel() > block)
        sizes = [locals_[i].numel() for i in index]
        groups.append(
            _Group(
                index=index,
                shapes=[locals_[i].shape for i in index],
                sizes=sizes,
                offsets=[0, *accumulate(sizes)][: len(sizes)],
                device=device,
                dtype=dtype,
                blocked=kernels == "blocked" or (kernels == "auto" and device.type == "cpu"),
                block=block,
            )
        )
    return groups


def _allocate_flat(g: _Group, dtype: torch.dtype) -> None:
    """Allocate ``g.ref``: one flat buffer with a view per block (blocked) or tensor (foreach).

    Each unit (blocked plan) or tensor (foreach plan) starts on a cache line.
    """
    if g.blocked and not g.units:
        g.units = _plan_units(g.sizes, g.block)
    align = max(1, _ALIGN_BYTES // dtype.itemsize)
    starts: list[int] = []
    end = 0
    for length in [sum(n for _, n in u.spans) for u in g.units] if g.blocked else g.sizes:
        starts.append(end)
        end += -(-length // align) * align
    g.ref = torch.zeros(end, dtype=dtype, device=g.device)
    if g.blocked:
        g.ref_blocks = [
            g.ref[start + v - u.spans[0][0] : start + v - u.spans[0][0] + n]
            for start, u in zip(starts, g.units, strict=True)
            for v, n in u.spans
        ]
    else:
        g.ref_views = [
            g.ref[o : o + n].view(shape)
            for o, n, shape in zip(starts, g.sizes, g.shapes, strict=True)
        ]


def _block_sources(
    g: _Group, tensors: Sequence[Tensor | None], fill: Callable[[int], Tensor] | None
) -> Iterator[Tensor | None]:
    """Each block's data as a 1-D tensor, in plan order.

    A run of small tensors is flattened into one new tensor (one C++ call); a chunk of a large
    tensor is a view. A missing tensor in a run is replaced by ``fill(index)``; every chunk of a
    missing large tensor yields ``None``.
    """
    for unit in g.units:
        if unit.chunked:
            t = tensors[unit.first]
            if t is None:
                yield from repeat(None, len(unit.spans))
            else:
                yield from t.reshape(-1).split(g.block)
        else:
            run = tensors[unit.first : unit.stop]
            if fill is not None:
                run = [t if t is not None else fill(unit.first + i) for i, t in enumerate(run)]
            yield _flatten(run)


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
      four foreach/flat kernels on an accelerator (which multiply bf16 gradients by a bf16
      reference in bf16: about 1e-4 of cosine error).
    - ``"sketch"`` keeps a count sketch of the previous gradient instead: extra memory of
      ``sketch_fraction`` of the gradients' bytes (default 2%). On real gradients of the
      example's 0.8M-parameter transformer (about 5,000 buckets) the cosine is off by 0.005 on
      average and by 0.03 at most (59 consecutive training steps x 16 seeds); larger models
      get more buckets and smaller errors. Choose it when one more gradient-sized buffer
      does not fit (large models, sharded or not); choose ``"exact"`` otherwise: it is exact,
      and on small models it is also faster (the sketch runs one multiply-add per round, and
      there are about 160 rounds whatever the model's size).
    - ``"off"`` computes only the norm and keeps no buffer.

    The sketch. Lay the local gradients of one device and dtype end to end in a fixed order (a
    virtual vector of ``n`` elements) and cut it into rounds of ``k`` elements. Element ``p``
    goes to bucket ``p mod k`` with sign ``s[rho[p // k] + p mod k]``, where ``s`` is a fixed
    random sign table of ``1.25 k`` entries and ``rho`` one random offset per round (seeded by
    ``sketch_seed``):

    .. math::

        S(g)_b = \\textstyle\\sum_{p \\equiv b \\,(\\mathrm{mod}\\, k)} s_p\\, g_p, \\qquad
        \\widehat{\\cos}_t = \\frac{\\langle S(g_t), S(g_{t-1}) \\rangle}
                                  {\\|S(g_t)\\|\\,\\|S(g_{t-1})\\|}

    Colliding elements carry independent pseudo-random signs, so cross terms cancel in
    expectation, as in a count sketch with hashed buckets (measured: as accurate as one), while
    the hash needs no stored index: a round is a contiguous range of buckets, computed with one
    fused multiply-add per tensor and round. The error of this ratio estimator is of the order
    of ``(1 - cos^2) / sqrt(k)``. ``k`` is chosen so that
    the current and previous sketch and the sign table (13 bytes a bucket) take
    ``sketch_fraction`` of the gradients' bytes, with at least :data:`MIN_BUCKETS` buckets (a
    group of at most that many elements is sketched one element a bucket: exactly).

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

        self._block = BLOCK  # fixed for the instance's lifetime
        locals_ = [local_tensor(p) for p in self.params]
        self._dtensor = any(loc is not p for loc, p in zip(locals_, self.params, strict=True))
        self.device = locals_[0].device if locals_ else torch.device("cpu")
        self._groups = _make_groups(locals_, self.kernels, self._block)
        # A single group covering every parameter in order needs no per-step re-indexing.
        self._identity = len(self._groups) == 1 and self._groups[0].index == list(
            range(len(self.params))
        )
        self._built = False
        self._sparse: list[int] = []
        self._layout_missing = -1  # missing-gradient count when layouts were last checked
        self._prev_sq = torch.zeros((), device=self.device)
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)
        self._skipped = False
        #: How many parameters had a gradient at the last :meth:`local_sums` call.
        self.last_grad_count = 0

    # ------------------------------------------------------------------ memory

    @property
    def grad_bytes(self) -> int:
        """Bytes of this rank's gradients (all watched parameters' local shards)."""
        return sum(g.numel * g.dtype.itemsize for g in self._groups)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the buffers this instance holds now (reference or sketch state)."""
        return sum(g.buffer_bytes() for g in self._groups)

    @property
    def sketch_buckets(self) -> int:
        """Total sketch buckets (0 before the first step and outside sketch mode)."""
        return sum(g.buckets for g in self._groups)

    # ------------------------------------------------------------------ lifecycle

    def forget(self) -> None:
        """Drop the reference gradient: the next cosine is undefined (used after resume)."""
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)

    def release(self) -> None:
        """Free the buffers (they are rebuilt, and the cosine restarts, if used again)."""
        for g in self._groups:
            g.ref, g.ref_views, g.ref_blocks = None, [], []
            g.cur, g.prev, g.signs, g.pieces, g.rounds = None, None, None, [], []
            g.prev_sq, g.prev_sketch_sq, g.buckets = None, None, 0
            g.units = []
        self._built = False
        self.forget()

    def _build(self) -> None:
        rank_offset = 0
        if (
            self._dtensor
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank_offset = torch.distributed.get_rank()
        for g in self._groups:
            if g.blocked:
                g.units = _plan_units(g.sizes, g.block)
            if self.cosine == "exact":
                self._build_reference(g)
            elif self.cosine == "sketch":
                self._build_sketch(g, self.sketch_seed + rank_offset)
        self._built = True
        self._prev_valid = torch.zeros((), dtype=torch.bool, device=self.device)

    def _build_reference(self, g: _Group) -> None:
        ref_dtype = self.reference_dtype or g.dtype
        g.lossless = torch.promote_types(g.dtype, ref_dtype) == ref_dtype
        _allocate_flat(g, ref_dtype)

    def _build_sketch(self, g: _Group, seed: int) -> None:
        n = g.numel
        budget = int(self.sketch_fraction * n * g.dtype.itemsize) // _SKETCH_BYTES_PER_BUCKET
        k = max(1, min(n, max(MIN_BUCKETS, budget)))
        spread = k // 4
        rounds = -(-n // k)
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (k + spread,), generator=gen, dtype=torch.int8)
        # Offsets drawn in Python: no tensor is read back to the host, even once.
        offsets = random.Random(seed)
        rho = [offsets.randint(0, spread) for _ in range(rounds)]
        g.buckets = k
        g.signs = (signs.to(torch.float32) * 2 - 1).to(g.device)
        g.cur = torch.zeros(k, dtype=torch.float32, device=g.device)
        g.prev = torch.zeros(k, dtype=torch.float32, device=g.device)
        g.prev_sq = torch.zeros((), dtype=torch.float32, device=g.device)
        g.prev_sketch_sq = torch.zeros((), dtype=torch.float32, device=g.device)

        def split(start: int, length: int) -> list[tuple[int, int, int, int]]:
            """(virtual start, length, bucket, sign index) of each round-aligned stretch."""
            out = []
            end = start + length
            while start < end:
                r, b = divmod(start, k)
                stop = min(end, (r + 1) * k)
                out.append((start, stop - start, b, rho[r] + b))
                start = stop
            return out

        if g.blocked:
            g.pieces = []
            for unit in g.units:
                for v0, length in unit.spans:
                    stretches = split(v0, length)
                    g.pieces.append(
                        [
                            _Piece(
                                start=v - v0,
                                length=m,
                                whole=len(stretches) == 1,
                                cur=g.cur[b : b + m],
                                sign=g.signs[s : s + m],
                            )
                            for v, m, b, s in stretches
                        ]
                    )
        else:
            by_round: dict[int, list[_RoundItem]] = defaultdict(list)
            for i, (o, size, shape) in enumerate(zip(g.offsets, g.sizes, g.shapes, strict=True)):
                stretches = split(o, size)
                for v, m, b, s in stretches:
                    whole = len(stretches) == 1
                    cur, sign = g.cur[b : b + m], g.signs[s : s + m]
                    if whole:
                        by_round[v // k].append(
                            _RoundItem(i, None, cur.view(shape), sign.view(shape))
                        )
                    else:
                        by_round[v // k].append(_RoundItem(i, slice(v - o, v - o + m), cur, sign))
            g.rounds = [by_round[r] for r in sorted(by_round)]

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def local_sums(self) -> Tensor:
        """This rank's ``[sum of squares, dot with previous gradient]`` (float32, on device).

        Also stores the current gradient (or its sketch) as the next step's reference. Call
        exactly once per optimizer step, after backward (and unscaling) and before clipping,
        then reduce the result across shard holders (if any) and pass it to :meth:`finish`.
        In sketch mode the dot product is the sketch's estimate (see the class docstring).
        """
        grads: list[Tensor | None] = [p.grad for p in self.params]
        missing = sum(map(operator.is_, grads, repeat(None)))
        self.last_grad_count = len(grads) - missing
        self._skipped = missing == len(grads)
        if self._skipped:
            # No gradient at all (a skipped batch): leave the reference as it is, so the next
            # cosine compares with the last real gradient.
            return torch.zeros(2, device=self.device)
        if not self._built:
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
        for group in self._groups:
            gs = grads if self._identity else [grads[i] for i in group.index]
            sq, dot = self._group_sums(group, gs, missing > 0)
            sq_parts.append(sq.to(device=self.device, dtype=torch.float32))
            dot_parts.append(dot.to(device=self.device, dtype=torch.float32))
        if len(sq_parts) == 1:
            return torch.stack([sq_parts[0], dot_parts[0]])
        return torch.stack([torch.stack(sq_parts).sum(), torch.stack(dot_parts).sum()])

    def _group_sums(
        self, g: _Group, gs: list[Tensor | None], missing: bool
    ) -> tuple[Tensor, Tensor]:
        if g.blocked:
            return self._blocked_sums(g, gs, missing)
        present = [t for t in gs if t is not None] if missing else cast(list[Tensor], gs)
        if not present:
            zero = torch.zeros((), device=g.device)
            if self.cosine == "exact":
                assert g.ref is not None
                g.ref.zero_()
            elif self.cosine == "sketch":
                return self._sketch_estimate(g, zero, zero_sketch=True)
            return zero, zero
        if self.cosine == "exact":
            return self._foreach_exact(g, gs, present, missing)
        if self.cosine == "sketch":
            return self._foreach_sketch(g, gs, present)
        return _sum_sq(present, g.compute_dtype), torch.zeros((), device=g.device)

    # ---- foreach plan (accelerators)

    def _foreach_exact(
        self, g: _Group, gs: list[Tensor | None], present: list[Tensor], missing: bool
    ) -> tuple[Tensor, Tensor]:
        assert g.ref is not None
        refs = g.ref_views
        if missing:
            refs = [r for r, t in zip(g.ref_views, gs, strict=True) if t is not None]
            absent = [r for r, t in zip(g.ref_views, gs, strict=True) if t is None]
            if absent:
                torch._foreach_zero_(absent)
        cd = g.compute_dtype
        # The product overwrites the reference; summing the flat buffer is one kernel.
        torch._foreach_mul_(refs, present)
        dot = g.ref.sum(dtype=cd)
        torch._foreach_copy_(refs, present)
        # A lossless reference now holds this gradient exactly: one flat reduction.
        sq = _flat_sq(g.ref, cd) if g.lossless else _sum_sq(present, cd)
        return sq, dot

    def _foreach_sketch(
        self, g: _Group, gs: list[Tensor | None], present: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        assert g.cur is not None
        g.cur.zero_()
        flat: dict[int, Tensor] = {}
        for items in g.rounds:
            curs, srcs, signs = [], [], []
            for it in items:
                t = gs[it.index]
                if t is None:
                    continue
                if it.part is not None:
                    if it.index not in flat:
                        flat[it.index] = t.reshape(-1)
                    t = flat[it.index][it.part]
                curs.append(it.cur)
                srcs.append(t)
                signs.append(it.sign)
            if srcs:  # distinct buckets within a round: no aliasing inside one foreach call
                torch._foreach_addcmul_(curs, srcs, signs)
        return self._sketch_estimate(g, _sum_sq(present, g.compute_dtype))

    # ---- blocked plan (CPU)

    def _blocked_sums(
        self, g: _Group, gs: list[Tensor | None], missing: bool
    ) -> tuple[Tensor, Tensor]:
        cd = g.compute_dtype
        mode = self.cosine
        if mode == "sketch":
            assert g.cur is not None
            g.cur.zero_()
        dots: list[Tensor] = []
        sqs: list[Tensor] = []
        fill = (lambda i: self._zeros(g, i)) if missing else None
        # Every operation on a block runs while the block is in cache.
        for j, s in enumerate(_block_sources(g, gs, fill)):
            if s is None:  # a chunk of a tensor without gradient: the reference becomes zero
                if mode == "exact":
                    g.ref_blocks[j].zero_()
                continue
            sf = s if s.dtype == cd else s.to(cd)
            if mode == "exact":
                r = g.ref_blocks[j]
                dots.append(torch.dot(sf, r if r.dtype == cd else r.to(cd)))
                r.copy_(s)
            elif mode == "sketch":
                for pc in g.pieces[j]:
                    src = s if pc.whole else s[pc.start : pc.start + pc.length]
                    pc.cur.addcmul_(src, pc.sign)
            sqs.append(torch.dot(sf, sf))
        zero = torch.zeros((), dtype=cd, device=g.device)
        sq = torch.stack(sqs).sum() if sqs else zero
        if mode == "sketch":
            return self._sketch_estimate(g, sq)
        return sq, torch.stack(dots).sum() if dots else zero

    @staticmethod
    def _zeros(g: _Group, i: int) -> Tensor:
        return torch.zeros(g.shapes[i], dtype=g.dtype, device=g.device)

    # ---- sketch estimate

    @staticmethod
    def _sketch_estimate(g: _Group, sq: Tensor, zero_sketch: bool = False) -> tuple[Tensor, Tensor]:
        """``(sq, ||g_t|| ||g_{t-1}|| cos(S_t, S_{t-1}))`` for this group; rolls the sketch."""
        assert g.cur is not None and g.prev is not None
        assert g.prev_sq is not None and g.prev_sketch_sq is not None
        if zero_sketch:
            g.cur.zero_()
        sq = sq.float()
        sketch_dot = torch.dot(g.cur, g.prev)
        sketch_sq = torch.dot(g.cur, g.cur)
        den = (sketch_sq * g.prev_sketch_sq).sqrt()
        scale = (sq * g.prev_sq).sqrt()
        dot = torch.where(den > 0, sketch_dot * (scale / den), torch.zeros_like(den))
        g.prev_sq, g.prev_sketch_sq = sq, sketch_sq
        g.prev.copy_(g.cur)  # k elements: a fraction of a percent of the gradients
        return sq, dot

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
                vals = _sq_norms([present[j] for j in js], torch.float32).to(self.device)
                out[torch.tensor([index[j] for j in js], device=self.device)] = vals
        return out


class UpdateRatio:
    """``||theta_new - theta_old|| / ||theta_old||`` over one optimizer's parameters.

    :meth:`snapshot` copies the parameters into a preallocated flat buffer before the optimizer
    step; :meth:`local_sums` afterwards returns ``[||delta||^2, ||theta_old||^2]`` for this rank.
    The buffer costs one parameter-sized copy and is only written on steps that log. Per call,
    one pass over the parameters and the buffer (blocked plan on the CPU, as in
    :class:`GradientStats`; foreach kernels elsewhere).

    Args:
        params: The parameters of the optimizer.
        kernels: ``"auto"``, ``"blocked"`` or ``"foreach"``, as for :class:`GradientStats`.
    """

    def __init__(self, params: Sequence[Tensor], *, kernels: Kernels = "auto") -> None:
        self.params = list(params)
        self.kernels: Kernels = check_choice("kernels", kernels, ("auto", "blocked", "foreach"))  # type: ignore[assignment]
        locals_ = [local_tensor(p) for p in self.params]
        self._dtensor = any(loc is not p for loc, p in zip(locals_, self.params, strict=True))
        self.device = locals_[0].device if locals_ else torch.device("cpu")
        self._groups = _make_groups(locals_, self.kernels, BLOCK)
        self._old_sq: Tensor | None = None

    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot is waiting for :meth:`local_sums`."""
        return self._old_sq is not None

    @property
    def memory_bytes(self) -> int:
        """Bytes of the snapshot buffer held now."""
        return sum(g.buffer_bytes() for g in self._groups)

    def _tensors(self, g: _Group) -> list[Tensor]:
        if self._dtensor:
            return [local_tensor(self.params[i].detach()) for i in g.index]
        return [self.params[i] for i in g.index]

    def _sum(self, parts: list[Tensor]) -> Tensor:
        if not parts:
            return torch.zeros((), device=self.device)
        return torch.stack([t.to(device=self.device, dtype=torch.float32) for t in parts]).sum()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current parameters (call before the optimizer step)."""
        parts = []
        for g in self._groups:
            if g.ref is None:
                _allocate_flat(g, g.dtype)
            assert g.ref is not None
            ts = self._tensors(g)
            if g.blocked:
                cd = g.compute_dtype
                sqs = []
                for s, buf in zip(_block_sources(g, ts, None), g.ref_blocks, strict=True):
                    assert s is not None
                    buf.copy_(s)
                    sf = s if s.dtype == cd else s.to(cd)
                    sqs.append(torch.dot(sf, sf))
                if sqs:
                    parts.append(torch.stack(sqs).sum())
            else:
                torch._foreach_copy_(g.ref_views, ts)
                parts.append(_flat_sq(g.ref, g.compute_dtype))
        self._old_sq = self._sum(parts)

    @torch.no_grad()
    def local_sums(self) -> Tensor | None:
        """``[||delta||^2, ||theta_old||^2]`` on this rank, or ``None`` without a snapshot."""
        if self._old_sq is None:
            return None
        parts = []
        for g in self._groups:
            assert g.ref is not None
            ts = self._tensors(g)
            if g.blocked:
                # The difference goes to a block-sized scratch that stays in cache: the
                # snapshot is only read, never written back.
                cd = g.compute_dtype
                scratch = torch.empty(min(g.block, g.numel), dtype=cd)  # >= any block
                sqs = []
                for s, buf in zip(_block_sources(g, ts, None), g.ref_blocks, strict=True):
                    assert s is not None
                    d = scratch[: s.numel()]
                    if s.dtype == cd:
                        torch.sub(buf, s, out=d)
                    else:
                        torch.sub(buf.to(cd), s.to(cd), out=d)
                    sqs.append(torch.dot(d, d))
                if sqs:
                    parts.append(torch.stack(sqs).sum())
            else:
                torch._foreach_sub_(g.ref_views, ts)
                parts.append(_flat_sq(g.ref, g.compute_dtype))
        out = torch.stack([self._sum(parts), self._old_sq])
        self._old_sq = None
        return out

    def release(self) -> None:
        """Free the snapshot buffer."""
        for g in self._groups:
            g.ref, g.ref_views, g.ref_blocks, g.units = None, [], [], []
        self._old_sq = None

    @staticmethod
    def finish(sums: Tensor) -> Tensor:
        """Reduced ``[||delta||^2, ||theta_old||^2]`` to the ratio (NaN if the weights are 0)."""
        old = sums[1].sqrt()
        return torch.where(old > 0, sums[0].sqrt() / old, torch.full_like(old, float("nan")))

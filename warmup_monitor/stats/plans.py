"""Kernel plans: how the local gradients of one device and dtype are walked.

A *group* is the local parameters of one device and dtype, laid end to end in a fixed order (a
virtual flat vector; tensors of at most a block first, then the larger ones). Two plans walk a
group and compute the same numbers:

- :class:`ForeachPlan` (accelerators): a handful of ``torch._foreach_*`` kernels over the
  gradient list and single kernels over flat buffers. On a GPU a foreach kernel is one launch
  for the whole list.
- :class:`BlockPlan` (CPU): on the CPU a foreach kernel is a C++ loop of one kernel per tensor,
  and each kernel is a separate pass over memory. The block plan instead walks the gradients in
  blocks of :data:`BLOCK` elements (small tensors flattened together, large ones cut in chunks)
  and runs every operation of a block while the block is in cache: per element, the gradient
  and the reference are read from memory once and the reference is written once (the floor,
  one copy of the gradients, reads and writes as much).

A plan owns the iteration; what is done with each piece of gradient belongs to the reference
(:mod:`warmup_monitor.stats.reference`), which a plan drives through :class:`Reference`.

Range. Squares of finite float32 gradients overflow float32 from about 1.8e19 (a loss scaled by
1e20 is enough), so the sums a plan returns are float64 (:func:`accumulate_dtype`) and are
computed so that finite gradients give finite sums:

- the foreach plan accumulates squares in float64 inside ``torch._foreach_norm`` (no float64
  copy of the gradients), and the exact reference takes its dot product from
  ``||g_t - g_{t-1}||^2`` (see :class:`~warmup_monitor.stats.reference.ExactReference`);
- the block plan keeps its float32 block kernels and multiplies each block by a power of two,
  :attr:`BlockPlan.scale`, chosen from the previous step's norm (1 for norms in
  ``[2^-32, 2^32]``: then nothing changes); a step whose float32 sum still overflows (or, when
  scaled, underflows) is summed again in float64 from the gradients. That check reads one
  number of host memory per group and step: the plan runs on the CPU, so this is no device
  sync.

This module imports no Lightning.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from typing import TYPE_CHECKING, Literal, Protocol, cast

import torch
from torch import Tensor

# One C++ call that flattens and concatenates a list of tensors (what DDP and apex use).
from torch._utils import _flatten_dense_tensors as _flatten

if TYPE_CHECKING:
    from warmup_monitor.stats.layers import PlanGroups

Kernels = Literal["auto", "blocked", "foreach"]

#: Elements per block of the CPU plan. A block of gradient and one of reference (float32, 1 MiB
#: together) stay in cache between the operations on the block; each operation costs a few
#: microseconds of dispatch, a small part of a block's memory time.
BLOCK = 1 << 17
#: Alignment in bytes (a cache line) of each tensor or unit in a flat buffer.
#: Unaligned views cost about a third more time per pass on the CPU (measured).
_ALIGN_BYTES = 64


def local_tensor(t: Tensor) -> Tensor:
    """The locally held part of ``t``: the shard of a ``DTensor``, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a group of ``dtype`` is computed: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums of squares and dot products: float64, or float32 on MPS (no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def exact_sq(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Sum of squares of same-device tensors, every square and sum in ``dtype``.

    Elsewhere than on the CPU, ``torch._foreach_norm`` converts each element in registers (one
    pass, no copy). The CPU converts ``BLOCK``-element chunks, one at a time.
    """
    if not tensors:
        return torch.zeros((), dtype=dtype)
    if tensors[0].device.type != "cpu":
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
        return norms[0].square() if len(norms) == 1 else torch.stack(norms).square().sum()
    parts = []
    for t in tensors:
        for c in t.reshape(-1).split(BLOCK):
            c = c if c.dtype == dtype else c.to(dtype)  # one chunk at a time
            parts.append(torch.dot(c, c))
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=dtype)


def host_float(t: Tensor) -> float:
    """The value of a 0-d CPU tensor, read from host memory (no device, so no sync)."""
    return float(t.numpy())


def flat_sq(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum of squares of a 1-D tensor, accumulated in ``dtype``.

    On the CPU one norm kernel accumulates a whole tensor in a single pass (0.7% off at 50M
    float32 elements, measured), so the CPU sums dot products of ``BLOCK``-element chunks
    (about 3e-8 off at 50M).
    """
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dtype=dtype).square()
    parts = [torch.dot(c, c) for c in (x if x.dtype == dtype else x.to(dtype)).split(BLOCK)]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=dtype)


def sq_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
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
            flat_sq(t.reshape(-1), dtype) if b else next(small_sq)
            for t, b in zip(tensors, big, strict=True)
        ]
    )


class Reference(Protocol):
    """What a plan does with each piece of gradient: the exact or sketch reference, or nothing.

    The block plan calls :meth:`block_begin`, then per block :meth:`block_step` (or
    :meth:`block_clear` for a block of a tensor without gradient), then :meth:`block_end`. The
    foreach plan calls :meth:`foreach_step` once.
    """

    def block_begin(self) -> None:
        """Start a step of the block plan."""

    def block_step(self, j: int, raw: Tensor, x: Tensor) -> Tensor | None:
        """Take block ``j`` (``raw`` in its dtype, ``x`` the same in the compute dtype).

        Both are multiplied by the plan's scale; what is stored keeps it. Returns the block's
        dot product with the reference (as stored), or ``None`` if there is none.
        """

    def block_clear(self, j: int) -> None:
        """Block ``j`` is part of a tensor without gradient (a zero gradient)."""

    def block_end(self, sq: Tensor, dot: Tensor) -> tuple[Tensor, Tensor]:
        """Finish a step of the block plan: ``(sum_sq, dot)`` from the plan's unscaled sums."""

    def foreach_step(
        self, plan: ForeachPlan, gs: Sequence[Tensor | None], present: list[Tensor], sq: Tensor
    ) -> tuple[Tensor, Tensor]:
        """A whole step of the foreach plan: ``(sum_sq, dot)``.

        ``present`` are the gradients there are, ``sq`` their sum of squares.
        """


@dataclass
class Flat:
    """A flat buffer and its views, one per piece of a plan's :meth:`Plan.spans`."""

    data: Tensor
    views: list[Tensor]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class _Unit:
    """Consecutive tensors of a group handled together by the block plan.

    Either a run of whole tensors (flattened into one block) or one large tensor cut into
    ``BLOCK``-element chunks (one block each, views of the gradient: no copy).
    """

    first: int
    stop: int
    chunked: bool
    spans: list[tuple[int, int]]  # (virtual start, length) of each block


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


class Plan:
    """The local parameters of one device and dtype, as one virtual flat vector.

    Subclasses decide how the vector is walked. Layout order: tensors of at most a block first,
    then the larger ones.
    """

    def __init__(
        self, index: list[int], shapes: list[torch.Size], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.index = index  # positions in the caller's parameter list, in layout order
        self.shapes = shapes
        self.sizes = [s.numel() for s in shapes]
        self.offsets = [0, *accumulate(self.sizes)][: len(self.sizes)]
        self.device = device
        self.dtype = dtype
        #: Per-group sums (:mod:`~warmup_monitor.stats.layers`): how the pieces fall into
        #: groups, and the sums of the last pass asked for them (``groups=True``).
        self.groups: PlanGroups | None = None
        self.group_sums: Tensor | None = None

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return accumulate_dtype(self.device)

    def spans(self) -> list[tuple[int, int, torch.Size | None]]:
        """``(virtual start, length, shape)`` of each piece a step visits, in order."""
        raise NotImplementedError

    def flat(self, dtype: torch.dtype) -> Flat:
        """A zeroed flat buffer of the group's size, with a view per piece of :meth:`spans`.

        Each piece starts on a cache line.
        """
        raise NotImplementedError

    def grad_sums(
        self, gs: Sequence[Tensor | None], missing: bool, ref: Reference, groups: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(sum_sq, dot)`` of the gradients ``gs`` (layout order, ``None``: no gradient).

        With ``groups`` (and :attr:`groups` set), the same pass also leaves the sum of squares
        per group in :attr:`group_sums`; so do :meth:`copy_sq` and :meth:`diff_sq`.
        """
        raise NotImplementedError

    def copy_sq(self, ts: list[Tensor], buf: Flat, groups: bool = False) -> Tensor:
        """Copy ``ts`` (all the group's tensors) into ``buf``; return their sum of squares."""
        raise NotImplementedError

    def diff_sq(self, ts: list[Tensor], buf: Flat, groups: bool = False) -> Tensor:
        """The sum of squares of ``buf - ts`` (``buf`` may be overwritten)."""
        raise NotImplementedError

    def _aligned(self, dtype: torch.dtype, lengths: list[int]) -> tuple[Tensor, list[int]]:
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        starts: list[int] = []
        end = 0
        for length in lengths:
            starts.append(end)
            end += -(-length // align) * align
        return torch.zeros(end, dtype=dtype, device=self.device), starts


class ForeachPlan(Plan):
    """A step is a few foreach kernels over the tensor list (one launch each on a GPU)."""

    def spans(self) -> list[tuple[int, int, torch.Size | None]]:
        return list(zip(self.offsets, self.sizes, self.shapes, strict=True))

    def flat(self, dtype: torch.dtype) -> Flat:
        data, starts = self._aligned(dtype, self.sizes)
        views = [
            data[o : o + n].view(shape)
            for o, n, shape in zip(starts, self.sizes, self.shapes, strict=True)
        ]
        return Flat(data, views)

    def grad_sums(
        self, gs: Sequence[Tensor | None], missing: bool, ref: Reference, groups: bool = False
    ) -> tuple[Tensor, Tensor]:
        present = [t for t in gs if t is not None] if missing else cast(list[Tensor], gs)
        if groups and self.groups is not None and present:
            # The per-tensor norms of the same kernel, added per group.
            per = sq_norms(present, self.accumulate_dtype).to(self.device)
            mask = [t is not None for t in gs] if missing else None
            self.group_sums = self.groups.tensor_sums(per, mask)
            sq = per.sum()
        else:
            sq = exact_sq(present, self.accumulate_dtype).to(self.device)
            if groups and self.groups is not None:
                self.group_sums = torch.zeros(self.groups.n, dtype=sq.dtype, device=self.device)
        return ref.foreach_step(self, gs, present, sq)

    # The buffer's padding stays zero: one reduction over all of it.

    def copy_sq(self, ts: list[Tensor], buf: Flat, groups: bool = False) -> Tensor:
        torch._foreach_copy_(buf.views, ts)
        return self._views_sq(buf, groups)

    def diff_sq(self, ts: list[Tensor], buf: Flat, groups: bool = False) -> Tensor:
        torch._foreach_sub_(buf.views, ts)
        return self._views_sq(buf, groups)

    def _views_sq(self, buf: Flat, groups: bool) -> Tensor:
        if groups and self.groups is not None and buf.views:
            per = sq_norms(buf.views, self.compute_dtype)
            self.group_sums = self.groups.tensor_sums(per)
            return per.sum()
        return flat_sq(buf.data, self.compute_dtype)


#: Norms in ``[2^-_SCALE_FREE, 2^_SCALE_FREE]`` leave the block plan's float32 kernels unscaled.
_SCALE_FREE = 32
#: A scaled float32 sum below this lost its precision to underflow: sum again in float64.
_TINY_SUM = 2.0**-60


def _scale_for(sq: float, current: float) -> float:
    """The power of two that brings a norm of ``sqrt(sq)`` near 1 (1 if it already is near)."""
    if sq == 0.0:
        return 1.0
    if not math.isfinite(sq):  # non-finite gradients: keep the scale
        return current
    e = math.frexp(math.sqrt(sq))[1]
    return 1.0 if abs(e) <= _SCALE_FREE else math.ldexp(1.0, -e)


class BlockPlan(Plan):
    """A step walks the group in blocks of at most :data:`BLOCK` elements, each in cache.

    The gradients' float32 kernels run on each block multiplied by :attr:`scale`, a power of
    two set from the previous step's norm so that the block's squares stay well inside float32
    (see the module docstring). Scaling by a power of two is exact.
    """

    def __init__(
        self,
        index: list[int],
        shapes: list[torch.Size],
        device: torch.device,
        dtype: torch.dtype,
        block: int,
    ) -> None:
        super().__init__(index, shapes, device, dtype)
        self.block = block
        self.units = _plan_units(self.sizes, block)
        #: Multiplies the gradients in this step's float32 kernels.
        self.scale = 1.0
        # The scale of what the reference stores (the last step's), and whether host memory
        # can be read (a block plan forced onto another device neither rescales nor checks).
        self._stored_scale = 1.0
        self._host = device.type == "cpu"

    def spans(self) -> list[tuple[int, int, torch.Size | None]]:
        return [(v, n, None) for u in self.units for v, n in u.spans]

    def flat(self, dtype: torch.dtype) -> Flat:
        data, starts = self._aligned(dtype, [sum(n for _, n in u.spans) for u in self.units])
        views = [
            data[start + v - u.spans[0][0] : start + v - u.spans[0][0] + n]
            for start, u in zip(starts, self.units, strict=True)
            for v, n in u.spans
        ]
        return Flat(data, views)

    def sources(
        self, tensors: Sequence[Tensor | None], fill: Callable[[int], Tensor] | None
    ) -> Iterator[Tensor | None]:
        """Each block's data as a 1-D tensor, in plan order.

        A run of small tensors is flattened into one new tensor (one C++ call); a chunk of a
        large tensor is a view. A missing tensor in a run is replaced by ``fill(index)``; every
        chunk of a missing large tensor yields ``None``.
        """
        for unit in self.units:
            if unit.chunked:
                t = tensors[unit.first]
                if t is None:
                    yield from repeat(None, len(unit.spans))
                else:
                    yield from t.reshape(-1).split(self.block)
            else:
                run = tensors[unit.first : unit.stop]
                if fill is not None:
                    run = [t if t is not None else fill(unit.first + i) for i, t in enumerate(run)]
                yield _flatten(run)

    def _zeros(self, i: int) -> Tensor:
        return torch.zeros(self.shapes[i], dtype=self.dtype, device=self.device)

    def grad_sums(
        self, gs: Sequence[Tensor | None], missing: bool, ref: Reference, groups: bool = False
    ) -> tuple[Tensor, Tensor]:
        c = self.scale
        pg = self.groups if groups else None
        sq, dot = self._pass(gs, missing, ref, c, pg)
        if self._host:
            # One number read from host memory per step: the plan runs on the CPU, no sync.
            value = host_float(sq)
            scaled = value * c * c  # the float32 kernels' own sum
            if not math.isfinite(value) or 0.0 < scaled < _TINY_SUM or (scaled == 0.0 and c != 1.0):
                # Float32 did not hold this step (a jump of the norm): sum the gradients again
                # in float64, and store the reference at the scale they need.
                sq = exact_sq([t for t in gs if t is not None], torch.float64).to(sq.dtype)
                value = host_float(sq)
                self.scale = _scale_for(value, c)
                if math.isfinite(value):  # else the gradients themselves are not finite
                    self._pass(gs, missing, ref, self.scale, pg)
            else:
                self.scale = _scale_for(value, c)
        return ref.block_end(sq, dot)

    def _pass(
        self,
        gs: Sequence[Tensor | None],
        missing: bool,
        ref: Reference,
        c: float,
        pg: PlanGroups | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One walk over the blocks, each multiplied by ``c``; the sums, divided by it (with
        ``pg``, also the sums per group, in :attr:`group_sums`)."""
        cd, acc = self.compute_dtype, self.accumulate_dtype
        scratch = None
        ref.block_begin()
        if pg is not None:
            pg.begin()
        dots: list[Tensor] = []
        sqs: list[Tensor] = []
        # Every operation on a block runs while the block is in cache.
        for j, s in enumerate(self.sources(gs, self._zeros if missing else None)):
            if s is None:  # a chunk of a tensor without gradient
                ref.block_clear(j)
                continue
            if c == 1.0:
                x = s if s.dtype == cd else s.to(cd)
            else:
                if scratch is None:
                    scratch = torch.empty(min(self.block, self.numel), dtype=cd, device=self.device)
                x = s = torch.mul(s, c, out=scratch[: s.numel()])
            d = ref.block_step(j, s, x)
            if d is not None:
                dots.append(d)
            if pg is None:
                sqs.append(torch.dot(x, x))
            else:  # one dot product per group inside the block: the same pass
                pg.block(j, x, sqs)
        parts = torch.stack(sqs) if sqs else None
        sq = (
            parts.sum(dtype=acc)
            if parts is not None
            else torch.zeros((), dtype=acc, device=self.device)
        )
        if pg is not None:
            g = (
                pg.block_sums(parts, acc)
                if parts is not None
                else torch.zeros(pg.n, dtype=acc, device=self.device)
            )
            self.group_sums = g / (c * c) if c != 1.0 else g
        dot = torch.stack(dots).sum(dtype=acc) if dots else torch.zeros_like(sq)
        if c != 1.0 or self._stored_scale != 1.0:
            sq, dot = sq / (c * c), dot / (c * self._stored_scale)
        self._stored_scale = c
        return sq, dot

    def copy_sq(self, ts: list[Tensor], buf: Flat, groups: bool = False) -> Tensor:
        cd = self.compute_dtype
        pg = self.groups if groups else None
        if pg is not None:
            pg.begin()
        sqs: list[Tensor] = []
        for j, (s, view) in enumerate(zip(self.sources(ts, None), buf.views, strict=True)):
            assert s is not None
            view.copy_(s)
            sf = s if s.dtype == cd else s.to(cd)
            if pg is None:
                sqs.append(torch.dot(sf, sf))
            else:
                pg.block(j, sf, sqs)
        return self._block_total(sqs, pg)

    def _block_total(self, sqs: list[Tensor], pg: PlanGroups | None) -> Tensor:
        cd = self.compute_dtype
        if not sqs:
            if pg is not None:
                self.group_sums = torch.zeros(pg.n, dtype=cd, device=self.device)
            return torch.zeros((), dtype=cd, device=self.device)
        parts = torch.stack(sqs)
        if pg is not None:
            self.group_sums = pg.block_sums(parts, cd)
        return parts.sum()

    def diff_sq(self, ts: list[Tensor], buf: Flat, groups: bool = False) -> Tensor:
        # The difference goes to a block-sized scratch that stays in cache: the buffer is only
        # read, never written back.
        cd = self.compute_dtype
        pg = self.groups if groups else None
        if pg is not None:
            pg.begin()
        scratch = torch.empty(min(self.block, self.numel), dtype=cd, device=self.device)
        sqs: list[Tensor] = []
        for j, (s, view) in enumerate(zip(self.sources(ts, None), buf.views, strict=True)):
            assert s is not None
            d = scratch[: s.numel()]
            if s.dtype == cd:
                torch.sub(view, s, out=d)
            else:
                torch.sub(view.to(cd), s.to(cd), out=d)
            if pg is None:
                sqs.append(torch.dot(d, d))
            else:
                pg.block(j, d, sqs)
        return self._block_total(sqs, pg)


def make_plans(locals_: list[Tensor], kernels: Kernels, block: int | None = None) -> list[Plan]:
    """Group local tensors by (device, dtype) and give each group its plan.

    ``"auto"`` gives parameters on the CPU the block plan and the others the foreach plan.
    ``block`` defaults to :data:`BLOCK` (read at each call).
    """
    block = BLOCK if block is None else block
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(locals_):
        by_key[(t.device, t.dtype)].append(i)
    plans: list[Plan] = []
    for (device, dtype), index in by_key.items():
        # Layout order: tensors of at most a block first (they are flattened together in runs),
        # then the large ones (cut in chunks). Fewer, fuller blocks.
        index = sorted(index, key=lambda i: locals_[i].numel() > block)
        shapes = [locals_[i].shape for i in index]
        if kernels == "blocked" or (kernels == "auto" and device.type == "cpu"):
            plans.append(BlockPlan(index, shapes, device, dtype, block))
        else:
            plans.append(ForeachPlan(index, shapes, device, dtype))
    return plans

"""What the cosine compares with: the previous gradient, exactly or as a count sketch.

:class:`ExactReference` keeps the previous gradient in one flat buffer; :class:`SketchReference`
keeps a count sketch of it; :class:`NoReference` keeps nothing (cosine ``"off"``). Each serves
both kernel plans of :mod:`warmup_monitor.stats.plans` through the plans' ``Reference``
protocol.

This module imports no Lightning.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from warmup_monitor.stats.plans import Flat, ForeachPlan, Plan, exact_sq

#: Fewest buckets of a sketch. A group with at most this many elements gets one bucket per
#: element, which makes its sketch cosine exact.
MIN_BUCKETS = 1024
#: Bytes of sketch state per bucket: current and previous sketch plus 1.25 signs, all float32.
_SKETCH_BYTES_PER_BUCKET = 13


class NoReference:
    """Cosine ``"off"``: only the sum of squares is computed."""

    @property
    def nbytes(self) -> int:
        return 0

    def block_begin(self) -> None:
        pass

    def block_step(self, j: int, raw: Tensor, x: Tensor) -> Tensor | None:
        return None

    def block_clear(self, j: int) -> None:
        pass

    def block_end(self, sq: Tensor, dot: Tensor) -> tuple[Tensor, Tensor]:
        return sq, dot  # the plan's sum over no blocks: zero

    def foreach_step(
        self, plan: ForeachPlan, gs: Sequence[Tensor | None], present: list[Tensor], sq: Tensor
    ) -> tuple[Tensor, Tensor]:
        return sq, torch.zeros_like(sq)


class ExactReference:
    """The previous gradient in one flat buffer of ``dtype`` (the gradients' size, padded).

    The block plan takes the dot product of each block with the buffer and copies the block
    in, while the block is in cache. The foreach plan gets the dot product from the distance
    to the previous gradient ``r``, whose sum of squares it kept from the last step:

    .. math::

        \\langle g, r \\rangle = \\tfrac12 \\left(\\|g\\|^2 + \\|r\\|^2
                                      - \\|r - g\\|^2\\right)

    with ``r - g`` written into the buffer by one foreach subtraction (no float32 product of two
    gradients, which overflows from about 1.8e19) and its squares summed in float64; then the
    gradients are copied in: as many passes as a product and a sum. The differences are
    rounded to the buffer's dtype: an error in the cosine of the order of
    ``2^-24 (R + 1/R) / sqrt(n)`` for ``n`` float32 elements whose norm changed by a factor
    ``R`` since the last step (on 1M Gaussian elements, about 1e-10 at ``R = 1`` and 5e-5 at
    ``R = 1e6``, where float32 products are off by about 1e-8 at any ``R``). The block plan's
    products do not overflow (:class:`~warmup_monitor.stats.plans.BlockPlan` scales them).
    """

    def __init__(self, plan: Plan, dtype: torch.dtype) -> None:
        #: The reference dtype holds the gradient dtype exactly.
        self.lossless = torch.promote_types(plan.dtype, dtype) == dtype
        self.buf: Flat = plan.flat(dtype)
        # The buffer's sum of squares (foreach plan).
        self.sq = torch.zeros((), dtype=plan.accumulate_dtype, device=plan.device)

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    # ---- block plan

    def block_begin(self) -> None:
        pass

    def block_step(self, j: int, raw: Tensor, x: Tensor) -> Tensor | None:
        r = self.buf.views[j]
        d = torch.dot(x, r if r.dtype == x.dtype else r.to(x.dtype))
        r.copy_(raw)
        return d

    def block_clear(self, j: int) -> None:
        self.buf.views[j].zero_()  # a chunk of a tensor without gradient: the reference is 0

    def block_end(self, sq: Tensor, dot: Tensor) -> tuple[Tensor, Tensor]:
        return sq, dot

    # ---- foreach plan

    def foreach_step(
        self, plan: ForeachPlan, gs: Sequence[Tensor | None], present: list[Tensor], sq: Tensor
    ) -> tuple[Tensor, Tensor]:
        if not present:
            self.buf.data.zero_()
            self.sq = torch.zeros_like(sq)
            return sq, torch.zeros_like(sq)
        views, absent = self.buf.views, []
        if len(present) < len(views):
            absent = [r for r, t in zip(views, gs, strict=True) if t is None]
            views = [r for r, t in zip(views, gs, strict=True) if t is not None]
        acc = plan.accumulate_dtype
        torch._foreach_sub_(views, present)  # r - g; r where there is no gradient (g = 0)
        # The padding stays zero: one sum over the flat buffer.
        dot = (sq + self.sq - exact_sq([self.buf.data], acc)) / 2
        if absent:
            torch._foreach_zero_(absent)
        torch._foreach_copy_(views, present)
        # A lossless buffer now holds the gradients exactly; a rounded one is summed again.
        self.sq = sq if self.lossless else exact_sq([self.buf.data], acc)
        return sq, dot


@dataclass
class _Piece:
    """A contiguous stretch of a span that lands in one contiguous range of sketch buckets."""

    start: int  # offset in the span
    length: int
    whole: bool  # the piece is the whole span
    cur: Tensor  # view of the current sketch (shaped like the tensor when whole and shaped)
    sign: Tensor  # view of the sign table, shaped the same


class SketchReference:
    """A count sketch of the previous gradient in ``k`` buckets.

    Lay the local gradients of one device and dtype end to end in a fixed order (a virtual
    vector of ``n`` elements) and cut it into rounds of ``k`` elements. Element ``p`` goes to
    bucket ``p mod k`` with sign ``s[rho[p // k] + p mod k]``, where ``s`` is a fixed random sign
    table of ``1.25 k`` entries and ``rho`` one random offset per round (seeded by ``seed``):

    .. math::

        S(g)_b = \\textstyle\\sum_{p \\equiv b \\,(\\mathrm{mod}\\, k)} s_p\\, g_p, \\qquad
        \\widehat{\\cos}_t = \\frac{\\langle S(g_t), S(g_{t-1}) \\rangle}
                                  {\\|S(g_t)\\|\\,\\|S(g_{t-1})\\|}

    Colliding elements carry independent pseudo-random signs, so cross terms cancel in
    expectation, as in a count sketch with hashed buckets (measured: as accurate as one), while
    the hash needs no stored index: a round is a contiguous range of buckets, computed with one
    fused multiply-add per span (block or tensor) and round. The error of this ratio estimator
    is of the order of ``(1 - cos^2) / sqrt(k)``. ``k`` is chosen so that the current and
    previous sketch and the sign table (13 bytes a bucket) take ``fraction`` of the gradients'
    bytes, with at least :data:`MIN_BUCKETS` buckets (a group of at most that many elements is
    sketched one element a bucket: exactly).

    A step returns ``(sum_sq, ||g_t|| ||g_{t-1}|| cos_sketch)``: a dot product estimate that
    adds across shards like the exact one.
    """

    def __init__(self, plan: Plan, fraction: float, seed: int) -> None:
        n = plan.numel
        budget = int(fraction * n * plan.dtype.itemsize) // _SKETCH_BYTES_PER_BUCKET
        k = max(1, min(n, max(MIN_BUCKETS, budget)))
        spread = k // 4
        rounds = -(-n // k)
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (k + spread,), generator=gen, dtype=torch.int8)
        # Offsets drawn in Python: no tensor is read back to the host, even once.
        offsets = random.Random(seed)
        rho = [offsets.randint(0, spread) for _ in range(rounds)]
        self.buckets = k
        self.signs = (signs.to(torch.float32) * 2 - 1).to(plan.device)
        # The current and the previous sketch, rows of one tensor: one conversion and one
        # matrix-vector product give both sums of the estimate.
        self.sketches = torch.zeros(2, k, dtype=torch.float32, device=plan.device)
        self.cur, self.prev = self.sketches.unbind()
        self.prev_sq = torch.zeros((), dtype=plan.accumulate_dtype, device=plan.device)
        self.prev_sketch_sq = torch.zeros((), dtype=plan.accumulate_dtype, device=plan.device)

        # Per span of the plan: its pieces, each within one round.
        self.pieces: list[list[_Piece]] = []
        by_round: dict[int, list[tuple[int, _Piece]]] = defaultdict(list)
        for i, (v0, length, shape) in enumerate(plan.spans()):
            stretches = []
            v, end = v0, v0 + length
            while v < end:
                r, b = divmod(v, k)
                stop = min(end, (r + 1) * k)
                stretches.append((r, v, stop - v, b, rho[r] + b))
                v = stop
            whole = len(stretches) == 1
            pieces = []
            for r, v, m, b, s in stretches:
                cur, sign = self.cur[b : b + m], self.signs[s : s + m]
                if whole and shape is not None:
                    cur, sign = cur.view(shape), sign.view(shape)
                piece = _Piece(v - v0, m, whole, cur, sign)
                pieces.append(piece)
                by_round[r].append((i, piece))
            self.pieces.append(pieces)
        #: The foreach plan's calls: per round, (tensor index, piece). Buckets are distinct
        #: within a round: no aliasing inside one foreach call.
        self.rounds = [by_round[r] for r in sorted(by_round)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sketches, self.signs))

    # ---- block plan

    def block_begin(self) -> None:
        self.cur.zero_()

    def block_step(self, j: int, raw: Tensor, x: Tensor) -> Tensor | None:
        for pc in self.pieces[j]:
            src = raw if pc.whole else raw[pc.start : pc.start + pc.length]
            pc.cur.addcmul_(src, pc.sign)
        return None

    def block_clear(self, j: int) -> None:
        pass

    def block_end(self, sq: Tensor, dot: Tensor) -> tuple[Tensor, Tensor]:
        return self.estimate(sq)

    # ---- foreach plan

    def foreach_step(
        self, plan: ForeachPlan, gs: Sequence[Tensor | None], present: list[Tensor], sq: Tensor
    ) -> tuple[Tensor, Tensor]:
        self.cur.zero_()
        flat: dict[int, Tensor] = {}
        for items in self.rounds:
            curs, srcs, signs = [], [], []
            for i, pc in items:
                t = gs[i]
                if t is None:
                    continue
                if not pc.whole:
                    if i not in flat:
                        flat[i] = t.reshape(-1)
                    t = flat[i][pc.start : pc.start + pc.length]
                curs.append(pc.cur)
                srcs.append(t)
                signs.append(pc.sign)
            if srcs:
                torch._foreach_addcmul_(curs, srcs, signs)
        return self.estimate(sq)

    # ---- the estimate

    def estimate(self, sq: Tensor) -> tuple[Tensor, Tensor]:
        """``(sq, ||g_t|| ||g_{t-1}|| cos(S_t, S_{t-1}))``; rolls the sketch.

        The sketch's products are summed in ``sq``'s dtype (float64 but on MPS). The ratio does
        not depend on the sketch's scale: the block plan may sketch scaled gradients.
        """
        both = self.sketches.to(sq.dtype)
        sketch_sq, sketch_dot = torch.mv(both, both[0]).unbind()
        den = (sketch_sq * self.prev_sketch_sq).sqrt()
        scale = (sq * self.prev_sq).sqrt()
        dot = torch.where(den > 0, sketch_dot * (scale / den), torch.zeros_like(den))
        self.prev_sq, self.prev_sketch_sq = sq, sketch_sq
        self.prev.copy_(self.cur)  # k elements: a fraction of a percent of the gradients
        return sq, dot

"""GradientStats and UpdateRatio against independent computations, in every mode and kernel plan.

References are computed here in float64 from the gradients themselves
(``torch.nn.utils.get_total_norm``, ``F.cosine_similarity`` of the flattened gradients). The
sketch's accuracy is checked on real gradients of the example's character transformer over
consecutive steps of real training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import load_example
from torch.utils._python_dispatch import TorchDispatchMode

from warmup_monitor.stats import GradientStats, UpdateRatio
from warmup_monitor.stats import plans as stats_module
from warmup_monitor.stats.plans import BLOCK
from warmup_monitor.stats.reference import MIN_BUCKETS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_transformer.py"
PLANS = ["blocked", "foreach"]

# Shapes that exercise every part of the plans: a run of small tensors, a tensor of exactly one
# block, tensors cut in several chunks (one not a multiple of the block), a zero-size tensor.
SHAPES: list[tuple[int, ...]] = [
    (300, 400),
    (400,),
    (BLOCK,),
    (5, 7),
    (2 * BLOCK + 123,),
    (0,),
    (33,),
    (700, 190),
]


def _params(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype] | None = None) -> list[Any]:
    dtypes = dtypes or [torch.float32] * len(shapes)
    return [
        torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in zip(shapes, dtypes, strict=True)
    ]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _set_grads(params: list[Any], grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Assign ``grads`` (None = no gradient); return them with zeros in place of None."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)]


def _correlated_steps(
    params: list[Any], n: int, seed: int = 0, keep: float = 0.8
) -> list[list[torch.Tensor]]:
    """``n`` steps of gradients, each step ``keep`` x the previous one plus fresh noise."""
    gen = torch.Generator().manual_seed(seed)
    steps: list[list[torch.Tensor]] = []
    for _ in range(n):
        fresh = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        if steps:
            fresh = [
                (keep * a.double() + b.double()).to(b.dtype)
                for a, b in zip(steps[-1], fresh, strict=True)
            ]
        steps.append(fresh)
    return steps


def _step(stats: GradientStats) -> tuple[float, float]:
    norm, cos = stats.finish(stats.local_sums()).tolist()
    return norm, cos


def _expected(grads: list[torch.Tensor], prev: list[torch.Tensor] | None) -> tuple[float, float]:
    norm = torch.nn.utils.get_total_norm([g.double() for g in grads]).item()
    if prev is None:
        return norm, math.nan
    return norm, F.cosine_similarity(_flat(grads), _flat(prev), dim=0).item()


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("cosine", ["exact", "off"])
def test_norm_and_cosine_match_independent_computation(plan: str, cosine: str) -> None:
    params = _params(SHAPES)
    stats = GradientStats(params, cosine=cosine, kernels=plan)  # type: ignore[arg-type]
    prev = None
    for grads in _correlated_steps(params, 5):
        _set_grads(params, list(grads))
        norm, cos = _step(stats)
        exp_norm, exp_cos = _expected(grads, prev)
        assert norm == pytest.approx(exp_norm, rel=1e-6)
        if cosine == "off" or prev is None:
            assert math.isnan(cos)
        else:
            assert cos == pytest.approx(exp_cos, abs=1e-6)
        prev = grads
    assert stats.last_grad_count == len(params)
    if cosine == "exact":  # one reference of the gradients' size (plus cache-line padding)
        assert stats.grad_bytes <= stats.memory_bytes <= stats.grad_bytes + 64 * len(params)
    else:
        assert stats.memory_bytes == 0


@pytest.mark.parametrize("plan", PLANS)
def test_mixed_dtypes_and_missing_gradients(plan: str) -> None:
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.bfloat16]
    shapes: list[tuple[int, ...]] = [(300, 400), (BLOCK + 5,), (64, 3), (17,), (20, 20)]
    params = _params(shapes, dtypes)
    stats = GradientStats(params, kernels=plan)  # type: ignore[arg-type]
    steps = _correlated_steps(params, 6, seed=1)
    prev = None
    for t, grads in enumerate(steps):
        given: list[torch.Tensor | None] = list(grads)
        if t in (2, 3):
            given[1] = None  # a large bf16 tensor without gradient: counts as zero
        if t == 3:
            given[3] = None  # and a small one in a run
        filled = _set_grads(params, given)
        norm, cos = _step(stats)
        exp_norm, exp_cos = _expected(filled, prev)
        assert stats.last_grad_count == sum(g is not None for g in given)
        assert norm == pytest.approx(exp_norm, rel=1e-5)
        if prev is None:
            assert math.isnan(cos)
        else:
            # The foreach plan subtracts bf16 gradients from their bf16 reference in bf16.
            assert cos == pytest.approx(exp_cos, abs=1e-5 if plan == "blocked" else 1e-4)
        prev = filled


@pytest.mark.parametrize("plan", PLANS)
def test_skipped_step_keeps_the_reference(plan: str) -> None:
    params = _params([(50, 40), (BLOCK + 1,)])
    stats = GradientStats(params, kernels=plan)  # type: ignore[arg-type]
    g0, g1 = _correlated_steps(params, 2)
    _set_grads(params, list(g0))
    _step(stats)
    _set_grads(params, [None, None])  # training_step returned None: no gradient at all
    norm, cos = _step(stats)
    assert stats.last_grad_count == 0 and norm == 0.0 and math.isnan(cos)
    _set_grads(params, list(g1))
    _, cos = _step(stats)
    assert cos == pytest.approx(_expected(g1, g0)[1], abs=1e-6)  # compared with g0


@pytest.mark.parametrize("plan", PLANS)
def test_bf16_reference_halves_memory_within_rounding(plan: str) -> None:
    params = _params(SHAPES)
    stats = GradientStats(params, reference_dtype=torch.bfloat16, kernels=plan)  # type: ignore[arg-type]
    prev = None
    for grads in _correlated_steps(params, 4, seed=2):
        _set_grads(params, list(grads))
        norm, cos = _step(stats)
        exp_norm, exp_cos = _expected(grads, prev)
        assert norm == pytest.approx(exp_norm, rel=1e-6)  # the norm reads the gradient itself
        if prev is not None:
            assert cos == pytest.approx(exp_cos, abs=2e-3)
        prev = grads
    assert stats.memory_bytes <= stats.grad_bytes / 2 + 64 * len(params)


def test_sum_of_squares_stays_exact_on_large_tensors() -> None:
    # One CPU norm kernel over millions of float32 elements drifts (9e-5 at 2.4M, 0.7% at 50M);
    # the blocked sums must not.
    gen = torch.Generator().manual_seed(3)
    params = _params([(3_000_000,)])
    grads = [torch.randn(3_000_000, generator=gen) * 3]
    expected = _flat(grads).norm().item()
    for cosine in ("exact", "off", "sketch"):
        for plan in PLANS:
            _set_grads(params, list(grads))
            stats = GradientStats(params, cosine=cosine, kernels=plan)  # type: ignore[arg-type]
            assert _step(stats)[0] == pytest.approx(expected, rel=2e-7)
    upd = UpdateRatio(params)
    with torch.no_grad():
        params[0].copy_(grads[0])
    upd.snapshot()
    with torch.no_grad():
        params[0].mul_(1.5)
    sums = upd.local_sums()
    assert sums is not None
    assert UpdateRatio.finish(sums).item() == pytest.approx(0.5, rel=1e-6)


def test_sparse_gradients_are_densified() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    lin = torch.nn.Linear(8, 1)
    params = [*emb.parameters(), *lin.parameters()]
    stats = GradientStats(params)
    prev = None
    for t in range(3):
        for p in params:
            p.grad = None
        lin(emb(torch.tensor([t, 3, 3, 7 + t]))).sum().backward()
        assert emb.weight.grad is not None and emb.weight.grad.is_sparse
        dense = [p.grad.to_dense() for p in params]  # type: ignore[union-attr]
        norm, cos = _step(stats)
        exp_norm, exp_cos = _expected(dense, prev)
        assert norm == pytest.approx(exp_norm, rel=1e-6)
        if prev is not None:
            assert cos == pytest.approx(exp_cos, abs=1e-6)
        prev = dense


def test_forget_and_release() -> None:
    params = _params([(30, 20), (BLOCK + 3,)])
    stats = GradientStats(params)
    steps = _correlated_steps(params, 6, seed=4)
    _set_grads(params, list(steps[0]))
    assert stats.memory_bytes == 0  # buffers are built at the first step
    _step(stats)
    held = stats.memory_bytes
    assert held >= stats.grad_bytes
    _set_grads(params, list(steps[1]))
    assert not math.isnan(_step(stats)[1])

    stats.forget()  # after a resume: the reference is stale
    _set_grads(params, list(steps[2]))
    assert math.isnan(_step(stats)[1])
    _set_grads(params, list(steps[3]))
    assert _step(stats)[1] == pytest.approx(_expected(steps[3], steps[2])[1], abs=1e-6)

    stats.release()  # end of the monitoring window
    assert stats.memory_bytes == 0
    _set_grads(params, list(steps[4]))
    norm, cos = _step(stats)  # rebuilt on use; the cosine restarts
    assert math.isnan(cos) and norm == pytest.approx(_expected(steps[4], None)[0], rel=1e-6)
    assert stats.memory_bytes == held
    _set_grads(params, list(steps[5]))
    assert _step(stats)[1] == pytest.approx(_expected(steps[5], steps[4])[1], abs=1e-6)


@pytest.mark.parametrize("plan", PLANS)
def test_per_tensor_norms(plan: str) -> None:
    params = _params(SHAPES)
    stats = GradientStats(params, kernels=plan)  # type: ignore[arg-type]
    grads: list[torch.Tensor | None] = list(_correlated_steps(params, 1, seed=5)[0])
    grads[1] = None
    filled = _set_grads(params, grads)
    stats.local_sums()
    sq = stats.per_tensor_sq_norms()
    assert sq.shape == (len(params),) and sq.dtype == torch.float32
    expected = torch.stack([g.double().square().sum() for g in filled])
    torch.testing.assert_close(sq.double(), expected, rtol=5e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Sketch
# --------------------------------------------------------------------------------------------


def test_sketch_plans_agree_and_memory_is_within_budget() -> None:
    params = _params(SHAPES)
    blocked = GradientStats(params, cosine="sketch", kernels="blocked")
    foreach = GradientStats(params, cosine="sketch", kernels="foreach")
    for grads in _correlated_steps(params, 4, seed=6):
        _set_grads(params, list(grads))
        a, b = _step(blocked), _step(foreach)
        assert a[0] == pytest.approx(b[0], rel=1e-6)
        assert a[1] == pytest.approx(b[1], abs=1e-5) or (math.isnan(a[1]) and math.isnan(b[1]))
    for stats in (blocked, foreach):
        assert stats.sketch_buckets > MIN_BUCKETS
        assert stats.memory_bytes <= 0.02 * stats.grad_bytes


def test_sketch_is_exact_for_groups_of_at_most_min_buckets_elements() -> None:
    params = _params([(20, 30), (30,), (7, 11)])  # 707 elements <= MIN_BUCKETS
    stats = GradientStats(params, cosine="sketch")
    prev = None
    for grads in _correlated_steps(params, 4, seed=7, keep=-0.5):
        _set_grads(params, list(grads))
        _, cos = _step(stats)
        if prev is not None:
            assert cos == pytest.approx(_expected(grads, prev)[1], abs=1e-6)
        prev = grads
    assert stats.sketch_buckets == 707


def test_sketch_sums_add_across_shards() -> None:
    # Two "ranks" each hold half of the parameters (a shard each), with their own seeds: the
    # sum of their local [sum_sq, dot] gives the global norm and an estimate of the cosine.
    params = _params([(400, 300), (300,), (500, 200), (200,)])
    ranks = [
        GradientStats(params[:2], cosine="sketch", sketch_seed=0),
        GradientStats(params[2:], cosine="sketch", sketch_seed=1),
    ]
    whole = GradientStats(params, cosine="exact")
    for grads in _correlated_steps(params, 5, seed=8):
        _set_grads(params, list(grads))
        sums = ranks[0].local_sums() + ranks[1].local_sums()
        results = [r.finish(sums).tolist() for r in ranks]
        norm, cos = _step(whole)
        for r_norm, r_cos in results:
            assert r_norm == pytest.approx(norm, rel=1e-6)
            assert r_cos == pytest.approx(cos, abs=0.05) or (math.isnan(r_cos) and math.isnan(cos))


@pytest.fixture(scope="module")
def example() -> ModuleType:
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE.name} is not in the tree")
    return load_example(EXAMPLE.name)


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread: on a shared machine, spinning OpenMP threads slow a step 3x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sketch_cosine_on_real_transformer_gradients(example: ModuleType, one_thread: Any) -> None:
    """|sketch - exact| <= 0.05 at every step of real training of the example's model, at 2%."""
    torch.manual_seed(0)
    corpus = example.CharCorpus.from_text(example.load_stdlib_text(200_000), 0.05)
    model = example.CharTransformer(len(corpus.vocab), 128, 128, 4, 4)  # the example's shape
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = iter(example.RandomWindows(corpus.train_ids, 128, 8, seed=0))
    sketch = GradientStats(params, cosine="sketch")
    exact = GradientStats(params, cosine="exact")
    errors = []
    prev: list[torch.Tensor] | None = None
    for step in range(24):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 10)  # warmup, then a lr hot enough to swing
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        s_norm, s_cos = _step(sketch)
        e_norm, e_cos = _step(exact)
        assert s_norm == pytest.approx(e_norm, rel=1e-6)
        if prev is not None:
            independent = F.cosine_similarity(_flat(grads), _flat(prev), dim=0).item()
            assert e_cos == pytest.approx(independent, abs=1e-5)
            errors.append(abs(s_cos - e_cos))
        prev = grads
        opt.step()
    assert max(errors) <= 0.05, errors
    assert sketch.memory_bytes <= 0.02 * sketch.grad_bytes
    assert sketch.sketch_buckets >= 4000  # ~5000 buckets for these 822K parameters


# --------------------------------------------------------------------------------------------
# Finite gradients whose float32 squares overflow (a loss scaled by 1e20)
# --------------------------------------------------------------------------------------------

# A run of small tensors, a tensor cut in chunks, a small tensor after it.
HUGE_SHAPES: list[tuple[int, ...]] = [(200, 150), (BLOCK + 9,), (33,)]


def _scaled_steps(
    params: list[Any], scales: list[float], seed: int, keep: float = 0.8
) -> list[list[torch.Tensor]]:
    """Correlated float32 gradients, step ``t`` multiplied by ``scales[t]`` (all finite)."""
    steps = _correlated_steps(params, len(scales), seed=seed, keep=keep)
    out = [
        [(g.double() * c).float() for g in grads] for grads, c in zip(steps, scales, strict=True)
    ]
    assert all(torch.isfinite(g).all() for grads in out for g in grads)
    return out


def _exact64(grads: list[torch.Tensor], prev: list[torch.Tensor] | None) -> tuple[float, float]:
    """Norm and cosine of float64 copies, with torch's own float64 functions."""
    flat = _flat(grads)
    norm = torch.linalg.vector_norm(flat).item()
    if prev is None:
        return norm, math.nan
    other = _flat(prev)
    return norm, (torch.dot(flat, other) / (norm * torch.linalg.vector_norm(other))).item()


def _check_run(stats: GradientStats, params: list[Any], steps: list[list[torch.Tensor]]) -> None:
    prev = None
    for grads in steps:
        _set_grads(params, list(grads))
        sums = stats.local_sums()
        assert sums.dtype == torch.float64  # float32 cannot hold the sum of squares
        norm, cos = stats.finish(sums).tolist()
        exp_norm, exp_cos = _exact64(grads, prev)
        assert norm == pytest.approx(exp_norm, rel=1e-6)
        if stats.cosine == "off" or prev is None:
            assert math.isnan(cos)
        else:
            assert cos == pytest.approx(exp_cos, abs=1e-6)
        prev = grads


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("cosine", ["exact", "off"])
def test_huge_finite_gradients_give_the_exact_norm_and_cosine(plan: str, cosine: str) -> None:
    # Gradients of 1e20 to 1e30: their float32 squares overflow, the float64 values do not.
    params = _params(HUGE_SHAPES)
    stats = GradientStats(params, cosine=cosine, kernels=plan)  # type: ignore[arg-type]
    _check_run(stats, params, _scaled_steps(params, [1e20, 1e20, 3e20, 1e21, 2e20], seed=13))
    stats.release()  # rebuilt at the next step, in a steady 1e30 regime from its first step
    _check_run(stats, params, _scaled_steps(params, [1e30, 1e30, 5e29, 1e30], seed=14))


@pytest.mark.parametrize("plan", PLANS)
def test_huge_finite_gradients_in_sketch_mode(plan: str) -> None:
    # A group of at most MIN_BUCKETS elements is sketched exactly: the exact float64 cosine.
    small = _params([(20, 30), (30,), (7, 11)])
    stats = GradientStats(small, cosine="sketch", kernels=plan)  # type: ignore[arg-type]
    _check_run(stats, small, _scaled_steps(small, [1e20, 2e20, 1e20, 1e30, 1e30], seed=15))
    # A larger group: the norm is exact, and the estimate is the same as for the gradients
    # divided by their scale (the sketch's estimate does not depend on the scale).
    params = _params(HUGE_SHAPES)
    huge = GradientStats(params, cosine="sketch", kernels=plan)  # type: ignore[arg-type]
    unit = GradientStats(params, cosine="sketch", kernels=plan)  # type: ignore[arg-type]
    scales = [1e20, 1e20, 3e20, 1e30, 1e30]
    for c, grads in zip(scales, _scaled_steps(params, scales, seed=16), strict=True):
        _set_grads(params, list(grads))
        norm, cos = _step(huge)
        assert norm == pytest.approx(_exact64(grads, None)[0], rel=1e-6)
        _set_grads(params, [(g.double() / c).float() for g in grads])
        _, unit_cos = _step(unit)
        assert cos == pytest.approx(unit_cos, abs=1e-6) or (
            math.isnan(cos) and math.isnan(unit_cos)
        )


def test_block_plan_follows_jumps_of_the_norm() -> None:
    # From ordinary gradients to 1e20 and 1e30, down to 1e-20 and back, in single steps: the
    # CPU plan rescales its float32 blocks, and sums again in float64 a step whose float32 sum
    # overflowed or underflowed.
    params = _params(HUGE_SHAPES)
    scales = [1.0, 1e20, 1e30, 1.0, 1e-20, 1.0, 1e25, 1e25, 1.0]
    for cosine in ("exact", "off"):
        stats = GradientStats(params, cosine=cosine, kernels="blocked")  # type: ignore[arg-type]
        _check_run(stats, params, _scaled_steps(params, scales, seed=17))


# --------------------------------------------------------------------------------------------
# Update ratio, host syncs, construction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS)
def test_update_ratio_matches_independent_computation(plan: str) -> None:
    params = _params(
        [(300, 400), (BLOCK + 9,), (5,)], [torch.float32, torch.float32, torch.bfloat16]
    )
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen))
    upd = UpdateRatio(params, kernels=plan)  # type: ignore[arg-type]
    assert upd.local_sums() is None and not upd.has_snapshot
    for _ in range(2):
        before = [p.detach().clone() for p in params]
        upd.snapshot()
        assert upd.has_snapshot
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        sums = upd.local_sums()
        assert sums is not None
        after = [p.detach() for p in params]
        expected = ((_flat(after) - _flat(before)).norm() / _flat(before).norm()).item()
        assert UpdateRatio.finish(sums).item() == pytest.approx(expected, rel=1e-5)
    size = sum(p.numel() * p.element_size() for p in params)
    assert size <= upd.memory_bytes <= size + 64 * len(params)
    upd.release()
    assert upd.memory_bytes == 0 and not upd.has_snapshot


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func) in {"aten._local_scalar_dense.default", "aten.item.default"}:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cosine", ["exact", "sketch", "off"])
@pytest.mark.parametrize("plan", PLANS)
def test_no_host_reads(cosine: str, plan: str, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(SHAPES)
    stats = GradientStats(params, cosine=cosine, kernels=plan)  # type: ignore[arg-type]
    upd = UpdateRatio(params)
    counter = _SyncCounter()
    tolist = torch.Tensor.tolist  # reads without dispatching an op: spied on instead

    def counting_tolist(self: torch.Tensor) -> Any:
        counter.count += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    with counter:
        for grads in _correlated_steps(params, 3, seed=10):
            _set_grads(params, list(grads))
            stats.finish(stats.local_sums())
            stats.per_tensor_sq_norms()
            upd.snapshot()
            upd.local_sums()
    monkeypatch.undo()
    assert counter.count == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cosine": "fast"}, ValueError, "cosine"),
        ({"kernels": "cuda"}, ValueError, "kernels"),
        ({"sketch_fraction": 0.0}, ValueError, "sketch_fraction"),
        ({"sketch_fraction": 1.5}, ValueError, "sketch_fraction"),
        ({"sketch_fraction": "2%"}, TypeError, "sketch_fraction"),
        ({"sketch_seed": -1}, ValueError, "sketch_seed"),
        ({"reference_dtype": "bfloat16"}, TypeError, "reference_dtype"),
        ({"reference_dtype": torch.int8}, ValueError, "reference_dtype"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GradientStats(_params([(3,)]), **kwargs)


def test_block_size_is_what_the_plan_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan reads BLOCK at build time and at every step: a smaller block gives the same values.
    params = _params([(100, 90), (2000,)])
    reference = GradientStats(params)
    monkeypatch.setattr(stats_module, "BLOCK", 256)
    small_blocks = GradientStats(params)
    check: Callable[[float, float], bool] = lambda a, b: a == pytest.approx(b, rel=1e-6)  # noqa: E731
    for grads in _correlated_steps(params, 3, seed=11):
        _set_grads(params, list(grads))
        a, b = _step(reference), _step(small_blocks)
        assert check(a[0], b[0])
        assert math.isnan(a[1]) == math.isnan(b[1])
        if not math.isnan(a[1]):
            assert a[1] == pytest.approx(b[1], abs=1e-6)


def test_a_loss_scaled_by_1e20_gives_finite_norms_and_no_alert_in_a_loop() -> None:
    """Issue 15 item 10 end to end: finite gradients of ~1e20 are not `non_finite`."""
    from warmup_monitor.loop import LoopMonitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    alerts: list = []
    monitor = LoopMonitor(opt, warmup_steps=6, on_alert=alerts.append)
    logged: dict[int, float] = {}
    monitor.engine.metrics_sinks.append(
        lambda m, step: logged.update({step: m["warmup/grad_norm"]})
    )
    norms = []
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(x), y) * 1e20
        loss.backward()
        grads = [p.grad.double() for p in model.parameters()]
        norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()
    monitor.close()
    assert [a.kind for a in alerts if a.kind == "non_finite"] == []
    assert all(math.isfinite(n) and n > 1e18 for n in norms)
    assert [logged[t] for t in range(6)] == pytest.approx(norms, rel=1e-5)

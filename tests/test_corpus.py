"""The corpus of real training runs (benchmarks/corpus): the label rules on hand-made traces,
the committed index, and the training loop's hook contract."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CORPUS = Path(__file__).resolve().parents[1] / "benchmarks" / "corpus"
sys.path.insert(0, str(CORPUS))

import labels  # noqa: E402
from traces import load_corpus  # noqa: E402

LABELS = ("healthy", "spiky", "failing", "silent", "unclear")


def _run(rid: str, loss: list[float], seed: int = 0, cell: str = "c", family: str = "f") -> Any:
    diverged = not all(math.isfinite(x) for x in loss)
    rec = {"id": rid, "family": family, "cell": cell, "seed": seed, "steps": 20,
           "diverged": diverged}  # fmt: skip
    return rec, {"loss": np.asarray(loss, dtype=np.float64)}


def _label(arms: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    recs, traces = [], {}
    for rid, loss in arms.items():
        rec, tr = _run(rid, loss)
        recs.append(rec)
        traces[rid] = tr
    return {r["id"]: r for r in labels.assign_labels(recs, traces)}


def test_trailing_median_deadline() -> None:
    # m[t] = median(loss[max(0, t-4)..t]); the deadline is the first t with
    # m[t] > 2 x min(m[0..t-1]), or the first non-finite loss.
    flat_then_jump = [1.0] * 5 + [3.0] * 5
    m = labels.trailing_median(flat_then_jump)
    assert m[5] == 1.0 and m[6] == 1.0 and m[7] == 3.0
    assert labels.spike_step(flat_then_jump) == 7
    # A one- or two-step spike does not move a median of 5.
    assert labels.spike_step([1.0] * 5 + [50.0, 50.0] + [1.0] * 5) is None
    # The minimum is over the earlier medians: a fall then a rise to 2.5 x the low.
    assert labels.spike_step([4.0] * 5 + [1.0] * 5 + [2.5] * 5) == 12
    assert labels.spike_step([4.0] * 5 + [1.0] * 5 + [2.5] * 5, factor=1.5) == 12
    assert labels.spike_step([1.0] * 5 + [1.8] * 5) is None
    assert labels.spike_step([1.0] * 5 + [1.8] * 5, factor=1.5) == 7
    # Non-finite: the step of the NaN (or of a non-finite gradient norm).
    assert labels.spike_step([1.0, 0.9, 0.8, math.nan]) == 3
    assert labels.spike_step([1.0, 0.9, 0.8], grad_norm=[1.0, math.inf, 1.0]) == 1


def test_label_rules() -> None:
    base = [2.0] * 19
    out = _label({
        "best": [*base, 1.00],
        "one_pct": [*base, 1.01],           # <= 1.02 x best: healthy
        "three_pct": [*base, 1.03],         # between 1.02 and 1.05: unclear
        "ten_pct": [*base, 1.10],           # > 1.05 and no spike: silent
        "spiky": [1.0] * 5 + [2.5] * 14 + [1.10],  # > 1.05 and a visible spike: failing
        "nan": [2.0, 1.5, math.nan],        # non-finite: failing
    })  # fmt: skip
    got = {k: v["label"] for k, v in out.items()}
    assert got == {"best": "healthy", "one_pct": "healthy", "three_pct": "unclear",
                   "ten_pct": "silent", "spiky": "failing", "nan": "failing"}  # fmt: skip
    assert out["nan"]["final_loss"] == math.inf and out["nan"]["deadline_step"] == 2
    assert out["spiky"]["deadline_step"] == 7 and out["ten_pct"]["deadline_step"] is None
    # final loss = the mean of the last 5 % of the planned steps (1 of 20 here).
    assert out["three_pct"]["final_loss"] == pytest.approx(1.03)
    # A spike that recovers within 2 % of the best arm is not healthy: spiky (the cell is
    # unstable at every warmup).
    assert _label({"a": [*base, 1.0], "b": [1.0] * 5 + [2.5] * 14 + [1.01]})["b"]["label"] == (
        "spiky"
    )


def test_best_arm_and_all_diverged() -> None:
    # The best arm diverged: the others are compared with the best finite arm.
    out = _label({"nan": [1.0, math.nan], "a": [2.0] * 19 + [1.0], "b": [2.0] * 19 + [1.2]})
    assert [out[k]["label"] for k in ("nan", "a", "b")] == ["failing", "healthy", "silent"]
    # Every arm diverged: all failing.
    out = _label({"x": [1.0, math.inf], "y": [1.0, 2.0, math.nan]})
    assert {v["label"] for v in out.values()} == {"failing"}
    # Arms are compared within their own seed only.
    recs, traces = [], {}
    for rid, seed, last in (("s0a", 0, 1.0), ("s0b", 0, 1.01), ("s1a", 1, 0.5), ("s1b", 1, 0.6)):
        rec, tr = _run(rid, [2.0] * 19 + [last], seed=seed)
        recs.append(rec)
        traces[rid] = tr
    got = {r["id"]: r["label"] for r in labels.assign_labels(recs, traces)}
    assert got == {"s0a": "healthy", "s0b": "healthy", "s1a": "healthy", "s1b": "silent"}


def test_split_rule() -> None:
    for fam in labels.REPORT_FAMILIES:
        assert {labels.split_of(fam, s) for s in (0, 1, 2)} == {"report"}
    assert [labels.split_of("cnn_digits", s) for s in (0, 1, 2)] == [
        "calibrate", "calibrate", "report",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpus() -> list[Any]:
    return load_corpus()


def test_committed_corpus(corpus: list[Any]) -> None:
    assert len(corpus) >= 150
    families = {r.family for r in corpus}
    assert len(families) >= 8
    assert {r.data for r in corpus} == {"vision", "text", "tabular"}
    assert {r.optimizer for r in corpus} == {"sgd", "sgdm", "adam", "adamw"}
    assert {r.warmup_arm for r in corpus} == {"none", "short", "long"}
    assert {r.seed for r in corpus} == {0, 1, 2}
    counts = Counter(r.label for r in corpus)
    assert set(counts) <= set(LABELS) and sum(counts.values()) == len(corpus)
    assert counts["healthy"] > 0 and counts["failing"] > 0 and counts["silent"] > 0
    for r in corpus:
        n = r.steps_done
        assert len(r.loss) == len(r.lr_trace) == len(r.grad_norm) == len(r.update_ratio) == n
        assert r.group_grad_norm.shape == (n, len(r.group_names))
        assert 0 < n <= r.steps and (n == r.steps or r.diverged)
        assert r.diverged == (r.final_loss == math.inf)
        assert r.split == labels.split_of(r.family, r.seed)
        assert r.deadline_step == labels.spike_step(r.loss, 2.0, r.grad_norm)
        if r.diverged:
            assert r.label == "failing"
    # The split: whole held-out families, and seed 2 of the others.
    held = {r.family for r in corpus if r.split == "report" and r.seed in (0, 1)}
    assert held == set(labels.REPORT_FAMILIES) and len(held) >= 3
    report = [r for r in corpus if r.split == "report"]
    for label in ("healthy", "failing"):
        assert len({r.family for r in report if r.label == label}) >= 3


def test_train_hook_order_and_bit_identity() -> None:
    import build
    import torch

    from warmup_monitor.loop import LoopMonitor

    spec = next(
        s for s in build.make_specs(["mlp_digits"], seeds=[1]) if s["warmup_arm"] == "short"
    )
    spec = dict(spec, steps=12)
    torch.set_num_threads(1)
    plain = build.train(spec)
    calls: list[str] = []

    class Recorder:
        def before_step(self) -> None:
            calls.append("before")

        def after_step(self, loss: Any) -> None:
            calls.append("after")

    assert build.train(spec, hook=Recorder())["loss"].tolist() == plain["loss"].tolist()
    assert calls == ["before", "after"] * 12
    monitors: list[LoopMonitor] = []

    def attach(optimizer: Any, model: Any) -> LoopMonitor:
        monitors.append(LoopMonitor(optimizer, warmup_steps=spec["warmup_steps"]))
        return monitors[0]

    watched = build.train(spec, hook=attach)
    monitors[0].close()
    for key in build.TRACE_KEYS:
        assert np.array_equal(watched[key], plain[key], equal_nan=key != "group_names"), key


def test_the_advice_quotes_what_a_longer_warmup_did_on_the_corpus() -> None:
    """The report's advice says how many failing runs with no or a short warmup the long arm of
    the same cell and seed turned healthy; recomputed here from the committed corpus."""
    from collections import defaultdict

    from warmup_monitor.report.wording import LONGER_WARMUP_HEALED

    arms: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
    for r in load_corpus():
        arms[(r.cell, r.seed)][r.warmup_arm] = r
    pairs = [
        (a[arm], a["long"])
        for a in arms.values()
        for arm in ("none", "short")
        if arm in a and "long" in a and a[arm].label == "failing"
    ]
    healed = sum(long.label == "healthy" for _, long in pairs)
    assert (healed, len(pairs)) == LONGER_WARMUP_HEALED

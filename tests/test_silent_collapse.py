"""The silent-collapse search (benchmarks/corpus/silent_collapse.py, issue 23 item 3): one
figure of the committed table recomputed from the raw trace files, and the script's functions on
hand-made traces."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "benchmarks" / "corpus"
sys.path.insert(0, str(CORPUS))

import silent_collapse as sc  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "silent_collapse.json"


def _raw(record: dict[str, Any]) -> Any:
    return np.load(CORPUS / "traces" / record["file"])


def test_bottom_share_at_step_20_from_the_raw_arrays() -> None:
    # A Post-LN silent run of the report split: the bottom group's (embed) share of the global
    # gradient norm at step 20, written out from the stored per-group norms.
    index = json.loads((CORPUS / "traces" / "index.json").read_text())
    rec = next(r for r in index if r["id"] == "postln_lm__adamw__bs16__lr0.03__onecycle__none__s2")
    with _raw(rec) as z:
        g = z["group_grad_norm"][20].astype(np.float64)
        names = list(z["group_names"])
    assert names[0] == "embed"
    share = g[0] / math.sqrt(sum(x * x for x in g))
    mine = sc.group_share(np.asarray([g]), 1)[0]
    assert math.isclose(mine, share, rel_tol=1e-12)
    assert share < 1e-3  # collapsed: far below the healthy runs' ~1e-2


def test_one_table_figure_recomputed() -> None:
    # share1_log on the report split: silent runs flagged by the chosen step, recomputed from the
    # raw arrays with the committed threshold (min over t <= K of log10 share < threshold).
    res = json.loads(RESULTS.read_text())["signals"]["share1_log"]
    k = res["chosen_step"]
    entry = res["per_step"][str(k)]
    thr = entry["threshold"]
    index = json.loads((CORPUS / "traces" / "index.json").read_text())
    flagged = runs = 0
    for rec in index:
        if rec["split"] != "report" or rec["label"] != "silent":
            continue
        runs += 1
        with _raw(rec) as z:
            g = z["group_grad_norm"][: k + 1].astype(np.float64)
        shares = [row[0] / math.sqrt(float((row * row).sum())) for row in g]
        logs = [math.log10(max(s, 1e-30)) for s in shares if math.isfinite(s)]
        flagged += min(logs) < thr
    assert runs == entry["report"]["silent"]["runs"] == 23
    assert flagged == entry["report"]["silent"]["flagged"]


def _trace(n: int = 30, collapse_at: int | None = 8) -> Any:
    g = np.ones((n, 3), dtype=np.float32)  # three groups, equal norms: share1 = 1/sqrt(3)
    if collapse_at is not None:
        g[collapse_at:, 0] = 1e-4
    loss = np.linspace(4.0, 3.0, n)
    return SimpleNamespace(
        group_grad_norm=g,
        group_update_ratio=np.full((n, 3), 1e-3, dtype=np.float32),
        loss=loss,
        lr_trace=np.full(n, 0.1),
        lr=0.1,
        data="vision",
        update_ratio=np.full(n, 1e-3),
        grad_norm=np.ones(n),
        grad_cosine=np.zeros(n),
    )


def test_signals_on_a_hand_made_trace() -> None:
    by_name = {s.name: s for s in sc.SIGNALS}
    s = by_name["share1_log"].fn(_trace())
    assert math.isclose(s[0], math.log10(1 / math.sqrt(3)), rel_tol=1e-6)
    expected = math.log10(1e-4 / math.sqrt(1e-8 + 2))
    assert math.isclose(s[8], expected, rel_tol=1e-5)
    # causal: the value at a step does not depend on later steps
    assert np.allclose(s[:8], by_name["share1_log"].fn(_trace(collapse_at=None))[:8])
    # the fall relative to steps 2-3: NaN before step 3, 0 until the collapse
    fall = by_name["share1_fall"].fn(_trace())
    assert np.isnan(fall[:3]).all() and np.allclose(fall[3:8], 0.0)
    assert math.isclose(fall[8], expected - math.log10(1 / math.sqrt(3)), rel_tol=1e-5)
    # the rule: flags at the first step past the threshold, only if that step is <= K
    assert sc.first_flag(s, 20, -3.0, "low") == 8
    assert sc.first_flag(s, 7, -3.0, "low") is None
    assert sc.extreme_by(s, 7, "low") > -3.0 > sc.extreme_by(s, 8, "low")
    # a dead bottom block (zero gradient) is the most alarming share, not NaN
    dead = _trace(collapse_at=None)
    dead.group_grad_norm[5, 0] = 0.0
    assert by_name["share1_log"].fn(dead)[5] == -30.0
    # the loss ratio is gated by the lr: NaN while lr < 0.5 x peak
    t = _trace(collapse_at=None)
    t.lr_trace = np.linspace(0.0, 0.1, 30)
    lv = by_name["loss_vs_initial"].fn(t)
    assert np.isnan(lv[:14]).all() and np.isfinite(lv[15:]).all()
    # "stuck": only once the lr has been high for 10 steps (steps 15..24 -> from step 24)
    st = by_name["loss_stuck_initial"].fn(t)
    assert np.isnan(st[:24]).all() and np.isfinite(st[24:]).all()
    assert math.isclose(st[29], float(np.median(t.loss[25:30])) / t.loss[0])


def test_trailing_median_and_threshold() -> None:
    m = sc.trailing_median(np.array([1.0, 5.0, 2.0, math.nan, 4.0, 3.0]), 3)
    assert np.allclose(m, [1.0, 3.0, 2.0, 3.5, 3.0, 3.5])
    # 100 healthy values 0..99 ("high" alarms): 2 may be flagged (98, 99), so the threshold
    # sits halfway between 97 and the nearest silent value above it (101).
    thr = sc.choose_threshold(list(range(100)), [50.0, 101.0, 200.0], "high", 1.0)
    assert thr == 99.0
    thr = sc.choose_threshold([float(x) for x in range(100)], [], "low", 1.0)
    assert thr == 2.0  # 0 and 1 flagged; no silent value below 2: the boundary itself

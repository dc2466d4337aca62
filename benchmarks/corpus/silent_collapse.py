"""Search for a "silent collapse" rule on the corpus (issue 23, item 3).

Pure numpy over the stored traces (no training; a few seconds). Every candidate signal is a
per-step value ``s[t]`` computed causally (from steps ``<= t`` only, plus constants known
before training: the configured peak lr, the unigram entropy of the training text). A rule
``(signal, K, threshold)`` is checked at every step ``t <= K`` and flags the run at the first
step where ``s[t]`` is past the threshold (above it for ``high`` signals, below for ``low``);
a run flags at most once, so alerts per 50 healthy runs = 50 x healthy runs flagged / healthy
runs.

Selection (calibrate split only): for each signal and each ``K`` in :data:`STEPS`, the
threshold is the most permissive one that flags at most ``floor(n_healthy / 50)`` of the
calibrate healthy runs (78 -> 1); it is put halfway between the last healthy value it must
not flag and the next value beyond it among the calibrate silent runs (if any). The step
reported for a signal is the ``K <= 20`` that flags the most calibrate silent runs (the
earliest on a tie). Then every rule is applied unchanged to the report split.

    .venv/bin/python benchmarks/corpus/silent_collapse.py          # table + results json
    .venv/bin/python benchmarks/corpus/silent_collapse.py --all-steps   # every K as well
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traces import Run, load_corpus

STEPS = (10, 15, 20, 30)
BAR_STEP = 20
MAX_HEALTHY_PER_50 = 1.0
LABELS = ("healthy", "silent", "failing", "spiky", "unclear")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "silent_collapse.json"
TEXT_VOCAB = 103  # the corpus's character vocabulary (build.py: pydoc_data.topics)
LR_HIGH = 0.5  # "the lr is high": lr[t] >= 0.5 x the configured peak lr
REF_STEPS = (2, 3)  # the "own early value" of a relative signal: the mean over steps 2-3


# ----------------------------------------------------------------------------- helpers


def trailing_median(x: np.ndarray, window: int = 5) -> np.ndarray:
    """``m[t] = median(x[max(0, t-window+1)..t])``, ignoring NaN (NaN if all are NaN)."""
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return x.copy()
    x = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(window - 1, np.nan), x])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows give NaN
        return np.nanmedian(windows, axis=1)


def log10_safe(x: np.ndarray, floor: float = 1e-30) -> np.ndarray:
    """log10 with zeros (a dead block: no gradient at all) mapped to log10(floor)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(x), np.log10(np.maximum(x, floor)), np.nan)


def group_share(group_grad_norm: np.ndarray, groups: int = 1) -> np.ndarray:
    """The bottom ``groups`` groups' share of the global gradient norm, per step:
    ``sqrt(sum_{g < groups} n_g^2) / sqrt(sum_g n_g^2)`` (NaN where the total is 0 or not
    finite)."""
    g = np.asarray(group_grad_norm, dtype=np.float64)
    sq = g * g
    total = np.sqrt(sq.sum(axis=1))
    bottom = np.sqrt(sq[:, :groups].sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = bottom / total
    return np.where(np.isfinite(total) & (total > 0), out, np.nan)


def relative_to_early(logx: np.ndarray) -> np.ndarray:
    """``logx[t] - mean(logx[2..3])`` from step 3 on (NaN before: the reference is not known
    yet)."""
    out = np.full(len(logx), np.nan)
    if len(logx) > max(REF_STEPS):
        ref = float(np.mean(logx[list(REF_STEPS)]))
        out[max(REF_STEPS) :] = logx[max(REF_STEPS) :] - ref
    return out


_UNIGRAM: dict[str, float] = {}


def unigram_entropy() -> float | None:
    """Entropy (nats) of the character distribution of the LM families' training text (the
    first 90 % of ``pydoc_data.topics``, as ``build._text``), or None if this Python's copy
    does not have the corpus's 103-character vocabulary."""
    if "h" not in _UNIGRAM:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
        if len(set(text)) != TEXT_VOCAB:
            _UNIGRAM["h"] = math.nan
        else:
            counts = np.array(list(Counter(text[: int(0.9 * len(text))]).values()), float)
            p = counts / counts.sum()
            _UNIGRAM["h"] = float(-(p * np.log(p)).sum())
    h = _UNIGRAM["h"]
    return None if math.isnan(h) else h


def loss_reference(run: Run) -> float:
    """The loss of a model that learned nothing but the marginals: the unigram entropy for the
    text families, else the run's own initial loss."""
    h = unigram_entropy() if run.data == "text" else None
    return float(run.loss[0]) if h is None else h


def lr_high(run: Run) -> np.ndarray:
    return np.asarray(run.lr_trace, dtype=np.float64) >= LR_HIGH * float(run.lr)


# ----------------------------------------------------------------------------- signals


@dataclass(frozen=True)
class Signal:
    name: str
    direction: str  # "high": flags when s[t] > threshold; "low": when s[t] < threshold
    description: str
    fn: Callable[[Run], np.ndarray]


def _share_log(groups: int) -> Callable[[Run], np.ndarray]:
    return lambda r: log10_safe(group_share(r.group_grad_norm, groups))


def _share_fall(groups: int) -> Callable[[Run], np.ndarray]:
    return lambda r: relative_to_early(log10_safe(group_share(r.group_grad_norm, groups)))


def _share_fall_med(groups: int) -> Callable[[Run], np.ndarray]:
    return lambda r: trailing_median(
        relative_to_early(log10_safe(group_share(r.group_grad_norm, groups))), 3
    )


def _loss_stuck_initial(r: Run) -> np.ndarray:
    s = trailing_median(r.loss, 5) / float(r.loss[0])
    return np.where(lr_high(r), s, np.nan)


def _loss_near_reference(r: Run) -> np.ndarray:
    s = trailing_median(r.loss, 5) / loss_reference(r)
    return np.where(lr_high(r), s, np.nan)


def lr_high_for(run: Run, steps: int = 10) -> np.ndarray:
    """True at step t where the lr has been high at every step of ``t-steps+1..t``."""
    h = lr_high(run).astype(np.int64)
    c = np.concatenate([[0], np.cumsum(h)])
    t = np.arange(len(h))
    return (t >= steps - 1) & (c[t + 1] - c[np.maximum(t + 1 - steps, 0)] == steps)


def _loss_stuck(reference: Callable[[Run], float]) -> Callable[[Run], np.ndarray]:
    """Median-5 loss / reference, only where the lr has been high for the last 10 steps: the
    loss is still near (or above) where it started although the lr has been high for a while."""

    def fn(r: Run) -> np.ndarray:
        s = trailing_median(r.loss, 5) / reference(r)
        return np.where(lr_high_for(r, 10), s, np.nan)

    return fn


def _loss_plateau(r: Run) -> np.ndarray:
    """The relative fall of the 5-step median loss over the last 5 steps (m[t-5] / m[t] - 1),
    while near the reference (m[t] < 1.15 x reference) and the lr is high; NaN elsewhere."""
    m = trailing_median(r.loss, 5)
    ref = loss_reference(r)
    out = np.full(len(m), np.nan)
    out[5:] = m[:-5] / m[5:] - 1.0
    return np.where(lr_high(r) & (m < 1.15 * ref), out, np.nan)


def _top_over_bottom_update(r: Run) -> np.ndarray:
    u = np.asarray(r.group_update_ratio, dtype=np.float64)
    return log10_safe(u[:, -1]) - log10_safe(u[:, 0])


def _bottom_update_fall(r: Run) -> np.ndarray:
    return relative_to_early(log10_safe(np.asarray(r.group_update_ratio, np.float64)[:, 0]))


def _global_update(r: Run) -> np.ndarray:
    return log10_safe(r.update_ratio)


def _global_update_med(r: Run) -> np.ndarray:
    return trailing_median(log10_safe(r.update_ratio), 5)


def _grad_norm_fall(r: Run) -> np.ndarray:
    return trailing_median(relative_to_early(log10_safe(r.grad_norm)), 3)


def _cosine(r: Run) -> np.ndarray:
    return trailing_median(np.asarray(r.grad_cosine, dtype=np.float64), 5)


_ABOVE_REF = "while it is < 1.15 x reference and lr >= 0.5 x peak"
SIGNALS: tuple[Signal, ...] = (
    Signal("share1_log", "low", "(a) log10 share of the grad norm, bottom group", _share_log(1)),
    Signal("share2_log", "low", "(a) log10 share, bottom two groups", _share_log(2)),
    Signal("share1_fall", "low", "(a) share1_log minus its mean at steps 2-3", _share_fall(1)),
    Signal("share2_fall", "low", "(a) share2_log minus its mean at steps 2-3", _share_fall(2)),
    Signal("share1_fall_med3", "low", "(a) share1_fall, median of 3", _share_fall_med(1)),
    Signal(
        "loss_vs_initial", "high", "(b) median-5 loss / loss[0], while lr >= 0.5 x peak",
        _loss_stuck_initial,
    ),
    Signal(
        "loss_vs_unigram", "high",
        "(b) median-5 loss / reference (unigram entropy for text, else loss[0]), "
        "while lr >= 0.5 x peak",
        _loss_near_reference,
    ),
    Signal(
        "loss_stuck_initial", "high",
        "(b) median-5 loss / loss[0], where the lr has been >= 0.5 x peak for 10 steps",
        _loss_stuck(lambda r: float(r.loss[0])),
    ),
    Signal(
        "loss_stuck_unigram", "high",
        "(b) median-5 loss / reference (unigram entropy for text, else loss[0]), where the lr "
        "has been >= 0.5 x peak for 10 steps",
        _loss_stuck(loss_reference),
    ),
    Signal(
        "loss_plateau", "low",
        f"(b) 5-step relative fall of the median-5 loss, {_ABOVE_REF}", _loss_plateau,
    ),
    Signal(
        "update_top_over_bottom", "high", "(c) log10 update ratio, top group / bottom group",
        _top_over_bottom_update,
    ),
    Signal(
        "update_bottom_fall", "low",
        "(c') log10 update ratio of the bottom group minus its mean at steps 2-3",
        _bottom_update_fall,
    ),
    Signal("update_global", "high", "(d) log10 global update ratio", _global_update),
    Signal("update_global_med5", "high", "(d) the same, median of 5", _global_update_med),
    Signal(
        "grad_norm_fall", "low",
        "(e) log10 global grad norm minus its mean at steps 2-3, median of 3", _grad_norm_fall,
    ),
    Signal("cosine_med5", "high", "(f) gradient cosine, median of 5", _cosine),
)  # fmt: skip


# ----------------------------------------------------------------------------- rules


def extreme_by(s: np.ndarray, k: int, direction: str) -> float:
    """The most alarming value of ``s`` over steps ``0..k`` (NaN if none is finite): the rule
    ``(k, thr)`` flags the run iff this is past ``thr``."""
    w = np.asarray(s[: k + 1], dtype=np.float64)
    w = w[~np.isnan(w)]
    if not len(w):
        return math.nan
    return float(w.max() if direction == "high" else w.min())


def first_flag(s: np.ndarray, k: int, thr: float, direction: str) -> int | None:
    """The first step ``t <= k`` where ``s[t]`` is past ``thr``, or None."""
    for t in range(min(k + 1, len(s))):
        v = s[t]
        if not math.isnan(v) and (v > thr if direction == "high" else v < thr):
            return t
    return None


def past(v: float, thr: float, direction: str) -> bool:
    return not math.isnan(v) and (v > thr if direction == "high" else v < thr)


def choose_threshold(
    healthy: Sequence[float],
    silent: Sequence[float],
    direction: str,
    max_per_50: float,
    allowed: int | None = None,
) -> float:
    """The most permissive threshold that flags at most ``allowed`` (default ``floor(
    len(healthy) * max_per_50 / 50)``) healthy values, halfway to the next silent value
    beyond it."""
    sign = 1.0 if direction == "high" else -1.0
    # most alarming first
    h = sorted((sign * v for v in healthy if not math.isnan(v)), reverse=True)
    if allowed is None:
        allowed = math.floor(len(healthy) * max_per_50 / 50 + 1e-9)
    # the most alarming healthy value that must stay unflagged
    bound = -math.inf if allowed >= len(h) else h[allowed]
    beyond = [sign * v for v in silent if not math.isnan(v) and sign * v > bound]
    if math.isinf(bound):
        thr = min(beyond) - 1e-9 if beyond else math.inf
    else:
        thr = (bound + min(beyond)) / 2 if beyond else bound
    return sign * thr


def _counts(values: dict[str, list[float]], thr: float, direction: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lab in LABELS:
        v = values.get(lab, [])
        n = sum(past(x, thr, direction) for x in v)
        out[lab] = {"runs": len(v), "flagged": int(n), "share": n / len(v) if v else math.nan}
    nh = out["healthy"]["runs"]
    out["healthy_alerts_per_50"] = 50 * out["healthy"]["flagged"] / nh if nh else math.nan
    return out


def evaluate(runs: Sequence[Run], signals: Sequence[Signal] = SIGNALS) -> dict[str, Any]:
    """Every signal's rule for every ``K`` chosen on the calibrate split and applied to both;
    per signal, the chosen step's flag step of every run (``flags``: run id -> step or None)."""
    series = {sig.name: {r.id: sig.fn(r) for r in runs} for sig in signals}
    results: dict[str, Any] = {}
    for sig in signals:
        per_k: dict[int, dict[str, Any]] = {}
        for k in STEPS:
            vals: dict[str, dict[str, list[float]]] = {"calibrate": {}, "report": {}}
            for r in runs:
                v = extreme_by(series[sig.name][r.id], k, sig.direction)
                vals[r.split].setdefault(r.label, []).append(v)
            cal = vals["calibrate"]
            thr = choose_threshold(
                cal.get("healthy", []), cal.get("silent", []), sig.direction, MAX_HEALTHY_PER_50
            )
            per_k[k] = {
                "threshold": thr,
                "calibrate": _counts(cal, thr, sig.direction),
                "report": _counts(vals["report"], thr, sig.direction),
            }
        early = [k for k in STEPS if k <= BAR_STEP]
        best = max(early, key=lambda k: (per_k[k]["calibrate"]["silent"]["flagged"], -k))
        rep = per_k[best]["report"]
        thr = per_k[best]["threshold"]
        flags = {r.id: first_flag(series[sig.name][r.id], best, thr, sig.direction) for r in runs}
        results[sig.name] = {
            "direction": sig.direction,
            "description": sig.description,
            "chosen_step": best,
            "per_step": {str(k): v for k, v in per_k.items()},
            "meets_bar": bool(
                rep["silent"]["share"] >= 0.9 and rep["healthy_alerts_per_50"] <= MAX_HEALTHY_PER_50
            ),
            "flags": flags,
        }
    return results


def by_family(runs: Sequence[Run], flags: dict[str, int | None], split: str) -> dict[str, str]:
    """Silent runs of ``split`` flagged per family (``"flagged/runs"``), families with any."""
    out: dict[str, list[int]] = {}
    for r in runs:
        if r.split == split and r.label == "silent":
            c = out.setdefault(r.family, [0, 0])
            c[0] += flags[r.id] is not None
            c[1] += 1
    return {f: f"{a}/{b}" for f, (a, b) in sorted(out.items())}


def greedy_or(
    runs: Sequence[Run], signals: Sequence[Signal] = SIGNALS, k: int = BAR_STEP
) -> dict[str, Any]:
    """An OR of rules at step ``k``, built greedily on the calibrate split: add the signal (with
    its threshold re-chosen so that the OR still flags at most ``floor(n_healthy / 50)``
    calibrate healthy runs) that adds the most calibrate silent runs; stop when none adds
    any. Then applied unchanged to the report split."""
    ext = {s.name: {r.id: extreme_by(s.fn(r), k, s.direction) for r in runs} for s in signals}
    cal = [r for r in runs if r.split == "calibrate"]
    n_h = sum(r.label == "healthy" for r in cal)
    budget = math.floor(n_h * MAX_HEALTHY_PER_50 / 50 + 1e-9)
    rules: list[tuple[Signal, float]] = []

    def hit(r: Run) -> bool:
        return any(past(ext[sg.name][r.id], t, sg.direction) for sg, t in rules)

    while True:
        free = [r for r in cal if not hit(r)]
        used = sum(r.label == "healthy" for r in cal) - sum(r.label == "healthy" for r in free)
        best: tuple[int, Signal, float] | None = None
        for sg in signals:
            if any(sg is x for x, _ in rules):
                continue
            thr = choose_threshold(
                [ext[sg.name][r.id] for r in free if r.label == "healthy"],
                [ext[sg.name][r.id] for r in free if r.label == "silent"],
                sg.direction, MAX_HEALTHY_PER_50, allowed=budget - used,
            )  # fmt: skip
            gain = sum(
                r.label == "silent" and past(ext[sg.name][r.id], thr, sg.direction) for r in free
            )
            if gain and (best is None or gain > best[0]):
                best = (gain, sg, thr)
        if best is None:
            break
        rules.append((best[1], best[2]))
    out: dict[str, Any] = {"step": k, "rules": [[sg.name, t] for sg, t in rules]}
    for split in ("calibrate", "report"):
        vals: dict[str, list[float]] = {}
        for r in runs:
            if r.split == split:
                vals.setdefault(r.label, []).append(1.0 if hit(r) else 0.0)
        out[split] = _counts(vals, 0.5, "high")
    return out


def union(runs: Sequence[Run], results: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Informative: the OR of the named signals' chosen rules (not a selected rule: each rule
    had its own healthy budget on the calibrate split)."""
    out: dict[str, Any] = {}
    for split in ("calibrate", "report"):
        vals: dict[str, list[float]] = {}
        for r in runs:
            if r.split == split:
                hit = any(results[n]["flags"][r.id] is not None for n in names)
                vals.setdefault(r.label, []).append(1.0 if hit else 0.0)
        out[split] = _counts(vals, 0.5, "high")
    return out


# ----------------------------------------------------------------------------- output


def _pct(c: dict[str, Any]) -> str:
    return f"{100 * c['share']:.0f}% ({c['flagged']}/{c['runs']})" if c["runs"] else "-"


def table(results: dict[str, Any], split: str, all_steps: bool = False) -> str:
    head = (
        "| signal | dir | step | threshold | silent flagged | healthy flagged "
        "| alerts / 50 healthy | failing | spiky | unclear |\n"
        "|---|:---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for name, res in results.items():
        ks = [str(k) for k in STEPS] if all_steps else [str(res["chosen_step"])]
        for k in ks:
            e = res["per_step"][k]
            c = e[split]
            op = ">" if res["direction"] == "high" else "<"
            rows.append(
                f"| `{name}` | {op} | {k} | {e['threshold']:.4g} | {_pct(c['silent'])} "
                f"| {_pct(c['healthy'])} | {c['healthy_alerts_per_50']:.2f} "
                f"| {_pct(c['failing'])} | {_pct(c['spiky'])} | {_pct(c['unclear'])} |"
            )
    return head + "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all-steps", action="store_true", help="print every K, not only the chosen")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    runs = load_corpus()
    results = evaluate(runs)
    print(f"unigram entropy of the training text: {unigram_entropy()} nats\n")
    for split in ("report", "calibrate"):
        print(f"### {split} split\n")
        print(table(results, split, args.all_steps))
    fams = sorted({r.family for r in runs if r.label == "silent" and r.split == "report"})
    print("### silent runs flagged per family (report split, chosen step)\n")
    print("| signal | " + " | ".join(fams) + " |\n|---|" + "---:|" * len(fams))
    for name, res in results.items():
        fam = by_family(runs, res["flags"], "report")
        print(f"| `{name}` | " + " | ".join(fam.get(f, "-") for f in fams) + " |")
    unions = {"all chosen rules": (list(results), union(runs, results, list(results)))}
    greedy = greedy_or(runs)
    print("\n### an OR of rules (step 20)\n")
    print("| rules | split | silent flagged | healthy flagged | alerts / 50 healthy | failing |")
    print("|---|---|---:|---:|---:|---:|")
    rule = " OR ".join(
        f"`{n}` {'>' if results[n]['direction'] == 'high' else '<'} {t:.3g}"
        for n, t in greedy["rules"]
    )
    rows = [(f"greedy OR on calibrate: {rule}", greedy)]
    rows += [(f"{key} ({len(n)}, informative)", u) for key, (n, u) in unions.items()]
    for label, u in rows:
        for split in ("report", "calibrate"):
            c = u[split]
            print(
                f"| {label} | {split} | {_pct(c['silent'])} | {_pct(c['healthy'])} "
                f"| {c['healthy_alerts_per_50']:.2f} | {_pct(c['failing'])} |"
            )
    met = [n for n, r in results.items() if r["meets_bar"]]
    print("\nmeets the bar (report split):", met or "none")
    for res in results.values():
        res["flags"] = {k: v for k, v in res["flags"].items() if v is not None}
        res["silent_report_by_family"] = by_family(
            runs, res["flags"] | {r.id: None for r in runs if r.id not in res["flags"]}, "report"
        )
    payload = {
        "command": "python benchmarks/corpus/silent_collapse.py",
        "selection": __doc__.split("\n\n")[2],
        "steps": list(STEPS),
        "bar": {"step": BAR_STEP, "silent_share": 0.9, "healthy_alerts_per_50": 1.0},
        "lr_high": LR_HIGH,
        "unigram_entropy": unigram_entropy(),
        "signals": results,
        "greedy_or": greedy,
        "unions": {k: {"rules": n, **u} for k, (n, u) in unions.items()},
        "meets_bar": met,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``layers.png``: per-group statistics as heatmaps of group x step, and the grid behind them.

A run logged with ``Statistics(layers=...)`` has ``<prefix>layers/<group>/grad_norm``,
``grad_share`` and ``update_ratio`` on its logging steps. :func:`layer_grid` gathers them into
one matrix per statistic (groups in the order they were logged: depth order, the bottom of the
network first), reduced to at most a given number of step columns; the report draws it here
(:func:`render_layers_png`) and the TensorBoard tab draws the same grid in the browser.

Two panels per run, both on a log10 colour scale, the bottom of the network at the bottom:

- the **gradient share** (group norm / global norm): a collapse of the bottom layers shows as
  their rows going dark (a share of 1e-5 is five decades below the top of the scale);
- the **update ratio** (``||delta|| / ||theta||`` of the group): an exploding top layer shows
  as its rows going bright.

This module imports no Lightning and no torch; matplotlib only when a picture is drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmup_monitor.report.analysis import RunSummary
from warmup_monitor.report.events import Series
from warmup_monitor.report.names import run_names
from warmup_monitor.report.runs import RunData
from warmup_monitor.schema import is_instability

__all__ = [
    "LAYER_STATS",
    "MAX_COLUMNS",
    "SHARE_FLOOR",
    "LayerGrid",
    "layer_grid",
    "render_layers_png",
]

#: The per-group statistics, as logged under ``layers/<group>/``.
LAYER_STATS = ("grad_norm", "grad_share", "update_ratio")
#: Step columns of a heatmap at most (more steps are averaged in log10 per column).
MAX_COLUMNS = 600
#: The bottom of the gradient-share colour scale (log10): shares below it are drawn at it.
SHARE_FLOOR = -7.0
#: A value of 0 (log10 ``-inf``) in the browser's grid (JSON has no infinities).
ZERO = -99.0
_GROUPS_SHOWN = 8  # runs with a heatmap in one picture


@dataclass
class LayerGrid:
    """Per-group statistics of one run as matrices.

    Attributes:
        groups: Group names in depth order (as logged: the bottom of the network first).
        steps: The first step of each column (ascending).
        width: Steps each column spans (the last column may span fewer).
        log10: Statistic -> ``[groups, columns]`` array of log10 values (the mean of the log10
            of the logged values within a column), NaN where nothing was logged, ``-inf``
            where a value was 0 (a group without gradient: drawn at the bottom of the scale).
    """

    groups: list[str]
    steps: np.ndarray
    width: int
    log10: dict[str, np.ndarray]

    def to_json(self) -> dict[str, Any]:
        """The grid for the browser: lists, ``None`` for NaN, :data:`ZERO` for ``-inf`` (a
        value of 0), values rounded to 4 digits."""

        def cell(v: float) -> float | None:
            if math.isfinite(v):
                return round(v, 4)
            return ZERO if v == -math.inf else None

        return {
            "groups": self.groups,
            "steps": self.steps.tolist(),
            "width": self.width,
            **{k: [[cell(v) for v in r] for r in a.tolist()] for k, a in self.log10.items()},
        }


def layer_groups_of(series: dict[str, Series], opt: str = "") -> list[str]:
    """The groups with per-group statistics in ``series`` (keys without the prefix), in the
    order they were logged; ``opt`` is ``""`` or ``"opt1/"``... for another optimizer."""
    head = f"{opt}layers/"
    out: dict[str, None] = {}
    for key in series:
        if key.startswith(head):
            group, _, stat = key[len(head) :].rpartition("/")
            if group and stat in LAYER_STATS:
                out.setdefault(group)
    return list(out)


def layer_grid(
    series: dict[str, Series], max_columns: int = MAX_COLUMNS, opt: str = ""
) -> LayerGrid | None:
    """The per-group statistics of a run as a :class:`LayerGrid` (``None`` if it has none)."""
    groups = layer_groups_of(series, opt)
    if not groups:
        return None
    found = [series[f"{opt}layers/{g}/{s}"] for g in groups for s in LAYER_STATS
             if f"{opt}layers/{g}/{s}" in series]  # fmt: skip
    all_steps = np.unique(np.concatenate([s.steps for s in found]))
    if all_steps.size == 0:
        return None
    lo, hi = int(all_steps[0]), int(all_steps[-1])
    # A column spans at least the logging interval (``Statistics.layers_every_n_steps``), so
    # that a thinned run draws no empty stripes between its columns.
    gap = int(np.diff(all_steps).min()) if all_steps.size > 1 else 1
    width = max(1, -(-(hi - lo + 1) // max_columns), gap)
    columns = -(-(hi - lo + 1) // width)
    steps = lo + width * np.arange(columns, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for stat in LAYER_STATS:
        total = np.zeros((len(groups), columns))
        count = np.zeros((len(groups), columns))
        for gi, g in enumerate(groups):
            s = series.get(f"{opt}layers/{g}/{stat}")
            if s is None or not len(s):
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.log10(s.values)
            ok = ~np.isnan(v) & (v != np.inf)  # 0 is -inf: kept, drawn at the bottom
            col = (s.steps[ok] - lo) // width
            np.add.at(total[gi], col, v[ok])
            np.add.at(count[gi], col, 1.0)
        with np.errstate(invalid="ignore"):
            out[stat] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return LayerGrid(groups, steps, width, out)


def short_names(groups: Sequence[str]) -> list[str]:
    """Group names without the dotted prefix they all share (``model.transformer.h.0`` ->
    ``h.0`` when every group starts with ``model.transformer.``)."""
    if len(groups) < 2:
        return list(groups)
    parts = [g.split(".") for g in groups]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _limits(grids: Sequence[LayerGrid], stat: str, floor: float | None) -> tuple[float, float]:
    vals = np.concatenate([g.log10[stat].ravel() for g in grids])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return (-1.0, 0.0)
    lo, hi = float(np.percentile(vals, 1)), float(vals.max())
    if floor is not None:
        lo = max(floor, min(lo, -1.0))
        hi = 0.0  # a share is at most 1
    if hi - lo < 1.0:
        lo = hi - 1.0
    return math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2


def render_layers_png(runs: Sequence[RunData], summaries: Sequence[RunSummary]) -> bytes | None:
    """The heatmaps of the runs that logged per-group statistics (at most 8), as PNG bytes;
    ``None`` when no run did."""
    chosen = []
    for run, summary in zip(runs, summaries, strict=True):
        grid = layer_grid(run.series)
        if grid is not None:
            chosen.append((run, summary, grid))
    if not chosen:
        return None
    chosen = chosen[:_GROUPS_SHOWN]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [g for _, _, g in chosen]
    labels = run_names([run.name for run, _, _ in chosen])
    share_lim = _limits(grids, "grad_share", SHARE_FLOOR)
    ratio_lim = _limits(grids, "update_ratio", None)
    heights = [max(2.2, 0.16 * len(g.groups) + 1.0) for g in grids]
    head = 1.6  # inches above the panels: the caption and the colour bars
    total_h = sum(heights) + 0.6 * len(grids) + head
    fig, axes = plt.subplots(
        len(chosen),
        2,
        figsize=(13, total_h),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    meshes = []
    for row, (run, summary, grid) in enumerate(chosen):
        edges_x = np.append(grid.steps, grid.steps[-1] + grid.width) - 0.5
        edges_y = np.arange(len(grid.groups) + 1) - 0.5
        names = short_names(grid.groups)
        for col, (stat, lim, cmap, title) in enumerate(
            (
                ("grad_share", share_lim, "viridis", "gradient share of each group (log10)"),
                ("update_ratio", ratio_lim, "magma", "update ratio of each group (log10)"),
            )
        ):
            ax = axes[row, col]
            data = np.clip(grid.log10[stat], lim[0], lim[1])
            mesh = ax.pcolormesh(
                edges_x, edges_y, np.ma.masked_invalid(data), cmap=cmap, vmin=lim[0],
                vmax=lim[1], shading="flat", rasterized=True,
            )  # fmt: skip
            if row == 0:
                meshes.append((mesh, title))
            every = max(1, -(-len(names) // 24))
            ticks = list(range(0, len(names), every))
            ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_ylim(-0.5, len(names) - 0.5)
            warm = summary.effective_warmup or summary.planned_warmup
            if warm and warm - 0.5 <= edges_x[-1]:  # an end past the run's data: not drawn
                ax.axvline(warm - 0.5, color="white", ls=":", lw=1.2)
            alerts = sorted({a.step for a in run.alerts if is_instability(a.kind)})
            if alerts:
                ax.plot(alerts, [len(names) - 0.5] * len(alerts), ls="none", marker="v",
                        ms=5, color="#cf222e", clip_on=False)  # fmt: skip
            label = f"{labels.short[row]}: {summary.verdict}"
            ax.set_title(label if col == 0 else "", fontsize=9, loc="left")
            if row == len(chosen) - 1:
                ax.set_xlabel("optimizer step", fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.98, top=1 - head / total_h, bottom=0.45 / total_h,
                        hspace=0.5, wspace=0.14)  # fmt: skip
    for col, (mesh, title) in enumerate(meshes):
        box = axes[0, col].get_position()
        cax = fig.add_axes((box.x0, 1 - 1.05 / total_h, box.width * 0.6, 0.13 / total_h))
        bar = fig.colorbar(mesh, cax=cax, orientation="horizontal")
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_title(title, fontsize=9, loc="left")
    fig.text(
        0.01, 1 - 0.12 / total_h,
        (f"Runs: {labels.pattern}\n" if labels.pattern else "")
        + "Inside the model: per-group statistics. Rows are groups of layers, the bottom of the "
        "network at the bottom; dotted: end of warmup; red ticks: instability alerts.\n"
        "A collapse shows as the bottom rows' gradient share going dark; an exploding layer as "
        "its update ratio going bright.",
        fontsize=8.5, va="top",
    )  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

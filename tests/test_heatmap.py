"""The per-group heatmaps: the grid read back from real event files, its columns, the picture,
and where the report and the Warmup tab put them."""

from __future__ import annotations

import io
import math
import os
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import read_scalars
from test_report import make_real_run, write_scalars

from warmup_monitor.cli import main as cli_main
from warmup_monitor.report import summarize
from warmup_monitor.report.heatmap import (
    LAYER_STATS,
    ZERO,
    layer_grid,
    layer_groups_of,
    render_layers_png,
    short_names,
)
from warmup_monitor.report.runs import load_run
from warmup_monitor.tb_plugin.plugin import MAX_LAYER_COLUMNS, WarmupPlugin
from warmup_monitor.tensorboard import write_scalars_event


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_real_run(tmp_path_factory.mktemp("layered"), layers=True, max_steps=30)


def test_the_grid_holds_the_logged_values_in_depth_order(layered_run: str) -> None:
    run = load_run(layered_run)
    grid = layer_grid(run.series)
    assert grid is not None
    assert grid.groups == ["net.0", "net.2"] and grid.width == 1
    scalars = read_scalars(layered_run)  # TensorBoard's own reader
    for stat in LAYER_STATS:
        for gi, group in enumerate(grid.groups):
            logged = scalars[f"warmup/layers/{group}/{stat}"]
            assert sorted(logged) == list(range(30))
            for step, value in logged.items():
                assert grid.log10[stat][gi, step] == pytest.approx(math.log10(value), abs=1e-6)
    # The shares of the two groups make the whole norm.
    shares = 10.0 ** grid.log10["grad_share"]
    np.testing.assert_allclose((shares**2).sum(axis=0), 1.0, rtol=1e-5)


def test_a_thinned_run_fills_every_column(tmp_path: Path) -> None:
    """``Statistics(layers_every_n_steps=5)``: a column per logged step, none empty."""
    run_dir = make_real_run(tmp_path, layers=True, max_steps=23, layers_every=5)
    scalars = read_scalars(run_dir)  # TensorBoard's own reader
    logged = scalars["warmup/layers/net.0/grad_share"]
    assert sorted(logged) == [0, 5, 10, 15, 20]
    grid = layer_grid(load_run(run_dir).series)
    assert grid is not None and grid.width == 5
    assert grid.steps.tolist() == [0, 5, 10, 15, 20]
    for stat in LAYER_STATS:
        assert not np.isnan(grid.log10[stat]).any()
    assert grid.log10["grad_share"][0, 2] == pytest.approx(math.log10(logged[10]), abs=1e-6)


@pytest.mark.parametrize("one_event", [False, True])
def test_groups_come_back_in_the_order_they_were_logged(tmp_path: Path, one_event: bool) -> None:
    names = ["wte", "wpe", "h.0", "h.1", "h.10", "h.2", "ln_f"]  # not sorted in any way
    core = {"warmup/lr": [(0, 1e-3)], "warmup/warmup_steps": [(0, 10.0)]}
    layers = {f"warmup/layers/{n}/grad_share": [(0, 0.1 * i), (1, 0.2)] for i, n in
              enumerate(names, 1)}  # fmt: skip
    if one_event:  # as the monitor writes them: one event per step holding every group
        from torch.utils.tensorboard import SummaryWriter

        write_scalars(tmp_path, core)
        writer = SummaryWriter(str(tmp_path))
        for step in (0, 1):
            write_scalars_event(writer, {k: dict(v)[step] for k, v in layers.items()}, step)
        writer.close()
    else:
        write_scalars(tmp_path, {**core, **layers})
    run = load_run(str(tmp_path))
    assert layer_groups_of(run.series) == names
    scalars = read_scalars(str(tmp_path))  # TensorBoard's reader sees the same values
    for key, points in layers.items():
        assert scalars[key] == pytest.approx(dict(points))
        assert run.series[key[len("warmup/") :]].values.tolist() == pytest.approx(
            [v for _, v in points]
        )


def test_columns_average_log10_over_their_steps() -> None:
    from test_report import _series

    steps = np.arange(1000)
    values = 10.0 ** (-(steps % 7).astype(float))  # 1, 0.1, ... 1e-6, repeating
    series = {"layers/a/grad_share": _series(steps.tolist(), values.tolist())}
    grid = layer_grid(series, max_columns=100)
    assert grid is not None and grid.width == 10 and grid.steps.tolist() == list(range(0, 1000, 10))
    want = [np.mean(-(np.arange(c, c + 10) % 7)) for c in range(0, 1000, 10)]
    np.testing.assert_allclose(grid.log10["grad_share"][0], want)
    assert np.isnan(grid.log10["update_ratio"]).all()  # not logged
    # A group without gradient (a share of 0): -inf, drawn at the bottom; ZERO in the JSON.
    zero = layer_grid({"layers/a/grad_share": _series([0, 1], [0.0, 0.5])})
    assert zero is not None and zero.log10["grad_share"][0, 0] == -math.inf
    assert zero.to_json()["grad_share"] == [[ZERO, round(math.log10(0.5), 4)]]
    assert layer_grid({"loss": _series([0], [1.0])}) is None


def test_short_names_drop_the_shared_prefix() -> None:
    assert short_names(["model.transformer.wte", "model.transformer.h.0"]) == ["wte", "h.0"]
    assert short_names(["0", "2"]) == ["0", "2"]
    assert short_names(["a.b"]) == ["a.b"]


def test_the_picture_shows_a_collapse_dark_and_a_healthy_share_bright() -> None:
    from test_report import _series, synthetic_run

    n = 60
    steps = list(range(n))
    collapse = {  # the bottom group's share falls to 1e-5 by step 20; the top keeps ~1
        "layers/bottom/grad_share": _series(steps, [max(1e-5, 0.3 * 0.5**s) for s in steps]),
        "layers/top/grad_share": _series(steps, [0.99] * n),
        "layers/bottom/update_ratio": _series(steps, [1e-3] * n),
        "layers/top/update_ratio": _series(steps, [1e-3] * 30 + [1.0] * 30),  # explodes
    }
    run = synthetic_run(n=n, warmup=10, extra=None)
    run.series.update(collapse)
    png = render_layers_png([run], [summarize(run)])
    assert png is not None and png.startswith(b"\x89PNG")
    import matplotlib.image

    image = matplotlib.image.imread(io.BytesIO(png))
    assert image.shape[0] > 200 and image.shape[1] > 1000
    grid = layer_grid(run.series)
    assert grid is not None
    assert grid.log10["grad_share"][0, 40] == pytest.approx(-5.0)
    assert grid.log10["update_ratio"][1, 40] == pytest.approx(0.0)
    plain = synthetic_run(n=n)
    assert render_layers_png([plain], [summarize(plain)]) is None


def test_the_report_writes_the_heatmaps_only_for_runs_that_logged_them(
    layered_run: str, tmp_path: Path
) -> None:
    out = tmp_path / "with"
    assert cli_main(["report", layered_run, "--out", str(out)]) == 0
    assert (out / "layers.png").read_bytes().startswith(b"\x89PNG")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>inside the model</h2>" in html and html.count("data:image/png;base64") == 2
    plain = make_real_run(tmp_path / "plain", max_steps=24)
    out = tmp_path / "without"
    assert cli_main(["report", plain, "--out", str(out)]) == 0
    assert not (out / "layers.png").exists()
    assert "inside the model" not in (out / "report.html").read_text(encoding="utf-8")


def test_the_tab_serves_the_grid_of_the_focus_run(layered_run: str, tmp_path: Path) -> None:
    from werkzeug.test import Client

    logdir = os.path.dirname(os.path.dirname(layered_run))

    class Context:
        pass

    context = Context()
    context.logdir = logdir  # type: ignore[attr-defined]
    plugin = WarmupPlugin(context)  # type: ignore[arg-type]
    app = plugin.get_plugin_apps()["/run"]
    name = os.path.relpath(layered_run, logdir)
    response = Client(app).get("/run?" + urllib.parse.urlencode({"run": name}))
    body = response.get_json()
    layers = body["layers"]
    grid = layer_grid(load_run(layered_run).series, MAX_LAYER_COLUMNS)
    assert grid is not None
    assert layers["groups"] == ["net.0", "net.2"] and layers["width"] == 1
    assert layers["steps"] == list(range(30))
    for stat in LAYER_STATS:
        np.testing.assert_allclose(np.array(layers[stat], dtype=float), grid.log10[stat], atol=1e-4)

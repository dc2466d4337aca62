"""Real 2-process CPU runs (gloo): DDP and FSDP2 give the single process's numbers and decisions.

Each run is a separate command (Lightning starts the second rank by re-running the command
line), launched side by side here and given a free port each.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_scalars

from warmup_monitor.alerts import ALERTS_FILENAME, read_alerts

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "scripts" / "distributed_run.py"
RUNS = {
    "single": ["--mode", "single"],
    "ddp": ["--mode", "ddp"],
    "ddp_spawn": ["--mode", "ddp_spawn"],
    "fsdp": ["--mode", "fsdp"],
    "ddp_nan": ["--mode", "ddp", "--nan-rank", "1", "--nan-step", "3"],
    "single_layers": ["--mode", "single", "--layers"],
    "ddp_layers": ["--mode", "ddp", "--layers"],
    "fsdp_layers": ["--mode", "fsdp", "--layers"],
}
KEYS = ["loss", "grad_norm", "grad_cosine", "update_ratio", "lr", "loss_ratio"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    procs = {}
    for name, args in RUNS.items():
        out = root / name
        out.mkdir()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        env.pop("LOCAL_RANK", None)
        procs[name] = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(out), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} run did not finish in 300 s (deadlock?)")
        assert proc.returncode == 0, f"{name} failed:\n{output[-3000:]}"
    return {name: root / name for name in RUNS}


def _ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_statistics_equal_one_process_over_the_same_global_batch(
    runs: dict[str, Path], mode: str
) -> None:
    single = read_scalars(str(runs["single"]))
    multi = read_scalars(str(runs[mode]))
    for key in KEYS:
        expected = single[f"warmup/{key}"]
        got = multi[f"warmup/{key}"]
        assert sorted(got) == sorted(expected), key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)


def test_ddp_spawn_pickles_the_monitor_and_logs_what_ddp_logs(runs: dict[str, Path]) -> None:
    ddp = read_scalars(str(runs["ddp"]))
    spawn = read_scalars(str(runs["ddp_spawn"]))
    for key in KEYS:
        expected, got = ddp[f"warmup/{key}"], spawn[f"warmup/{key}"]
        assert sorted(got) == sorted(expected), key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp_nan"])
def test_every_rank_holds_the_same_state_and_files_are_written_once(
    runs: dict[str, Path], mode: str
) -> None:
    ranks = _ranks(runs[mode])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["state"] == ranks[1]["state"]
    # Files and hooks on rank zero only.
    assert len(glob.glob(str(runs[mode] / "events.out.tfevents.*"))) == 1
    assert ranks[1]["alerts"] == []


def test_nan_on_one_rank_reaches_every_rank_without_deadlock(runs: dict[str, Path]) -> None:
    ranks = _ranks(runs["ddp_nan"])
    # The decision loss is the mean over ranks: rank 1's NaN makes it NaN for both.
    non_finite = [a["step"] for a in ranks[0]["alerts"] if a["kind"] == "non_finite"]
    assert non_finite == [3]
    assert ranks[0]["alert_count"] == ranks[1]["alert_count"] == len(ranks[0]["alerts"])
    on_disk = read_alerts(runs["ddp_nan"] / ALERTS_FILENAME)
    assert [a.to_dict() for a in on_disk] == ranks[0]["alerts"]
    # Training went on to the end on both ranks.
    assert all(r["state"]["steps"]["0"] == 8 for r in ranks)


@pytest.mark.parametrize("mode", ["single_layers", "ddp_layers", "fsdp_layers"])
def test_per_group_statistics_equal_a_per_module_computation(
    runs: dict[str, Path], mode: str
) -> None:
    """Per group (each Linear): gradient norm, share and update ratio against plain torch over
    the whole gradients and parameters (gathered under FSDP2, in the test only), and the same
    as one process over the same global batch."""
    logged = read_scalars(str(runs[mode]))
    single = read_scalars(str(runs["single_layers"]))
    expected = _ranks(runs[mode])[0]["expected"]
    assert sorted(int(s) for s in expected) == list(range(8))
    stats = ("grad_norm", "grad_share", "update_ratio")
    for step, groups in expected.items():
        assert sorted(groups) == ["layers.0", "layers.2", "layers.4"]
        for group, values in groups.items():
            for stat, want in zip(stats, values, strict=True):
                tag = f"warmup/layers/{group}/{stat}"
                assert logged[tag][int(step)] == pytest.approx(want, rel=1e-5), (tag, step)
                assert logged[tag][int(step)] == pytest.approx(single[tag][int(step)], rel=1e-5), (
                    tag,
                    step,
                )
    shares = [logged[f"warmup/layers/layers.{i}/grad_share"][0] ** 2 for i in (0, 2, 4)]
    assert sum(shares) == pytest.approx(1.0, rel=1e-6)  # the groups cover every parameter


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp_layers", "fsdp_layers"])
def test_one_small_all_reduce_per_step_and_no_barrier(runs: dict[str, Path], mode: str) -> None:
    for rank in _ranks(runs[mode]):
        steps = rank["collectives"]
        assert len(steps) == 8
        assert all(s["all_reduce"] == 1 for s in steps), steps
        assert all(s["barrier"] == 0 and s["broadcast"] == 0 for s in steps), steps

"""The anchor snapshot (``AdaptiveWarmup.anchor_step``): a snapshot from early warmup kept next
to the two recent ones, so that an episode that began before both can still return to it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rollback import _net

from warmup_monitor import AdaptiveWarmup
from warmup_monitor.loop import LoopMonitor
from warmup_monitor.rollback import Snapshots


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> torch.Tensor:
    loss = model(torch.randn(16, 4, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _assert_state(model: Any, opt: Any, model_sd: dict, opt_sd: dict) -> None:
    for key, value in model_sd.items():  # parameters and BatchNorm buffers
        assert torch.equal(model.state_dict()[key], value), key
    state = opt.state_dict()["state"]
    assert state.keys() == opt_sd.keys()
    for idx, entry in opt_sd.items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(state[idx][name]), torch.as_tensor(value))


@pytest.mark.parametrize("anchor", [2, None])
def test_an_onset_before_both_recent_snapshots_returns_to_the_anchor(anchor: int | None) -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    snaps = Snapshots("cpu", keep=2, anchor_step=anchor)
    expected: tuple[dict, dict] | None = None
    for step in range(20):
        if step == 2:  # the state before update 2, copied independently
            expected = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"]))
        if step in (0, 2, 5, 10, 15):  # snapshots every 5 steps, and the anchor's
            snaps.take(step, model, [opt], {0: {"step": step}})
        _step(model, opt, g)
    assert expected is not None
    if anchor is None:
        assert snaps.steps == [10, 15]  # step 2 was never a snapshot step of its own
        assert snaps.restore(model, [opt], before=4) is None
        return
    assert snaps.steps == [2, 10, 15] and snaps.anchor is not None
    got = snaps.restore(model, [opt], before=4)  # a collapse found at step 20, onset at 3
    assert got is snaps.anchor and got.step == 2 and got.monitor == {0: {"step": 2}}
    _assert_state(model, opt, *expected)
    assert snaps.steps == [2]  # the recent ones held the episode; the anchor stays
    for _ in range(3):  # training goes on; a second collapse returns to the anchor again
        _step(model, opt, g)
    assert snaps.restore(model, [opt], before=19) is got
    _assert_state(model, opt, *expected)


def test_the_anchor_costs_one_snapshot_of_memory_and_keeps_its_own_buffers() -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    _step(model, opt, g)
    snaps = Snapshots("cpu", keep=2, anchor_step=1)
    anchor = snaps.take(1, model, [opt], {})
    # Independently: parameters and buffers, Adam's two moments and step count per parameter.
    tensors = list(model.state_dict().values())
    tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    one = sum(t.numel() * t.element_size() for t in tensors)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert anchor.nbytes == one and one >= 3 * params
    ptr = anchor.model["0.weight"].data_ptr()
    for step in range(2, 8):
        _step(model, opt, g)
        snaps.take(step, model, [opt], {})
    assert snaps.steps == [1, 6, 7] and snaps.nbytes == 3 * one
    assert snaps.anchor is anchor and anchor.model["0.weight"].data_ptr() == ptr  # not reused


def test_a_loop_monitor_keeps_the_anchor_through_warmup_and_in_its_state_dict() -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    adaptive = AdaptiveWarmup(anchor_step=2, snapshot_every_n_steps=5)
    monitor = LoopMonitor(opt, warmup_steps=30, adaptive=adaptive, model=model, alerts_file=None)
    before_2: dict[str, torch.Tensor] = {}
    for step in range(12):
        if step == 2:
            before_2 = copy.deepcopy(model.state_dict())
        loss = model(torch.randn(16, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
    snaps = monitor.engine.snapshots
    assert snaps is not None and snaps.anchor is not None and snaps.anchor.step == 2
    assert 2 in snaps.steps and max(snaps.steps) == 10
    for key, value in before_2.items():
        assert torch.equal(snaps.anchor.model[key], value), key
    # A checkpoint taken now holds the anchor; a new monitor loads it back as the anchor.
    state = copy.deepcopy(monitor.state_dict())
    monitor.close()
    fresh = LoopMonitor(opt, warmup_steps=30, adaptive=adaptive, model=model, alerts_file=None)
    fresh.load_state_dict(state)
    loaded = fresh.engine.snapshots
    assert loaded is not None and loaded.anchor is not None and loaded.anchor.step == 2
    for key, value in before_2.items():
        assert torch.equal(loaded.anchor.model[key], value), key
    fresh.close()


def test_anchor_step_is_checked_by_name() -> None:
    with pytest.raises((ValueError, TypeError), match=r"AdaptiveWarmup\.anchor_step"):
        AdaptiveWarmup(anchor_step=-1)


@pytest.mark.parametrize(
    ("optimizer", "row", "states"), [("adamw", "AdamW", 2), ("sgd", "SGD, momentum", 1)]
)
def test_the_rollback_page_states_the_anchors_memory(optimizer: str, row: str, states: int) -> None:
    """The anchor's rows of ``docs/rollback.md`` are those of the measured JSON: three kept
    snapshots, each the parameters plus the optimizer's state (AdamW 3x, SGD momentum 2x)."""
    root = Path(__file__).resolve().parent.parent
    runs = json.loads((root / "benchmarks" / "results" / "snapshot_memory.json").read_text())
    pick = [r for r in runs["runs"] if r["optimizer"] == optimizer]
    anchor = next(r for r in pick if r.get("anchor"))
    off = next(r for r in pick if not r["rollback"])
    assert anchor["snapshots_kept"] == 3
    assert round(anchor["total_x_params"], 2) == 3 * (1 + states)
    mib = 2.0**20
    expected = (
        f"| {row} + anchor | {anchor['param_bytes'] / mib:.0f} MiB "
        f"| {anchor['snapshot_bytes'] / mib:.0f} MiB ({1 + states}x) "
        f"| {anchor['snapshots_total_bytes'] / mib:.0f} MiB ({3 * (1 + states)}x) "
        f"| {(anchor['rss_end_bytes'] - off['rss_end_bytes']) / mib:+.0f} MiB "
        f"| {anchor['checkpoint_bytes'] / mib:.0f} MiB instead of "
        f"{off['checkpoint_bytes'] / mib:.0f} |"
    )
    assert expected in (root / "docs" / "rollback.md").read_text()

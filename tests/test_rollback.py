"""Rollback: snapshots and their restore, a scripted instability in real Lightning training, a
resume through a checkpoint file after a rollback, and 2-process DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, make_data, ten_x_only, tiny_module_class
from rollback_witness import witness_class

from warmup_monitor import AdaptiveWarmup, Alert, WarmupMonitor, Window
from warmup_monitor.rollback import Snapshots

# ------------------------------------------------------------------------- snapshots


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_restore_brings_back_parameters_buffers_and_optimizer_state_not_the_rngs() -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, 3, seed=1)
    snaps = Snapshots("cpu")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected_model = copy.deepcopy(model.state_dict())
    expected_opt = copy.deepcopy(opt.state_dict()["state"])
    snap = snaps.take(3, model, [opt], {0: {"detector": 1}})
    # The episode: training goes on, the RNGs move, the scheduler changes the lr.
    torch.rand(3), random.random(), np.random.rand()
    _train(model, opt, 3, seed=2)
    rngs = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for group in opt.param_groups:
        group["lr"] = 0.004
    assert not torch.equal(model[0].weight, expected_model["0.weight"])

    got = snaps.restore(model, [opt], before=4)
    assert got is snap and got.step == 3 and got.monitor == {0: {"detector": 1}}
    for key, value in expected_model.items():  # parameters and BatchNorm buffers
        assert torch.equal(model.state_dict()[key], value), key
    state = opt.state_dict()["state"]
    assert state.keys() == expected_opt.keys()
    for idx, entry in expected_opt.items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(state[idx][name]), torch.as_tensor(value))
    assert [g["lr"] for g in opt.param_groups] == [0.004]  # the schedule goes on
    # Time goes on: the random generators are not rewound (no replayed shuffle or dropout).
    assert torch.equal(torch.get_rng_state(), rngs[0])
    assert random.getstate() == rngs[1] and np.array_equal(np.random.get_state()[1], rngs[2])
    # The optimizer still updates the model's own parameters.
    before = model[0].weight.detach().clone()
    _train(model, opt, 1, seed=3)
    assert not torch.equal(model[0].weight, before)


def test_memory_is_counted_and_buffers_are_reused() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 1, seed=1)
    snaps = Snapshots("cpu", keep=2)
    first = snaps.take(1, model, [opt], {})
    # Independently: parameters and buffers, and one momentum buffer per parameter.
    tensors = list(model.state_dict().values())
    tensors += [s["momentum_buffer"] for s in opt.state.values()]
    assert first.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    ptr = first.model["0.weight"].data_ptr()
    snaps.take(2, model, [opt], {})
    third = snaps.take(3, model, [opt], {})  # reuses the oldest one's buffers
    assert third.model["0.weight"].data_ptr() == ptr
    assert snaps.steps == [2, 3] and snaps.nbytes == 2 * first.nbytes


def test_restore_takes_the_last_snapshot_before_the_onset_or_none() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = Snapshots("same")
    assert snaps.restore(model, [opt], before=10) is None
    snaps.take(4, model, [opt], {})
    snaps.take(6, model, [opt], {})
    assert snaps.restore(model, [opt], before=4) is None and snaps.steps == [4, 6]
    got = snaps.restore(model, [opt], before=6)
    assert got is not None and got.step == 4 and snaps.steps == [4]  # 6 held the episode
    with pytest.raises(ValueError, match="`device` must be 'cpu' or 'same'"):
        Snapshots("cuda")


# ------------------------------------------------------------------------- in Lightning


class Trace(pl.Callback):
    """Parameters and momentum buffers before each update, the lr it used, the batch index."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.momentum: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        self.batches.append(idx)

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        opt = trainer.optimizers[0]
        # Registered after the monitor's lr factor: sees the lr the update uses.
        opt.register_step_pre_hook(lambda o, a, k: self.lrs.append(float(o.param_groups[0]["lr"])))

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        self.before.append([p.detach().clone() for p in module.parameters()])
        state = optimizer.state
        self.momentum.append(
            [
                state[p]["momentum_buffer"].clone() if p in state else torch.zeros_like(p)
                for p in module.parameters()
            ]
        )


def _rollback_monitor(hooked: list[Alert] | None = None) -> WarmupMonitor:
    return WarmupMonitor(
        warmup_steps=10,
        schedule="linear",
        adaptive=AdaptiveWarmup(rollback=True, snapshot_every_n_steps=1),
        detection=ten_x_only(),
        on_alert=None if hooked is None else hooked.append,
    )


def test_a_scripted_instability_backs_off_and_rolls_back_to_the_snapshot(
    tmp_path: Path,
) -> None:
    hooked: list[Alert] = []
    trace = Trace()
    model = tiny_module_class(pl)(lr=0.05, scripted=lambda s: 20.0 if s == 6 else 1.0)
    fit(pl, tmp_path, [_rollback_monitor(hooked), trace], model=model, max_steps=12)
    kinds = [(a.step, a.kind.value) for a in hooked]
    assert kinds == [(6, "loss_spike"), (6, "lr_backoff"), (6, "warmup_extended"), (6, "rollback")]
    rollback = hooked[-1]
    # The loss of step 6 came from the parameters before update 6: the last snapshot before
    # the onset is the one before update 5 (one is taken before every update).
    assert rollback.details["snapshot_step"] == 5 and rollback.value == 2.0  # updates 5, 6
    # After the rollback the parameters and the momentum are exactly the snapshot's.
    for p, q in zip(trace.before[7], trace.before[5], strict=True):
        assert torch.equal(p, q)
    for m, n in zip(trace.momentum[7], trace.momentum[5], strict=True):
        assert torch.equal(m, n)
    assert not all(torch.equal(p, q) for p, q in zip(trace.before[7], trace.before[6], strict=True))
    # The back-off: from factor 0.7 (step 6) to 0.35, then the line to 1 at step 19 (the
    # 20-step plan: + W past the planned end).
    expected = [0.05 * (t + 1) / 10 for t in range(7)]
    expected += [0.05 * (0.35 + 0.65 * (t - 6) / 13) for t in range(7, 12)]
    assert trace.lrs == pytest.approx(expected, rel=1e-9)
    # The data stream goes on: no batch is replayed (8 batches an epoch).
    assert trace.batches == [t % 8 for t in range(12)]


def test_a_resume_after_a_rollback_follows_the_uninterrupted_run(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"

    def model() -> Any:
        return tiny_module_class(pl)(
            lr=0.05, scripted=lambda s: 20.0 if s == 5 else 1.0, batch_from_step=True
        )

    whole_monitor, whole_trace = _rollback_monitor(), Trace()
    whole = model()
    saver = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=9, save_top_k=-1)
    fit(
        pl,
        tmp_path / "a",
        [whole_monitor, whole_trace, saver],
        model=whole,
        max_steps=16,
        enable_checkpointing=True,
    )
    assert whole_monitor.engine.controller is not None
    assert whole_monitor.engine.controller.rollbacks == [[5, 4]]
    (ckpt,) = [p for p in ckpt_dir.iterdir() if "step=9" in p.name]

    resumed_monitor, resumed_trace = _rollback_monitor(), Trace()
    resumed = model()
    fit(
        pl,
        tmp_path / "b",
        [resumed_monitor, resumed_trace],
        model=resumed,
        max_steps=16,
        ckpt_path=str(ckpt),
    )
    controller = resumed_monitor.engine.controller
    assert controller is not None and controller.rollbacks == [[5, 4]]  # the fact survived
    assert resumed_trace.lrs == pytest.approx(whole_trace.lrs[9:], rel=1e-12)
    for p, q in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
    assert resumed_monitor.state_dict()["controllers"] == whole_monitor.state_dict()["controllers"]


# ------------------------------------------------------------------------- 2-process DDP

SCRIPT = Path(__file__).parent / "scripts" / "rollback_run.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.distributed
def test_rollback_under_ddp_keeps_the_ranks_identical(tmp_path: Path) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    # Both ranks decided the same rollback at the same step, from the all-reduced values ...
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == [[4, 3]]
    assert ranks[0]["state"] == ranks[1]["state"]
    # ... restored the snapshot before update 3 (the next update starts from it) ...
    for r in ranks:
        assert r["before"][5] == r["before"][3]
    # ... and stayed identical to the end.
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["before"] == ranks[1]["before"]
    assert [a["kind"] for a in ranks[0]["alerts"]] == [
        "loss_spike",
        "lr_backoff",
        "warmup_extended",
        "rollback",
        "episode_end",  # the spike's episode, closed when the episode went quiet or the fit ended
    ]
    assert ranks[1]["alerts"] == []  # files and hooks on rank zero only


# ------------------------------------------------------------------------- issue 21, part A


def _net_class(ns: Any) -> type:
    """A small regression model with BatchNorm (buffers) as a LightningModule of ``ns``.

    ``losses`` scripts the loss *value* at chosen optimizer steps (the gradients stay the real
    ones); ``nan_grad_at`` fills every gradient with NaN at chosen steps, so that the update
    really damages the weights.
    """

    class Net(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(
            self,
            optimizer: str = "adam",
            losses: dict[int, float] | None = None,
            nan_grad_at: tuple[int, ...] = (),
            lr: float = 0.02,
        ) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 16),
                torch.nn.BatchNorm1d(16),
                torch.nn.Tanh(),
                torch.nn.Linear(16, 1),
            )
            self.optimizer_name, self.losses = optimizer, dict(losses or {})
            self.nan_grad_at, self.lr = nan_grad_at, lr

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            value = self.losses.get(self.trainer.global_step)
            return loss if value is None else loss - loss.detach() + value

        def on_after_backward(self) -> None:
            if self.trainer.global_step in self.nan_grad_at:
                for p in self.parameters():
                    p.grad.fill_(float("nan"))

        def configure_optimizers(self) -> Any:
            if self.optimizer_name == "adam":
                return torch.optim.Adam(self.parameters(), lr=self.lr)
            if self.optimizer_name == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return Net


def _adaptive_monitor(ns_adaptive: AdaptiveWarmup | None = None, **kwargs: Any) -> WarmupMonitor:
    return WarmupMonitor(
        warmup_steps=10,
        schedule="linear",
        adaptive=ns_adaptive or AdaptiveWarmup(),
        detection=ten_x_only(),
        alerts_file=None,
        **kwargs,
    )


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values())


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_repeated_rollbacks_restore_the_snapshot_as_it_was_taken(
    ns: Any, optimizer: str, tmp_path: Path
) -> None:
    """Issue 21 item 1: three rollbacks; after each one the parameters, BatchNorm buffers and
    every optimizer-state tensor (Adam's ``step`` included) equal an independent deep copy made
    when the snapshot was taken, and the kept snapshots never change afterwards."""
    monitor = _adaptive_monitor()  # AdaptiveWarmup() defaults: a snapshot before every update
    witness = witness_class(ns)(monitor)
    model = _net_class(ns)(optimizer, losses={6: 1e3, 13: math.nan, 20: 1e3})
    fit(ns, tmp_path, [monitor, witness], model=model, max_steps=24, logger=False)
    assert monitor.engine.controller is not None
    assert monitor.engine.controller.rollbacks == [[6, 5], [13, 12], [20, 19]]
    assert witness.checked == [[6, 5], [13, 12], [20, 19]]
    assert witness.errors == []
    assert witness.snapshot_checks >= 40  # two kept snapshots checked at nearly every step
    if optimizer != "sgd":  # the step count came back too: 5 updates before snapshot 5, ...
        steps = [float(s["step"]) for s in witness.copies[7]["opts"][0].values()]
        assert steps and all(s == 5.0 for s in steps)


def test_a_restored_optimizer_shares_no_storage_with_the_snapshot() -> None:
    """Issue 21 item 1, at the unit level: after a restore, training does not write into the
    snapshot, and a second restore brings back the snapshot's values, not the live ones."""
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2, seed=1)
    snaps = Snapshots("cpu")
    snaps.take(2, model, [opt], {})
    expected = copy.deepcopy(opt.state_dict()["state"])
    expected_model = copy.deepcopy(model.state_dict())
    for seed in (2, 3):
        _train(model, opt, 3, seed=seed)
        snap = snaps.restore(model, [opt], before=5)
        assert snap is not None and snap.step == 2
        for idx, entry in expected.items():
            for name, value in entry.items():
                assert torch.equal(opt.state_dict()["state"][idx][name], value), (seed, name)
                assert torch.equal(snap.optimizers[0][idx][name], value), (seed, name)
                live = opt.state_dict()["state"][idx][name]
                assert live.data_ptr() != snap.optimizers[0][idx][name].data_ptr()
        for key, value in expected_model.items():
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("on_exhausted", ["stop", "warn", "raise"])
def test_the_episode_that_exhausts_the_plan_is_rolled_back_too(
    on_exhausted: str, tmp_path: Path
) -> None:
    """Issue 21 item 2: NaN gradients at steps 6 and 13 with ``max_extensions=1``: the second
    episode exhausts the plan and is rolled back as well; no NaN weight is kept, and
    ``ModelCheckpoint(save_last=True)`` writes the snapshot's finite weights."""
    from warmup_monitor.controller import WarmupExhaustedError

    adaptive = AdaptiveWarmup(max_extensions=1, on_exhausted=on_exhausted)  # type: ignore[arg-type]
    monitor = _adaptive_monitor(adaptive)
    witness = witness_class(pl)(monitor)
    model = _net_class(pl)("adam", nan_grad_at=(6, 13))
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    if on_exhausted == "raise":
        with pytest.raises(WarmupExhaustedError):
            fit(pl, tmp_path, [monitor, witness], model=model, max_steps=20, logger=False)
        assert _finite(model) and witness.errors == []
        # The rollback came before the exception: the model is the snapshot before update 12.
        for key, value in witness.copies[12]["model"].items():
            assert torch.equal(model.state_dict()[key], value), key
        return
    trainer = fit(
        pl, tmp_path, [monitor, witness, saver], model=model, max_steps=20, logger=False,
        enable_checkpointing=True,
    )  # fmt: skip
    controller = monitor.engine.controller
    assert controller is not None and controller.exhausted
    assert controller.rollbacks == [[6, 5], [13, 12]]
    assert witness.checked == [[6, 5], [13, 12]] and witness.errors == []
    assert _finite(model)
    assert trainer.global_step == (14 if on_exhausted == "stop" else 20)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(bool(torch.isfinite(t).all()) for t in last["state_dict"].values())
    if on_exhausted == "stop":  # stopped right after the rollback: the snapshot's weights
        for key, value in witness.copies[12]["model"].items():
            assert torch.equal(last["state_dict"][key], value), key


def test_a_weight_averaging_callback_listed_first_never_sees_the_damaged_weights(
    ns: Any, tmp_path: Path
) -> None:
    """Issue 21 item 3: Lightning's own ``EMAWeightAveraging`` listed *before* the monitor
    updates its average in ``on_train_batch_end``; the rollback happens earlier, in the
    optimizer's step post-hook, so the average takes in the restored weights, not the NaN
    ones, and the model it writes back at the end of training is the EMA of the weights the
    witness saw after every step (computed here independently)."""
    decay = 0.8
    ema = ns.callbacks.EMAWeightAveraging(decay=decay, use_buffers=False)
    monitor = _adaptive_monitor()
    witness = witness_class(ns)(monitor)
    model = _net_class(ns)("adamw", nan_grad_at=(6,))
    fit(ns, tmp_path, [ema, monitor, witness], model=model, max_steps=10, logger=False)
    assert monitor.engine.controller is not None
    assert monitor.engine.controller.rollbacks == [[6, 5]]
    names = [n for n, _ in model.named_parameters()]
    expected = {n: witness.copies[1]["model"][n].clone() for n in names}
    for step in range(2, 11):  # the weights after each update, as the witness copied them
        for n in names:
            expected[n] = decay * expected[n] + (1 - decay) * witness.copies[step]["model"][n]
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)
    assert witness.errors == []


@pytest.mark.parametrize(
    ("every", "spike", "saved", "restored"),
    [(4, 11, [8], 8), (1, 10, [9], 9)],
    ids=["snapshot-every-4", "snapshot-every-step"],
)
def test_a_resume_between_the_last_snapshot_and_the_episode_rolls_back_the_same(
    tmp_path: Path, every: int, spike: int, saved: list[int], restored: int
) -> None:
    """Issue 21 item 7: a checkpoint at step 10, after the last snapshot before the episode
    (before update 8 with a snapshot every 4 steps, a spike at 11; before update 9 with one
    every step, a spike at 10). The checkpoint holds that snapshot (a rollback can still come),
    so the resumed run restores it as the uninterrupted run does, and both end with the same
    weights and AdamW state. (With a snapshot every step, the snapshot before update 10 is the
    checkpoint's own state: left out, the resumed run takes it again.)"""
    ckpt_dir = tmp_path / "ckpt"

    def model() -> Any:
        return tiny_module_class(pl)(
            lr=0.05, scripted=lambda s: 20.0 if s == spike else 1.0, batch_from_step=True,
            optimizer="adamw",
        )  # fmt: skip

    def monitor() -> WarmupMonitor:
        return _adaptive_monitor(AdaptiveWarmup(snapshot_every_n_steps=every))

    whole_monitor, whole = monitor(), model()
    saver = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=10, save_top_k=-1)
    whole_trainer = fit(
        pl, tmp_path / "a", [whole_monitor, saver], model=whole, max_steps=16,
        enable_checkpointing=True, logger=False,
    )  # fmt: skip
    assert whole_monitor.engine.controller is not None
    assert whole_monitor.engine.controller.rollbacks == [[spike, restored]]
    (ckpt,) = [p for p in ckpt_dir.iterdir() if "step=10" in p.name]

    resumed_monitor, resumed = monitor(), model()
    resumed_trainer = fit(
        pl, tmp_path / "b", [resumed_monitor], model=resumed, max_steps=16, ckpt_path=str(ckpt),
        logger=False,
    )  # fmt: skip
    assert resumed_monitor.engine.controller is not None
    assert resumed_monitor.engine.controller.rollbacks == [[spike, restored]]
    for p, q in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q)
    a = resumed_trainer.optimizers[0].state_dict()["state"]
    b = whole_trainer.optimizers[0].state_dict()["state"]
    for idx, entry in b.items():
        for name, value in entry.items():
            assert torch.equal(a[idx][name], value), (idx, name)
    # What made it so: the checkpoint holds the snapshot a rollback can still restore (an
    # older one could only serve an onset before it: none can come, every step up to 9 was
    # processed and no episode is open). A weights-only load.
    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [v for k, v in callbacks.items() if "WarmupMonitor" in k]
    assert [s["step"] for s in state["snapshots"]["snapshots"]] == saved


def test_after_the_window_no_snapshot_goes_into_the_checkpoint(tmp_path: Path) -> None:
    """The snapshots' cost in checkpoints ends with the window in which a rollback can act
    (a 10-step warmup, no grace window), and with the fit."""
    monitor = _adaptive_monitor(AdaptiveWarmup(grace_steps=0))
    seen: list[list[int] | None] = []

    def look(*args: Any) -> None:
        state = monitor.state_dict()
        snaps = state.get("snapshots")
        seen.append(None if snaps is None else [s["step"] for s in snaps["snapshots"]])

    spy = type("Spy", (pl.Callback,), {"on_train_batch_end": lambda self, *a: look()})()
    fit(pl, tmp_path, [monitor, spy], max_steps=12, logger=False)
    # After update t (t + 1 updates taken): the snapshot before update t, the one a rollback
    # of an onset at t + 1 restores (the one before t + 1 is the current state).
    assert seen == [[t] for t in range(9)] + [None] * 3
    assert "snapshots" not in monitor.state_dict()  # the fit is over


class Batches(pl.Callback):
    """The first input row of every batch, in order."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        self.rows.append(batch[0][0].clone())


def test_after_a_rollback_the_data_goes_on_and_no_epoch_replays_another(tmp_path: Path) -> None:
    """Issue 21 item 8: a spike on the first step of epoch 2 rolls back to the snapshot before
    update 15 (epoch 1). The batches that follow are exactly those of the same run without
    rollback (the shuffle of epoch 3 is its own, not epoch 2's again)."""
    loader_seed = 123

    def run(rollback: bool, root: Path) -> tuple[list[torch.Tensor], Any]:
        pl.seed_everything(loader_seed)
        batches = Batches()
        monitor = _adaptive_monitor(AdaptiveWarmup(rollback=rollback, snapshot_every_n_steps=1))
        model = _net_class(pl)("sgd", losses={16: 1e3})
        loader = torch.utils.data.DataLoader(make_data(32), batch_size=4, shuffle=True)
        fit(pl, root, [monitor, batches], model=model, max_steps=32, loader=loader, logger=False)
        return batches.rows, monitor

    rows, monitor = run(True, tmp_path / "a")
    assert monitor.engine.controller.rollbacks == [[16, 15]]
    plain, _ = run(False, tmp_path / "b")
    assert len(rows) == len(plain) == 32
    for step, (got, expected) in enumerate(zip(rows, plain, strict=True)):
        assert torch.equal(got, expected), step
    epochs = [torch.stack(rows[e * 8 : (e + 1) * 8]) for e in range(4)]
    assert not torch.equal(epochs[3], epochs[2])  # not a replay of the epoch of the episode


REPEATED = Path(__file__).parent / "scripts" / "rollback_repeated_run.py"
RUNS = {
    "ddp-adam": ["--strategy", "ddp", "--optimizer", "adam"],
    "ddp-adamw": ["--strategy", "ddp", "--optimizer", "adamw"],
    "ddp-sgd": ["--strategy", "ddp", "--optimizer", "sgd"],
    "fsdp-adamw": ["--strategy", "fsdp", "--optimizer", "adamw"],
}


@pytest.fixture(scope="module")
def repeated_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("repeated")
    procs = {}
    for name, args in RUNS.items():
        out = root / name
        out.mkdir()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        env.pop("LOCAL_RANK", None)
        procs[name] = subprocess.Popen(
            [sys.executable, str(REPEATED), "--out", str(out), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} did not finish in 300 s (deadlock?)")
        assert proc.returncode == 0, f"{name} failed:\n{output[-3000:]}"
        results[name] = [json.loads(p.read_text()) for p in sorted((root / name).glob("r*.json"))]
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("run", list(RUNS))
def test_repeated_rollbacks_under_ddp_and_fsdp2_restore_the_snapshot_on_every_rank(
    repeated_runs: dict[str, list[dict[str, Any]]], run: str
) -> None:
    """Issue 21 items 1 and 4, 2 processes (gloo, CPU): three rollbacks with DDP (Adam, AdamW,
    SGD momentum) and with FSDP2 (``fully_shard``, ``AdaptiveWarmup()`` defaults, snapshots of
    DTensor shards in host memory). On every rank, after each rollback, the parameters (shards),
    buffers and optimizer state equal the independent witness's copy of the snapshot's step,
    and every kept snapshot equals the copy of its step at every later step."""
    ranks = repeated_runs[run]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["rollbacks"] == r["checked"] == [[6, 5], [13, 12], [20, 19]]
        assert r["errors"] == []
        assert r["snapshot_checks"] >= 40
        if "sgd" not in run:  # Adam's step count is the snapshot's: 5 updates before 5 ...
            assert r["steps"] and set(r["steps"]) == {5.0}
    assert ranks[0]["alerts"].count("rollback") == 3 and ranks[1]["alerts"] == []
    if run.startswith("fsdp"):  # the parameters were shards, and the ranks held different ones
        assert all(all(r["dtensor"]) for r in ranks)
        assert ranks[0]["shard_numel"] != ranks[1]["shard_numel"]


def test_the_checkpoint_keeps_the_older_snapshot_while_an_open_episode_may_need_it() -> None:
    """Which snapshots a checkpoint holds: the last one before the earliest onset a rollback
    can still have (an open episode's onset, or the first step not yet processed)."""
    from warmup_monitor.alerts import AlertKind
    from warmup_monitor.controller import WarmupController

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = Snapshots("cpu")
    for step in (4, 8):
        snaps.take(step, model, [opt], {})
    assert [s["step"] for s in snaps.state_dict()["snapshots"]] == [4, 8]
    assert [s["step"] for s in snaps.state_dict(onset_from=10)["snapshots"]] == [8]
    assert [s["step"] for s in snaps.state_dict(onset_from=8)["snapshots"]] == [4, 8]
    assert [s["step"] for s in snaps.state_dict(onset_from=3)["snapshots"]] == [4, 8]
    # The snapshot of the current state is in the checkpoint anyway (the model, the optimizer).
    assert [s["step"] for s in snaps.state_dict(onset_from=8, current=8)["snapshots"]] == [4]
    c = WarmupController(warmup_steps=100, min_alerts=2, window_steps=20)
    assert c.earliest_onset(10) == 10
    # A trend spike at step 8 opens an episode that a second one could still act on.
    c.observe(8, [Alert(8, AlertKind.LOSS_TREND_SPIKE, "trend")])
    assert c.rollback_request is None and c.earliest_onset(10) == 8
    assert c.earliest_onset(40) == 40  # the episode is over: a new one starts later


def test_with_several_optimizers_a_weight_averaging_callback_listed_first_is_warned_of(
    ns: Any, tmp_path: Path
) -> None:
    """With several optimizers (manual optimization) the rollback comes after the batch, in
    the monitor's ``on_train_batch_end``: an averaging callback listed first gets a warning
    naming the fix; listed after the monitor, no warning."""

    class TwoOptimizers(ns.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
            self.automatic_optimization = False

        def training_step(self, batch: Any, idx: int) -> None:
            x, y = batch
            for opt in self.optimizers():
                loss = torch.nn.functional.mse_loss(self.b(self.a(x).tanh()), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.a.parameters(), lr=0.01),
                    torch.optim.SGD(self.b.parameters(), lr=0.01)]  # fmt: skip

    ema = ns.callbacks.EMAWeightAveraging
    with pytest.warns(UserWarning, match="EMAWeightAveraging is listed before the monitor"):
        fit(ns, tmp_path, [ema(), _adaptive_monitor()], model=TwoOptimizers(), max_steps=2)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ns, tmp_path, [_adaptive_monitor(), ema()], model=TwoOptimizers(), max_steps=2)
    assert not [w for w in caught if "listed before the monitor" in str(w.message)]


@pytest.mark.parametrize(
    ("optimizer", "row", "states"), [("adamw", "AdamW", 2), ("sgd", "SGD, momentum", 1)]
)
def test_the_readme_states_the_snapshot_memory_snapshots_hold(
    optimizer: str, row: str, states: int, tmp_path: Path
) -> None:
    """Issue 21 item 11: one snapshot holds the parameters and the optimizer's state (AdamW:
    two moments and a step per tensor: 3x; SGD momentum: 2x), two are kept (6x, 4x); the
    rollback page the README links to (``docs/rollback.md``) states these, with the figures
    of ``benchmarks/results/snapshot_memory.json`` and the command that measured them."""
    monitor = _adaptive_monitor(AdaptiveWarmup(snapshot_every_n_steps=1))
    model = tiny_module_class(pl)(optimizer=optimizer)
    # Three steps of a 10-step warmup are enough: the monitor says the fit ends in warmup.
    with pytest.warns(UserWarning, match="training ends during warmup"):
        fit(pl, tmp_path, [monitor], model=model, max_steps=3, logger=False)
    assert monitor._snapshots is not None
    kept = monitor._snapshots._ring
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    steps = 4 * len(params) if optimizer == "adamw" else 0  # one float32 `step` per tensor
    assert [s.nbytes for s in kept] == [(1 + states) * param_bytes + steps] * 2
    assert monitor._snapshots.nbytes == 2 * (1 + states) * param_bytes + 2 * steps

    section = (Path(__file__).parent.parent / "docs" / "rollback.md").read_text()
    assert "benchmarks/snapshot_memory.py" in section
    results = Path(__file__).parent.parent / "benchmarks" / "results" / "snapshot_memory.json"
    runs = json.loads(results.read_text())["runs"]
    on, off = (next(r for r in runs if r["optimizer"] == optimizer and r["rollback"] is b)
               for b in (True, False))  # fmt: skip
    mib = 2.0**20
    assert round(on["per_snapshot_x_params"], 2) == 1 + states
    assert round(on["total_x_params"], 2) == 2 * (1 + states)
    expected = (
        f"| {row} | {on['param_bytes'] / mib:.0f} MiB "
        f"| {on['snapshot_bytes'] / mib:.0f} MiB ({1 + states}x) "
        f"| {on['snapshots_total_bytes'] / mib:.0f} MiB ({2 * (1 + states)}x) "
        f"| {(on['rss_end_bytes'] - off['rss_end_bytes']) / mib:+.0f} MiB "
        f"| {on['checkpoint_bytes'] / mib:.0f} MiB instead of {off['checkpoint_bytes'] / mib:.0f} |"
    )
    assert expected in section


def test_a_rollback_decided_by_a_deferred_read_is_carried_out_at_once(tmp_path: Path) -> None:
    """With ``check_every_n_steps=5`` the spike of step 6 is read when the snapshot before
    update 8 is due (its steps are processed first): the rollback to the snapshot before
    update 4 happens right there, after update 7, not one update later; the witness sees the
    snapshot's state exactly."""
    monitor = WarmupMonitor(
        warmup_steps=20,
        schedule="linear",
        adaptive=AdaptiveWarmup(snapshot_every_n_steps=4),
        detection=ten_x_only(),
        window=Window(check_every_n_steps=5, log_every_n_steps=5),
        alerts_file=None,
    )
    witness = witness_class(pl)(monitor)
    model = _net_class(pl)("adam", losses={6: 1e3})
    # 12 steps of the 20-step warmup (the rollback is in there): the monitor says it ends early.
    with pytest.warns(UserWarning, match="training ends during warmup"):
        fit(pl, tmp_path, [monitor, witness], model=model, max_steps=12, logger=False)
    assert monitor.engine.controller is not None
    assert monitor.engine.controller.rollbacks == [[7, 4]]
    assert witness.checked == [[7, 4]] and witness.errors == []

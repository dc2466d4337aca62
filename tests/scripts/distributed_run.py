"""One training run for the distributed tests: single process, DDP, DDP spawn or FSDP2 on 2 CPU
processes.

Every run sees the same global batches: a single process trains on batches of 8 samples; each of
2 ranks trains on its half (``data[rank::2]``, 4 samples a batch, no distributed sampler), so the
averaged gradient equals the single process's. Each rank writes ``rank{R}.json`` with the
monitor's state and the alerts it decided on; rank zero's TensorBoard files are in ``--out``.
With ``ddp_spawn`` the monitor is pickled into the spawned ranks, and each rank picks its half of
the data in ``train_dataloader`` (the rank is known only there); no ``rank{R}.json``.

With ``--layers`` the monitor also logs per-group statistics (``Statistics(layers="auto")``:
``layers.0``, ``layers.2``, ``layers.4``), and each rank writes the per-module values computed
here with plain torch from whole gradients and parameters (``DTensor.full_tensor()`` under
FSDP2: a test may gather) as ``expected`` in its ``rank{R}.json``.

Usage: python distributed_run.py --mode single|ddp|ddp_spawn|fsdp --out DIR
       [--nan-rank R --nan-step S] [--layers]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from sharding import shard_linear_layers

from warmup_monitor import Alert, Statistics, WarmupMonitor, Window

warnings.filterwarnings("ignore")


class Net(pl.LightningModule):
    def __init__(self, nan_rank: int, nan_step: int, fsdp: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(6, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 1),
        )
        self.nan_rank, self.nan_step, self.fsdp = nan_rank, nan_step, fsdp

    def configure_model(self) -> None:
        if self.fsdp:
            shard_linear_layers(self.layers, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layers(x), y)
        if self.global_rank == self.nan_rank and self.trainer.global_step == self.nan_step:
            loss = loss - loss.detach() + math.nan  # the value only: gradients stay finite
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(64, 1, generator=g)
    return x, y


def rank_loader(rank: int, world: int) -> DataLoader:
    x, y = make_data()
    return DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=8 // world)


class SpawnNet(Net):
    """Under ddp_spawn the rank is known only in the spawned process."""

    def train_dataloader(self) -> DataLoader:
        return rank_loader(self.trainer.global_rank, self.trainer.world_size)


class CollectiveCounter(pl.Callback):
    """Counts Python-level collectives per training step (spies on the real functions)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"all_reduce": 0, "barrier": 0, "broadcast": 0}
        self.per_step: list[dict[str, int]] = []
        self._last = dict(self.calls)
        dist = torch.distributed
        for name in self.calls:
            real = getattr(dist, name)

            def spy(*a, _real=real, _name=name, **k):  # type: ignore[no-untyped-def]
                self.calls[_name] += 1
                return _real(*a, **k)

            setattr(dist, name, spy)

    def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
        self._last = dict(self.calls)

    def on_train_batch_end(self, *args) -> None:  # type: ignore[no-untyped-def]
        self.per_step.append({k: self.calls[k] - self._last[k] for k in self.calls})


def _whole(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach().double().reshape(-1)


class PerModule(pl.Callback):
    """Per-module gradient norm, share and update ratio with plain torch (the test's reference),
    for every Linear of ``module.layers``: gradients in ``on_before_optimizer_step`` (what the
    monitor reads), parameters before and after the step."""

    def __init__(self) -> None:
        self.expected: dict[int, dict[str, list[float]]] = {}
        self._old: dict[str, torch.Tensor] = {}
        self._row: dict[str, list[float]] = {}

    def _flat(self, module: torch.nn.Module, grad: bool) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in module.layers.named_children():  # type: ignore[union-attr]
            ps = list(m.parameters())
            if ps:
                ts = [_whole(p.grad if grad else p) for p in ps]
                out[f"layers.{name}"] = torch.cat(ts)
        return out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        grads = self._flat(pl_module, True)
        total = torch.cat(list(grads.values())).norm()
        self._row = {n: [g.norm().item(), (g.norm() / total).item()] for n, g in grads.items()}
        self._old = {n: p.clone() for n, p in self._flat(pl_module, False).items()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # type: ignore[no-untyped-def]
        new = self._flat(pl_module, False)
        for n, old in self._old.items():
            self._row[n].append(((new[n] - old).norm() / old.norm()).item())
        self.expected[trainer.global_step - 1] = self._row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "ddp", "ddp_spawn", "fsdp"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nan-rank", type=int, default=-1)
    ap.add_argument("--nan-step", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    alerts: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=6,
        window=Window(post_warmup_steps=10),
        on_alert=alerts.append,
        statistics=Statistics(layers="auto", layers_every_n_steps=1) if args.layers else None,
    )
    callbacks: list[pl.Callback] = [monitor]
    per_module = PerModule()
    if args.layers:
        callbacks.append(per_module)
    if args.mode != "ddp_spawn":  # its spies on torch.distributed do not pickle
        counter = CollectiveCounter()
        callbacks.append(counter)
    if args.mode == "single":
        strategy: object = "auto"
        devices = 1
    elif args.mode in ("ddp", "ddp_spawn"):
        strategy, devices = args.mode, 2
    else:
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        devices = 2
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(args.out, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    if args.mode == "ddp_spawn":
        trainer.fit(SpawnNet(args.nan_rank, args.nan_step, False))
        return
    rank, world = trainer.global_rank, trainer.world_size
    loader = rank_loader(rank, world)
    trainer.fit(Net(args.nan_rank, args.nan_step, args.mode == "fsdp"), loader)
    state = monitor.state_dict()
    result = {
        "rank": rank,
        "world": world,
        "state": json.loads(json.dumps(state, default=str)),
        "alert_count": monitor.engine.alert_count,
        "alerts": [a.to_dict() for a in alerts],
        "collectives": counter.per_step,
        "expected": per_module.expected,
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

"""A 2-process DDP run (gloo, CPU) with a scripted spike and rollback, for tests/test_rollback.py.

Each rank trains on its own half of the data; the loss value of step 4 is scripted to 20 on both
ranks (the gradients stay real). Each rank writes ``rank{R}.json``: its parameters before every
update and at the end, the controller's rollback facts, the monitor's state and the alerts it
dispatched (rank zero only).

Usage: python rollback_run.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from warmup_monitor import AdaptiveWarmup, Alert, Detection, WarmupMonitor

warnings.filterwarnings("ignore")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layers(x), y)
        value = 20.0 if self.trainer.global_step == 4 else 1.0
        return loss - loss.detach() + value

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Before(pl.Callback):
    def __init__(self) -> None:
        self.before: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.before.append(torch.cat([p.detach().flatten() for p in module.parameters()]).tolist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    alerts: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=8,
        schedule="linear",
        adaptive=AdaptiveWarmup(rollback=True, snapshot_every_n_steps=1),
        detection=Detection(
            loss_trend_spike=False, grad_norm_spike=False, oscillation=False, persistence=False
        ),
        on_alert=alerts.append,
        alerts_file=None,
    )
    before = Before()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=10,
        callbacks=[monitor, before],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    rank, world = trainer.global_rank, trainer.world_size
    loader = DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=4)
    model = Net()
    trainer.fit(model, loader)
    controller = monitor.engine.controller
    assert controller is not None
    result = {
        "rank": rank,
        "rollbacks": controller.rollbacks,
        "state": json.loads(json.dumps(monitor.state_dict(), default=str)),
        "before": before.before,
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "alerts": [a.to_dict() for a in alerts],
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

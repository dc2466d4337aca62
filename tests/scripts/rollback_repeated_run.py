"""Three rollbacks in a 2-process run (gloo, CPU), watched by an independent witness, for
tests/test_rollback.py.

``--strategy ddp``: DDP; ``--strategy fsdp``: ``ModelParallelStrategy`` with ``fully_shard``
(FSDP2: parameters and optimizer state are DTensor shards). The monitor runs with
``AdaptiveWarmup()`` defaults (rollback on, snapshots in host memory before every update of a
10-step warmup). Loss values are scripted at steps 6 (1e3), 13 (NaN) and 20 (1e3) on both
ranks; the gradients stay the real ones. The witness (tests/rollback_witness.py) deep-copies the
model and optimizer state before every update with its own code, and compares after each
rollback and with every kept snapshot. Each rank writes ``rank{R}.json``.

Usage: python rollback_repeated_run.py --strategy ddp|fsdp --optimizer adam|adamw|sgd --out DIR
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))
from rollback_witness import witness_class  # noqa: E402
from sharding import shard_linear_layers  # noqa: E402 (this folder: sys.path[0])

from warmup_monitor import AdaptiveWarmup, Alert, Detection, WarmupMonitor  # noqa: E402

warnings.filterwarnings("ignore")
LOSSES = {6: 1e3, 13: math.nan, 20: 1e3}


class Net(pl.LightningModule):
    def __init__(self, optimizer: str, fsdp: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(6, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 1),
        )
        self.optimizer_name, self.fsdp = optimizer, fsdp

    def configure_model(self) -> None:
        if self.fsdp:
            shard_linear_layers(self.layers, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layers(x), y)
        value = LOSSES.get(self.trainer.global_step)
        return loss if value is None else loss - loss.detach() + value

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    alerts: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=10,
        schedule="linear",
        adaptive=AdaptiveWarmup(),
        detection=Detection(
            loss_trend_spike=False,
            grad_norm_spike=False,
            loss_divergence=False,
            grad_norm_rise=False,
            oscillation=False,
            persistence=False,
            episodes=False,
        ),
        on_alert=alerts.append,
        alerts_file=None,
    )
    witness = witness_class(pl)(monitor)
    strategy: object = "ddp"
    if args.strategy == "fsdp":
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=24,
        callbacks=[monitor, witness],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    rank, world = trainer.global_rank, trainer.world_size
    loader = DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=4)
    model = Net(args.optimizer, args.strategy == "fsdp")
    trainer.fit(model, loader)
    controller = monitor.engine.controller
    assert controller is not None
    params = list(model.parameters())
    result = {
        "rank": rank,
        "rollbacks": controller.rollbacks,
        "checked": witness.checked,
        "errors": witness.errors[:20],
        "snapshot_checks": witness.snapshot_checks,
        "dtensor": [type(p).__name__ == "DTensor" for p in params],
        "shard_numel": [int(t.numel()) for _, t in sorted(witness.copies[0]["model"].items())],
        "steps": sorted(
            float(e["step"]) for e in witness.copies[7]["opts"][0].values() if "step" in e
        ),
        "alerts": [a.kind.value for a in alerts],
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

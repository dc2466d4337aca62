"""The new user's script of issue 20: an MLP on scikit-learn's digits, AdamW, batch 32, a
``LambdaLR`` that warms up linearly and then decays with a cosine to 0, 5 epochs = 235 steps.

``run(lr=3e-3, warmup=50, monitor=None)`` trains it in Lightning and returns the final training
loss (mean of the last 12 steps), the validation accuracy and the trainer. ``monitor=None``
trains without the monitor (the reference). Also a script::

    python tests/scripts/digits_run.py --lr 3e-3 --warmup 50 [--monitor watch|adaptive]
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = 5
BATCH = 32


def data() -> tuple[TensorDataset, TensorDataset]:
    """1,500 training images (pixels / 16) and the rest for validation, in a fixed order."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


def make_module(pl: Any, lr: float, warmup: int, total: int) -> Any:
    """The user's LightningModule, in the namespace ``pl`` (pytorch_lightning or lightning)."""

    class DigitsMLP(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
            )
            self.train_losses: list[float] = []
            self.correct = 0
            self.seen = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.train_losses.append(float(loss.detach()))
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.correct += int((self.net(x).argmax(-1) == y).sum())
            self.seen += len(y)

        def on_validation_epoch_start(self) -> None:
            self.correct = self.seen = 0

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)

            def factor(s: int) -> float:
                if s < warmup:
                    return (s + 1) / warmup
                return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return DigitsMLP()


def run(
    *,
    lr: float = 3e-3,
    warmup: int = 50,
    monitor: Any = None,
    root: str | None = None,
    pl: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the user's run; ``monitor`` is a callback (or ``None``). Returns ``final_loss``
    (mean of the last 12 training losses), ``val_accuracy``, ``losses``, ``params`` (the final
    parameters) and ``trainer``."""
    if pl is None:
        import pytorch_lightning as pl
    pl.seed_everything(seed, verbose=False)
    train, val = data()
    total = EPOCHS * math.ceil(len(train) / BATCH)
    module = make_module(pl, lr, warmup, total)
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        callbacks=[] if monitor is None else [monitor],
        logger=pl.loggers.TensorBoardLogger(root, name="digits") if root else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, DataLoader(val, batch_size=256))
    losses = module.train_losses
    return {
        "final_loss": sum(losses[-12:]) / 12,
        "val_accuracy": module.correct / max(module.seen, 1),
        "losses": losses,
        "params": [p.detach().clone() for p in module.parameters()],
        "trainer": trainer,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--monitor", choices=["none", "watch", "adaptive"], default="watch")
    ap.add_argument("--root", default="runs/digits")
    args = ap.parse_args()
    from warmup_monitor import WarmupMonitor

    monitor = None
    if args.monitor != "none":
        monitor = WarmupMonitor(warmup_steps=args.warmup, adaptive=args.monitor == "adaptive")
    out = run(lr=args.lr, warmup=args.warmup, monitor=monitor, root=args.root)
    print(f"final loss {out['final_loss']:.4f}, val accuracy {out['val_accuracy']:.3f}")
    print("log dir:", out["trainer"].log_dir if args.root else None)
    if args.root and out["trainer"].log_dir:
        print(os.listdir(out["trainer"].log_dir))


if __name__ == "__main__":
    main()

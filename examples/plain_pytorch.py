"""The monitor in a hand-written PyTorch loop (no Lightning): a small MLP regression.

Run: python examples/plain_pytorch.py --log-dir runs/plain [--lr 0.5]
A too-high lr (e.g. --lr 3) makes the loss spike and the monitor say so.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.tensorboard import SummaryWriter

from warmup_monitor.loop import LoopMonitor


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-dir", default="runs/plain")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = torch.sin(x @ torch.randn(16, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps)
    )
    writer = SummaryWriter(args.log_dir)
    monitor = LoopMonitor(
        optimizer,
        warmup_steps=args.warmup_steps,
        writer=writer,
        alerts_file=os.path.join(args.log_dir, "warmup_alerts.jsonl"),
        on_alert=lambda alert: print(alert),
    )
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        monitor.before_step()  # after backward, before clipping and the step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        monitor.after_step(loss)
        optimizer.zero_grad()
        warmup.step()
        if step % 20 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    monitor.close()
    writer.close()
    print(f"TensorBoard logs and alerts in {args.log_dir}")
    return args.log_dir


if __name__ == "__main__":
    main()

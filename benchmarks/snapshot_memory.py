"""Memory of rollback snapshots: per snapshot, in total, in the process and in checkpoints.

For each optimizer (AdamW; SGD with momentum 0.9), two runs, each its own process: a real
``Trainer`` fits an MLP of ``--layers`` x ``Linear(--width, --width)`` (about 21 M parameters by
default, float32) for ``--steps`` optimizer steps with ``WarmupMonitor(warmup_steps=100,
adaptive=...)``, rollback on (``AdaptiveWarmup()`` defaults: snapshots in host memory, a
snapshot every 10 steps, the two most recent kept; here ``snapshot_every_n_steps=1`` so that two
are kept after two steps) and rollback off (``AdaptiveWarmup(rollback=False)``). A
``ModelCheckpoint`` saves at the last step, inside the window in which a rollback can still act.
A third run adds the anchor snapshot (``AdaptiveWarmup(anchor_step=1)``): three kept.

Reported per run: the bytes of the parameters, of one snapshot (``Snapshot.nbytes``: the
model's ``state_dict`` and the optimizer's per-parameter state) and of all kept snapshots
(``Snapshots.nbytes``), their ratio to the parameters' bytes, the resident memory at the end
of ``fit`` (``VmRSS``) and its peak (``VmHWM``), and the checkpoint file's size. Written to
``benchmarks/results/snapshot_memory.json``.

Usage::

    .venv/bin/python benchmarks/snapshot_memory.py            # about 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "snapshot_memory.json")


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_run(optimizer: str, mode: str, width: int, layers: int, steps: int) -> dict[str, Any]:
    """One fit in this process; the figures of the docstring."""
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, ROOT)
    from warmup_monitor import AdaptiveWarmup, WarmupMonitor

    torch.set_num_threads(1)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, batch: Any, idx: int) -> Any:
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=1e-4)
            return torch.optim.SGD(self.parameters(), lr=1e-4, momentum=0.9)

    rollback = mode != "off"
    adaptive = AdaptiveWarmup(
        rollback=rollback,
        snapshot_every_n_steps=1 if rollback else None,
        anchor_step=1 if mode == "anchor" else None,
    )
    monitor = WarmupMonitor(warmup_steps=100, adaptive=adaptive, alerts_file=None)
    with tempfile.TemporaryDirectory() as tmp:
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp, every_n_train_steps=steps)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            callbacks=[monitor, saver],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = MLP()
        data = TensorDataset(torch.randn(8 * steps, width))
        trainer.fit(model, DataLoader(data, batch_size=8))
        rss, peak = _status("VmRSS"), _status("VmHWM")
        (ckpt,) = [os.path.join(tmp, f) for f in os.listdir(tmp)]
        ckpt_bytes = os.path.getsize(ckpt)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    snaps = monitor._snapshots
    out: dict[str, Any] = {
        "optimizer": optimizer,
        "rollback": rollback,
        "anchor": mode == "anchor",
        "parameters": sum(p.numel() for p in model.parameters()),
        "param_bytes": params,
        "rss_end_bytes": rss,
        "rss_peak_bytes": peak,
        "checkpoint_bytes": ckpt_bytes,
    }
    if snaps is not None:
        kept = snaps.snapshots
        out.update(
            snapshots_kept=len(kept),
            snapshot_bytes=kept[-1].nbytes,
            snapshots_total_bytes=snaps.nbytes,
            per_snapshot_x_params=kept[-1].nbytes / params,
            total_x_params=snaps.nbytes / params,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--one", nargs=2, metavar=("OPTIMIZER", "ROLLBACK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        result = one_run(args.one[0], args.one[1], args.width, args.layers, args.steps)
        print(json.dumps(result))
        return
    runs = []
    for optimizer in ("adamw", "sgd"):
        for rollback in ("on", "off", "anchor"):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", optimizer, rollback]
            cmd += ["--width", str(args.width), "--layers", str(args.layers)]
            cmd += ["--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 2.0**20
    print("| optimizer | params | one snapshot | kept (total) | RSS at end, on - off | "
          "checkpoint, on / off |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for on, off, anchor in zip(runs[::3], runs[1::3], runs[2::3], strict=True):
        for run, name in ((on, on["optimizer"]), (anchor, f"{on['optimizer']} + anchor")):
            print(
                f"| {name} | {run['param_bytes'] / mib:.0f} MiB "
                f"| {run['snapshot_bytes'] / mib:.0f} MiB ({run['per_snapshot_x_params']:.2f}x) "
                f"| {run['snapshots_total_bytes'] / mib:.0f} MiB ({run['total_x_params']:.2f}x)"
                f" ({run['snapshots_kept']} kept) "
                f"| {(run['rss_end_bytes'] - off['rss_end_bytes']) / mib:+.0f} MiB "
                f"| {run['checkpoint_bytes'] / mib:.0f} / {off['checkpoint_bytes'] / mib:.0f} MiB |"
            )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"args": vars(args) | {"one": None}, "runs": runs}, f, indent=1)
    print(f"written to {os.path.relpath(RESULTS, ROOT)}")


if __name__ == "__main__":
    main()

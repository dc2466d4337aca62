"""Does adaptive warmup rescue runs whose warmup is too short, and leave stable runs alone?

A grid of real Lightning runs, each with ``WarmupMonitor`` attached (so that every arm pays the
same monitoring cost and reports the same alerts):

- **families**: ``post_ln``, the example's character transformer (``examples/char_transformer.py``)
  with Post-LN blocks, d_model 64, 2 layers, AdamW(0.9, 0.95), on the standard library's
  source; ``resnet``, a small residual CNN without normalisation, SGD with momentum 0.9, on a
  learnable synthetic 10-class image task (class templates, random shifts and scales, heavy
  noise);
- **peak lrs**: four per family, from safe to unstable;
- **arms**: ``none`` (a 1-step warmup), ``short`` (10 steps), ``long`` (100 steps), ``adaptive``
  (10 steps and ``AdaptiveWarmup(rollback=False)``: back-off and longer warmup only),
  ``rollback`` (10 steps and ``AdaptiveWarmup()``, the defaults: back-off, longer warmup and
  rollback);
- **seeds**: 3 per cell (model init and data order).

The user's own scheduler (a ``LambdaLR`` stepped every optimizer step) warms up linearly over
the arm's warmup and decays by a cosine to 0.1 x the peak at the last step; the monitor runs
with ``schedule=None`` and, in the adaptive arms, stretches the ramp the scheduler set.

Per run: the final training loss (mean of the last 5 % of steps), the validation loss at the
end, spikes (steps whose loss is above twice the median of the 10 before), diverged (a
non-finite loss, or a final loss above 0.95 x the first), the effective warmup (the planned
length at the end), extensions, rollbacks, steps of progress undone by rollbacks, snapshot
memory and time, and wall time.

Usage::

    python benchmarks/adaptive_warmup.py                      # the grid, 2 worker processes
    python benchmarks/adaptive_warmup.py --arms adaptive,rollback   # re-run some arms only
    python benchmarks/adaptive_warmup.py --report             # table and plot from the results

Results go to ``benchmarks/results/adaptive_warmup.json`` (runs of other arms are kept), the
table to stdout and ``--readme`` (``benchmarks/README_adaptive.md`` between its markers), the
plot to ``docs/adaptive_warmup.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "adaptive_warmup.json"
README = ROOT / "benchmarks" / "README_adaptive.md"
PLOT = ROOT / "docs" / "adaptive_warmup.png"

STEPS = 250
SHORT, LONG = 10, 100
ARMS = ("none", "short", "long", "adaptive", "rollback")
FAMILIES: dict[str, dict[str, Any]] = {
    "post_ln": {"lrs": [3e-3, 1e-2, 2e-2, 3e-2], "optimizer": "AdamW(0.9, 0.95), wd 0.1"},
    "resnet": {"lrs": [0.05, 0.1, 0.2, 0.4], "optimizer": "SGD momentum 0.9, wd 5e-4"},
}
WARMUP = {"none": 1, "short": SHORT, "long": LONG, "adaptive": SHORT, "rollback": SHORT}


# ------------------------------------------------------------------------------------ models


def _schedule(warmup: int, steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        q = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * q))

    return factor


_EXAMPLE: Any = None


def _example() -> Any:
    global _EXAMPLE
    if _EXAMPLE is None:
        import importlib.util

        path = ROOT / "examples" / "char_transformer.py"
        spec = importlib.util.spec_from_file_location("example_char_transformer", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _EXAMPLE = module
    return _EXAMPLE


def _post_ln(lr: float, warmup: int, seed: int) -> tuple[Any, Any, Any]:
    ex = _example()
    args = ex.parse_args(
        [
            *("--lr", str(lr), "--warmup-steps", str(warmup), "--max-steps", str(STEPS)),
            *("--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--seq-len", "64"),
            *("--batch-size", "16", "--max-chars", "400000", "--seed", str(seed), "--post-ln"),
            *("--val-batches", "8", "--threads", "1", "--quiet", "--no-monitor"),
        ]
    )
    model, train, val = ex.build(args)
    return model, train, val


def _images(n: int, seed: int) -> tuple[Any, Any]:
    """A learnable 10-class task: fixed smooth templates, scaled, shifted, under heavy noise."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1234)  # the task itself: the same for every seed
    templates = F.interpolate(
        torch.randn(10, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear", align_corners=False
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] * (0.5 + torch.rand(n, 1, 1, 1, generator=g))
    shifts = torch.randint(-3, 4, (n, 2), generator=g).tolist()
    x = torch.stack(
        [torch.roll(xi, (dy, dx), dims=(1, 2)) for xi, (dy, dx) in zip(x, shifts, strict=False)]
    )
    return x + 2.5 * torch.randn(x.shape, generator=g), y


def _resnet(lr: float, warmup: int, seed: int) -> tuple[Any, Any, Any]:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    class Residual(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(c, c, 3, padding=1)
            self.c2 = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.c2(F.relu(self.c1(x))))

    class Stream(IterableDataset):
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            g = torch.Generator().manual_seed(seed)
            while True:
                idx = torch.randint(0, len(self.x), (64,), generator=g)
                yield self.x[idx], self.y[idx]

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            w = 16
            self.f = nn.Sequential(
                *(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), Residual(w)),
                *(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(), Residual(2 * w)),
                *(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10)),
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.f(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup, STEPS))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    x, y = _images(8192, 0)
    vx, vy = _images(1024, 1)
    torch.manual_seed(seed)
    return Net(), DataLoader(Stream(x, y), batch_size=None), DataLoader(TensorDataset(vx, vy), 256)


BUILDERS = {"post_ln": _post_ln, "resnet": _resnet}


# ------------------------------------------------------------------------------------ one run


def spikes(losses: Sequence[float]) -> int:
    """Steps whose loss is above twice the median of the (up to) 10 losses before it."""
    count = 0
    for t in range(1, len(losses)):
        before = [x for x in losses[max(0, t - 10) : t] if math.isfinite(x)]
        if before and math.isfinite(losses[t]) and losses[t] > 2.0 * statistics.median(before):
            count += 1
    return count


def run_one(
    family: str, lr: float, arm: str, seed: int, log_dir: str | None = None
) -> dict[str, Any]:
    """Train one run; return its figures. With ``log_dir``, TensorBoard logs and the alerts
    file go to ``log_dir/<arm>/version_N`` (the demo)."""
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch

    import warmup_monitor as wm

    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "warmup_monitor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    pl.seed_everything(seed, verbose=False)
    model, train, val = BUILDERS[family](lr, WARMUP[arm], seed)

    losses: list[float] = []
    alerts: list[Any] = []
    step_times: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss))
            step_times.append(time.perf_counter() - self._t)

    adaptive: Any = False
    if arm == "adaptive":
        adaptive = wm.AdaptiveWarmup(rollback=False)
    elif arm == "rollback":
        adaptive = wm.AdaptiveWarmup()  # the defaults
    monitor = wm.WarmupMonitor(
        warmup_steps=WARMUP[arm],
        adaptive=adaptive,
        on_alert=alerts.append,
        alerts_file=None if log_dir is None else wm.alerts.ALERTS_FILENAME,
        window=wm.Window(post_warmup_steps=-1),
        # Runs that keep their logs also log per-group statistics (read-only: training is
        # the same; the heatmaps of the report and the Warmup tab).
        statistics=wm.Statistics(layers="auto") if log_dir is not None else None,
    )
    logger: Any = False
    if log_dir is not None:
        logger = pl.loggers.TensorBoardLogger(log_dir, name=arm, default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        max_epochs=1,
        callbacks=[monitor, Record()],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train)
    wall = time.perf_counter() - start
    val_loss = _validate(model, val)

    tail = losses[-max(1, len(losses) // 20) :]
    final = sum(tail) / len(tail)
    finite = all(math.isfinite(x) for x in losses)
    controller = monitor.engine.controller
    rollbacks = [a for a in alerts if a.kind.value == "rollback"]
    snapshots = getattr(monitor, "_snapshots", None)  # the wall time of each copy
    snap_seconds = [] if snapshots is None else [snap.seconds for snap in snapshots._ring]
    return {
        "log_dir": None if log_dir is None else trainer.log_dir,
        "family": family,
        "lr": lr,
        "arm": arm,
        "seed": seed,
        "final_loss": final if math.isfinite(final) else None,
        "val_loss": val_loss if math.isfinite(val_loss) else None,
        "first_loss": losses[0],
        "spikes": spikes(losses),
        "diverged": (not finite) or not (final <= 0.95 * losses[0]),
        "effective_warmup": controller.warmup_steps if controller is not None else WARMUP[arm],
        "extensions": controller.extensions if controller is not None else 0,
        "rollbacks": len(rollbacks),
        "steps_undone": sum(int(a.value) for a in rollbacks if math.isfinite(a.value)),
        "snapshot_bytes": max([a.details.get("snapshot_bytes", 0) for a in rollbacks] or [0]),
        "snapshot_seconds": [s for s in snap_seconds if s is not None],
        "step_seconds": statistics.median(step_times) if step_times else None,
        "wall_s": wall,
        "alerts": [[a.step, a.kind.value] for a in alerts][:200],
        "losses": [round(x, 4) if math.isfinite(x) else None for x in losses],
    }


def _validate(model: Any, val: Any) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in val:
            if hasattr(model, "f"):
                logits = model.f(x)
                loss = F.cross_entropy(logits, y)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            total += float(loss) * len(x)
            count += len(x)
    return total / max(count, 1)


def _worker(job: tuple[Any, ...]) -> dict[str, Any]:
    return run_one(*job)


def snapshot_cost(steps: int = 20) -> str:
    """Memory and time of one snapshot of the example's default model (0.8 M parameters,
    AdamW), against a training step of it (median of ``steps``, one thread)."""
    import torch
    import torch.nn.functional as F

    from warmup_monitor.rollback import Snapshots

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _example().CharTransformer(101, 128, 128, 4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 101, (32, 129))
    snaps = Snapshots("cpu")
    step_s, snap_s = [], []
    for i in range(steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - start)
        snap = snaps.take(i, model, [opt], {})
        snap_s.append(snap.seconds)
    step, copy = statistics.median(step_s), statistics.median(snap_s[2:])
    params = sum(p.numel() for p in model.parameters())
    return (
        f"example transformer ({params / 1e6:.2f} M parameters, AdamW): one snapshot holds "
        f"{snap.nbytes / 2**20:.1f} MiB ({snap.nbytes / (4 * params):.2f} x the parameters' "
        f"bytes; two are kept), takes {copy * 1e3:.1f} ms against {step * 1e3:.0f} ms a step "
        f"({copy / step:.1%} of a step)"
    )


#: The demo's cell: the residual CNN at peak lr 0.4, seed 2, where the short warmup dies.
DEMO = ("resnet", 0.4, 2)


def demo(out: str) -> int:
    """``make demo``: the short fixed warmup and the defaults on :data:`DEMO`, side by side,
    then one report that overlays them (``out/report``)."""
    family, lr, seed = DEMO
    jobs = [(family, lr, arm, seed, out) for arm in ("short", "rollback")]
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        runs = list(pool.map(_worker, jobs))
    for r in runs:
        name = "short fixed warmup" if r["arm"] == "short" else "adaptive warmup (defaults)"
        print(
            f"{name:28s} final loss {r['final_loss'] or math.nan:.4f}, "
            f"val {r['val_loss'] or math.nan:.4f}, "
            f"warmup {r['effective_warmup']}, extensions {r['extensions']}, rollbacks "
            f"{r['rollbacks']} ({r['wall_s']:.0f} s): {r['log_dir']}"
        )
    from warmup_monitor import cli

    return cli.main(["report", *(r["log_dir"] for r in runs), "--out", os.path.join(out, "report")])


def cells(specs: Sequence[str], out: str, workers: int) -> int:
    """``--cell``: the given runs of the grid with their logs in ``out/<family>_<lr>/<arm>``
    (per-group statistics on), and one report over them (``out/report``)."""
    jobs = []
    for spec in specs:
        family, lr, arm, seed = spec.split(":")
        if family not in FAMILIES or arm not in ARMS:
            raise SystemExit(f"--cell {spec}: family one of {list(FAMILIES)}, arm one of {ARMS}")
        jobs.append((family, float(lr), arm, int(seed), os.path.join(out, f"{family}_{lr}")))
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        runs = list(pool.map(_worker, jobs))
    for r in runs:
        print(
            f"{r['family']} lr {r['lr']:g} {r['arm']:9s} seed {r['seed']}: final loss "
            f"{r['final_loss'] or math.nan:.4f}, val {r['val_loss'] or math.nan:.4f} "
            f"({r['wall_s']:.0f} s): {r['log_dir']}"
        )
    from warmup_monitor import cli

    return cli.main(["report", *(r["log_dir"] for r in runs), "--out", os.path.join(out, "report")])


# ------------------------------------------------------------------------------------ the grid


def _load() -> list[dict[str, Any]]:
    if RESULTS.exists():
        return list(json.loads(RESULTS.read_text())["runs"])
    return []


def _save(runs: list[dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": STEPS, "runs": runs}) + "\n")


def run_grid(families: list[str], arms: list[str], seeds: int, workers: int) -> None:
    jobs = [
        (family, lr, arm, seed)
        for family in families
        for lr in FAMILIES[family]["lrs"]
        for arm in arms
        for seed in range(seeds)
    ]
    keep = [r for r in _load() if (r["family"], r["lr"], r["arm"], r["seed"]) not in set(jobs)]
    start = time.perf_counter()
    done: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for r in pool.map(_worker, jobs):
            done.append(r)
            print(
                f"{r['family']:8s} lr {r['lr']:<6g} {r['arm']:9s} seed {r['seed']}: final "
                f"{r['final_loss'] or math.nan:.4f} spikes {r['spikes']} ext {r['extensions']} "
                f"rb {r['rollbacks']} ({r['wall_s']:.0f} s)",
                flush=True,
            )
            _save(keep + done)
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s with {workers} workers")


def _median(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < len(values):
        return math.inf
    return statistics.median(finite) if finite else math.nan


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, lr, arm): medians over seeds, and the must-show verdicts."""
    cells: dict[tuple[str, float], dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        cells.setdefault((r["family"], r["lr"]), {}).setdefault(r["arm"], []).append(r)
    rows = []
    for (family, lr), arms in sorted(cells.items()):
        short = arms.get("short", [])
        unstable = any(r["spikes"] or r["diverged"] for r in short)
        fixed = [_median([r["final_loss"] for r in arms[a]]) for a in ("none", "short", "long")]
        best_fixed = min(fixed) if fixed else math.nan
        short_final = _median([r["final_loss"] for r in short])
        for arm in ARMS:
            rs = arms.get(arm, [])
            if not rs:
                continue
            final = _median([r["final_loss"] for r in rs])
            row = {
                "family": family,
                "lr": lr,
                "arm": arm,
                "cell": "unstable" if unstable else "stable",
                "final": final,
                "val": _median([r["val_loss"] for r in rs]),
                "spikes": statistics.median(r["spikes"] for r in rs),
                "diverged": sum(bool(r["diverged"]) for r in rs),
                "warmup": statistics.median(r["effective_warmup"] for r in rs),
                "extensions": statistics.median(r["extensions"] for r in rs),
                "max_extensions": max(r["extensions"] for r in rs),
                "rollbacks": statistics.median(r["rollbacks"] for r in rs),
                "max_rollbacks": max(r["rollbacks"] for r in rs),
                "wall": statistics.median(r["wall_s"] for r in rs),
                "seeds": len(rs),
                "verdict": "",
            }
            if arm in ("adaptive", "rollback"):
                if unstable:
                    ok = row["diverged"] == 0 and final <= 1.03 * best_fixed
                    row["verdict"] = (
                        f"{'ok' if ok else 'FAIL'} ({final / best_fixed - 1:+.1%} vs best fixed)"
                    )
                else:
                    acted = row["max_extensions"] or row["max_rollbacks"]
                    ok = not acted and abs(final / short_final - 1) <= 0.005
                    row["verdict"] = (
                        f"{'ok' if ok else 'FAIL'} ({final / short_final - 1:+.2%} vs short)"
                    )
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| family | peak lr | cell | arm | final loss | val loss | spikes | diverged | warmup | "
        "ext | rollbacks | wall s | must-show |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['lr']:g} | {r['cell']} | {r['arm']} | {r['final']:.4f} | "
            f"{r['val']:.4f} | {r['spikes']:g} | {r['diverged']}/{r['seeds']} | {r['warmup']:g} | "
            f"{r['extensions']:g} | {r['rollbacks']:g} | {r['wall']:.0f} | {r['verdict']} |"
        )
    return head + "\n".join(lines) + "\n"


def costs(runs: list[dict[str, Any]]) -> str:
    rb = [r for r in runs if r["arm"] == "rollback" and r["rollbacks"]]
    if not rb:
        return "No rollback happened in the grid.\n"
    out = [
        "| family | peak lr | seed | rollbacks | steps undone | snapshot MiB | snapshot / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rb:
        secs = r["snapshot_seconds"]
        frac = (
            (statistics.median(secs) / r["step_seconds"])
            if secs and r["step_seconds"]
            else math.nan
        )
        out.append(
            f"| {r['family']} | {r['lr']:g} | {r['seed']} | {r['rollbacks']} | "
            f"{r['steps_undone']} | {r['snapshot_bytes'] / 2**20:.2f} | {frac:.2f} |"
        )
    return "\n".join(out) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in runs})
    fig, axes = plt.subplots(len(families), 2, figsize=(12, 4 * len(families)), squeeze=False)
    colors = {"none": "#999999", "short": "#d62728", "long": "#2ca02c", "adaptive": "#1f77b4",
              "rollback": "#9467bd"}  # fmt: skip
    for i, family in enumerate(families):
        rows = summarize([r for r in runs if r["family"] == family])
        ax = axes[i][0]
        for arm in ARMS:
            pts = [(r["lr"], r["final"]) for r in rows if r["arm"] == arm]
            if pts:
                xs, ys = zip(*pts, strict=False)
                ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys], "o-",
                        color=colors[arm], label=arm)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("peak lr")
        ax.set_ylabel("final training loss (median of 3 seeds)")
        ax.set_title(f"{family}: final loss per arm")
        ax.legend()
        # The most unstable cell where short spikes: the loss curves of seed 0.
        unstable = [r["lr"] for r in rows if r["cell"] == "unstable" and r["arm"] == "short"]
        ax = axes[i][1]
        if unstable:
            lr = unstable[0]
            for arm in ARMS:
                for r in runs:
                    if (r["family"], r["lr"], r["arm"], r["seed"]) == (family, lr, arm, 0):
                        ys = [math.nan if v is None else v for v in r["losses"]]
                        ax.plot(ys, color=colors[arm], label=arm, lw=1)
            ax.set_title(f"{family}, peak lr {lr:g}, seed 0: training loss")
            ax.set_xlabel("optimizer step")
            ax.set_yscale("log")
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_readme(text: str) -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    body = README.read_text() if README.exists() else f"{start}\n{end}\n"
    a, b = body.index(start) + len(start), body.index(end)
    README.write_text(body[:a] + "\n" + text + body[b:])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only the table and plot")
    ap.add_argument("--readme", action="store_true", help="write the table into the README")
    ap.add_argument("--demo", metavar="DIR", help="only the demo: two runs and a report in DIR")
    ap.add_argument(
        "--cell",
        action="append",
        metavar="FAMILY:LR:ARM:SEED",
        help="only these runs (e.g. post_ln:0.03:short:0), with their logs and one report in "
        "--cell-dir",
    )
    ap.add_argument("--cell-dir", default="runs/cells", metavar="DIR")
    args = ap.parse_args(argv)
    if args.demo:
        sys.exit(demo(args.demo))
    if args.cell:
        sys.exit(cells(args.cell, args.cell_dir, args.workers))
    if not args.report:
        run_grid(args.families.split(","), args.arms.split(","), args.seeds, args.workers)
    runs = _load()
    text = table(summarize(runs)) + "\nRollback costs (rollback arm, runs that rolled back):\n\n"
    text += costs(runs) + "\nSnapshot cost on a larger model: " + snapshot_cost() + ".\n"
    print(text)
    plot(runs, PLOT)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()

"""Curvature probe benchmarks: its accuracy through the edge of stability, and its cost and
margins on the example character transformer.

Three measurements, printed as Markdown tables (and written as JSON with ``--json``):

``eos``
    Full-batch gradient descent on a small tanh MLP through the edge of stability (Cohen et
    al. 2021), probed every ``--intervals`` steps by the monitor's prober with its defaults,
    warm-started as in the monitor, and by the previous release's probe (a lone warm-start
    vector); every probe against the dense Hessian's top eigenvalue, with the Hessian-vector
    products and CPU time per probe. Seeds, learning rates and intervals are options.

``cost``
    Time of one curvature probe (:func:`warmup_monitor.curvature.estimate_stability` under
    :func:`~warmup_monitor.curvature.probe_guard`, on one fixed batch) as a multiple of one
    training step (forward, backward, optimizer step, ``zero_grad``), measured interleaved
    during a short warmup run, and the average overhead of a probe every ``N`` steps.

``spike``
    The example transformer trained with SGD and a too-high lr: the loss every step, the
    stability margin every ``--probe-every`` steps (before the update, with its lr), and for
    every loss spike the margins probed in the 4 steps before it and at it.

Both are plain PyTorch loops (no Lightning): the model, data and lr schedule are those of
``examples/char_transformer.py`` when it can be imported, else an equivalent nanoGPT-like model
defined here (the output says which). A plain loop is the cheapest possible training step, so
the overhead it reports is an upper bound for the same model under a Lightning Trainer.

Run from the repository root (one CPU thread; a few minutes for ``eos`` and ``cost``, 10-20 for
``spike`` with its defaults, which probe before every update)::

    .venv/bin/python benchmarks/curvature.py eos
    .venv/bin/python benchmarks/curvature.py cost --warm-start
    .venv/bin/python benchmarks/curvature.py spike --json spike.json
    .venv/bin/python benchmarks/curvature.py report --json spike.json

``benchmarks/README_curvature.md`` holds the figures and what they show.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from warmup_monitor import CurvatureProbe  # noqa: E402
from warmup_monitor.curvature import (  # noqa: E402
    CurvatureProber,
    estimate_stability,
    probe_guard,
)

# --------------------------------------------------------------------------------------------
# The model: the example's, or an equivalent one
# --------------------------------------------------------------------------------------------


def _load_example() -> ModuleType | None:
    path = ROOT / "examples" / "char_transformer.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_char_transformer_example", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        for name in ("CharTransformer", "CharCorpus", "RandomWindows", "load_stdlib_text"):
            getattr(module, name)
    except Exception as err:  # the example is being written: fall back, and say so
        sys.modules.pop(spec.name, None)
        print(f"note: examples/char_transformer.py is not usable ({err!r}); using own model")
        return None
    return module


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, -1).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class _FallbackTransformer(nn.Module):
    """nanoGPT-like: token + position embeddings, pre-LN blocks, tied head, GPT-2 init."""

    def __init__(self, vocab: int, seq_len: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _fallback_ids(max_chars: int) -> tuple[Tensor, int]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for path in sorted(stdlib.glob("*.py")):
        text += path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= max_chars:
            break
    text = text[:max_chars]
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text]), len(vocab)


def build(args: argparse.Namespace) -> tuple[nn.Module, Iterator[tuple[Tensor, Tensor]], str]:
    """The model (seeded) and an endless iterator of training batches."""
    example = None if args.own_model else _load_example()
    torch.manual_seed(args.seed)
    if example is not None:
        corpus = example.CharCorpus.from_text(example.load_stdlib_text(args.max_chars), 0.05)
        ids, vocab = corpus.train_ids, len(corpus.vocab)
        model = example.CharTransformer(vocab, args.seq_len, args.d_model, args.layers, args.heads)
        batches = iter(example.RandomWindows(ids, args.seq_len, args.batch_size, seed=args.seed))
        source = "examples/char_transformer.py CharTransformer"
    else:
        ids, vocab = _fallback_ids(args.max_chars)
        model = _FallbackTransformer(vocab, args.seq_len, args.d_model, args.layers, args.heads)
        gen = torch.Generator().manual_seed(args.seed)

        def stream() -> Iterator[tuple[Tensor, Tensor]]:
            offsets = torch.arange(args.seq_len + 1)
            while True:
                starts = torch.randint(
                    0, len(ids) - args.seq_len - 1, (args.batch_size, 1), generator=gen
                )
                w = ids[starts + offsets]
                yield w[:, :-1], w[:, 1:]

        batches = stream()
        source = "benchmarks/curvature.py _FallbackTransformer (same architecture)"
    n_params = sum(p.numel() for p in model.parameters())
    desc = (
        f"{source}: d_model={args.d_model}, layers={args.layers}, heads={args.heads}, "
        f"seq_len={args.seq_len}, batch={args.batch_size}, vocab={vocab}, params={n_params:,}"
    )
    return model, batches, desc


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":  # the example's: decay on matrices only, betas (0.9, 0.95)
        decayed = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)


def warmup_lr(step: int, peak: float, warmup_steps: int) -> float:
    """The example's linear warmup: ``peak * (step + 1) / warmup_steps``, then constant."""
    return peak * min(1.0, (step + 1) / warmup_steps)


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())


class Clock:
    """Wall and process-CPU seconds of a block (CPU time is robust to other jobs' load)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]
) -> Tensor:
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def probe(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    max_iters: int,
    tol: float,
    init: Tensor | None = None,
    explore: int | None = None,
    seed: int = 0,
) -> Any:
    """One probe as the monitor runs it: the training modes, a fixed dropout mask, everything
    restored; ``init``: the previous probe's ``result.vectors`` (a warm start);
    ``explore=0`` with a single ``init`` vector: the previous release's probe (a lone warm
    start, no random vector)."""
    with probe_guard(model):
        return estimate_stability(
            lambda: loss_fn(model, batch),
            opt,
            max_iters=max_iters,
            tol=tol,
            init=init,
            explore=explore,
            seed=seed,
            return_vector=True,
        )


# --------------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------------


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    model, batches, desc = build(args)
    opt = make_optimizer(model, args)
    probe_batch = next(batches)  # fixed: the first training batch
    print(f"model: {desc}")
    print(f"optimizer: {args.optimizer}, peak lr {args.lr}, warmup {args.warmup_steps} steps")
    print(f"threads: {torch.get_num_threads()}")

    steps: list[Clock] = []
    probes: list[dict[str, Any]] = []
    vectors: Tensor | None = None
    old_vector: Tensor | None = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, args.lr, args.warmup_steps)
        batch = next(batches)
        with Clock() as clock:
            train_step(model, opt, batch)
        if step >= 2:  # the first steps allocate
            steps.append(clock)
        if step >= 1 and step % args.probe_every == 0:
            with Clock() as cold_clock:
                cold = probe(model, opt, probe_batch, args.max_iters, args.tol)
            row = {
                "step": step + 1,
                "sharpness": cold.sharpness,
                "margin": cold.margin,
                "iters": cold.result.iterations,
                "converged": cold.result.converged,
                "wall": cold_clock.wall,
                "cpu": cold_clock.cpu,
            }
            if args.warm_start:  # from the previous probe's Ritz vectors, as the monitor does
                with Clock() as warm_clock:
                    warm = probe(
                        model, opt, probe_batch, args.max_iters, args.tol, init=vectors, seed=step
                    )
                vectors = warm.result.vectors
                # The previous release's probe: a lone warm-start vector, no exploration.
                with Clock() as old_clock:
                    old = probe(
                        model, opt, probe_batch, args.max_iters, args.tol, init=old_vector,
                        explore=0,
                    )  # fmt: skip
                old_vector = old.result.vector
                row.update(
                    warm_iters=warm.result.iterations,
                    warm_cpu=warm_clock.cpu,
                    warm_sharpness=warm.sharpness,
                    warm_converged=warm.result.converged,
                    old_iters=old.result.iterations,
                    old_cpu=old_clock.cpu,
                    old_sharpness=old.sharpness,
                )
            probes.append(row)
            print(
                f"  step {row['step']:4d}: sharpness {row['sharpness']:10.2f}  margin "
                f"{row['margin']:.4f}  iters {row['iters']:2d}  conv {row['converged']!s:5}  "
                f"probe {row['cpu']:.2f} s cpu / {row['wall']:.2f} s wall"
                + (
                    f"  warm: {row['warm_sharpness']:.2f}, {row['warm_iters']} HVPs; "
                    f"lone warm vector: {row['old_sharpness']:.2f}, {row['old_iters']} HVPs"
                    if "warm_iters" in row
                    else ""
                )
            )

    step_cpu = statistics.median(c.cpu for c in steps)
    step_wall = statistics.median(c.wall for c in steps)
    probe_cpu = statistics.median(p["cpu"] for p in probes)
    probe_wall = statistics.median(p["wall"] for p in probes)
    iters = statistics.median(p["iters"] for p in probes)
    ratio_cpu = probe_cpu / step_cpu
    ratio_wall = probe_wall / step_wall
    per_hvp = (probe_cpu / step_cpu - 1.0) / max(iters, 1)
    print()
    print("| quantity | CPU time | wall time |\n|---|---|---|")
    print(f"| one training step (median of {len(steps)}) | {step_cpu:.3f} s | {step_wall:.3f} s |")
    print(
        f"| one probe (median of {len(probes)}, {iters:g} HVPs) | {probe_cpu:.2f} s | "
        f"{probe_wall:.2f} s |"
    )
    print(f"| probe / step | **{ratio_cpu:.1f}x** | {ratio_wall:.1f}x |")
    # Warm-started probes (from the previous probe's Ritz vectors; the first one had none).
    warm_rows = [p for p in probes[1:] if "warm_cpu" in p]
    ratio_warm = ratio_old = None
    if warm_rows:
        warm_cpu = statistics.median(p["warm_cpu"] for p in warm_rows)
        warm_iters = statistics.median(p["warm_iters"] for p in warm_rows)
        old_cpu = statistics.median(p["old_cpu"] for p in warm_rows)
        old_iters = statistics.median(p["old_iters"] for p in warm_rows)
        ratio_warm, ratio_old = warm_cpu / step_cpu, old_cpu / step_cpu
        print(
            f"| warm-started probe (median of {len(warm_rows)}, {warm_iters:g} HVPs) | "
            f"{warm_cpu:.2f} s | |\n| warm probe / step | **{ratio_warm:.1f}x** | |\n"
            f"| lone warm vector, the previous release (median, {old_iters:g} HVPs) | "
            f"{old_cpu:.2f} s | |\n| its probe / step | {ratio_old:.1f}x | |"
        )
    print(f"\none Hessian-vector product ~ {per_hvp:.2f} training steps (CPU time)\n")
    print("| probe every N steps | average overhead, cold | warm-started |\n|---|---|---|")
    overhead = {}
    for n in args.intervals:
        overhead[n] = ratio_cpu / n
        warm = f"{100 * ratio_warm / n:.1f}%" if ratio_warm is not None else "-"
        print(f"| {n} | {100 * overhead[n]:.1f}% | {warm} |")
    return {
        "model": desc,
        "optimizer": args.optimizer,
        "threads": torch.get_num_threads(),
        "step_cpu_s": step_cpu,
        "step_wall_s": step_wall,
        "probe_cpu_s": probe_cpu,
        "probe_wall_s": probe_wall,
        "probe_over_step_cpu": ratio_cpu,
        "probe_over_step_wall": ratio_wall,
        "median_iterations": iters,
        "warm_probe_over_step_cpu": ratio_warm,
        "old_warm_probe_over_step_cpu": ratio_old,
        "overhead_by_interval": overhead,
        "probes": probes,
    }


# --------------------------------------------------------------------------------------------
# spike
# --------------------------------------------------------------------------------------------


def spike_events(losses: list[float], factor: float) -> list[int]:
    """Steps where a loss spike starts: the loss exceeds ``factor`` x the lowest loss before it
    (or is not finite) while the previous step's did not."""
    events, best, inside = [], math.inf, False
    for step, loss in enumerate(losses):
        spiking = not math.isfinite(loss) or loss > factor * best
        if spiking and not inside:
            events.append(step)
        inside = spiking
        if math.isfinite(loss):
            best = min(best, loss)
    return events


def analyze_spikes(results: dict[str, Any], lookback: int = 4) -> str:
    """A Markdown table: for every loss spike, the margins probed in the ``lookback`` steps
    before it and at it, and whether the margin was above 1 (once; twice in a row) by then."""
    losses = results["losses"]
    margins = {int(k): v["margin"] for k, v in results["margins"].items()}
    factor = results.get("spike_factor", 1.2)
    lines = [
        f"Loss spikes (loss > {factor} x lowest loss so far) and the margins probed in the "
        f"{lookback} steps before each, up to and including its step:",
        "",
        "| spike at step | loss (lowest before) | margins probed (step: margin) "
        "| margin > 1 by the spike? | twice in a row? |",
        "|---|---|---|---|---|",
    ]
    for event in spike_events(losses, factor):
        window = [s for s in sorted(margins) if event - lookback <= s <= event]
        best = min((x for x in losses[:event] if math.isfinite(x)), default=math.nan)
        shown = ", ".join(f"{s}: {margins[s]:.2f}" for s in window) or "none"
        above = [s for s in window if margins[s] > 1.0]
        pairs = [b for a, b in itertools.pairwise(window) if margins[a] > 1.0 and margins[b] > 1.0]
        verdict = "no" if not above else ("before" if above[0] < event else "at")
        twice = f"yes (step {pairs[0]})" if pairs else "no"
        lines.append(
            f"| {event} | {losses[event]:.2f} ({best:.2f}) | {shown} | {verdict} | {twice} |"
        )
    return "\n".join(lines)


def run_spike(args: argparse.Namespace) -> dict[str, Any]:
    model, batches, desc = build(args)
    opt = make_optimizer(model, args)
    probe_batch = next(batches)
    print(f"model: {desc}")
    print(
        f"optimizer: {args.optimizer} (momentum {args.momentum}), linear warmup to lr {args.lr} "
        f"over {args.warmup_steps} steps; probe every {args.probe_every} steps, "
        f"max_iters={args.max_iters}, tol={args.tol}"
    )
    losses: list[float] = []
    lrs: list[float] = []
    margins: dict[int, dict[str, Any]] = {}
    vectors: Tensor | None = None
    for step in range(args.steps):
        lr = warmup_lr(step, args.lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        if step % args.probe_every == 0 and (args.optimizer == "sgd" or step > 0):
            # Before the update of step `step`, with the lr it will use: the margin of this update.
            # Warm-started from the previous probe, as the monitor does.
            est = probe(model, opt, probe_batch, args.max_iters, args.tol, vectors, seed=step)
            vectors = est.result.vectors
            with probe_guard(model), torch.no_grad():
                probe_loss = float(loss_fn(model, probe_batch))
            row = {
                "lr": lr,
                "sharpness": est.sharpness,
                "margin": est.margin,
                "iters": est.result.iterations,
                "converged": est.result.converged,
                "probe_loss": probe_loss,
            }
            if args.step_batch_margin:  # the same on the batch this update is about to use
                own = probe(model, opt, batch, args.max_iters, args.tol)
                row.update(step_batch_sharpness=own.sharpness, step_batch_margin=own.margin)
            margins[step] = row
        loss = float(train_step(model, opt, batch))
        losses.append(loss)
        lrs.append(lr)
        if step in margins:
            m = margins[step]
            print(
                f"  step {step:4d}  lr {lr:.4f}  loss {loss:9.4f}  probe-batch loss "
                f"{m['probe_loss']:9.4f}  sharpness {m['sharpness']:9.2f}  margin "
                f"{m['margin']:7.3f}  iters {m['iters']:2d}"
                + (
                    f"  step-batch margin {m['step_batch_margin']:7.3f}"
                    if "step_batch_margin" in m
                    else ""
                )
                + ("" if m["converged"] else " (not converged)")
            )
        if not math.isfinite(loss):
            print(f"  step {step:4d}  loss {loss}: diverged, stopping")
            break
    return {
        "model": desc,
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "peak_lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "losses": losses,
        "lrs": lrs,
        "margins": {str(k): v for k, v in margins.items()},
        "spike_factor": args.spike_factor,
    }


def _print_spike_analysis(results: dict[str, Any]) -> None:
    print()
    print(analyze_spikes(results))


# --------------------------------------------------------------------------------------------
# eos
# --------------------------------------------------------------------------------------------


def _eos_problem(seed: int, width: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A tanh MLP (6 -> width -> width -> 1) and 128 random regression targets: full-batch GD
    on MSE sharpens until the sharpness reaches 2 / lr, then hovers there."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(128, 6, generator=g), torch.randn(128, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )
    return model, x, y


def _dense_top(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The top eigenvalue of the dense float64 Hessian of the full-batch loss."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model64 = copy.deepcopy(model).double()

    def loss(flat: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        out = torch.func.functional_call(model64, params, (x.double(),))
        return F.mse_loss(out, y.double())

    return float(torch.linalg.eigvalsh(torch.func.hessian(loss)(flat0))[-1])


def eos_run(seed: int, width: int, lr: float, every: int, steps: int) -> dict[str, Any]:
    """One GD run, probed every ``every`` steps by the monitor's prober (the defaults) and by
    the previous release's probe (a lone warm-start vector, tol 1e-2, 20 products), each
    against the dense Hessian."""
    model, x, y = _eos_problem(seed, width)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    prober = CurvatureProber(CurvatureProbe(every_n_steps=every))

    def loss() -> Tensor:
        return F.mse_loss(model(x), y)

    old_vector: Tensor | None = None
    rows = []
    for step in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        if not prober.due(step):
            continue
        with Clock() as new_clock:
            metrics, _ = prober.probe(step, opt, loss, model, lr_factor=1.0, distributed=False)
        with Clock() as old_clock:
            old = probe_old(model, opt, loss, old_vector)
        old_vector = old.result.vector
        new = prober.estimate
        if new is None or not math.isfinite(new.sharpness):
            break  # diverged
        rows.append(
            {
                "step": step,
                "top": _dense_top(model, x, y),
                "new": new.sharpness,
                "new_converged": bool(metrics["sharpness_converged"]),
                "new_hvps": new.result.iterations,
                "new_cpu": new_clock.cpu,
                "old": old.sharpness,
                "old_hvps": old.result.iterations,
                "old_cpu": old_clock.cpu,
            }
        )
    return {"seed": seed, "width": width, "lr": lr, "every": every, "rows": rows}


def probe_old(
    model: nn.Module, opt: torch.optim.Optimizer, loss: Any, vector: Tensor | None
) -> Any:
    """The previous release's probe: Lanczos from the last Ritz vector alone, tol 1e-2."""
    with probe_guard(model):
        return estimate_stability(
            loss, opt, max_iters=20, tol=1e-2, init=vector, explore=0, return_vector=True
        )


def _eos_summary(run: dict[str, Any]) -> dict[str, Any]:
    rows = run["rows"]
    new_err = [(r["top"] - r["new"]) / r["top"] for r in rows]
    old_err = [(r["top"] - r["old"]) / r["top"] for r in rows]
    return {
        "probes": len(rows),
        "new_worst": max(new_err),
        "new_misses": sum(e > 0.02 for e in new_err),
        "new_unconverged": sum(not r["new_converged"] for r in rows),
        "new_missed_converged": sum(
            e > 0.02 and r["new_converged"] for e, r in zip(new_err, rows, strict=True)
        ),
        "new_hvps": statistics.mean(r["new_hvps"] for r in rows),
        "new_cpu_ms": 1e3 * statistics.mean(r["new_cpu"] for r in rows),
        "old_worst": max(old_err),
        "old_misses": sum(e > 0.02 for e in old_err),
        "old_hvps": statistics.mean(r["old_hvps"] for r in rows),
        "old_cpu_ms": 1e3 * statistics.mean(r["old_cpu"] for r in rows),
    }


def run_eos(args: argparse.Namespace) -> dict[str, Any]:
    print(
        "Full-batch GD on a tanh MLP through the edge of stability; each probe against the "
        "dense Hessian (worst: the largest relative shortfall; misses: probes > 2% below)"
    )
    print(
        "\n| seed | width | lr | every | probes | now: worst | misses | unconverged | HVPs "
        "| ms | before: worst | misses | HVPs | ms |\n|" + "---|" * 14
    )
    runs = []
    total = {"probes": 0, "new_misses": 0, "new_unconverged": 0, "old_misses": 0}
    hvps = {"new": 0.0, "old": 0.0}
    for every in args.intervals:
        for lr in args.lrs:
            for seed in args.seeds:
                steps = args.steps or int(240 / lr)
                run = eos_run(seed, args.width, lr, every, steps)
                summary = _eos_summary(run)
                run["summary"] = summary
                runs.append(run)
                for key in total:
                    total[key] += summary[key]
                hvps["new"] += summary["new_hvps"] * summary["probes"]
                hvps["old"] += summary["old_hvps"] * summary["probes"]
                print(
                    f"| {seed} | {args.width} | {lr} | {every} | {summary['probes']} | "
                    f"{100 * summary['new_worst']:.2f}% | {summary['new_misses']} | "
                    f"{summary['new_unconverged']} | {summary['new_hvps']:.1f} | "
                    f"{summary['new_cpu_ms']:.1f} | {100 * summary['old_worst']:.2f}% | "
                    f"{summary['old_misses']} | {summary['old_hvps']:.1f} | "
                    f"{summary['old_cpu_ms']:.1f} |",
                    flush=True,
                )
    n = max(total["probes"], 1)
    print(
        f"\nall: {total['probes']} probes; now {total['new_misses']} misses > 2% "
        f"({total['new_unconverged']} unconverged), {hvps['new'] / n:.2f} HVPs per probe; "
        f"before {total['old_misses']} misses, {hvps['old'] / n:.2f} HVPs per probe"
    )
    return {"runs": runs, "total": total, "hvps_per_probe": {k: v / n for k, v in hvps.items()}}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "what",
        choices=["cost", "spike", "eos", "report"],
        help="report: analyse the spikes of a saved `spike --json` file",
    )
    arg = parser.add_argument
    arg("--optimizer", choices=["adamw", "sgd"], default=None)
    arg("--lr", type=float, default=None, help="peak lr")
    arg("--momentum", type=float, default=0.9)
    arg("--warmup-steps", type=int, default=None)
    arg("--steps", type=int, default=None, help="training steps")
    arg("--probe-every", type=int, default=None)
    arg("--max-iters", type=int, default=20)
    arg("--tol", type=float, default=1e-2)
    arg("--warm-start", action="store_true", help="also time a probe warm-started (cost)")
    arg("--intervals", type=int, nargs="+", default=None)
    arg("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="eos")
    arg("--lrs", type=float, nargs="+", default=[0.2, 0.3], help="eos")
    arg("--width", type=int, default=12, help="eos: hidden width (12: 253 parameters)")
    arg("--spike-factor", type=float, default=1.2)
    arg(
        "--step-batch-margin",
        action="store_true",
        help="spike: also probe the batch each update uses (twice the probe cost)",
    )
    arg("--batch-size", type=int, default=32)
    arg("--seq-len", type=int, default=128)
    arg("--d-model", type=int, default=128)
    arg("--layers", type=int, default=4)
    arg("--heads", type=int, default=4)
    arg("--max-chars", type=int, default=300_000)
    arg("--seed", type=int, default=0)
    arg("--threads", type=int, default=1, help="torch threads (1: stable ratios on a busy box)")
    arg("--own-model", action="store_true", help="do not import the example's model")
    arg("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    defaults = {
        "cost": {
            "optimizer": "adamw",
            "lr": 3e-3,
            "warmup_steps": 100,
            "steps": 40,
            "probe_every": 5,
        },
        "spike": {
            "optimizer": "sgd",
            "lr": 2.0,
            "warmup_steps": 100,
            "steps": 40,
            "probe_every": 1,
        },
        "eos": {},
        "report": {},
    }[args.what]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.intervals is None:  # cost: the overhead table; eos: the probe intervals
        args.intervals = [10, 25, 50, 100, 200]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "report":
        results = json.loads(Path(args.json).read_text())
        _print_spike_analysis(results)
        return
    runner = {"cost": run_cost, "spike": run_spike, "eos": run_eos}[args.what]
    results = runner(args)
    if args.what == "spike":
        _print_spike_analysis(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Build the corpus of real training runs that the detectors are calibrated on (issue 20).

Tiny models on CPU (vision, text and tabular), each trained for 150-400 optimizer steps under a
grid of optimizers, batch sizes, peak learning rates (safe to unstable), warmup arms (none,
short, long), lr schedulers and seeds. Every step records, with plain torch (no warmup_monitor
code except the pure ``warmup_monitor.schedules.warmup_factor`` in the ``wm_*`` schedulers):
the loss, the lr, the global gradient norm, the cosine between consecutive gradients, the
update/weight ratio, and per top-level block the gradient norm, update ratio and weight norm.
One compressed ``.npz`` per run and ``index.json`` (labels from ``labels.py``).

Usage::

    python benchmarks/corpus/build.py                  # the whole corpus, 2 worker processes
    python benchmarks/corpus/build.py --only gru_lm    # rebuild one family (index merged)
    python benchmarks/corpus/build.py --quick          # smoke test: a few short runs in runs/

Re-train one run with a hook (e.g. a ``LoopMonitor``)::

    from build import train            # with benchmarks/corpus on sys.path
    trace = train(record, hook=monitor)  # record: an index.json record or a traces.Run
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from labels import assign_labels  # noqa: E402

from warmup_monitor.schedules import warmup_factor  # noqa: E402

DEFAULT_OUT = HERE / "traces"
QUICK_OUT = ROOT / "runs" / "corpus_quick"
ARMS = ("none", "short", "long")
SEEDS = (0, 1, 2)
SHORT_WARMUP = 10
LONG_FRACTION = 0.3
SCHEDULERS = (
    "lambda_cosine",
    "hf_linear",
    "onecycle",
    "wm_linear",
    "hf_cosine",
    "wm_cosine",
    "wm_exponential",
)


@dataclass(frozen=True)
class Family:
    """A model on a data set, with its cells: (optimizer, batch size, peak lr, scheduler)."""

    data: str
    model: str
    steps: int
    cells: tuple[tuple[str, int, float, str], ...]


FAMILIES: dict[str, Family] = {
    "mlp_digits": Family(
        "vision",
        "MLP 64-128-128-10 (ReLU) on sklearn digits",
        200,
        (
            ("sgd", 256, 0.5, "lambda_cosine"),
            ("sgd", 256, 2.0, "hf_linear"),
            ("sgdm", 32, 0.3, "hf_cosine"),
            ("sgdm", 32, 1.0, "wm_cosine"),
        ),
    ),
    "mlp_tabular": Family(
        "tabular",
        "MLP 30-64-64-2 (ReLU) on sklearn breast_cancer (standardized)",
        200,
        (
            ("adam", 16, 0.001, "wm_exponential"),
            ("adam", 16, 0.1, "hf_linear"),
            ("adam", 16, 0.3, "onecycle"),
            ("sgd", 64, 5.0, "hf_cosine"),
        ),
    ),
    "cnn_digits": Family(
        "vision",
        "CNN 2 conv (16, 32) + 2 linear, no normalization, on 8x8 digits",
        200,
        (
            ("sgdm", 64, 0.1, "wm_exponential"),
            ("sgdm", 64, 0.45, "lambda_cosine"),
            ("adam", 64, 0.01, "onecycle"),
            ("adam", 64, 0.1, "wm_linear"),
        ),
    ),
    "cnn_bn_digits": Family(
        "vision",
        "CNN 2 conv (16, 32) with BatchNorm + 2 linear, on 8x8 digits",
        200,
        (
            ("sgdm", 64, 0.1, "hf_cosine"),
            ("sgdm", 64, 0.5, "wm_cosine"),
            ("adamw", 32, 0.1, "hf_linear"),
            ("adamw", 32, 0.3, "onecycle"),
        ),
    ),
    "resnet_digits": Family(
        "vision",
        "ResNet: stem + 3 residual blocks (conv-BN-ReLU-conv-BN + skip), 16 channels, on digits",
        200,
        (
            ("sgdm", 64, 0.1, "wm_linear"),
            ("sgdm", 64, 2.0, "wm_cosine"),
            ("adam", 64, 0.01, "wm_exponential"),
            ("adam", 64, 1.0, "hf_linear"),
        ),
    ),
    "gru_lm": Family(
        "text",
        "GRU char LM (embed 32, hidden 128, 1 layer) on pydoc_data.topics",
        200,
        (
            ("adam", 16, 0.003, "onecycle"),
            ("adam", 16, 0.03, "wm_linear"),
            ("adam", 16, 0.3, "wm_cosine"),
            ("sgd", 4, 5.0, "wm_exponential"),
        ),
    ),
    "preln_lm": Family(
        "text",
        "Pre-LN transformer char LM (d 64, 2 layers, 2 heads, causal) on pydoc_data.topics",
        200,
        (
            ("adamw", 16, 0.001, "hf_linear"),
            ("adamw", 16, 0.05, "wm_linear"),
            ("adamw", 16, 0.2, "hf_cosine"),
            ("sgdm", 8, 0.6, "wm_exponential"),
        ),
    ),
    "postln_lm": Family(
        "text",
        "Post-LN transformer char LM (d 64, 2 layers, 2 heads, causal) on pydoc_data.topics",
        200,
        (
            ("adamw", 16, 0.001, "lambda_cosine"),
            ("adamw", 16, 0.01, "hf_linear"),
            ("adamw", 16, 0.03, "onecycle"),
            ("adam", 32, 0.03, "wm_cosine"),
        ),
    ),
    "hf_gpt2": Family(
        "text",
        "Hugging Face GPT2LMHeadModel from GPT2Config (2 layers, n_embd 64, 2 heads)",
        200,
        (
            ("adamw", 8, 0.001, "wm_exponential"),
            ("adamw", 8, 0.01, "lambda_cosine"),
            ("adamw", 8, 0.2, "onecycle"),
            ("sgdm", 4, 0.3, "wm_linear"),
        ),
    ),
}

SEQ_LEN = 32
# Classification losses use label smoothing: the loss then has a floor well above 0 (about 0.5
# for 10 classes), so that ratios of final losses and the 2x spike rule are not dominated by
# noise on losses near 0.
LABEL_SMOOTHING = 0.1


# ----------------------------------------------------------------------------------- data


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(1234).permutation(len(x))
    x = torch.tensor(x[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.long)
    n = 1437
    return x[:n], y[:n], x[n:], y[n:]


@cache
def _tabular() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    perm = np.random.RandomState(1234).permutation(len(x))
    x, y = x[perm], y[perm]
    n = 455
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-8
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return xt[:n], yt[:n], xt[n:], yt[n:]


@cache
def _text() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Char ids of ``pydoc_data.topics`` (topics sorted by name): train (90 %), val, vocab."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(vocab)


def _batches(family: str, seed: int, steps: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """The run's mini-batches, in order: a function of the seed only (shared by all arms)."""
    rng = np.random.RandomState(10_000 + seed)
    data = FAMILIES[family].data
    if data == "text":
        train, _, _ = _text()
        starts = rng.randint(0, len(train) - SEQ_LEN - 1, size=(steps, batch))
        out = []
        for row in starts:
            idx = torch.tensor(row)[:, None] + torch.arange(SEQ_LEN + 1)
            chunk = train[idx]
            out.append((chunk[:, :-1], chunk[:, 1:]))
        return out
    x, y, _, _ = _tabular() if data == "tabular" else _digits()
    order: list[int] = []
    while len(order) < steps * batch:
        order.extend(rng.permutation(len(x)).tolist())
    out = []
    for t in range(steps):
        idx = torch.tensor(order[t * batch : (t + 1) * batch])
        xb = x[idx]
        if family != "mlp_digits" and data == "vision":
            xb = xb.view(-1, 1, 8, 8)
        out.append((xb, y[idx]))
    return out


def _val_batches(family: str) -> list[tuple[torch.Tensor, ...]]:
    data = FAMILIES[family].data
    if data == "text":
        _, val, _ = _text()
        rng = np.random.RandomState(999)
        starts = rng.randint(0, len(val) - SEQ_LEN - 1, size=(8, 32))
        out = []
        for row in starts:
            chunk = val[torch.tensor(row)[:, None] + torch.arange(SEQ_LEN + 1)]
            out.append((chunk[:, :-1], chunk[:, 1:]))
        return out
    _, _, x, y = _tabular() if data == "tabular" else _digits()
    if family != "mlp_digits" and data == "vision":
        x = x.view(-1, 1, 8, 8)
    return [(x, y)]


# --------------------------------------------------------------------------------- models


class CharTransformer(nn.Module):
    """Token + position embeddings, ``nn.TransformerEncoderLayer`` blocks with a causal mask,
    a final LayerNorm (Pre-LN only) and a linear head."""

    def __init__(self, vocab: int, norm_first: bool, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(SEQ_LEN, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, 2, 4 * d, dropout=0.0, batch_first=True, norm_first=norm_first
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d) if norm_first else nn.Identity()
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ_LEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


class CharGRU(nn.Module):
    """Embedding, one GRU layer, linear head."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, 128, batch_first=True)
        self.head = nn.Linear(128, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    """Stem, residual blocks (a ModuleList), pooled linear head."""

    def __init__(self, c: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.ModuleList(ResBlock(c) for _ in range(blocks))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))


class HFCausalLM(nn.Module):
    """A Hugging Face ``GPT2LMHeadModel`` built from a config (no download); returns logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab,
            n_positions=SEQ_LEN,
            n_embd=64,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def _conv_block(cin: int, cout: int, bn: bool) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)
    return (
        nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())
        if bn
        else nn.Sequential(conv, nn.ReLU())
    )


def build_model(family: str) -> tuple[nn.Module, list[str]]:
    """The family's model (built from the current torch RNG state) and its group names: the
    top-level blocks in depth order, as module paths."""
    if family == "mlp_digits":
        m: nn.Module = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        return m, ["0", "2", "4"]
    if family == "mlp_tabular":
        m = nn.Sequential(
            nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        )
        return m, ["0", "2", "4"]
    if family in ("cnn_digits", "cnn_bn_digits"):
        bn = family == "cnn_bn_digits"
        m = nn.Sequential(
            _conv_block(1, 16, bn),
            _conv_block(16, 32, bn),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Sequential(nn.Linear(32 * 16, 64), nn.ReLU()),
            nn.Linear(64, 10),
        )
        return m, ["0", "1", "4", "5"]
    if family == "resnet_digits":
        return ResNet(), ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    vocab = _text()[2]
    if family == "gru_lm":
        return CharGRU(vocab), ["embed", "rnn", "head"]
    if family in ("preln_lm", "postln_lm"):
        pre = family == "preln_lm"
        names = ["embed", "pos", "blocks.0", "blocks.1", *(["norm"] if pre else []), "head"]
        return CharTransformer(vocab, norm_first=pre), names
    if family == "hf_gpt2":
        # lm_head.weight is tied to transformer.wte.weight, so the head has no own parameter.
        return HFCausalLM(vocab), [
            "model.transformer.wte",
            "model.transformer.wpe",
            "model.transformer.h.0",
            "model.transformer.h.1",
            "model.transformer.ln_f",
        ]
    raise ValueError(f"unknown family {family!r}")


def build_optimizer(name: str, params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``sgd``, ``sgdm`` (momentum 0.9), ``adam``, ``adamw`` (weight decay 0.05)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    raise ValueError(f"unknown optimizer {name!r}")


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup: int, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's lr scheduler, stepped once after every optimizer step.

    ``lambda_cosine``: LambdaLR, linear warmup ``(s + 1) / W`` then cosine to 0;
    ``hf_linear`` / ``hf_cosine``: ``transformers.get_{linear,cosine}_schedule_with_warmup``
    (their warmup is ``s / W``: the first update has lr 0); ``onecycle``: ``OneCycleLR`` with
    ``pct_start = W / steps`` (cosine, no momentum cycling; the ``none`` arm starts at the peak);
    ``wm_<shape>``: LambdaLR of ``warmup_monitor.schedules.warmup_factor(shape, s, W)`` times a
    cosine decay to 0 after ``W``.
    """

    def cosine(s: int) -> float:
        q = min(1.0, max(0.0, (s - warmup) / max(1, steps - warmup)))
        return 0.5 * (1.0 + math.cos(math.pi * q))

    if name == "lambda_cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / warmup if s < warmup else cosine(s)
        )
    if name in ("hf_linear", "hf_cosine"):
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        fn = (
            get_linear_schedule_with_warmup
            if name == "hf_linear"
            else get_cosine_schedule_with_warmup
        )
        return fn(optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    if name == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        pct = max(warmup, 2) / steps
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=steps,
            pct_start=pct,
            anneal_strategy="cos",
            cycle_momentum=False,
            div_factor=25.0 if warmup > 0 else 1.0,
            final_div_factor=1e4,
        )
    if name.startswith("wm_"):
        shape = name[3:]
        w = max(warmup, 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_factor(shape, s, w) * cosine(s)
        )
    raise ValueError(f"unknown scheduler {name!r}")


# ------------------------------------------------------------------------------- the grid


def warmup_steps_of(arm: str, steps: int) -> int:
    """0 (none), 10 (short; 5 % of the steps if that is less) or 30 % of the steps (long)."""
    short = min(SHORT_WARMUP, max(2, round(0.05 * steps)))
    return {"none": 0, "short": short, "long": round(LONG_FRACTION * steps)}[arm]


def cell_id(family: str, optimizer: str, batch: int, lr: float, scheduler: str) -> str:
    """The cell: everything but the warmup arm and the seed."""
    return f"{family}__{optimizer}__bs{batch}__lr{lr:g}__{scheduler}"


def make_specs(
    families: Sequence[str] | None = None,
    quick: bool = False,
    seeds: Sequence[int] = SEEDS,
) -> list[dict[str, Any]]:
    """One record (without outcome fields) per run, in a fixed order: family, cell, seed, arm.
    All arms of a cell share its scheduler; ``quick``: 30-step runs of one cell of three
    families, seed 0."""
    specs: list[dict[str, Any]] = []
    for family, fam in FAMILIES.items():
        for optimizer, batch, lr, scheduler in fam.cells:
            if families and family not in families:
                continue
            cell = cell_id(family, optimizer, batch, lr, scheduler)
            steps = 30 if quick else fam.steps
            for seed in (0,) if quick else seeds:
                for arm in ARMS:
                    rid = f"{cell}__{arm}__s{seed}"
                    specs.append(
                        {
                            "id": rid,
                            "file": f"{rid}.npz",
                            "family": family,
                            "data": fam.data,
                            "model": fam.model,
                            "optimizer": optimizer,
                            "batch_size": batch,
                            "lr": lr,
                            "warmup_arm": arm,
                            "warmup_steps": warmup_steps_of(arm, steps),
                            "scheduler": scheduler,
                            "seed": seed,
                            "steps": steps,
                            "cell": cell,
                        }
                    )
    if quick:  # the second cell of three families, seed 0: 9 runs of 30 steps
        keep = set(families) if families else {"mlp_digits", "cnn_bn_digits", "hf_gpt2"}
        second = {f: cell_id(f, *FAMILIES[f].cells[1]) for f in keep}
        specs = [
            s for s in specs if s["family"] in keep and s["cell"].startswith(second[s["family"]])
        ]
    return specs


# ---------------------------------------------------------------------------- training


class Hook(Protocol):
    """What :func:`train` calls, in ``warmup_monitor.loop.LoopMonitor``'s order."""

    def before_step(self) -> Any: ...

    def after_step(self, loss: Any) -> Any: ...


def _get(spec: Any, key: str) -> Any:
    return spec[key] if isinstance(spec, Mapping) else getattr(spec, key)


def train(
    spec: Any, *, hook: Hook | Callable[[Any, nn.Module], Hook] | None = None
) -> dict[str, Any]:
    """Train one run and return its trace (arrays of equal length, one entry per step).

    The loop, per optimizer step ``t``::

        loss = loss_fn(model(x), y); loss.backward()
        hook.before_step()                      # after backward, before the step
        (record loss, lr of group 0, gradient norms and cosine; snapshot the weights)
        optimizer.step()
        (record update ratios)
        hook.after_step(loss)                   # after the step, before zero_grad
        optimizer.zero_grad(); scheduler.step()

    A non-finite loss or gradient is recorded, the step completes (hook included), and the run
    stops there (``diverged``). The RNG is only used to build the model; batches are fixed by the
    seed, so a hook that only reads leaves the run bit-identical.

    Args:
        spec: An ``index.json`` record or any object with its fields as attributes.
        hook: Optional object with ``before_step()`` and ``after_step(loss)``; or a callable
            ``hook(optimizer, model)`` that returns one, called once the optimizer is built
            (e.g. ``lambda opt, model: LoopMonitor(opt, warmup_steps=...)``).

    Returns:
        The per-step arrays of :data:`TRACE_KEYS` and ``val_loss``, ``diverged``, ``n_params``.
    """
    family, seed, steps = _get(spec, "family"), int(_get(spec, "seed")), int(_get(spec, "steps"))
    batch, lr = int(_get(spec, "batch_size")), float(_get(spec, "lr"))
    torch.manual_seed(seed)
    model, group_names = build_model(family)
    named = list(model.named_parameters())
    params = [p for _, p in named]

    def group_of(name: str) -> int:
        for i, g in enumerate(group_names):
            if name == g or name.startswith(g + "."):
                return i
        raise ValueError(f"parameter {name} is in no group of {group_names}")

    pgroup = np.array([group_of(n) for n, _ in named])
    offsets = np.cumsum([0] + [p.numel() for p in params])[:-1]
    n_groups = len(group_names)

    def by_group(v: torch.Tensor) -> np.ndarray:
        per_param = np.add.reduceat((v * v).numpy(), offsets)
        return np.bincount(pgroup, weights=per_param, minlength=n_groups)

    def flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in ts]).double()

    optimizer = build_optimizer(_get(spec, "optimizer"), params, lr)
    scheduler = build_scheduler(
        _get(spec, "scheduler"), optimizer, int(_get(spec, "warmup_steps")), steps
    )
    batches = _batches(family, seed, steps, batch)
    if hook is not None and not hasattr(hook, "before_step") and callable(hook):
        hook = hook(optimizer, model)
    smoothing = 0.0 if FAMILIES[family].data == "text" else LABEL_SMOOTHING
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)

    rec: dict[str, list[Any]] = {
        k: []
        for k in (
            "loss", "lr", "grad_norm", "grad_cosine", "update_ratio",
            "group_grad_norm", "group_update_ratio", "group_param_norm",
        )
    }  # fmt: skip
    prev_g: torch.Tensor | None = None
    diverged = False
    model.train()
    for x, y in batches:
        out = model(x)
        loss = loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        if hook is not None:
            hook.before_step()
        g = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        gsq = by_group(g)
        gnorm = float(torch.linalg.vector_norm(g))
        if prev_g is None or not math.isfinite(gnorm):
            cos = math.nan
        else:
            denom = gnorm * float(torch.linalg.vector_norm(prev_g))
            cos = float(torch.dot(g, prev_g)) / denom if denom > 0 else math.nan
        prev_g = g
        before = flat(params)
        rec["loss"].append(float(loss.detach()))
        rec["lr"].append(float(optimizer.param_groups[0]["lr"]))
        rec["grad_norm"].append(gnorm)
        rec["grad_cosine"].append(cos)
        rec["group_grad_norm"].append(np.sqrt(gsq))
        psq = by_group(before)
        rec["group_param_norm"].append(np.sqrt(psq))
        optimizer.step()
        delta = flat(params) - before
        pnorm = float(torch.linalg.vector_norm(before))
        with np.errstate(divide="ignore", invalid="ignore"):
            rec["update_ratio"].append(float(torch.linalg.vector_norm(delta)) / pnorm)
            rec["group_update_ratio"].append(np.sqrt(by_group(delta)) / np.sqrt(psq))
        if hook is not None:
            hook.after_step(loss)
        optimizer.zero_grad()
        scheduler.step()
        if not (math.isfinite(rec["loss"][-1]) and math.isfinite(gnorm)):
            diverged = True
            break

    val_loss = math.nan
    if not diverged:
        model.eval()
        with torch.no_grad():
            total, count = 0.0, 0
            for x, y in _val_batches(family):
                out = model(x)
                total += float(loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))) * len(y)
                count += len(y)
        val_loss = total / count
    arrays: dict[str, Any] = {
        k: np.asarray(v, dtype=np.float64) for k, v in rec.items() if not k.startswith("group_")
    }
    for k in ("group_grad_norm", "group_update_ratio", "group_param_norm"):
        arrays[k] = np.asarray(rec[k], dtype=np.float32).reshape(-1, n_groups)
    arrays["group_names"] = np.asarray(group_names)
    arrays["val_loss"] = np.float64(val_loss)
    arrays["diverged"] = diverged
    arrays["n_params"] = sum(p.numel() for p in params)
    return arrays


# ----------------------------------------------------------------------------- storage


def save_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    """A compressed ``.npz`` with fixed zip timestamps (the same arrays give the same bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


TRACE_KEYS = (
    "loss", "lr", "grad_norm", "grad_cosine", "update_ratio",
    "group_names", "group_grad_norm", "group_update_ratio", "group_param_norm",
)  # fmt: skip


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_one(args: tuple[dict[str, Any], str]) -> dict[str, Any]:
    spec, out = args
    t0 = time.perf_counter()
    tr = train(spec)
    save_npz(Path(out) / spec["file"], {k: tr[k] for k in TRACE_KEYS})
    rec = dict(spec)
    rec["steps_done"] = len(tr["loss"])
    rec["diverged"] = bool(tr["diverged"])
    rec["val_loss"] = float(tr["val_loss"])
    rec["n_params"] = int(tr["n_params"])
    rec["_loss"] = tr["loss"].tolist()
    rec["_grad_norm"] = tr["grad_norm"].tolist()
    rec["_seconds"] = time.perf_counter() - t0
    return rec


INDEX_ORDER = (
    "id", "file", "family", "data", "model", "n_params", "optimizer", "batch_size", "lr",
    "warmup_arm", "warmup_steps", "scheduler", "seed", "steps", "steps_done", "diverged",
    "final_loss", "val_loss", "cell", "label", "label_reason", "deadline_step", "spike_1_5x",
    "split",
)  # fmt: skip


def summary(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: runs per label (total, per split, per family and per family and split)."""
    labels = ("healthy", "spiky", "failing", "silent", "unclear")
    lines = ["| | runs | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]

    def row(name: str, rs: Sequence[Mapping[str, Any]]) -> None:
        c = Counter(r["label"] for r in rs)
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(str(c[k]) for k in labels) + " |")

    row("**all**", records)
    for split in ("calibrate", "report"):
        row(f"split {split}", [r for r in records if r["split"] == split])
    for fam in sorted({r["family"] for r in records}, key=list(FAMILIES).index):
        rs = [r for r in records if r["family"] == fam]
        row(fam, rs)
        for split in ("calibrate", "report"):
            part = [r for r in rs if r["split"] == split]
            if part:
                seeds = ",".join(str(s) for s in sorted({r["seed"] for r in part}))
                row(f"&nbsp; {fam} {split} (seeds {seeds})", part)
    return "\n".join(lines)


def family_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: per family its data, parameter count, steps, cells and schedulers."""
    lines = [
        "| family | data | params | steps | cells: optimizer, batch, peak lr, scheduler |",
        "|---|---|---|---|---|",
    ]
    for fam in sorted({r["family"] for r in records}, key=list(FAMILIES).index):
        rs = [r for r in records if r["family"] == fam]
        cells = sorted({(r["optimizer"], r["batch_size"], r["lr"], r["scheduler"]) for r in rs})
        text = "; ".join(f"{o} bs{b} lr {lr:g} {sc}" for o, b, lr, sc in cells)
        lines.append(
            f"| {fam} | {rs[0]['data']} | {rs[0]['n_params']:,} | {rs[0]['steps']} | {text} |"
        )
    return "\n".join(lines)


def cell_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: per cell and seed, each arm's label (h/f/s/u) and final loss."""
    abbrev = {"healthy": "h", "spiky": "k", "failing": "f", "silent": "s", "unclear": "u"}
    lines = ["| cell | seed | none | short | long |", "|---|---|---|---|---|"]
    rows: dict[tuple[str, int], dict[str, str]] = {}
    for r in records:
        fl = r["final_loss"]
        text = (
            f"{abbrev[r['label']]} {fl:.3f}" if math.isfinite(fl) else f"{abbrev[r['label']]} div"
        )
        rows.setdefault((r["cell"], r["seed"]), {})[r["warmup_arm"]] = text
    for (cell, seed), arms in rows.items():
        lines.append(f"| {cell} | {seed} | " + " | ".join(arms.get(a, "") for a in ARMS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(FAMILIES), default=None)
    ap.add_argument("--quick", action="store_true", help=f"a few short runs, to {QUICK_OUT}")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="(for tuning)")
    ap.add_argument(
        "--summary", action="store_true", help="print the tables of an existing index; no training"
    )
    ap.add_argument(
        "--relabel",
        action="store_true",
        help="label an existing index again (labels.py); no training",
    )
    args = ap.parse_args(argv)
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.relabel:
        records = json.loads((out / "index.json").read_text())
        stored: dict[str, dict[str, np.ndarray]] = {}
        for r in records:
            with np.load(out / r["file"]) as z:
                stored[r["id"]] = {"loss": z["loss"], "grad_norm": z["grad_norm"]}
        records = [{k: r.get(k) for k in INDEX_ORDER} for r in assign_labels(records, stored)]
        (out / "index.json").write_text(json.dumps(records, indent=1) + "\n")
        args.summary = True
    if args.summary:
        records = json.loads((out / "index.json").read_text())
        print(family_table(records), summary(records), cell_table(records), sep="\n\n")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = make_specs(args.only, quick=args.quick, seeds=args.seeds)
    # Longest runs first (text families), for load balance.
    order = sorted(specs, key=lambda s: -s["steps"] * (3 if s["data"] == "text" else 1))
    work = [(s, str(out)) for s in order]
    if args.jobs > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, initializer=_worker_init) as pool:
            done = list(pool.imap_unordered(_run_one, work, chunksize=1))
    else:
        _worker_init()
        done = [_run_one(w) for w in work]
    by_id = {r["id"]: r for r in done}
    new = [by_id[s["id"]] for s in specs]
    traces: dict[str, dict[str, np.ndarray]] = {}
    for r in new:
        traces[r["id"]] = {
            "loss": np.asarray(r.pop("_loss")),
            "grad_norm": np.asarray(r.pop("_grad_norm")),
        }
    seconds = {r["id"]: r.pop("_seconds") for r in new}

    index_path = out / "index.json"
    kept: list[dict[str, Any]] = []
    if args.only and index_path.exists():
        rebuilt = set(args.only)
        old = [r for r in json.loads(index_path.read_text()) if r["family"] not in rebuilt]
        for r in old:
            with np.load(out / r["file"]) as z:
                traces[r["id"]] = {"loss": z["loss"], "grad_norm": z["grad_norm"]}
        kept = old
    all_specs_order = {s["id"]: i for i, s in enumerate(make_specs(None, quick=args.quick))}
    records = sorted(kept + new, key=lambda r: all_specs_order.get(r["id"], 1 << 30))
    records = assign_labels(records, traces)
    records = [{k: r.get(k) for k in INDEX_ORDER} for r in records]
    index_path.write_text(json.dumps(records, indent=1) + "\n")
    wall = time.perf_counter() - t0
    print(summary(records))
    fam_time = Counter()
    for r in new:
        fam_time[r["family"]] += seconds[r["id"]]
    print("\nworker seconds per family: " + ", ".join(f"{k} {v:.0f}" for k, v in fam_time.items()))
    print(f"\n{len(new)} runs trained, {len(records)} in {index_path}; wall time {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

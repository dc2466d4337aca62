"""Load the corpus: ``index.json`` plus one ``.npz`` of per-step arrays per run.

Example::

    import sys; sys.path.insert(0, "benchmarks/corpus")
    from traces import load_corpus
    runs = load_corpus()                       # list[Run], in index order
    failing = [r for r in runs if r.label == "failing" and r.split == "calibrate"]
    r = failing[0]; r.loss, r.lr, r.deadline_step, r.group_names, r.group_grad_norm.shape
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_PATH", "Run", "load_corpus"]

DEFAULT_PATH = Path(__file__).resolve().parent / "traces"


@dataclass
class Run:
    """One run: its ``index.json`` record and its per-step arrays (``steps_done`` entries each;
    the per-group arrays are ``[steps_done, len(group_names)]``)."""

    id: str
    file: str
    family: str
    data: str
    model: str
    n_params: int
    optimizer: str
    batch_size: int
    lr: float
    warmup_arm: str
    warmup_steps: int
    scheduler: str
    seed: int
    steps: int
    steps_done: int
    diverged: bool
    final_loss: float
    val_loss: float
    cell: str
    label: str
    label_reason: str
    deadline_step: int | None
    spike_1_5x: int | None
    split: str
    loss: np.ndarray
    lr_trace: np.ndarray
    grad_norm: np.ndarray
    grad_cosine: np.ndarray
    update_ratio: np.ndarray
    group_names: list[str]
    group_grad_norm: np.ndarray
    group_update_ratio: np.ndarray
    group_param_norm: np.ndarray

    @property
    def record(self) -> dict[str, Any]:
        """The ``index.json`` record (what ``build.train`` takes as ``spec``)."""
        arrays = _ARRAY_FIELDS | {"lr_trace"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in arrays}


_ARRAY_FIELDS = {
    "loss", "grad_norm", "grad_cosine", "update_ratio", "group_names",
    "group_grad_norm", "group_update_ratio", "group_param_norm",
}  # fmt: skip


def load_corpus(path: str | Path = DEFAULT_PATH) -> list[Run]:
    """Every run of the corpus at ``path`` (a folder with ``index.json``), in index order.

    The per-step lr is ``Run.lr_trace`` (``Run.lr`` is the peak lr of the record). A diverged
    run's ``final_loss`` is ``inf``; its ``val_loss`` is NaN.
    """
    folder = Path(path)
    records = json.loads((folder / "index.json").read_text())
    runs = []
    for r in records:
        with np.load(folder / r["file"]) as z:
            arrays = {k: z[k] for k in z.files}
        runs.append(
            Run(
                **{k: v for k, v in r.items() if k != "final_loss"},
                final_loss=math.inf if r["final_loss"] is None else float(r["final_loss"]),
                loss=arrays["loss"],
                lr_trace=arrays["lr"],
                grad_norm=arrays["grad_norm"],
                grad_cosine=arrays["grad_cosine"],
                update_ratio=arrays["update_ratio"],
                group_names=[str(n) for n in arrays["group_names"]],
                group_grad_norm=arrays["group_grad_norm"],
                group_update_ratio=arrays["group_update_ratio"],
                group_param_norm=arrays["group_param_norm"],
            )
        )
    return runs

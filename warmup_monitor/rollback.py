"""In-memory snapshots of training, and the rollback that restores one.

With ``AdaptiveWarmup(rollback=True)`` the adapter keeps :class:`Snapshots`: every
``snapshot_every_n_steps`` optimizer steps during warmup and its grace window it copies

- the model's ``state_dict()`` (parameters and buffers, e.g. BatchNorm statistics),
- each optimizer's per-parameter state (Adam's moments and step counts, SGD's momentum),
- the RNG states of torch (CPU and every CUDA device), Python's ``random`` and NumPy,
- the monitor's detector states,

into buffers allocated once (on the CPU, pinned when CUDA is available, or on each tensor's own
device with ``snapshot_device="same"``) and reused: the two most recent snapshots are kept.

When the controller asks for a rollback (:attr:`~warmup_monitor.engine.MonitorEngine.
rollback_request`), :meth:`Snapshots.restore` copies back the last snapshot taken before the
episode's onset, in place (the optimizer keeps its parameters). **Time goes on:** the step
count, the lr schedule (the scheduler and the optimizer's param-group hyperparameters such as
``lr``) and the data stream are not rewound: the batches after the rollback are new ones (as
PaLM skipped the batches around a spike), and the controller's back-off and longer re-warm
apply from the next update. Under data parallelism every rank holds the same parameters and
takes the same decision at the same step (the decision is a function of all-reduced values),
so every rank restores the same snapshot without a collective.

This module imports no Lightning.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Snapshot", "Snapshots", "carry_out"]


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return np.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is None:
        return
    import numpy as np

    np.random.set_state(state)


@dataclass
class Snapshot:
    """One copy of the training state, taken before update ``step``.

    Attributes:
        step: Updates taken when it was taken (its parameters produce the loss of ``step``).
        model: The model's ``state_dict()`` copy.
        optimizers: Each optimizer's per-parameter ``state`` copy.
        rng: The RNG states.
        monitor: The detectors' states.
        nbytes: Bytes held by its tensors.
        seconds: Wall time of the last copy into it.
    """

    step: int
    model: dict[str, Tensor]
    optimizers: list[dict[int, dict[str, Any]]]
    rng: dict[str, Any]
    monitor: dict[int, Any]
    nbytes: int = 0
    seconds: float = 0.0
    _valid: bool = field(default=True, repr=False)


def _copy_into(dst: Tensor | None, src: Tensor, device: str) -> Tensor:
    """``src`` copied into ``dst`` when it fits (no allocation), else into a new buffer."""
    src = src.detach()
    if dst is not None and dst.shape == src.shape and dst.dtype == src.dtype:
        dst.copy_(src, non_blocking=dst.is_pinned())
        return dst
    if device == "same":
        return src.clone()
    out = torch.empty(src.shape, dtype=src.dtype, pin_memory=torch.cuda.is_available())
    out.copy_(src, non_blocking=src.is_cuda)
    return out


def _copy_tree(dst: Any, src: Any, device: str) -> Any:
    if isinstance(src, Tensor):
        return _copy_into(dst if isinstance(dst, Tensor) else None, src, device)
    if isinstance(src, dict):
        old = dst if isinstance(dst, dict) else {}
        return {k: _copy_tree(old.get(k), v, device) for k, v in src.items()}
    return src


def _nbytes(tree: Any) -> int:
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0


class Snapshots:
    """The two most recent snapshots of a model and its optimizers, in reused buffers.

    Example::

        snapshots = Snapshots(device="cpu")
        snapshots.take(step, model, [optimizer], monitor_state)   # before update ``step``
        ...
        snap = snapshots.restore(model, [optimizer], before=onset)  # None if none is older

    Args:
        device: ``"cpu"`` (host memory, pinned when CUDA is available) or ``"same"`` (each
            tensor's own device).
        keep: How many snapshots are kept (>= 1).
    """

    def __init__(self, device: str = "cpu", keep: int = 2) -> None:
        if device not in ("cpu", "same"):
            raise ValueError(f"`device` must be 'cpu' or 'same', got {device!r}")
        self.device = device
        self.keep = keep
        self._ring: list[Snapshot] = []
        self._spare: Snapshot | None = None

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def steps(self) -> list[int]:
        """The steps of the kept snapshots, oldest first."""
        return [s.step for s in self._ring]

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept snapshots (and the buffer being reused)."""
        spare = self._spare.nbytes if self._spare is not None else 0
        return sum(s.nbytes for s in self._ring) + spare

    def clear(self) -> None:
        """Drop every snapshot."""
        self._ring = []
        self._spare = None

    def take(
        self,
        step: int,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        monitor: dict[int, Any],
    ) -> Snapshot:
        """Copy the state before update ``step``; the oldest snapshot's buffers are reused."""
        start = time.perf_counter()
        if self._ring and self._ring[-1].step == step:
            self._ring.pop()  # the same step again (a rollback landed on it): take it afresh
        reuse = self._spare
        if len(self._ring) >= self.keep:
            reuse = self._ring.pop(0)
        model_state = _copy_tree(reuse.model if reuse else None, model.state_dict(), self.device)
        opt_states = [
            _copy_tree(
                reuse.optimizers[i] if reuse and i < len(reuse.optimizers) else None,
                dict(opt.state_dict()["state"]),
                self.device,
            )
            for i, opt in enumerate(optimizers)
        ]
        if any(t.is_cuda for t in model_state.values() if isinstance(t, Tensor)) and (
            self.device == "cpu"
        ):
            torch.cuda.synchronize()  # the non-blocking copies must land before training goes on
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        snap = Snapshot(step, model_state, opt_states, rng, monitor)
        snap.nbytes = _nbytes(model_state) + _nbytes(opt_states)
        snap.seconds = time.perf_counter() - start
        self._ring.append(snap)
        self._spare = None
        return snap

    def restore(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], *, before: int
    ) -> Snapshot | None:
        """Restore the last snapshot taken before update ``before`` (its step < ``before``)
        in place; ``None`` (nothing changed) if none is kept. Newer snapshots are dropped:
        they hold the episode."""
        older = [s for s in self._ring if s.step < before]
        if not older:
            return None
        snap = older[-1]
        newer = [s for s in self._ring if s.step > snap.step]
        self._ring = [s for s in self._ring if s.step <= snap.step]
        if newer:
            self._spare = newer[0]  # its buffers serve the next snapshot
        with torch.no_grad():
            model.load_state_dict(snap.model)
        for opt, state in zip(optimizers, snap.optimizers, strict=False):
            # The per-parameter state goes back; the param groups (lr and the other
            # hyperparameters the scheduler set) stay as they are now.
            current = opt.state_dict()
            opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        rng = snap.rng
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        _set_numpy_state(rng["numpy"])
        return snap


def carry_out(
    engine: Any,
    snapshots: Snapshots,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
) -> None:
    """The adapter's side of rollback, after a batch: restore when the engine asks, then take
    a snapshot when one is due. ``engine`` is a :class:`~warmup_monitor.engine.MonitorEngine`.
    """
    request = engine.rollback_request
    if request is not None:
        snap = snapshots.restore(model, optimizers, before=request.onset)
        if snap is None:
            engine.rolled_back(None, None, snapshot_bytes=snapshots.nbytes)
        else:
            # No wall time in the alert: the alerts of a run are reproducible, bit for bit.
            engine.rolled_back(snap.step, snap.monitor, snapshot_bytes=snap.nbytes)
    if engine.snapshot_due():
        step, monitor = engine.snapshot_state()
        if engine.rollback_request is None and step not in snapshots.steps:
            snapshots.take(step, model, optimizers, monitor)

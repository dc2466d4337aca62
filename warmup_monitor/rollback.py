"""In-memory snapshots of training, and the rollback that restores one.

With ``AdaptiveWarmup(rollback=True)`` the engine keeps :class:`Snapshots` (when to take and
restore them: :mod:`warmup_monitor.engine.rollback`): every
``snapshot_every_n_steps`` optimizer steps during warmup and its grace window it copies

- the model's ``state_dict()`` (parameters and buffers, e.g. BatchNorm statistics),
- each optimizer's per-parameter state (Adam's moments and step counts, SGD's momentum),
- the monitor's detector states,

into buffers allocated once (on the CPU, pinned when CUDA is available, or on each tensor's own
device with ``snapshot_device="same"``) and reused: the two most recent snapshots are kept. A
``DTensor`` (FSDP2) is kept as the shard this rank holds. With ``AdaptiveWarmup.anchor_step``
the snapshot taken before that update is kept too, for the whole watch (the **anchor**): an
episode whose onset precedes both recent snapshots (a collapse found late) returns to it.

When the controller asks for a rollback (:attr:`~warmup_monitor.controller.WarmupController.
rollback_request`), :meth:`Snapshots.restore` copies the last snapshot taken before the
episode's onset **into** the live tensors (the model's parameters and buffers, the optimizer's
state; a shard into its shard): the snapshot never shares storage with what training updates,
so it stays as it was taken until it is dropped. **Time goes on:** the step count, the lr
schedule (the scheduler and the optimizer's param-group hyperparameters such as ``lr``), the
data stream and the random generators are not rewound: the batches after the rollback are the
ones that come next (as PaLM skipped the batches around a spike; a later epoch's shuffle is a
new one, not a replay), and the controller's back-off and longer re-warm apply from the next
update. Under data parallelism every rank holds the same parameters (or its own shards) and
takes the same decision at the same step (the decision is a function of all-reduced values),
so every rank restores the same snapshot without a collective.

This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Snapshot", "Snapshots"]

_DTENSOR: Any = None


def _dtensor_class() -> Any:
    """``torch.distributed.tensor.DTensor``, or ``None`` where torch has no distributed."""
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - builds without torch.distributed
            _DTENSOR = False
        else:
            _DTENSOR = DTensor
    return _DTENSOR or None


def _local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: a ``DTensor``'s local shard, else ``t`` itself."""
    cls = _dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t.to_local()
    return t


@dataclass
class Snapshot:
    """One copy of the training state, taken before update ``step``.

    Attributes:
        step: Updates taken when it was taken (its parameters produce the loss of ``step``).
        model: The model's ``state_dict()`` copy (a ``DTensor`` as this rank's shard).
        optimizers: Each optimizer's per-parameter ``state`` copy.
        monitor: The detectors' states.
        nbytes: Bytes held by its tensors.
        seconds: Wall time of the last copy into it.
    """

    step: int
    model: dict[str, Tensor]
    optimizers: list[dict[int, dict[str, Any]]]
    monitor: dict[int, Any]
    nbytes: int = 0
    seconds: float = 0.0


def _copy_into(dst: Tensor | None, src: Tensor, device: str) -> Tensor:
    """``src`` (this rank's shard of it) copied into ``dst`` when it fits (no allocation),
    else into a new buffer. The result never shares storage with ``src``."""
    src = _local(src.detach())
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


def _fits(live: Any, saved: Any) -> bool:
    """Whether ``saved`` can be copied into ``live`` in place."""
    if isinstance(saved, Tensor):
        if not isinstance(live, Tensor):
            return False
        target = _local(live)
        return target.shape == saved.shape and target.dtype == saved.dtype
    return not isinstance(live, Tensor)


def _restore_model(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    """Copy ``saved`` into the model's own parameters and buffers (a shard into its shard)."""
    live = model.state_dict()  # detached views of the live tensors
    if live.keys() == saved.keys() and all(_fits(live[k], v) for k, v in saved.items()):
        for key, value in saved.items():
            _local(live[key]).copy_(value)
        return
    # The model changed shape since the snapshot (rare): load a copy, never the buffers.
    model.load_state_dict({k: v.clone() for k, v in saved.items()})


def _new_state_value(param: Tensor, key: str, value: Any, group: Mapping[str, Any]) -> Any:
    """A fresh copy of a saved per-parameter state value, placed as the optimizer keeps it
    (torch's own rule: ``step`` stays where it was unless ``capturable``/``fused``; the rest
    on the parameter's device, floating values in its dtype; a shard of a ``DTensor``
    parameter becomes a ``DTensor`` again)."""
    if not isinstance(value, Tensor):
        return value
    local = _local(param)
    if key == "step":
        if group.get("capturable") or group.get("fused"):
            return value.to(dtype=torch.float32, device=param.device, copy=True)
        return value.clone()
    out = value.to(device=local.device, copy=True)
    if param.is_floating_point() and out.is_floating_point():
        out = out.to(dtype=local.dtype)
    cls = _dtensor_class()
    if cls is not None and isinstance(param, cls) and out.shape == local.shape:
        return cls.from_local(
            out, param.device_mesh, param.placements, run_check=False,
            shape=param.shape, stride=param.stride(),
        )  # fmt: skip
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, saved: Mapping[int, Mapping[str, Any]]) -> None:
    """Copy ``saved`` (per-parameter state by index, as ``state_dict()`` numbers them) into the
    optimizer's own state; the param groups (lr and the other hyperparameters) stay as they
    are. State that did not exist at the snapshot is dropped; state that no longer exists is
    created from a copy."""
    index = 0
    for group in opt.param_groups:
        for param in group["params"]:
            entry = saved.get(index)
            index += 1
            live = opt.state.get(param)
            if entry is None:
                if live is not None:
                    del opt.state[param]
                continue
            if (
                live is not None
                and live.keys() == entry.keys()
                and all(_fits(live[k], v) for k, v in entry.items())
            ):
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        _local(live[key]).copy_(value)
                    else:
                        live[key] = value
            else:
                opt.state[param] = {
                    k: _new_state_value(param, k, v, group) for k, v in entry.items()
                }


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
        keep: How many recent snapshots are kept (>= 1).
        anchor_step: The snapshot taken before this update is the anchor: kept apart from the
            recent ones (its buffers are never reused) until :meth:`clear`; ``None``: none.
    """

    def __init__(self, device: str = "cpu", keep: int = 2, anchor_step: int | None = None) -> None:
        if device not in ("cpu", "same"):
            raise ValueError(f"`device` must be 'cpu' or 'same', got {device!r}")
        self.device = device
        self.keep = keep
        self.anchor_step = anchor_step
        self._ring: list[Snapshot] = []
        self._spare: Snapshot | None = None
        self._anchor: Snapshot | None = None

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def steps(self) -> list[int]:
        """The steps of the kept snapshots (the anchor's included), oldest first."""
        return [s.step for s in self.snapshots]

    @property
    def snapshots(self) -> list[Snapshot]:
        """The kept snapshots, the anchor included, oldest first (read them; they are the
        monitor's buffers)."""
        kept = list(self._ring) if self._anchor is None else [self._anchor, *self._ring]
        return sorted(kept, key=lambda s: s.step)

    @property
    def anchor(self) -> Snapshot | None:
        """The anchor snapshot (``anchor_step``), once taken."""
        return self._anchor

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept snapshots (the anchor's and the buffer being reused)."""
        spare = self._spare.nbytes if self._spare is not None else 0
        return sum(s.nbytes for s in self.snapshots) + spare

    def clear(self) -> None:
        """Drop every snapshot, the anchor too."""
        self._ring = []
        self._spare = None
        self._anchor = None

    def take(
        self,
        step: int,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        monitor: dict[int, Any],
    ) -> Snapshot:
        """Copy the state before update ``step``; the oldest snapshot's buffers are reused
        (the anchor, at ``anchor_step``, gets buffers of its own)."""
        start = time.perf_counter()
        anchor = step == self.anchor_step
        if self._ring and self._ring[-1].step == step:
            self._ring.pop()  # the same step again (a rollback landed on it): take it afresh
        reuse = self._spare if not anchor else None
        if len(self._ring) >= self.keep and not anchor:
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
        if self.device == "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies must land before training goes on
        snap = Snapshot(step, model_state, opt_states, monitor)
        snap.nbytes = _nbytes(model_state) + _nbytes(opt_states)
        snap.seconds = time.perf_counter() - start
        if anchor:
            self._anchor = snap
            return snap
        self._ring.append(snap)
        self._spare = None
        return snap

    def restore(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], *, before: int
    ) -> Snapshot | None:
        """Restore the last snapshot taken before update ``before`` (its step < ``before``)
        by copying it into the live model and optimizer state; ``None`` (nothing changed) if
        none is kept. Newer snapshots are dropped: they hold the episode. The random
        generators are left alone (time goes on; the module docstring)."""
        older = [s for s in self.snapshots if s.step < before]
        if not older:
            return None
        snap = older[-1]
        newer = [s for s in self._ring if s.step > snap.step]
        self._ring = [s for s in self._ring if s.step <= snap.step]
        if newer:
            self._spare = newer[0]  # its buffers serve the next snapshot
        with torch.no_grad():
            _restore_model(model, snap.model)
            for opt, state in zip(optimizers, snap.optimizers, strict=False):
                _restore_optimizer(opt, state)
        return snap

    # ------------------------------------------------------------------ checkpoints

    def state_dict(
        self, *, onset_from: int | None = None, current: int | None = None
    ) -> dict[str, Any]:
        """The kept snapshots, for a checkpoint: steps, tensors and detector states. The
        tensors are the snapshots' own buffers (serialize the result before training goes
        on, as a checkpoint does).

        Args:
            onset_from: The earliest onset a rollback can still have: snapshots older than
                the last one before it are left out (they can no longer be restored).
            current: The updates taken now: a snapshot of that step holds the current state,
                which the checkpoint holds anyway; it is left out (take it again on resume).
        """
        ring = self._ring
        if onset_from is not None:
            older = [i for i, s in enumerate(ring) if s.step < onset_from]
            ring = ring[older[-1] :] if older else ring
        ring = [s for s in ring if s.step != current]
        if self._anchor is not None and self._anchor.step != current:
            ring = [self._anchor, *ring]  # a late onset still returns to it after a resume
        return {
            "snapshots": [
                {"step": s.step, "model": s.model, "optimizers": s.optimizers, "monitor": s.monitor}
                for s in ring
            ]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep the snapshots of :meth:`state_dict` (their tensors become the buffers)."""
        self.clear()
        for entry in state.get("snapshots", []):
            model, opts = (
                dict(entry["model"]),
                [{int(k): dict(v) for k, v in o.items()} for o in entry["optimizers"]],
            )
            monitor = {int(k): v for k, v in dict(entry.get("monitor", {})).items()}
            snap = Snapshot(int(entry["step"]), model, opts, monitor)
            snap.nbytes = _nbytes(model) + _nbytes(opts)
            if snap.step == self.anchor_step:
                self._anchor = snap
            else:
                self._ring.append(snap)
        self._ring = self._ring[-self.keep :]

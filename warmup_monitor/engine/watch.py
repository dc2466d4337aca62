"""What the engine keeps per optimizer and per step, and how it sums over ranks."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from warmup_monitor.config import Detection, Statistics
from warmup_monitor.controller import WarmupController
from warmup_monitor.detectors import Episodes, InstabilityDetector
from warmup_monitor.engine.per_group import groups_of
from warmup_monitor.lr_factor import LrFactor
from warmup_monitor.stats import GradientStats, UpdateRatio
from warmup_monitor.stats.layers import Groups

#: ``reduce(tensor, sharded)``: sums a small tensor over the ranks (all of them, or only those
#: holding shards when ``sharded``); returns it (in place is fine).
Reducer = Callable[[Tensor, bool], Tensor]


class WorldReducer:
    """A :data:`Reducer` over ``torch.distributed``'s default group (identity when not running).

    A class, not a closure, so that the monitor pickles (``strategy="ddp_spawn"``).

    Args:
        shard_groups: Process groups over which shard sums are reduced (default: the world).
    """

    def __init__(self, shard_groups: Sequence[Any] | None = None) -> None:
        self.shard_groups = list(shard_groups or [])

    def __call__(self, t: Tensor, sharded: bool) -> Tensor:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return t
        if sharded and self.shard_groups:
            for group in self.shard_groups:
                dist.all_reduce(t, group=group)
        else:
            dist.all_reduce(t)
        return t

    def __getstate__(self) -> dict[str, Any]:
        return {"shard_groups": []}  # process groups do not travel; attach() finds them again


def dtensor_shard_groups(params: Sequence[Tensor]) -> list[Any] | None:
    """Process groups of the mesh dimensions along which ``DTensor`` parameters are sharded.

    ``None`` if no parameter is a ``DTensor`` (gradients are whole on every rank).
    """
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        placements = getattr(p, "placements", None)
        if mesh is None or placements is None:
            continue
        dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
        return [mesh.get_group(d) for d in dims]
    return None


@dataclass
class Pending:
    """Measured in ``before_step``; completed when the batch's loss is known."""

    step: int
    progress: int
    sums: Tensor  # local [sum_sq, dot] (then the groups' sums of squares on a per-group step)
    lrs: list[float]
    factor: float
    grad_count: int
    log: bool


@dataclass
class Record:
    """One completed step, its values still on the device."""

    step: int
    progress: int
    values: Tensor  # [loss, grad_norm, cosine, update_ratio] (NaN = absent), then per group
    # on logging steps with ``Statistics.layers``: G grad norms, G shares, G update ratios
    lrs: list[float]
    factor: float
    grad_count: int
    has_loss: bool
    log: bool
    amp_skipped: bool = False


def read_values(records: Sequence[Record]) -> list[list[float]]:
    """The values of ``records`` in **one** device-to-host read (records differ in length)."""
    flat = torch.cat([r.values for r in records]).tolist()
    out, at = [], 0
    for r in records:
        n = r.values.numel()
        out.append(flat[at : at + n])
        at += n
    return out


def record_state(rec: Record, values: list[float]) -> dict[str, Any]:
    """A kept step as primitives, its values read back (for a checkpoint)."""
    return {"step": rec.step, "progress": rec.progress, "values": values, "lrs": rec.lrs,
            "factor": rec.factor, "grad_count": rec.grad_count, "has_loss": rec.has_loss,
            "log": rec.log, "amp_skipped": rec.amp_skipped}  # fmt: skip


def restore_record(state: dict[str, Any], device: torch.device) -> Record:
    """The inverse of :func:`record_state`, its values back on ``device``."""
    values = torch.tensor([float(v) for v in state["values"]], device=device)
    return Record(
        step=int(state["step"]),
        progress=int(state["progress"]),
        values=values,
        lrs=[float(x) for x in state["lrs"]],
        factor=float(state["factor"]),
        grad_count=int(state["grad_count"]),
        has_loss=bool(state["has_loss"]),
        log=bool(state["log"]),
        amp_skipped=bool(state.get("amp_skipped", False)),
    )


@dataclass
class Watch:
    """Everything kept for one optimizer."""

    index: int
    optimizer: torch.optim.Optimizer
    stats: GradientStats
    update: UpdateRatio | None
    detector: InstabilityDetector
    controller: WarmupController | None = None
    episodes: Episodes | None = None
    step: int = 0
    progress: int = 0  # updates actually applied (steps skipped by a GradScaler excluded)
    pending: Pending | None = None
    stepped: bool = False
    records: list[Record] = field(default_factory=list)
    hook: Any = None
    lr_factor: LrFactor | None = None
    groups: Groups | None = None  # per-group statistics (``Statistics.layers``)
    released: bool = False  # buffers freed once past the window
    completed_unstepped: bool = False  # the last step was completed before its optimizer stepped
    sizes: tuple[int, ...] = ()  # parameters per param group when the lists were built
    frozen: list[Tensor] = field(default_factory=list)  # the optimizer's frozen parameters

    @property
    def plan_end(self) -> int | None:
        """The current planned end of warmup, if a controller keeps a plan."""
        return None if self.controller is None else self.controller.warmup_steps

    def factor(self) -> float:
        """The factor of the next update (recording the user's lr first: the controller
        stretches the ramp the user's scheduler really set)."""
        if self.controller is None:
            return 1.0
        if self.controller.shape is None and self.controller.adaptive:
            if self.lr_factor is not None:
                lr = self.lr_factor.scheduler_lrs()[0]
            else:
                lr = float(self.optimizer.param_groups[0]["lr"])
            self.controller.record_user_lr(self.progress, lr)
        return self.controller.factor(self.progress)


class Losses:
    """The losses back-propagated since the previous optimizer step of any optimizer.

    A step's loss is their mean. When several optimizers step on one backward (same batch, no
    new loss in between), each gets that batch's loss.
    """

    def __init__(self) -> None:
        self.batch = 0  # counts the adapter's end_batch calls
        self.clear()
        self._last: tuple[Tensor, int] | None = None  # (loss, batch) of the last step

    def clear(self) -> None:
        """Forget the losses not yet taken."""
        self._sum: Tensor | None = None
        self.count = 0

    def add(self, loss: Any, *, restart: bool = False) -> None:
        """Add one loss; ``restart`` forgets the earlier ones first (their gradients were
        dropped: they belong to no update).

        A loss is any real number (``float``, ``int``, NumPy scalars such as ``np.float32``,
        ``fractions.Fraction``), or a one-element tensor or array (torch or NumPy, any real
        dtype); booleans and complex numbers are refused.
        """
        if loss is None:
            return
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"`loss` must be a single value (a number or a 0-dim tensor), got a tensor "
                    f"of shape {tuple(loss.shape)}: reduce it (e.g. loss.mean()) first"
                )
            if loss.dtype == torch.bool or loss.is_complex():
                raise TypeError(f"`loss` must be a real number, got a {loss.dtype} tensor")
            value = loss.detach().float().reshape(())
        else:
            value = torch.tensor(_real(loss))
        if restart:
            self.clear()
        self._sum = value if self._sum is None else self._sum + value.to(self._sum.device)
        self.count += 1

    def take(self) -> Tensor | None:
        """The mean of the losses since the last take (and forget them), or ``None``."""
        if self._sum is not None:
            loss = self._sum / self.count if self.count > 1 else self._sum
            self._last = (loss, self.batch)
            self.clear()
            return loss
        if self._last is not None and self._last[1] == self.batch:
            return self._last[0]  # several optimizers stepped on one backward
        return None


def _real(loss: Any) -> float:
    """A host loss as a float: a real number, or a one-element real array (NumPy, ...)."""
    if isinstance(loss, (bool, str, bytes)):
        raise TypeError(f"`loss` must be a real number or a 0-dim tensor, got {loss!r}")
    if isinstance(loss, numbers.Real):
        return float(loss)
    if hasattr(loss, "__array__"):
        import numpy as np

        arr = np.asarray(loss)
        if arr.size != 1:
            raise ValueError(
                f"`loss` must be a single value (a number or a 0-dim array), got an array of "
                f"shape {arr.shape}: reduce it (e.g. loss.mean()) first"
            )
        if arr.dtype.kind in "fiu":
            return float(arr.reshape(()))
    raise TypeError(f"`loss` must be a real number or a 0-dim tensor, got {type(loss).__name__}")


def trained_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of ``optimizer`` that require a gradient, group after group."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def frozen_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of ``optimizer`` that do not require a gradient (watched for unfreezing)."""
    return [p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]


def group_sizes(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """The number of parameters of each param group: what changes when a group is added."""
    return tuple(len(g["params"]) for g in optimizer.param_groups)


def make_statistics(
    config: Statistics, params: list[Tensor], model: torch.nn.Module | None = None
) -> tuple[GradientStats, UpdateRatio | None, Groups | None]:
    """The gradient statistics and update ratio over ``params``, and their groups for
    ``Statistics.layers`` (found in ``model``; ``None``: per-group statistics off)."""
    layers = groups_of(config.layers, model, params)
    dtype = None if config.reference_dtype is None else getattr(torch, config.reference_dtype)
    stats = GradientStats(
        params,
        cosine=config.cosine,
        reference_dtype=dtype,
        sketch_fraction=config.sketch_fraction,
        groups=layers,
    )
    update = UpdateRatio(params, groups=layers) if config.update_ratio else None
    return stats, update, layers


def follow_groups(watch: Watch, config: Statistics, model: torch.nn.Module | None) -> None:
    """Rebuild the parameter lists of ``watch`` when its optimizer's param groups changed
    (``add_param_group``) or one of its frozen parameters was unfrozen (progressive
    unfreezing with ``requires_grad_``): a host-side look at the group sizes and at the
    frozen parameters' flags, no device work. The cosine restarts (the gradient vector
    changed); the per-group plans of ``Statistics.layers`` are rebuilt with groups found
    again in ``model`` (a new parameter joins its block). A parameter frozen later needs
    nothing: it has no gradient, it adds 0."""
    sizes = group_sizes(watch.optimizer)
    if sizes == watch.sizes and not any(p.requires_grad for p in watch.frozen):
        return
    watch.sizes = sizes
    watch.frozen = frozen_params(watch.optimizer)
    params = trained_params(watch.optimizer)
    if [id(p) for p in params] == [id(p) for p in watch.stats.params]:
        return
    watch.stats.release()
    if watch.update is not None:
        watch.update.release()
    watch.stats, watch.update, watch.groups = make_statistics(config, params, model)


def make_episodes(detection: Detection, state: dict[str, Any] | None) -> Episodes | None:
    """The episode filter of one optimizer (``None`` when ``Detection.episodes`` is off)."""
    if not detection.episodes:
        return None
    episodes = Episodes(quiet_steps=detection.episode_quiet_steps)
    if state is not None:
        episodes.load_state_dict(state)
    return episodes

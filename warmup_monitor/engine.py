"""The monitor's engine: everything it does per optimizer step, without Lightning.

:class:`MonitorEngine` owns, for each watched optimizer, the gradient statistics, the update
ratio, the instability detector and the step count; it decides which steps are read back to the
host, feeds the detectors, and hands metrics and alerts to sinks given by its user. The
Lightning callback (:mod:`warmup_monitor.callback`) and the plain-PyTorch helper
(:mod:`warmup_monitor.loop`) are thin shells around it.

Host reads. Statistics stay on the device. Each step's values are stacked into a small device
tensor and kept; on a step that logs, or every ``check_every_n_steps``, everything kept since the
last read comes back in **one** device-to-host read and the detectors see every step in order.
On other steps nothing is read: a decision about step ``t`` is taken at the next read, at most
``check_every_n_steps - 1`` steps later (0 with the default of 1).

Distributed. Under data parallelism the gradients are identical on every rank after the
all-reduce, so only the loss is averaged over ranks. Sharded gradients (FSDP2 ``DTensor``, or
FSDP1 flat shards) contribute local sums of squares and dot products that are summed over the
ranks holding shards. Both reductions go into one small all-reduce per step. Every rank then
holds the same numbers and takes the same decisions without further communication.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.controller import WarmupController, WarmupExhaustedError
from warmup_monitor.detectors import InstabilityDetector
from warmup_monitor.lr_factor import LrFactor
from warmup_monitor.stats import CosineMode, GradientStats, UpdateRatio

__all__ = ["MetricsSink", "MonitorEngine", "world_reducer"]

#: ``sink(metrics, step)``: where the engine sends the scalars of a logging step.
MetricsSink = Callable[[dict[str, float], int], None]
#: ``reduce(tensor, sharded)``: sums a small float32 tensor over the ranks (all of them, or only
#: those holding shards when ``sharded``); returns it (in place is fine).
Reducer = Callable[[Tensor, bool], Tensor]


def world_reducer(shard_groups: Sequence[Any] | None = None) -> Reducer:
    """A :data:`Reducer` over ``torch.distributed``'s default group (identity when not running).

    Args:
        shard_groups: Process groups over which shard sums are reduced (default: the world).
    """

    def reduce(t: Tensor, sharded: bool) -> Tensor:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return t
        if sharded and shard_groups:
            for group in shard_groups:
                dist.all_reduce(t, group=group)
        else:
            dist.all_reduce(t)
        return t

    return reduce


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
class _Pending:
    """Measured in ``before_step``; completed when the batch's loss is known."""

    step: int
    progress: int
    sums: Tensor  # local [sum_sq, dot] (and [delta_sq, old_sq] appended later)
    lrs: list[float]
    factor: float
    grad_count: int
    log: bool


@dataclass
class _Record:
    """One completed step, its values still on the device."""

    step: int
    progress: int
    values: Tensor  # [loss, grad_norm, cosine, update_ratio] (NaN = absent)
    lrs: list[float]
    factor: float
    grad_count: int
    has_loss: bool
    log: bool
    amp_skipped: bool = False


@dataclass
class _Watch:
    """Everything kept for one optimizer."""

    index: int
    optimizer: torch.optim.Optimizer
    stats: GradientStats
    update: UpdateRatio | None
    detector: InstabilityDetector
    controller: WarmupController | None = None
    step: int = 0
    progress: int = 0  # updates actually applied (steps skipped by a GradScaler excluded)
    pending: _Pending | None = None
    stepped: bool = False
    records: list[_Record] = field(default_factory=list)
    hook: Any = None
    lr_factor: LrFactor | None = None

    @property
    def plan_end(self) -> int | None:
        """The current planned end of warmup, if a controller keeps a plan."""
        return None if self.controller is None else self.controller.warmup_steps

    def factor(self) -> float:
        """The factor of the next update."""
        return 1.0 if self.controller is None else self.controller.factor(self.progress)


class MonitorEngine:
    """Per-step measurement, detection and routing for one or more optimizers.

    Call :meth:`attach` with the optimizers, then per optimizer step :meth:`before_step` (after
    backward and unscaling, before clipping) and per batch :meth:`end_batch` (after the
    optimizer step or steps, with the batch's loss); :meth:`flush` at the end.

    Args:
        warmup_steps: Planned warmup length in optimizer steps.
        log_every_n_steps: Logging interval during warmup.
        check_every_n_steps: Interval of host reads on steps that do not log.
        post_warmup_steps: Steps monitored after warmup (``-1``: all).
        post_warmup_log_every_n_steps: Logging interval after warmup.
        detector: Template detector; each optimizer gets its own copy.
        controller: Template warmup plan (schedule, adaptive extension); each optimizer gets
            its own copy. ``None``: the monitor only watches.
        cosine: Cosine mode of :class:`~warmup_monitor.stats.GradientStats`.
        reference_dtype: dtype of the cosine's reference buffer.
        update_ratio: Whether to measure the update/weight ratio on logging steps.
        key_prefix: Prefix of every metric key.
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        log_every_n_steps: int = 1,
        check_every_n_steps: int = 1,
        post_warmup_steps: int = 100,
        post_warmup_log_every_n_steps: int = 1,
        detector: InstabilityDetector,
        controller: WarmupController | None = None,
        cosine: CosineMode = "exact",
        reference_dtype: torch.dtype | None = None,
        update_ratio: bool = True,
        key_prefix: str = "warmup/",
    ) -> None:
        self.warmup_steps = warmup_steps
        self.log_every_n_steps = log_every_n_steps
        self.check_every_n_steps = check_every_n_steps
        self.post_warmup_steps = post_warmup_steps
        self.post_warmup_log_every_n_steps = post_warmup_log_every_n_steps
        self.detector = detector
        self.controller = controller
        self.cosine = cosine
        self.reference_dtype = reference_dtype
        self.update_ratio = update_ratio
        self.key_prefix = key_prefix

        self.metrics_sinks: list[MetricsSink] = []
        self.alert_sinks: list[Callable[[Alert], None]] = []
        self.reducer: Reducer = world_reducer()
        self.world_size = 1
        self.sharded = False
        self.shards_span_world = True

        self.alert_count = 0
        self.skipped_steps = 0
        self.amp_skipped_steps = 0
        self._watches: list[_Watch] = []
        self._detector_states: dict[int, dict[str, Any]] = {}
        self._controller_states: dict[int, dict[str, Any]] = {}
        self._steps: dict[int, int] = {}
        self._progress: dict[int, int] = {}
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._released = False

    # ------------------------------------------------------------------ the monitoring window

    def planned_warmup_steps(self, opt_idx: int = 0) -> int:
        """The current planned warmup length (extended by the controller, if any)."""
        if opt_idx < len(self._watches):
            end = self._watches[opt_idx].plan_end
            if end is not None:
                return end
        return self.warmup_steps

    def monitor_until(self, opt_idx: int = 0) -> float:
        """The first optimizer step no longer monitored (``inf`` when ``post_warmup_steps=-1``)."""
        if self.post_warmup_steps < 0:
            return math.inf
        return self.planned_warmup_steps(opt_idx) + self.post_warmup_steps

    def is_active(self, step: int, opt_idx: int = 0) -> bool:
        """Whether optimizer step ``step`` is monitored."""
        return step < self.monitor_until(opt_idx)

    def should_log(self, step: int, opt_idx: int = 0) -> bool:
        """Whether optimizer step ``step`` logs its scalars."""
        end = self.planned_warmup_steps(opt_idx)
        if step < end:
            return step % self.log_every_n_steps == 0
        return (step - end) % self.post_warmup_log_every_n_steps == 0

    def _should_read(self, step: int, opt_idx: int) -> bool:
        return self.should_log(step, opt_idx) or step % self.check_every_n_steps == 0

    @property
    def stop_requested(self) -> bool:
        """Whether a controller asks to stop training (``on_exhausted="stop"``)."""
        return any(w.controller is not None and w.controller.stop_requested for w in self._watches)

    def key(self, name: str, opt_idx: int = 0) -> str:
        """The metric key of ``name`` for optimizer ``opt_idx``."""
        if opt_idx == 0:
            return f"{self.key_prefix}{name}"
        return f"{self.key_prefix}opt{opt_idx}/{name}"

    # ------------------------------------------------------------------ lifecycle

    def attach(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        first_step: int | None = None,
    ) -> None:
        """Start watching ``optimizers`` (again). Step counts and detector states carry over.

        Args:
            optimizers: The optimizers, in a stable order (index ``K`` logs as ``optK``).
            first_step: Step count to start from for optimizers without a saved count (e.g.
                the trainer's global step when resuming from a checkpoint made without us).
        """
        self.detach()
        self._watches = []
        all_params: list[Tensor] = []
        for idx, opt in enumerate(optimizers):
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            all_params.extend(params)
            detector = self.detector if idx == 0 else copy.deepcopy(self.detector)
            if idx in self._detector_states:
                detector.load_state_dict(self._detector_states[idx])
            elif idx > 0:
                detector.reset()
            controller = None
            if self.controller is not None:
                controller = self.controller if idx == 0 else copy.deepcopy(self.controller)
                if idx in self._controller_states:
                    controller.load_state_dict(self._controller_states[idx])
                elif idx > 0:
                    controller.reset()
            watch = _Watch(
                index=idx,
                optimizer=opt,
                stats=GradientStats(
                    params, cosine=self.cosine, reference_dtype=self.reference_dtype
                ),
                update=UpdateRatio(params) if self.update_ratio else None,
                detector=detector,
                controller=controller,
                step=self._steps.get(idx, first_step or 0),
                progress=self._progress.get(idx, first_step or 0),
            )
            watch.hook = opt.register_step_post_hook(self._post_hook(watch))
            if controller is not None and (controller.shape is not None or controller.adaptive):
                watch.lr_factor = LrFactor(opt, watch.factor)
            self._watches.append(watch)
        groups = dtensor_shard_groups(all_params)
        if groups is not None:
            self.sharded = True
            self.reducer = world_reducer(groups)
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                self.shards_span_world = (
                    len(groups) == 1 and dist.get_world_size(groups[0]) == dist.get_world_size()
                )
        self._reset_loss()
        self._released = False

    def detach(self) -> None:
        """Stop watching: flush what is kept, remove the optimizer hooks, free the buffers."""
        self.flush()
        for w in self._watches:
            if w.hook is not None:
                w.hook.remove()
                w.hook = None
            if w.lr_factor is not None:
                w.lr_factor.remove()
                w.lr_factor = None
            self._steps[w.index] = w.step
            self._progress[w.index] = w.progress
            self._detector_states[w.index] = w.detector.state_dict()
            if w.controller is not None:
                self._controller_states[w.index] = w.controller.state_dict()
        self._release()

    @staticmethod
    def _post_hook(watch: _Watch) -> Callable[..., None]:
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            watch.stepped = True

        return hook

    def steps_taken(self, opt_idx: int = 0) -> int:
        """Optimizer steps optimizer ``opt_idx`` has taken (monitored or not)."""
        if opt_idx < len(self._watches):
            return self._watches[opt_idx].step
        return self._steps.get(opt_idx, 0)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The watched optimizers, in index order."""
        return [w.optimizer for w in self._watches]

    # ------------------------------------------------------------------ per step

    def watch_of(self, optimizer: Any) -> _Watch | None:
        """The watch of ``optimizer`` (a torch optimizer or a wrapper with ``_optimizer``)."""
        raw = getattr(optimizer, "_optimizer", optimizer)
        for w in self._watches:
            if w.optimizer is raw:
                return w
        return None

    def before_step(self, optimizer: Any) -> None:
        """Measure ``optimizer``'s gradients (after backward/unscaling, before clipping)."""
        watch = self.watch_of(optimizer)
        if watch is None:
            return
        if not self.is_active(watch.step, watch.index):
            # Past the window: count the step, do nothing else.
            watch.step += 1
            watch.progress += 1
            self._release()
            return
        sums = watch.stats.local_sums()
        do_log = self.should_log(watch.step, watch.index)
        if watch.update is not None and do_log:
            watch.update.snapshot()
        watch.stepped = False
        factor = watch.factor()
        if watch.lr_factor is not None:
            base = watch.lr_factor.scheduler_lrs()
        else:
            base = [float(g["lr"]) for g in watch.optimizer.param_groups]
        watch.pending = _Pending(
            step=watch.step,
            progress=watch.progress,
            sums=sums,
            lrs=[lr * factor for lr in base],
            factor=factor,
            grad_count=watch.stats.last_grad_count,
            log=do_log,
        )

    def add_loss(self, loss: Tensor | None) -> None:
        """Add one micro-batch's loss (already divided as the user's loop divides it)."""
        if loss is None:
            return
        loss = loss.detach().float().reshape(())
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def end_batch(self, loss_scale: float = 1.0) -> None:
        """Complete the steps measured since the last call, using the losses added so far.

        The step's loss is ``sum(losses) * loss_scale / count`` (Lightning divides each
        micro-batch's loss by the accumulation factor: pass it as ``loss_scale``). Does nothing
        (and keeps the losses) when no optimizer stepped.
        """
        pending = [w for w in self._watches if w.pending is not None]
        if not pending:
            return
        has_loss = self._loss_sum is not None
        device = pending[0].pending.sums.device  # type: ignore[union-attr]
        if self._loss_sum is not None:
            loss = (self._loss_sum * (loss_scale / self._loss_count)).to(device)
        else:
            loss = torch.zeros((), device=device)
        self._reset_loss()

        # One small all-reduce: the loss's share of the mean, and the shard sums.
        parts: list[Tensor] = [loss / self.world_size]
        for w in pending:
            assert w.pending is not None
            parts.append(w.pending.sums.to(device))
            upd = w.update.local_sums() if w.update is not None and w.update.has_snapshot else None
            parts.append(
                upd.to(device) if upd is not None else torch.full((2,), math.nan, device=device)
            )
        flat = torch.cat([p.reshape(-1) for p in parts])
        if self.world_size > 1:
            if not self.sharded:  # whole gradients, identical on every rank: only the loss
                flat = torch.cat([self.reducer(flat[:1].clone(), False), flat[1:]])
            elif self.shards_span_world:  # one collective: loss / world and the shard sums
                flat = self.reducer(flat, True)
            else:  # shards within groups, replicas across them: two collectives
                flat = torch.cat(
                    [self.reducer(flat[:1].clone(), False), self.reducer(flat[1:], True)]
                )
        loss_mean = flat[0] if has_loss else torch.full_like(flat[0], math.nan)

        for i, w in enumerate(pending):
            p = w.pending
            assert p is not None
            grad = w.stats.finish(flat[1 + 4 * i : 3 + 4 * i])
            ratio = UpdateRatio.finish(flat[3 + 4 * i : 5 + 4 * i])
            values = torch.stack([loss_mean, grad[0], grad[1], ratio])
            w.records.append(
                _Record(
                    step=p.step,
                    progress=p.progress,
                    values=values,
                    lrs=p.lrs,
                    factor=p.factor,
                    grad_count=p.grad_count,
                    has_loss=has_loss,
                    log=p.log,
                    amp_skipped=not w.stepped,
                )
            )
            w.pending = None
            w.step = p.step + 1
            if w.stepped:
                w.progress = p.progress + 1
            if self._should_read(p.step, w.index):
                self._read(w)

    def report(
        self,
        step: int,
        alerts: Sequence[Alert],
        metrics: dict[str, float] | None = None,
        *,
        opt_idx: int = 0,
        feed_controller: bool = True,
    ) -> None:
        """Route findings made outside the per-step statistics (e.g. the curvature probe).

        The metrics go to the metrics sinks at ``step``; the alerts are counted, dispatched and
        (with ``feed_controller``) shown to the optimizer's warmup controller like the
        detectors' own.
        """
        out = list(alerts)
        w = self._watches[opt_idx] if opt_idx < len(self._watches) else None
        if feed_controller and w is not None and w.controller is not None and out:
            out.extend(w.controller.observe(step, out, next_step=w.progress))
        self.alert_count += len(out)
        if metrics:
            for sink in self.metrics_sinks:
                sink({self.key(k, opt_idx): v for k, v in metrics.items()}, step)
        self._dispatch(out, opt_idx)

    def flush(self) -> None:
        """Read back and process every step still kept on the device."""
        for w in self._watches:
            if w.records:
                self._read(w)

    # ------------------------------------------------------------------ host side

    def _read(self, w: _Watch) -> None:
        records, w.records = w.records, []
        # The one device-to-host read for all steps kept since the last read.
        host = torch.stack([r.values for r in records]).tolist()
        for rec, (loss, grad_norm, cosine, ratio) in zip(records, host, strict=True):
            self._process(w, rec, loss, grad_norm, cosine, ratio)

    def _process(
        self, w: _Watch, rec: _Record, loss: float, grad_norm: float, cosine: float, ratio: float
    ) -> None:
        idx, step = w.index, rec.step
        if rec.amp_skipped:
            # The gradient scaler skipped the update (inf/NaN in fp16 gradients): not an
            # instability; the step is counted apart and taught the detectors nothing.
            self.amp_skipped_steps += 1
            w.stats.forget()
            return
        if rec.grad_count == 0 and not rec.has_loss:
            # training_step returned None: Lightning counts the step, nothing was learned.
            self.skipped_steps += 1
            return
        loss_f = loss if rec.has_loss else None
        cosine_f = cosine if math.isfinite(cosine) else None
        alerts: list[Alert] = []
        if rec.grad_count == 0:
            alerts.append(
                Alert(
                    step=step,
                    kind=AlertKind.MONITOR,
                    message="no parameter of the optimizer has a gradient at this step",
                    details={"optimizer": idx},
                )
            )
        alerts.extend(w.detector.update(step, loss_f, grad_norm, cosine_f))
        if w.controller is not None:
            alerts.extend(
                w.controller.observe(rec.progress, alerts, next_step=w.progress, lr=rec.lrs[0])
            )
        self.alert_count += len(alerts)

        if rec.log:
            metrics: dict[str, float] = {self.key("lr", idx): rec.lrs[0]}
            if len(rec.lrs) > 1:
                for j, lr in enumerate(rec.lrs):
                    metrics[self.key(f"lr/pg{j}", idx)] = lr
            if loss_f is not None:
                metrics[self.key("loss", idx)] = loss_f
                loss_ratio = w.detector.loss_ratio(loss_f)
                if loss_ratio is not None:
                    metrics[self.key("loss_ratio", idx)] = loss_ratio
            if rec.grad_count:
                metrics[self.key("grad_norm", idx)] = grad_norm
            if cosine_f is not None:
                metrics[self.key("grad_cosine", idx)] = cosine_f
            if math.isfinite(ratio):
                metrics[self.key("update_ratio", idx)] = ratio
            metrics[self.key("warmup_steps", idx)] = float(self.planned_warmup_steps(idx))
            if w.controller is not None:
                metrics[self.key("lr_factor", idx)] = rec.factor
            metrics[self.key("alerts", idx)] = float(self.alert_count)
            unstable = any(AlertKind(a.kind).is_instability for a in alerts)
            metrics[self.key("unstable", idx)] = 1.0 if unstable else 0.0
            if self.amp_skipped_steps:
                metrics[self.key("amp_skipped_steps", idx)] = float(self.amp_skipped_steps)
            for sink in self.metrics_sinks:
                sink(metrics, step)
        self._dispatch(alerts, idx)

    def _dispatch(self, alerts: Sequence[Alert], opt_idx: int) -> None:
        for alert in alerts:
            alert.details.setdefault("optimizer", opt_idx)
            for alert_sink in self.alert_sinks:
                alert_sink(alert)
        for alert in alerts:
            if alert.kind == AlertKind.WARMUP_EXHAUSTED and alert.details.get("action") == "raise":
                raise WarmupExhaustedError(alert.message)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step counts, counters and every optimizer's detector state (primitives only)."""
        steps = dict(self._steps)
        progress = dict(self._progress)
        detectors = dict(self._detector_states)
        controllers = dict(self._controller_states)
        for w in self._watches:
            steps[w.index] = w.step
            progress[w.index] = w.progress
            detectors[w.index] = w.detector.state_dict()
            if w.controller is not None:
                controllers[w.index] = w.controller.state_dict()
        if not detectors:
            detectors[0] = self.detector.state_dict()
        return {
            "steps": steps,
            "progress": progress,
            "controllers": controllers,
            "alert_count": self.alert_count,
            "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "detectors": detectors,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the previous gradients are not restored (no cosine on
        the first step after)."""
        self._steps = {int(k): int(v) for k, v in state.get("steps", {}).items()}
        self._progress = {int(k): int(v) for k, v in state.get("progress", self._steps).items()}
        self._controller_states = {int(k): v for k, v in state.get("controllers", {}).items()}
        if self.controller is not None and 0 in self._controller_states:
            self.controller.load_state_dict(self._controller_states[0])
        self.alert_count = int(state.get("alert_count", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp_skipped_steps = int(state.get("amp_skipped_steps", 0))
        self._detector_states = {int(k): v for k, v in state.get("detectors", {}).items()}
        if 0 in self._detector_states:
            self.detector.load_state_dict(self._detector_states[0])
        for w in self._watches:
            w.step = self._steps.get(w.index, w.step)
            w.progress = self._progress.get(w.index, w.progress)
            if w.controller is not None and w.index in self._controller_states:
                w.controller.load_state_dict(self._controller_states[w.index])
            if w.index in self._detector_states:
                w.detector.load_state_dict(self._detector_states[w.index])
            w.stats.forget()

    # ------------------------------------------------------------------ internals

    def _reset_loss(self) -> None:
        self._loss_sum = None
        self._loss_count = 0

    def _release(self) -> None:
        if self._released:
            return
        for w in self._watches:
            w.stats.release()
            if w.update is not None:
                w.update.release()
        self._released = True

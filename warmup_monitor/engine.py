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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import MonitorConfig
from warmup_monitor.controller import WarmupController, WarmupExhaustedError
from warmup_monitor.curvature.probe import CurvatureProber
from warmup_monitor.detectors import InstabilityDetector
from warmup_monitor.lr_factor import LrFactor
from warmup_monitor.stats import GradientStats, UpdateRatio

__all__ = ["AlertSink", "MetricsSink", "MonitorEngine"]

#: ``sink(metrics, step)``: where the engine sends the scalars of a logging step.
MetricsSink = Callable[[dict[str, float], int], None]
#: ``sink(alert)``: where the engine sends each alert.
AlertSink = Callable[[Alert], None]
#: ``reduce(tensor, sharded)``: sums a small float32 tensor over the ranks (all of them, or only
#: those holding shards when ``sharded``); returns it (in place is fine).
Reducer = Callable[[Tensor, bool], Tensor]


class _WorldReducer:
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
    """Per-step measurement, detection, adaptive warmup and the curvature probe, for one or
    more optimizers; everything the monitor does, without Lightning.

    The adapters (the Lightning callback, :class:`~warmup_monitor.loop.LoopMonitor`) wire it
    once with :meth:`attach` and then only say what happened:

    - :meth:`add_loss` for each loss that was back-propagated (the real loss, not divided by
      the accumulation factor);
    - :meth:`before_step` per optimizer step, after backward and unscaling, before clipping;
    - the step is completed right after ``optimizer.step`` by the engine's own step hook
      (``complete_on_step=True``), or by :meth:`after_step` when the loss is only known later;
    - :meth:`end_batch` at the end of each batch (completes a step a ``GradScaler`` skipped);
    - :meth:`probe` after a step, with the probe's loss, when :meth:`probe_due` says so;
    - :meth:`detach` at the end (flushes what is kept and removes the hooks).

    A step's loss is the mean of the losses added since the previous optimizer step of any
    optimizer: with accumulation, its micro-batches; with several optimizers (manual
    optimization), the losses back-propagated for that optimizer's update only.

    Args:
        config: The whole, validated configuration.
    """

    def __init__(self, config: MonitorConfig) -> None:
        if not isinstance(config, MonitorConfig):
            raise TypeError(f"`config` must be a MonitorConfig, got {config!r}")
        self.config = config
        self.warmup_steps = config.warmup_steps
        window = config.window
        self.log_every_n_steps = window.log_every_n_steps
        self.check_every_n_steps = window.check_every_n_steps
        self.post_warmup_steps = window.post_warmup_steps
        self.post_warmup_log_every_n_steps = window.post_log_every
        self.key_prefix = config.log_key_prefix
        self.detector = InstabilityDetector(config.detection)
        self.controller: WarmupController | None = None
        if config.schedule is not None or config.adaptive is not None:
            self.controller = WarmupController(
                warmup_steps=config.warmup_steps,
                shape=config.schedule,
                shape_kwargs=config.schedule_kwargs,
                adaptive=config.adaptive if config.adaptive is not None else False,
            )
        self.prober = None if config.curvature is None else CurvatureProber(config.curvature)
        self._watches: list[_Watch] = []
        self._released = True
        self._steps: dict[int, int] = {}
        self._progress: dict[int, int] = {}
        self._detector_states: dict[int, dict[str, Any]] = {}
        self._controller_states: dict[int, dict[str, Any]] = {}
        self.reset()

    def reset(self) -> None:
        """Start a fresh watch: step counts, counters, detectors, plan and probe from zero."""
        self.detach()
        self.detector.reset()
        if self.controller is not None:
            self.controller.reset()
        if self.prober is not None:
            self.prober.reset()
        self.metrics_sinks: list[MetricsSink] = []
        self.alert_sinks: list[AlertSink] = []
        self.reducer: Reducer = _WorldReducer()
        self.world_size = 1
        self.sharded = False
        self.shards_span_world = True
        self.complete_on_step = False
        self.alert_count = 0
        self.skipped_steps = 0
        self.amp_skipped_steps = 0
        self._watches = []
        self._detector_states = {}
        self._controller_states = {}
        self._steps = {}
        self._progress = {}
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._last_loss: tuple[Tensor | None, int] | None = None  # (loss, batch) of the last step
        self._batch = 0
        self._warned: set[str] = set()
        self._released = True

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
        world_size: int = 1,
        sharded: bool = False,
        complete_on_step: bool = False,
        metrics_sinks: Sequence[MetricsSink] = (),
        alert_sinks: Sequence[AlertSink] = (),
    ) -> None:
        """Start watching ``optimizers`` (again): the one call that wires the engine.

        Step counts, detector and controller states carry over from an earlier attach or a
        loaded state.

        Args:
            optimizers: The optimizers, in a stable order (index ``K`` logs as ``optK``).
            first_step: Step count to start from for optimizers without a saved count (e.g.
                the trainer's global step when resuming from a checkpoint made without us).
            world_size: Number of data-parallel ranks the loss is averaged over.
            sharded: Whether each rank holds flat gradient shards spanning the world (FSDP1);
                DTensor shards are found by the engine itself.
            complete_on_step: Complete each step right after ``optimizer.step`` (the losses of
                the step were added before it); otherwise :meth:`after_step` completes it.
            metrics_sinks: Receive the scalars of each logging step.
            alert_sinks: Receive each alert.
        """
        self.detach()
        self.world_size = world_size
        self.sharded = sharded
        self.shards_span_world = True
        self.reducer = _WorldReducer()
        self.complete_on_step = complete_on_step
        self.metrics_sinks = list(metrics_sinks)
        self.alert_sinks = list(alert_sinks)
        stats_cfg = self.config.statistics
        dtype = (
            None if stats_cfg.reference_dtype is None else getattr(torch, stats_cfg.reference_dtype)
        )
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
                    params,
                    cosine=stats_cfg.cosine,
                    reference_dtype=dtype,
                    sketch_fraction=stats_cfg.sketch_fraction,
                ),
                update=UpdateRatio(params) if stats_cfg.update_ratio else None,
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
            self.reducer = _WorldReducer(groups)
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

    def _post_hook(self, watch: _Watch) -> Callable[..., None]:
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            watch.stepped = True
            if watch.pending is None:
                if self.is_active(watch.step, watch.index):
                    self._warn_once(
                        "no_before",
                        "optimizer.step() ran without before_step() first: this step is not "
                        "monitored. Call order: backward, before_step(optimizer), "
                        "optimizer.step(), after_step(loss).",
                    )
                return
            if self.complete_on_step:
                self._complete(watch)

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
        """Measure ``optimizer``'s gradients (after backward/unscaling, before clipping).

        Raises:
            ValueError: ``optimizer`` is not one of the watched optimizers.
        """
        watch = self.watch_of(optimizer)
        if watch is None:
            raise ValueError(
                "before_step() got an optimizer the monitor does not watch; pass one of the "
                "optimizers it was built with"
            )
        if watch.pending is not None:
            # The previous step was never completed (after_step() forgotten, or a skipped
            # optimizer.step): complete it now, without the losses that follow.
            self._warn_once(
                "no_after",
                "before_step() came twice without the step being completed: call after_step() "
                "after every optimizer.step(). Call order: backward, before_step(optimizer), "
                "optimizer.step(), after_step(loss).",
            )
            self._complete(watch)
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

    def add_loss(self, loss: Tensor | float | None) -> None:
        """Add one back-propagated loss: a float or a one-element tensor (the real loss).

        Raises:
            ValueError: ``loss`` has more than one element (reduce it first).
            TypeError: ``loss`` is neither a number nor a tensor.
        """
        if loss is None:
            return
        if isinstance(loss, bool) or not isinstance(loss, (Tensor, int, float)):
            raise TypeError(f"`loss` must be a float or a 0-dim tensor, got {type(loss).__name__}")
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"`loss` must be a single value (a float or a 0-dim tensor), got a tensor "
                    f"of shape {tuple(loss.shape)}: reduce it (e.g. loss.mean()) first"
                )
            value = loss.detach().float().reshape(())
        else:
            value = torch.tensor(float(loss))
        self._loss_sum = (
            value if self._loss_sum is None else self._loss_sum + value.to(self._loss_sum.device)
        )
        self._loss_count += 1

    def after_step(self, optimizer: Any = None) -> None:
        """Complete the measured step of ``optimizer`` (default: every pending one) with the
        losses added since the previous step."""
        for w in self._watches:
            if w.pending is not None and (optimizer is None or w is self.watch_of(optimizer)):
                self._complete(w)

    def end_batch(self) -> None:
        """End of a batch: complete what is still pending (a step a GradScaler skipped)."""
        self.after_step()
        self._batch += 1

    def _take_loss(self) -> Tensor | None:
        if self._loss_sum is not None:
            loss: Tensor | None = self._loss_sum / self._loss_count
            self._last_loss = (loss, self._batch)
            self._reset_loss()
            return loss
        if self._last_loss is not None and self._last_loss[1] == self._batch:
            return self._last_loss[0]  # several optimizers stepped on one backward
        return None

    def _complete(self, w: _Watch) -> None:
        p = w.pending
        assert p is not None
        device = p.sums.device
        loss = self._take_loss()
        has_loss = loss is not None
        # One small all-reduce: the loss's share of the mean, and the shard sums.
        loss_t = loss.to(device) if loss is not None else torch.zeros((), device=device)
        upd = w.update.local_sums() if w.update is not None and w.update.has_snapshot else None
        upd_t = upd.to(device) if upd is not None else torch.full((2,), math.nan, device=device)
        flat = torch.cat([(loss_t / self.world_size).reshape(1), p.sums.to(device), upd_t])
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
        grad = w.stats.finish(flat[1:3])
        ratio = UpdateRatio.finish(flat[3:5])
        w.records.append(
            _Record(
                step=p.step,
                progress=p.progress,
                values=torch.stack([loss_mean, grad[0], grad[1], ratio]),
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

    # ------------------------------------------------------------------ the curvature probe

    def probe_due(self, step: int) -> bool:
        """Whether a curvature probe follows the update at ``step`` (optimizer 0)."""
        return self.prober is not None and self.prober.due(step) and self.is_active(step)

    def probe(self, step: int, loss_fn: Callable[[], Tensor], module: Any = None) -> None:
        """Probe the curvature after the update at ``step`` and report what it finds.

        Args:
            step: The update just taken by optimizer 0.
            loss_fn: Recomputes the loss of the fixed probe batch (the adapter's business).
            module: The model, restored by the probe's guard (``None``: no guard).
        """
        if self.prober is None or not self._watches:
            return
        self.flush()  # the probe's findings come after the step's own
        w = self._watches[0]
        metrics, alerts = self.prober.probe(
            step,
            w.optimizer,
            loss_fn,
            module,
            lr_factor=w.factor(),
            distributed=self.world_size > 1,
        )
        if self.prober.disabled:
            for alert in alerts:
                warnings.warn(f"warmup_monitor: the {alert.message}", UserWarning, stacklevel=2)
        feed = self.prober.config.feeds_controller and not self.prober.disabled
        self.report(step, alerts, metrics, feed_controller=feed)

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
        """Step counts, counters, detector, controller and probe states (primitives only).

        Steps still kept on the device are processed first, so that the state includes every
        step taken (a checkpoint between two host reads loses nothing).
        """
        self.flush()
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
        state = {
            "steps": steps,
            "progress": progress,
            "controllers": controllers,
            "alert_count": self.alert_count,
            "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "detectors": detectors,
        }
        if self.prober is not None:
            state["probe"] = self.prober.state_dict()
        return state

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
        if self.prober is not None:
            self.prober.load_state_dict(state.get("probe", {}))
        for w in self._watches:
            w.step = self._steps.get(w.index, w.step)
            w.progress = self._progress.get(w.index, w.progress)
            if w.controller is not None and w.index in self._controller_states:
                w.controller.load_state_dict(self._controller_states[w.index])
            if w.index in self._detector_states:
                w.detector.load_state_dict(self._detector_states[w.index])
            w.stats.forget()

    # ------------------------------------------------------------------ internals

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"warmup_monitor: {message}", UserWarning, stacklevel=3)

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

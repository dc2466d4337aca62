"""The device side of the engine and its wiring (the package docstring: how it works)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from warmup_monitor import schema
from warmup_monitor.alerts import Alert
from warmup_monitor.config import MonitorConfig
from warmup_monitor.controller import WarmupController
from warmup_monitor.curvature.probe import CurvatureProber
from warmup_monitor.detectors import InstabilityDetector
from warmup_monitor.engine import host, per_group, rollback, state
from warmup_monitor.engine.ramp import RampCheck
from warmup_monitor.engine.watch import (
    Losses,
    Pending,
    Record,
    Reducer,
    Watch,
    WorldReducer,
    dtensor_shard_groups,
    follow_groups,
    frozen_params,
    group_sizes,
    make_episodes,
    make_statistics,
    restore_record,
    trained_params,
)
from warmup_monitor.lr_factor import LrFactor
from warmup_monitor.rollback import Snapshots
from warmup_monitor.stats import UpdateRatio

__all__ = ["AlertSink", "MetricsSink", "MonitorEngine"]

#: ``sink(metrics, step)``: where the engine sends the scalars of a logging step.
MetricsSink = Callable[[dict[str, float], int], None]
#: ``sink(alert)``: where the engine sends each alert.
AlertSink = Callable[[Alert], None]


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
    - :meth:`rollback_point` at the start of training and after each batch, when ``attach``
      was given the model (with rollback: restore if asked, snapshot when due);
    - :meth:`detach` at the end (flushes what is kept and removes the hooks).

    A step's loss is the mean of the losses added since the previous optimizer step of any
    optimizer (monitored or not): with accumulation, its micro-batches; with several optimizers
    (manual optimization), the losses back-propagated for that optimizer's update only. Losses
    whose gradients were dropped before a step (a ``zero_grad`` that sets them to ``None``, as
    a batch skipped on a NaN loss does) belong to no step.

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
        self._layers_every = config.statistics.layers_every_n_steps
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
        adaptive = config.adaptive
        #: The snapshots a rollback restores (``AdaptiveWarmup(rollback=True)``), or ``None``.
        self.snapshots = (
            Snapshots(adaptive.snapshot_device, anchor_step=adaptive.anchor_step)
            if adaptive is not None and adaptive.rollback
            else None
        )
        self.snapshots_loaded = False  # load_state_dict brought snapshots (a resume)
        self._watches: list[Watch] = []
        self._released = True
        self._steps: dict[int, int] = {}
        self._progress: dict[int, int] = {}
        self._detector_states: dict[int, dict[str, Any]] = {}
        self._episode_states: dict[int, dict[str, Any]] = {}
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
        self.reducer: Reducer = WorldReducer()
        self.world_size = 1
        self.sharded = False
        self.shards_span_world = True
        self.complete_on_step = False
        self.alert_count = 0
        self.skipped_steps = 0
        self.amp_skipped_steps = 0
        self.log_dir: str | None = None  # where the run logs (:meth:`continue_in`)
        self._watches = []
        self._detector_states = {}
        self._episode_states = {}
        self._controller_states = {}
        self._steps = {}
        self._progress = {}
        self._kept: dict[int, list[dict[str, Any]]] = {}  # loaded records, not yet attached
        self._rollback_target: tuple[nn.Module, list[Any]] | None = None  # model, optimizers
        self._model: nn.Module | None = None  # names the groups of ``Statistics.layers``
        self.losses = Losses()
        self._warned: set[str] = set()
        self._ramp = RampCheck(self.config.warmup_steps, self.config.schedule is None)
        self._released = True
        self._raise_exhausted = True  # off while an interrupted run is wound up

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

    # ------------------------------------------------------------------ rollback

    def rollback_point(self, *, start: bool = False) -> None:
        """Between two updates (the start of training, the end of each batch): carry out a
        pending rollback, then take a snapshot if one is due (:mod:`.rollback`)."""
        rollback.rollback_point(self, start=start)

    @property
    def stop_requested(self) -> bool:
        """Whether a controller asks to stop training (``on_exhausted="stop"``)."""
        return any(w.controller is not None and w.controller.stop_requested for w in self._watches)

    def key(self, name: str, opt_idx: int = 0) -> str:
        """The metric key of ``name`` for optimizer ``opt_idx`` (:func:`.schema.key`)."""
        return schema.key(name, self.key_prefix, opt_idx)

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
        model: nn.Module | None = None,
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
            model: The model being trained. A rollback restores it, with ``optimizers``
                (``None``: no rollback; with snapshots on, the engine restores where the
                request is decided, :mod:`warmup_monitor.engine.rollback`, and snapshots at
                :meth:`rollback_point`); it names the groups of ``Statistics.layers`` (none
                without it).
        """
        self.detach()
        self._model = model
        self.world_size = world_size
        self.sharded = sharded
        self.shards_span_world = True
        self.reducer = WorldReducer()
        self.complete_on_step = complete_on_step
        self.metrics_sinks = list(metrics_sinks)
        self.alert_sinks = list(alert_sinks)
        self._watches = []
        all_params: list[Tensor] = []
        for idx, opt in enumerate(optimizers):
            params = trained_params(opt)
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
            stats, update, layers = make_statistics(self.config.statistics, params, model)
            watch = Watch(
                index=idx,
                optimizer=opt,
                stats=stats,
                update=update,
                groups=layers,
                sizes=group_sizes(opt),
                frozen=frozen_params(opt),
                detector=detector,
                controller=controller,
                episodes=make_episodes(self.config.detection, self._episode_states.get(idx)),
                step=self._steps.get(idx, first_step or 0),
                progress=self._progress.get(idx, first_step or 0),
            )
            watch.records = [restore_record(r, watch.stats.device) for r in self._kept.pop(idx, [])]
            watch.hook = opt.register_step_post_hook(self._post_hook(watch))
            if controller is not None and (controller.shape is not None or controller.adaptive):
                watch.lr_factor = LrFactor(opt, watch.factor)
            self._watches.append(watch)
        groups = dtensor_shard_groups(all_params)
        if groups is not None:
            self.sharded = True
            self.reducer = WorldReducer(groups)
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                self.shards_span_world = (
                    len(groups) == 1 and dist.get_world_size(groups[0]) == dist.get_world_size()
                )
        self.losses.clear()
        if model is not None and self.snapshots is not None:
            self._rollback_target = (model, list(optimizers))
        self._released = False

    def detach(self, *, close_episodes: bool = False, interrupted: bool = False) -> None:
        """Stop watching: flush what is kept, remove the optimizer hooks, free the buffers.

        With ``close_episodes`` (the end of a fit or loop), an unstable episode still open is
        closed (outcome ``"open_at_end"``, not recovered) and its ``episode_end`` dispatched.
        The hooks are removed even if a sink raises (the error is raised after).
        ``interrupted``: as :meth:`interrupt`.
        """
        host.stop(self, close_episodes=close_episodes, interrupted=interrupted)

    def interrupt(self) -> None:
        """Training stopped on an exception: keep everything it measured, then stop watching.

        The steps completed and still kept on the device are processed as at a host read
        (their scalars and alerts reach the sinks; ``on_exhausted="raise"`` does not raise
        here), a step measured by :meth:`before_step` whose ``optimizer.step`` never completed
        is dropped (it was not taken), every open episode ends with outcome ``"interrupted"``,
        and every optimizer hook of the monitor is removed. No collective is called (the
        other ranks may be gone). Idempotent; never raises (a sink's error is logged): the
        exception that stopped training is the one to see.
        """
        host.stop(self, close_episodes=True, interrupted=True)

    def _post_hook(self, watch: Watch) -> Callable[..., None]:
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            watch.stepped = True
            if watch.pending is None:
                if self.complete_on_step:
                    self.losses.take()  # this step's losses are its own, monitored or not
                if watch.completed_unstepped:  # completed before this step: after_step first
                    watch.completed_unstepped = False
                    self._warn_once(
                        "after_first",
                        "after_step() ran before optimizer.step(): the step was counted as "
                        "skipped by a GradScaler and not monitored. Call order: backward, "
                        "before_step(optimizer), optimizer.step(), after_step(loss).",
                    )
                elif self.is_active(watch.step, watch.index):
                    self._warn_once(
                        "no_before",
                        "optimizer.step() ran without before_step() first: this step is not "
                        "monitored. Call order: backward, before_step(optimizer), "
                        "optimizer.step(), after_step(loss).",
                    )
                return
            if self.complete_on_step:
                self._complete(watch)
                if len(self._watches) == 1:  # several: the other optimizers' steps follow
                    rollback.roll_back_now(self)

        return hook

    def continue_in(self, log_dir: str | None) -> Alert | None:
        """Note the run's log dir; a resume from elsewhere returns the record that says so."""
        return state.continue_in(self, log_dir)

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

    def watch_of(self, optimizer: Any) -> Watch | None:
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
            self._ramp.see(watch.index, watch.step, watch.progress, None)
            # Past the window: count the step, do nothing else.
            watch.step += 1
            watch.progress += 1
            if not watch.released:  # only this optimizer's buffers: the others may still watch
                watch.released = True
                watch.stats.release()
                if watch.update is not None:
                    watch.update.release()
            return
        watch.released = False
        follow_groups(watch, self.config.statistics, self._model)
        do_log = self.should_log(watch.step, watch.index)
        every = per_group.every(self._layers_every, watch.groups)
        sums = watch.stats.local_sums(groups=every > 0 and do_log and watch.step % every == 0)
        if watch.update is not None and do_log:
            watch.update.snapshot(groups=sums.numel() > 2)
        watch.stepped = False
        factor = watch.factor()
        if watch.lr_factor is not None:
            base = watch.lr_factor.scheduler_lrs()
        else:
            base = [float(g["lr"]) for g in watch.optimizer.param_groups]
        self._ramp.see(watch.index, watch.step, watch.progress, base[0] if base else None)
        watch.pending = Pending(
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
        dropped = self.losses.count > 0 and self._gradients_dropped()
        self.losses.add(loss, restart=dropped)

    def after_step(self, optimizer: Any = None) -> None:
        """Complete the measured step of ``optimizer`` (default: every pending one) with the
        losses added since the previous step."""
        for w in self._watches:
            if w.pending is not None and (optimizer is None or w is self.watch_of(optimizer)):
                self._complete(w)

    def end_batch(self) -> None:
        """End of a batch: complete what is still pending (a step a GradScaler skipped)."""
        self.after_step()
        self.losses.batch += 1

    def _complete(self, w: Watch) -> None:
        p = w.pending
        assert p is not None
        device = p.sums.device
        loss = self.losses.take()
        has_loss = loss is not None
        # One small all-reduce: the loss's share of the mean, and the shard sums.
        loss_t = loss.to(device) if loss is not None else torch.zeros((), device=device)
        upd = w.update.local_sums() if w.update is not None and w.update.has_snapshot else None
        share = loss_t / self.world_size if self.world_size > 1 else loss_t
        flat, n_groups = per_group.step_sums(share, p.sums.to(device), upd, device)
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
        values = per_group.values(torch.stack([loss_mean, grad[0], grad[1], ratio]), flat, n_groups)
        w.records.append(
            Record(
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
        w.completed_unstepped = not w.stepped
        w.step = p.step + 1
        if w.stepped:
            w.progress = p.progress + 1
        if self._should_read(p.step, w.index):
            self._read(w)

    # ------------------------------------------------------------------ the curvature probe

    def probe_due(self, step: int) -> bool:
        """Whether a curvature probe follows the update at ``step`` (optimizer 0)."""
        return self.prober is not None and self.prober.due(step) and self.is_active(step)

    def probe(self, step: int, loss_fn: Callable[[], Tensor | None], module: Any = None) -> None:
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

    def _read(self, w: Watch) -> None:
        host.read(self, w)

    def _dispatch(self, alerts: Sequence[Alert], opt_idx: int) -> None:
        host.dispatch(self, alerts, opt_idx)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step counts, counters, detector, controller and probe states (primitives only), and
        during a fit, while a rollback can still come, the snapshots it may restore.

        Steps still kept on the device are saved as they are, unprocessed (one host read): a
        run resumed from the state processes them at its next read, exactly where the run
        without the checkpoint does, so writing a checkpoint changes nothing in the run.
        """
        return state.save(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (its snapshots are kept for the next fit); the previous
        gradients are not restored (no cosine on the first step after)."""
        state.load(self, state_dict)

    # ------------------------------------------------------------------ internals

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"warmup_monitor: {message}", UserWarning, stacklevel=3)

    def _gradients_dropped(self) -> bool:
        """Whether no watched parameter holds a gradient (host-side; no device work)."""
        return all(p.grad is None for w in self._watches for p in w.stats.params)

    def _release(self) -> None:
        if self._released:
            return
        for w in self._watches:
            w.stats.release()
            if w.update is not None:
                w.update.release()
        self._released = True

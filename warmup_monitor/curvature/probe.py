"""The probe as the monitor runs it: the guard, the edge rule and the engine's prober.

What a probe differentiates: the loss of the fixed probe batch as training computes it, i.e.
the module in the modes it trains in (batch norm on batch statistics, dropout on), with one
fixed dropout mask: the torch RNG is seeded with :data:`PROBE_SEED` before every evaluation of
the loss, so every Hessian-vector product of a probe, and every probe of a run, sees the same
mask (for the same batch shape). Everything training depends on is put back afterwards:
module modes, ``.grad``, buffers (batch-norm running statistics) and the RNG states of torch
(CPU and CUDA), Python's ``random`` and NumPy's global generator.

This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from warmup_monitor._checks import check_choice, check_int
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import CurvatureProbe
from warmup_monitor.curvature.stability import StabilityEstimate, estimate_stability

__all__ = ["PROBE_SEED", "CurvatureProber", "EdgeOfStabilityRule", "probe_guard"]

ProbeMode = Literal["keep", "train", "eval"]

#: The torch seed set before every evaluation of the probe's loss: one dropout mask per probe
#: batch, the same at every probe.
PROBE_SEED = 0

# The probe's relative residual tolerance (see top_hessian_eigenvalue's `tol`).
_TOL = 1e-2


@contextlib.contextmanager
def probe_guard(
    module: nn.Module, *, mode: ProbeMode = "keep", seed: int | None = PROBE_SEED
) -> Iterator[nn.Module]:
    """Run a probe on ``module`` without leaving a trace on training.

    Inside the block the module is in ``mode``: ``"keep"`` (default) leaves every submodule's
    mode as it is, so a probe during training differentiates the function being trained
    (batch norm on batch statistics, dropout on, a frozen submodule still frozen); ``"train"``
    and ``"eval"`` set the whole module. Every parameter's ``.grad`` is detached (set to None),
    autograd is on (also inside ``torch.no_grad`` or ``inference_mode``), and the torch RNG of
    the CPU and of the module's CUDA devices is seeded with ``seed`` (None: not seeded), so
    that the dropout mask of a probe is a fixed one. On exit, however the block ends:

    - each submodule's ``training`` flag is what it was;
    - each parameter's ``.grad`` is the very tensor object it was before (or None), untouched
      whatever the probe did to ``.grad``; no gradient is left behind;
    - every buffer (batch-norm ``running_mean``, ``running_var``, ``num_batches_tracked``...) has
      its values, and its tensor object if the probe re-assigned it;
    - the RNG states are restored: torch's CPU generator, and when CUDA is initialised the
      generators of the current device and of every device holding the module's tensors;
      Python's ``random`` and NumPy's global ``numpy.random`` state (a ``numpy.random.Generator``
      object of your own is yours to keep apart).

    Parameters are not restored: a probe must not write them (the functions here never do).
    Costs one copy of the buffers (small for batch norm); gradients are not copied.

    Args:
        module: The model (the unwrapped one under DDP).
        mode: ``"keep"``, ``"train"`` or ``"eval"``.
        seed: The torch seed set on entry (>= 0), or None.

    Yields:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or ``seed`` is not an int.
        ValueError: ``mode`` is not one of the allowed values, or ``seed`` is negative.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    mode = check_choice("mode", mode, ("keep", "train", "eval"))  # type: ignore[assignment]
    if seed is not None:
        seed = check_int("seed", seed, minimum=0)
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    buffers = []
    for owner in module.modules():
        for name, buf in owner._buffers.items():
            if buf is not None:
                buffers.append((owner, name, buf, buf.detach().clone()))
    try:
        with forked_rng(_cuda_devices(module), seed=seed):
            for p, _ in grads:
                p.grad = None
            if mode != "keep":
                module.train(mode == "train")
            with torch.inference_mode(False), torch.enable_grad():
                yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, grad in grads:
            p.grad = grad
        with torch.no_grad():
            for owner, name, buf, saved in buffers:
                owner._buffers[name] = buf
                buf.copy_(saved)


@contextlib.contextmanager
def forked_rng(devices: list[int], *, seed: int | None = None) -> Iterator[None]:
    """Save every global RNG state a probe could draw from, optionally seed torch's, and
    restore them all on exit: torch's CPU generator and the CUDA generators of ``devices``,
    Python's ``random`` and NumPy's global state."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = [(d, torch.cuda.get_rng_state(d)) for d in devices]
    try:
        if seed is not None:
            seed_torch(seed, devices)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        for device, state in cuda_states:
            torch.cuda.set_rng_state(state, device)


def seed_torch(seed: int, devices: list[int]) -> None:
    """Seed torch's CPU generator and the CUDA generators of ``devices`` (no other device)."""
    torch.default_generator.manual_seed(seed)
    for device in devices:
        torch.cuda.default_generators[device].manual_seed(seed)


def _cuda_devices(module: nn.Module | None) -> list[int]:
    """The CUDA devices whose RNG a probe of ``module`` can draw from: those of its tensors and
    the current one (not every GPU of the node: that would create a context on each)."""
    if not torch.cuda.is_initialized():
        return []
    devices = {torch.cuda.current_device()}
    if module is not None:
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_cuda and t.device.index is not None:
                devices.add(t.device.index)
    return sorted(devices)


class EdgeOfStabilityRule:
    """Alert ``edge_of_stability`` when the stability margin stays above 1.

    A freshly initialised model is often sharp for a step or two, so one probe above the edge
    is not enough: the rule fires when ``consecutive`` probes in a row read a margin above
    ``threshold`` (default: two probes above 1), once per such run. The prober feeds it only
    probes whose eigenvalue converged: one that did not is skipped (it neither counts nor
    breaks a run), and its ``sharpness_converged`` metric reads 0.

    Args:
        threshold: The margin that counts as past the edge (> 0).
        consecutive: Probes in a row needed (>= 1).
    """

    def __init__(self, *, threshold: float = 1.0, consecutive: int = 2) -> None:
        if not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"`threshold` must be a number > 0, got {threshold!r}")
        if isinstance(consecutive, bool) or not isinstance(consecutive, int) or consecutive < 1:
            raise ValueError(f"`consecutive` must be an int >= 1, got {consecutive!r}")
        self.threshold = float(threshold)
        self.consecutive = consecutive
        self.reset()

    def reset(self) -> None:
        """Forget the current run of probes above the edge."""
        self._run = 0

    def update(self, step: int, margin: float) -> Alert | None:
        """Feed one probe's margin (NaN is ignored: the non-finite rule covers it)."""
        if not math.isfinite(margin):
            return None
        if margin <= self.threshold:
            self._run = 0
            return None
        self._run += 1
        if self._run != self.consecutive:
            return None
        return Alert(
            step=step,
            kind=AlertKind.EDGE_OF_STABILITY,
            message=(
                f"the lr is past the edge of stability: margin lr x sharpness / threshold = "
                f"{margin:.3g} on {self.consecutive} converged probes in a row (above 1 means "
                "unstable)"
            ),
            value=margin,
            threshold=self.threshold,
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"run": int}``: probes above the edge in the current run."""
        return {"run": self._run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing key starts a new run."""
        self._run = int(state.get("run", 0))


class _NoLoss(Exception):
    """The probe's loss function returned None for the kept probe batch."""


class CurvatureProber:
    """Run the curvature probe of one monitor (optimizer 0).

    Probes every ``CurvatureProbe.every_n_steps`` optimizer steps on the adapter's fixed probe
    batch, under :func:`probe_guard` (the training modes, one fixed dropout mask, everything
    restored), warm-started from the previous probe's leading Ritz vectors; scales the margin
    by the lr factor of the next update; feeds converged probes to the edge rule; and turns an
    unsupported setup into one ``monitor`` alert and a probe that stays off.

    A loss function that returns None (no loss for this batch) reports nothing and keeps the
    probe on: :attr:`accepts_batch` turns True, the probe is due again at the next step, and
    the adapter is expected to offer its next batch as the probe batch.

    Args:
        config: What to probe and how often.
    """

    def __init__(self, config: CurvatureProbe) -> None:
        self.config = config
        self.edge_rule = EdgeOfStabilityRule()
        self.vectors: Tensor | None = None
        #: The last probe's estimate (its ``result`` holds the products it took and the time).
        self.estimate: StabilityEstimate | None = None
        self.disabled = False
        #: True after a probe whose loss function returned None: the adapter should replace
        #: its probe batch with the next training batch (the probe is due at the next step).
        self.accepts_batch = False

    def due(self, step: int) -> bool:
        """Whether the update at ``step`` (just taken) is followed by a probe."""
        if self.disabled:
            return False
        return self.accepts_batch or step % self.config.every_n_steps == 0

    def probe(
        self,
        step: int,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[], Tensor | None],
        module: nn.Module | None,
        *,
        lr_factor: float,
        distributed: bool,
    ) -> tuple[dict[str, float], list[Alert]]:
        """Measure the sharpness and the stability margin of ``optimizer`` after ``step``.

        Args:
            step: The update just taken.
            optimizer: The optimizer whose next update the margin is about.
            loss_fn: Recomputes the loss of the fixed probe batch, or returns None when that
                batch has no loss (then nothing is reported, see :attr:`accepts_batch`).
            module: The model (its training flags, gradients, buffers and RNG are restored
                by :func:`probe_guard`); ``None``: only the RNG states are restored.
            lr_factor: The factor the monitor applies to the next update's lr.
            distributed: Whether the probe's products are averaged over ranks.

        Returns:
            The metrics (``sharpness``, ``stability_margin``, ``sharpness_residual``,
            ``sharpness_converged``) and the alerts to report.
        """
        try:
            est = self._estimate(step, loss_fn, optimizer, module, distributed)
        except _NoLoss:
            self.accepts_batch = True
            return {}, []
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
            self.disabled = True
            alert = Alert(
                step=step,
                kind=AlertKind.MONITOR,
                message=f"curvature probe is turned off (unsupported here): {err}",
            )
            return {}, [alert]
        self.accepts_batch = False
        self.estimate = est
        result = est.result
        self.vectors = result.vectors
        if not math.isfinite(est.sharpness):
            return {}, []
        # The margin is proportional to the lr, and the monitor's own factor is applied inside
        # optimizer.step only: scale by the factor of the next update.
        margin = est.margin * lr_factor
        alerts = []
        if result.converged:  # an unconverged value never feeds the edge rule
            edge = self.edge_rule.update(step, margin)
            if edge is not None:
                alerts.append(edge)
        metrics = {
            "sharpness": est.sharpness,
            "stability_margin": margin,
            "sharpness_residual": result.residual,
            "sharpness_converged": 1.0 if result.converged else 0.0,
        }
        return metrics, alerts

    def _estimate(
        self,
        step: int,
        loss_fn: Callable[[], Tensor | None],
        optimizer: torch.optim.Optimizer,
        module: nn.Module | None,
        distributed: bool,
    ) -> StabilityEstimate:
        devices = _cuda_devices(module)

        def seeded_loss() -> Tensor:
            seed_torch(PROBE_SEED, devices)  # the same dropout mask at every evaluation
            loss = loss_fn()
            if loss is None:
                raise _NoLoss
            return loss

        guard = (
            probe_guard(module, mode="keep", seed=None)
            if module is not None
            else forked_rng(devices)
        )
        with guard:
            return estimate_stability(
                seeded_loss,
                optimizer,
                max_iters=self.config.max_iters,
                tol=_TOL,
                seed=step,
                init=self.vectors,
                return_vector=True,
                distributed=distributed,
            )

    def reset(self) -> None:
        """Forget the warm start and the edge rule's run (a fresh watch)."""
        self.edge_rule.reset()
        self.vectors = None
        self.estimate = None
        self.disabled = False
        self.accepts_batch = False

    def state_dict(self) -> dict[str, Any]:
        """The edge rule's state (the warm-start vectors are not saved)."""
        return {"edge_rule": self.edge_rule.state_dict(), "disabled": self.disabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.edge_rule.load_state_dict(state.get("edge_rule", {}))
        self.disabled = bool(state.get("disabled", False))

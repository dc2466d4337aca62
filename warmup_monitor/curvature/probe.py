"""The probe as the monitor runs it: the guard, the edge rule and the engine's prober.

This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from warmup_monitor._checks import check_choice
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import CurvatureProbe
from warmup_monitor.curvature.stability import estimate_stability

__all__ = ["CurvatureProber", "EdgeOfStabilityRule", "probe_guard"]

ProbeMode = Literal["eval", "train"]


@contextlib.contextmanager
def probe_guard(module: nn.Module, *, mode: ProbeMode = "eval") -> Iterator[nn.Module]:
    """Run a probe on ``module`` without leaving a trace on training.

    Inside the block the module is in ``mode`` (``"eval"``: dropout off, batch norm on its
    running statistics, a deterministic loss; ``"train"``: the loss the optimizer sees, batch
    statistics and one dropout mask), every parameter's ``.grad`` is detached (set to None) and
    autograd is on (also inside ``torch.no_grad`` or ``inference_mode``). On exit, however the
    block ends:

    - each submodule's ``training`` flag is what it was (per submodule, so a frozen batch norm
      in eval mode inside a training model stays in eval mode);
    - each parameter's ``.grad`` is the very tensor object it was before (or None), untouched
      whatever the probe did to ``.grad``; no gradient is left behind;
    - every buffer (batch-norm ``running_mean``, ``running_var``, ``num_batches_tracked``...) has
      its values, and its tensor object if the probe re-assigned it;
    - the CPU RNG state is restored, and when CUDA is initialised, the RNG state of the current
      CUDA device and of every device holding the module's tensors.

    Parameters are not restored: a probe must not write them (the functions here never do).
    Costs one copy of the buffers (small for batch norm); gradients are not copied.

    Args:
        module: The model (the unwrapped one under DDP).
        mode: ``"eval"`` (default) or ``"train"``.

    Yields:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``mode`` is not one of the allowed values.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    train = check_choice("mode", mode, ("eval", "train")) == "train"
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    buffers = []
    for owner in module.modules():
        for name, buf in owner._buffers.items():
            if buf is not None:
                buffers.append((owner, name, buf, buf.detach().clone()))
    cpu_rng = torch.get_rng_state()
    cuda_rng = [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(module)]
    try:
        for p, _ in grads:
            p.grad = None
        module.train(train)
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
        torch.set_rng_state(cpu_rng)
        for device, state in cuda_rng:
            torch.cuda.set_rng_state(state, device)


def _cuda_devices(module: nn.Module) -> list[int]:
    """The CUDA devices whose RNG a probe of ``module`` can draw from: those of its tensors and
    the current one (not every GPU of the node: that would create a context on each)."""
    if not torch.cuda.is_initialized():
        return []
    devices = {torch.cuda.current_device()}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_cuda and t.device.index is not None:
            devices.add(t.device.index)
    return sorted(devices)


class EdgeOfStabilityRule:
    """Alert ``edge_of_stability`` when the stability margin stays above 1.

    A freshly initialised model is often sharp for a step or two, so one probe above the edge
    is not enough: the rule fires when ``consecutive`` probes in a row read a margin above
    ``threshold`` (default: two probes above 1), once per such run.

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
                f"{margin:.3g} on {self.consecutive} probes in a row (above 1 means unstable)"
            ),
            value=margin,
            threshold=self.threshold,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"run": self._run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run = int(state.get("run", 0))


class CurvatureProber:
    """Run the curvature probe of one monitor (optimizer 0).

    Args:
        config: What to probe and how often.
    """

    def __init__(self, config: CurvatureProbe) -> None:
        self.config = config
        self.edge_rule = EdgeOfStabilityRule()
        self.vector: Tensor | None = None
        self.disabled = False

    def due(self, step: int) -> bool:
        """Whether the update at ``step`` (just taken) is followed by a probe."""
        return not self.disabled and step % self.config.every_n_steps == 0

    def probe(
        self,
        step: int,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[], Tensor],
        module: nn.Module | None,
        *,
        lr_factor: float,
        distributed: bool,
    ) -> tuple[dict[str, float], list[Alert]]:
        """Measure the sharpness and the stability margin of ``optimizer`` after ``step``.

        Args:
            step: The update just taken.
            optimizer: The optimizer whose next update the margin is about.
            loss_fn: Recomputes the loss of the fixed probe batch.
            module: The model (its training flags, gradients, buffers and RNG are restored
                by :func:`~warmup_monitor.curvature.probe_guard`); ``None`` skips the guard.
            lr_factor: The factor the monitor applies to the next update's lr.
            distributed: Whether the probe's products are summed over ranks.

        Returns:
            The metrics (``sharpness``, ``stability_margin``) and alerts to report.
        """
        try:
            if module is not None:
                with probe_guard(module):
                    est = self._estimate(loss_fn, optimizer, distributed)
            else:
                est = self._estimate(loss_fn, optimizer, distributed)
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
            self.disabled = True
            alert = Alert(
                step=step,
                kind=AlertKind.MONITOR,
                message=f"curvature probe is turned off (unsupported here): {err}",
            )
            return {}, [alert]
        self.vector = est.result.vector
        # The margin is proportional to the lr, and the monitor's own factor is applied inside
        # optimizer.step only: scale by the factor of the next update.
        margin = est.margin * lr_factor
        alerts = []
        edge = self.edge_rule.update(step, margin)
        if edge is not None:
            alerts.append(edge)
        metrics: dict[str, float] = {}
        if math.isfinite(est.sharpness):
            metrics = {"sharpness": est.sharpness, "stability_margin": margin}
        return metrics, alerts

    def _estimate(
        self, loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, distributed: bool
    ) -> Any:
        return estimate_stability(
            loss_fn,
            optimizer,
            max_iters=self.config.max_iters,
            tol=1e-2,
            init=self.vector,
            return_vector=True,
            distributed=distributed,
        )

    def reset(self) -> None:
        """Forget the warm start and the edge rule's run (a fresh watch)."""
        self.edge_rule.reset()
        self.vector = None
        self.disabled = False

    def state_dict(self) -> dict[str, Any]:
        """The edge rule's state (the warm-start vector is not saved)."""
        return {"edge_rule": self.edge_rule.state_dict(), "disabled": self.disabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.edge_rule.load_state_dict(state.get("edge_rule", {}))
        self.disabled = bool(state.get("disabled", False))

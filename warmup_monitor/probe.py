"""The curvature probe as the engine runs it: when to probe, on what, and what it reports.

:class:`CurvatureProber` turns :func:`~warmup_monitor.curvature.estimate_stability` into a
monitor capability: it probes every ``CurvatureProbe.every_n_steps`` optimizer steps on a fixed
probe batch (kept by the adapter), scales the margin by the lr factor of the next update, runs
the edge-of-stability rule, and turns an unsupported setup into one ``monitor`` alert and a
probe that stays off. The adapters only say how the loss of the probe batch is computed.

This module imports no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import CurvatureProbe
from warmup_monitor.curvature import EdgeOfStabilityRule, estimate_stability, probe_guard

__all__ = ["CurvatureProber"]


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

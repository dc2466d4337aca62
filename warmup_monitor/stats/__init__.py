"""Gradient statistics on the device: global norm, consecutive-gradient cosine, update ratio.

Nothing here reads a value back from a device: every result is a device tensor, and the caller
decides when to pay for one batched read (the CPU plan reads one float of host memory per step
to guard against overflow: no device is involved). Parameter lists, buffers and the kernel plan
are built once per fit; a step runs a few kernels over them.

The package is cut along two seams:

- *plans* (:mod:`~warmup_monitor.stats.plans`): how the gradients of one device and dtype are
  walked: the CPU block plan (every operation of a block while it is in cache) or the foreach
  plan (a few ``torch._foreach_*`` kernels, one launch each on a GPU). Both compute the same
  numbers.
- *references* (:mod:`~warmup_monitor.stats.reference`): what the cosine compares with: the
  exact previous gradient, or a count sketch of it.

:class:`GradientStats` (:mod:`~warmup_monitor.stats.gradient`) and :class:`UpdateRatio`
(:mod:`~warmup_monitor.stats.update`) put them together.

This package imports no Lightning.
"""

from warmup_monitor.stats.gradient import CosineMode, GradientStats
from warmup_monitor.stats.update import UpdateRatio

__all__ = ["CosineMode", "GradientStats", "UpdateRatio"]

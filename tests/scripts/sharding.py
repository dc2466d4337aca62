"""FSDP2 for the test scripts' small ``nn.Sequential`` models (2 CPU processes, gloo)."""

from __future__ import annotations

import torch


def shard_linear_layers(layers: torch.nn.Sequential, mesh: object) -> None:
    """``fully_shard`` each ``Linear`` of ``layers``, then the whole, on ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)  # type: ignore[arg-type]
    fully_shard(layers, mesh=mesh)  # type: ignore[arg-type]

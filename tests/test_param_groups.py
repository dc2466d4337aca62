"""A param group added mid-training (progressive unfreezing) joins the gradient statistics."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import fit, read_scalars, tiny_module_class

from warmup_monitor import WarmupMonitor
from warmup_monitor.loop import LoopMonitor

UNFREEZE_AT = 3
STEPS = 7


class _Record(pl.Callback):
    """What an independent observer sees of the optimizer's own parameters at each step."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self._params: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # The optimizer's parameters being trained now (a frozen one has no gradient).
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.grads.append([p.grad.detach().clone() for p in self._params])
        self.before.append([p.detach().clone() for p in self._params])

    def on_train_batch_end(self, *args: Any) -> None:
        self.after.append([p.detach().clone() for p in self._params])


def _unfreezing_module(how: str) -> Any:
    """The head is frozen at first and unfrozen at step ``UNFREEZE_AT``: added to the
    optimizer as a new param group (``"add_param_group"``), or already in the optimizer and
    given ``requires_grad`` back (``"requires_grad"``)."""
    base = tiny_module_class(pl)

    class Unfreezing(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__(lr=0.05)
            self.net[2].requires_grad_(False)

        def configure_optimizers(self) -> Any:
            params = self.net[0].parameters() if how == "add_param_group" else self.parameters()
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self.trainer.global_step == UNFREEZE_AT:
                self.net[2].requires_grad_(True)
                if how == "add_param_group":
                    head = list(self.net[2].parameters())
                    self.trainer.optimizers[0].add_param_group({"params": head, "lr": 0.02})

    return Unfreezing()


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


@pytest.mark.parametrize("how", ["add_param_group", "requires_grad"])
def test_a_parameter_unfrozen_mid_training_joins_the_statistics(
    tmp_path: os.PathLike, how: str
) -> None:
    rec = _Record()
    trainer = fit(
        pl, tmp_path, [WarmupMonitor(warmup_steps=4), rec], model=_unfreezing_module(how),
        max_steps=STEPS,
    )  # fmt: skip
    scalars = read_scalars(trainer.log_dir)
    assert len(rec.grads) == STEPS
    assert [len(g) for g in rec.grads] == [2] * UNFREEZE_AT + [4] * (STEPS - UNFREEZE_AT)
    for t in range(STEPS):
        norm = torch.nn.utils.get_total_norm(rec.grads[t]).item()
        assert scalars["warmup/grad_norm"][t] == pytest.approx(norm, rel=1e-6), t
        before, after = _flat(rec.before[t]), _flat(rec.after[t])
        ratio = ((after - before).norm() / before.norm()).item()
        assert scalars["warmup/update_ratio"][t] == pytest.approx(ratio, rel=1e-5), t
        if t in (0, UNFREEZE_AT):  # no previous gradient of the same parameters
            assert t not in scalars["warmup/grad_cosine"], t
        else:
            cos = F.cosine_similarity(_flat(rec.grads[t]), _flat(rec.grads[t - 1]), dim=0)
            assert scalars["warmup/grad_cosine"][t] == pytest.approx(cos.item(), abs=1e-6), t
    if how == "add_param_group":
        assert sorted(scalars["warmup/lr/pg1"]) == list(range(UNFREEZE_AT, STEPS))
    # The head's gradient is a large part of the norm: leaving it out is not a rounding error.
    head = torch.nn.utils.get_total_norm(rec.grads[UNFREEZE_AT][2:]).item()
    assert head > 0.1 * scalars["warmup/grad_norm"][UNFREEZE_AT]


def test_loop_a_param_group_added_mid_training_joins_the_norm() -> None:
    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(body.parameters(), lr=0.01)
    logged: dict[int, float] = {}
    monitor = LoopMonitor(opt, warmup_steps=6)
    monitor.engine.metrics_sinks.append(lambda m, s: logged.__setitem__(s, m["warmup/grad_norm"]))
    expected = []
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(6):
        if step == 2:
            opt.add_param_group({"params": list(head.parameters())})
        loss = F.mse_loss(head(torch.tanh(body(x))), y)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        expected.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()
        head.zero_grad()  # the head is not in the optimizer at first: its grads too
    monitor.close()
    assert [logged[s] for s in range(6)] == pytest.approx(expected, rel=1e-6)

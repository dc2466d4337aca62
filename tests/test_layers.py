"""Per-group statistics (``Statistics(layers=...)``): which groups, and exact values.

Groups are checked on module trees named as Hugging Face, timm and torchvision name theirs
(replicas of the trees: the libraries are not installed here) and on real ``torch.nn`` models.
Values are checked against plain torch per module, computed here in float64 from the gradients
and parameters: in both kernel plans (block boundaries inside and across groups, chunked large
tensors, missing gradients, gradients large enough to need the block plan's rescaling), and in
real training: Lightning with gradient accumulation, a plain loop under bf16 autocast with a
``GradScaler`` (the statistics see the unscaled gradients). DDP and FSDP2:
``tests/test_distributed.py``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_loader, read_scalars
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from warmup_monitor import Statistics, WarmupMonitor, Window
from warmup_monitor.loop import LoopMonitor
from warmup_monitor.stats import GradientStats, UpdateRatio
from warmup_monitor.stats.layers import OTHER, auto_groups, group_param_names, layer_groups
from warmup_monitor.stats.plans import BLOCK

REL = 1e-5
STATS = ("grad_norm", "grad_share", "update_ratio")

# --------------------------------------------------------------------------------- the groups


class _GPT2(nn.Module):
    """The module tree of Hugging Face's ``GPT2LMHeadModel`` (head tied to the embedding)."""

    def __init__(self, n_layer: int = 3, d: int = 8) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(50, d)
        self.transformer.wpe = nn.Embedding(16, d)
        self.transformer.drop = nn.Dropout(0.1)
        self.transformer.h = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 16, batch_first=True) for _ in range(n_layer)
        )
        self.transformer.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 50, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


class _Wrapper(nn.Module):
    """A LightningModule-like shell: ``self.model = ...``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner
        self.loss = nn.CrossEntropyLoss()


class _ViT(nn.Module):
    """timm's ``VisionTransformer`` tree: parameters on the root, ``blocks`` a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)


class _ConvNeXt(nn.Module):
    """timm's ``ConvNeXt`` tree: ``stem``, ``stages`` (each with its own ``blocks``), ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 2, 2), nn.GroupNorm(1, 4))
        self.stages = nn.Sequential()
        for _ in range(3):
            stage = nn.Module()
            stage.blocks = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
            self.stages.append(stage)
        self.head = nn.Linear(4, 10)


class _ResNet(nn.Module):
    """torchvision's ``resnet`` tree: four ``layerN`` Sequentials between stem and ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        for i in range(1, 3):
            blocks = [nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)) for _ in range(2)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(4, 10)


def _auto(module: nn.Module) -> list[str]:
    return [name for name, _ in auto_groups(module)]


def test_auto_groups_of_a_hugging_face_gpt2_tree_under_a_wrapper() -> None:
    model = _Wrapper(_GPT2())
    names = ["wte", "wpe", "h.0", "h.1", "h.2", "ln_f"]
    assert _auto(model) == [f"model.transformer.{n}" for n in names]
    params = list(model.parameters())
    groups = layer_groups(model, params, "auto")
    assert groups is not None and OTHER not in groups.names
    members = group_param_names(groups, params, model)
    # The tied head is counted once, with the embedding it shares its weight with.
    assert members["model.transformer.wte"] == ["model.transformer.wte.weight"]
    assert sum(map(len, members.values())) == len(params)


def test_auto_groups_of_timm_and_torchvision_trees_and_of_torch_models() -> None:
    assert _auto(_ViT()) == [
        "cls_token", "pos_embed", "patch_embed", "blocks.0", "blocks.1", "blocks.2", "norm", "head",
    ]  # fmt: skip
    assert _auto(_ConvNeXt()) == ["stem", "stages.0", "stages.1", "stages.2", "head"]
    assert _auto(_ResNet()) == [
        "conv1",
        "bn1",
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
        "fc",
    ]
    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    assert _auto(mlp) == ["0", "2", "4"]
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16), 3, norm=nn.LayerNorm(8), enable_nested_tensor=False
    )
    assert _auto(enc) == ["layers.0", "layers.1", "layers.2", "norm"]
    # Two containers of plain layers side by side: each layer is a group.
    two = _Wrapper(nn.Module())
    two.model.enc = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    two.model.dec = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    assert _auto(two) == ["model.enc.0", "model.enc.1", "model.dec.0", "model.dec.1"]


def test_pattern_groups_and_the_rest_in_other() -> None:
    model = _Wrapper(_GPT2())
    params = list(model.parameters())
    groups = layer_groups(model, params, r"model\.transformer\.h\.\d+")
    assert groups is not None
    assert groups.names == [f"model.transformer.h.{i}" for i in range(3)] + [OTHER]
    members = group_param_names(groups, params, model)
    assert "model.transformer.wte.weight" in members[OTHER]
    # A list of patterns; the outermost match wins; a parameter can be named directly.
    groups = layer_groups(model, params, [r".*\.h", r".*\.h\.0", r".*wpe\.weight"])
    assert groups is not None and groups.names == ["model.transformer.wpe.weight",
                                                   "model.transformer.h", OTHER]  # fmt: skip
    # Only the optimizer's parameters: a group without any is left out.
    head_only = [p for n, p in model.named_parameters() if ".h.2." in n]
    groups = layer_groups(model, head_only, "auto")
    assert groups is not None and groups.names == ["model.transformer.h.2"]
    assert layer_groups(model, params, r"nothing") is None


def test_loop_monitor_needs_the_model_for_layers() -> None:
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`Statistics\.layers` needs the model.*model=model"):
        LoopMonitor(
            opt, warmup_steps=5, statistics=Statistics(layers="auto", layers_every_n_steps=1)
        )
    with pytest.raises(TypeError, match=r"`LoopMonitor\.model` must be a torch\.nn\.Module"):
        LoopMonitor(opt, warmup_steps=5, model="net")  # type: ignore[arg-type]
    assert Statistics(layers=["a", "b"]).layers == ("a", "b")  # a list is kept as a tuple
    assert Statistics().layers == "off"


# --------------------------------------------------------------- exact values: the plans

# Groups laid out so that group boundaries fall inside blocks (runs of small tensors), and
# groups made of chunked large tensors, a zero-size tensor, and a group split by size.
SHAPES: list[tuple[int, ...]] = [
    (300, 400), (400,), (BLOCK,), (5, 7), (2 * BLOCK + 123,), (0,), (33,), (700, 190), (9,),
]  # fmt: skip
GROUP_OF = [0, 0, 1, 2, 2, 3, 3, 4, 0]


class _Groups:
    """A hand-made ``Groups`` for a parameter list (``layer_groups`` needs a module)."""

    def __init__(self, of_param: list[int]) -> None:
        self.of_param = of_param
        self.names = [f"g{i}" for i in range(max(of_param) + 1)]

    def __len__(self) -> int:
        return len(self.names)


def _per_group(tensors: list[torch.Tensor], of: list[int], n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.float64)
    for t, g in zip(tensors, of, strict=True):
        out[g] += t.detach().double().square().sum()
    return out


@pytest.mark.parametrize("plan", ["blocked", "foreach"])
@pytest.mark.parametrize("cosine", ["exact", "sketch", "off"])
def test_group_sums_of_gradients_equal_per_tensor_sums(plan: str, cosine: str) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(s)) for s in SHAPES]
    groups = _Groups(GROUP_OF)
    stats = GradientStats(params, cosine=cosine, kernels=plan, groups=groups)  # type: ignore[arg-type]
    plain = GradientStats(params, cosine=cosine, kernels=plan)  # type: ignore[arg-type]
    for step, scale in enumerate([1.0, 1e25, 1e25, 1e-30, 1.0]):
        grads: list[torch.Tensor | None] = [torch.randn(s, generator=gen) * scale for s in SHAPES]
        if step == 2:  # missing gradients: a small tensor and a chunked one
            grads[1] = grads[4] = None
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        present = [torch.zeros(s) if g is None else g for g, s in zip(grads, SHAPES, strict=True)]
        want = _per_group(present, GROUP_OF, len(groups))
        got = stats.local_sums(groups=True)
        assert got.shape == (2 + len(groups),)
        torch.testing.assert_close(got[2:], want, rtol=1e-6, atol=0)
        assert got[0].item() == pytest.approx(want.sum().item(), rel=1e-6)
        assert got[0].item() == pytest.approx(plain.local_sums()[0].item(), rel=1e-6)
        # A step without groups returns the two global sums only.
        assert stats.local_sums().shape == (2,)


@pytest.mark.parametrize("plan", ["blocked", "foreach"])
def test_group_sums_of_the_update_equal_per_tensor_sums(plan: str) -> None:
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    groups = _Groups(GROUP_OF)
    upd = UpdateRatio(params, kernels=plan, groups=groups)  # type: ignore[arg-type]
    for with_groups in (True, False, True):
        old = [p.detach().clone() for p in params]
        upd.snapshot(groups=with_groups)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        got = upd.local_sums()
        assert got is not None
        n = len(groups)
        assert got.shape == ((2 + 2 * n,) if with_groups else (2,))
        delta = [p.detach() - o for p, o in zip(params, old, strict=True)]
        if with_groups:
            torch.testing.assert_close(
                got[2 : 2 + n].double(), _per_group(delta, GROUP_OF, n), rtol=1e-5, atol=0
            )
            torch.testing.assert_close(
                got[2 + n :].double(), _per_group(old, GROUP_OF, n), rtol=1e-5, atol=0
            )


# ------------------------------------------------------------- exact values: real training


def _module_values(module: nn.Module, groups: list[str]) -> tuple[dict, dict]:
    """Per group: the gradient's norm and share (plain torch), and a copy of the parameters."""
    named = dict(module.named_modules())
    grads = {g: torch.cat([p.grad.double().reshape(-1) for p in named[g].parameters()])
             for g in groups}  # fmt: skip
    total = torch.cat(list(grads.values())).norm().item()
    values = {g: [v.norm().item(), v.norm().item() / total] for g, v in grads.items()}
    params = {g: torch.cat([p.detach().double().reshape(-1) for p in named[g].parameters()])
              for g in groups}  # fmt: skip
    return values, params


def _add_update_ratio(module: nn.Module, values: dict, old: dict) -> None:
    named = dict(module.named_modules())
    for g, before in old.items():
        after = torch.cat([p.detach().double().reshape(-1) for p in named[g].parameters()])
        values[g].append(((after - before).norm() / before.norm()).item())


def _assert_logged(scalars: dict, expected: dict[int, dict], prefix: str = "warmup/") -> None:
    assert expected
    for step, groups in expected.items():
        for g, values in groups.items():
            for stat, want in zip(STATS, values, strict=True):
                tag = f"{prefix}layers/{g}/{stat}"
                assert scalars[tag][step] == pytest.approx(want, rel=REL), (tag, step)


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 1))  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


class _Reference(pl.Callback):
    """Plain torch per module, in the hook where the monitor reads (after accumulation)."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = groups
        self.expected: dict[int, dict] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._values, self._old = _module_values(pl_module, self.groups)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.fit_loop._should_accumulate():  # a micro-batch: no optimizer step yet
            return
        _add_update_ratio(pl_module, self._values, self._old)
        self.expected[trainer.global_step - 1] = self._values


def _fit_and_read(
    tmp_path: os.PathLike, callbacks: list[Any], *, max_steps: int, accumulate: int = 1
) -> dict[str, dict[int, float]]:
    """Fit ``_Net`` with ``callbacks`` and a TensorBoardLogger; the scalars, read back."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="", version=""),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Net(), make_loader(n=4 * max_steps * accumulate, batch_size=4))
    return read_scalars(str(tmp_path))


def test_lightning_with_gradient_accumulation_logs_exact_per_group_values(
    tmp_path: os.PathLike,
) -> None:
    groups = ["net.0", "net.2", "net.4"]
    ref = _Reference(groups)
    monitor = WarmupMonitor(
        warmup_steps=6,
        statistics=Statistics(layers="auto", layers_every_n_steps=1),
        window=Window(log_every_n_steps=2),
    )
    scalars = _fit_and_read(tmp_path, [monitor, ref], max_steps=6, accumulate=3)
    logged = {s for s in scalars["warmup/layers/net.0/grad_norm"]}
    assert logged == {0, 2, 4}  # logging steps only
    _assert_logged(scalars, {s: v for s, v in ref.expected.items() if s in logged})
    assert set(ref.expected) == set(range(6))


@pytest.mark.parametrize(("log_every", "layers_every"), [(1, 3), (2, 3)])
def test_per_group_values_come_on_logging_steps_that_are_multiples_of_layers_every_n_steps(
    tmp_path: os.PathLike, log_every: int, layers_every: int
) -> None:
    groups = ["net.0", "net.2", "net.4"]
    ref = _Reference(groups)
    monitor = WarmupMonitor(
        warmup_steps=12,
        statistics=Statistics(layers="auto", layers_every_n_steps=layers_every),
        window=Window(log_every_n_steps=log_every),
    )
    scalars = _fit_and_read(tmp_path, [monitor, ref], max_steps=12)
    expected_steps = {s for s in range(12) if s % log_every == 0 and s % layers_every == 0}
    for g in groups:
        for stat in ("grad_norm", "grad_share", "update_ratio"):
            assert set(scalars[f"warmup/layers/{g}/{stat}"]) == expected_steps
    assert set(scalars["warmup/grad_norm"]) == {s for s in range(12) if s % log_every == 0}
    _assert_logged(scalars, {s: v for s, v in ref.expected.items() if s in expected_steps})


def test_plain_loop_under_bf16_autocast_and_a_grad_scaler_sees_unscaled_gradients(
    tmp_path: os.PathLike,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 4))  # fmt: skip
    groups = ["0", "2", "4"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    writer = SummaryWriter(str(tmp_path))
    monitor = LoopMonitor(opt, warmup_steps=5, writer=writer, model=model,
                          statistics=Statistics(layers="auto", layers_every_n_steps=1))  # fmt: skip
    expected: dict[int, dict] = {}
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaled = model[0].weight.grad.double().norm().item()
        scaler.unscale_(opt)
        unscaled = model[0].weight.grad.double().norm().item()
        assert unscaled == pytest.approx(scaled / 2.0**12, rel=1e-6)
        values, old = _module_values(model, groups)
        monitor.before_step()
        scaler.step(opt)
        scaler.update()
        monitor.after_step(loss)
        _add_update_ratio(model, values, old)
        expected[step] = values
        opt.zero_grad()
    monitor.close()
    writer.close()
    _assert_logged(read_scalars(str(tmp_path)), expected)


def test_per_group_keys_follow_the_prefix_and_the_optimizer_index(tmp_path: os.PathLike) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model[2].parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    every = Statistics(layers="auto", layers_every_n_steps=1)
    monitor = LoopMonitor([opt_a, opt_b], warmup_steps=3, writer=writer, model=model,
                          statistics=every, log_key_prefix="wm/")  # fmt: skip
    for _ in range(3):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        monitor.before_step(opt_a)
        monitor.before_step(opt_b)
        opt_a.step()
        opt_b.step()
        monitor.after_step(loss)
        opt_a.zero_grad()
        opt_b.zero_grad()
    monitor.close()
    writer.close()
    tags = {t for t in read_scalars(str(tmp_path)) if "/layers/" in t}
    assert tags == {f"wm/layers/0/{s}" for s in STATS} | {f"wm/opt1/layers/2/{s}" for s in STATS}
    # Each optimizer's group is all of its gradient: a share of exactly one.
    assert read_scalars(str(tmp_path))["wm/layers/0/grad_share"][0] == pytest.approx(1.0)


def test_off_logs_no_per_group_key_and_a_zero_gradient_logs_no_share(
    tmp_path: os.PathLike,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got: list[dict[str, float]] = []
    for layers in ("off", "auto"):
        stats = Statistics(layers=layers, layers_every_n_steps=1)
        monitor = LoopMonitor(opt, warmup_steps=3, model=model, statistics=stats)
        monitor.engine.metrics_sinks.append(lambda m, s: got.append(m))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        monitor.before_step()
        opt.step()
        monitor.after_step(0.5)
        monitor.close()
    assert not any("/layers/" in k for k in got[0])
    assert got[1]["warmup/layers/0/grad_norm"] == 0.0
    assert "warmup/layers/0/grad_share" not in got[1]  # 0 / 0: undefined, not logged
    assert math.isfinite(got[1]["warmup/layers/0/update_ratio"])


@pytest.mark.parametrize("how", ["add_param_group", "requires_grad"])
def test_a_group_added_mid_training_gets_exact_per_group_values_after(
    how: str, tmp_path: os.PathLike
) -> None:
    """The statistics are rebuilt when a param group is added (or a frozen parameter is
    unfrozen) mid-training; their per-group plans are rebuilt with them, the groups found
    again in the model: from that step on the new block is a group of its own, and every
    group's norm, share and update ratio equals plain torch over the trained parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))  # fmt: skip
    head = list(model[4].parameters())
    if how == "add_param_group":
        opt = torch.optim.AdamW([*model[0].parameters(), *model[2].parameters()], lr=0.01)
    else:
        model[4].requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    monitor = LoopMonitor(opt, warmup_steps=6, writer=writer, model=model,
                          statistics=Statistics(layers="auto", layers_every_n_steps=1))  # fmt: skip
    expected: dict[int, dict] = {}
    gen = torch.Generator().manual_seed(0)
    groups = ["0", "2"]
    for step in range(6):
        if step == 2:
            groups = ["0", "2", "4"]
            if how == "add_param_group":
                opt.add_param_group({"params": head, "lr": 0.02})
            else:
                model[4].requires_grad_(True)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        values, old = _module_values(model, groups)
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
        _add_update_ratio(model, values, old)
        expected[step] = values
        model.zero_grad()  # the head's gradients too, while no optimizer holds it
    monitor.close()
    writer.close()
    scalars = read_scalars(str(tmp_path))
    assert sorted(scalars["warmup/layers/0/grad_norm"]) == list(range(6))
    assert sorted(scalars["warmup/layers/4/grad_norm"]) == [2, 3, 4, 5]  # a group from step 2
    _assert_logged(scalars, expected)
    # The head is a large part of the norm: the shares after step 2 are not those before.
    assert expected[2]["4"][1] > 0.1


@pytest.mark.parametrize(("n_layers", "every"), [(3, 10), (48, 12)])
def test_by_default_per_group_steps_are_further_apart_with_more_groups(
    n_layers: int, every: int
) -> None:
    """``layers_every_n_steps=None``: every ``max(10, ceil(groups / 4))`` steps (written out
    here: 3 groups every 10th step, 48 groups every 12th), step 0 included."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = LoopMonitor(opt, warmup_steps=30, model=model, statistics=Statistics(layers="auto"))
    seen: dict[int, int] = {}
    monitor.engine.metrics_sinks.append(
        lambda m, s: seen.__setitem__(s, sum("/layers/" in k for k in m))
    )
    for _ in range(25):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        monitor.before_step()
        opt.step()
        monitor.after_step(loss)
    monitor.close()
    assert max(10, -(-n_layers // 4)) == every
    assert sorted(seen) == list(range(25))  # every step logs its scalars
    assert {s for s, n in seen.items() if n} == set(range(0, 25, every))
    assert {n for n in seen.values() if n} == {3 * n_layers}

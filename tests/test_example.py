"""The example script trains for real: a tiny model, a few steps, TensorBoard files on disk."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_example
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_transformer.py"

TINY = [
    "--max-steps", "6", "--warmup-steps", "3", "--batch-size", "4", "--seq-len", "16",
    "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--max-chars", "50000",
    "--val-every", "3", "--val-batches", "1", "--threads", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example(EXAMPLE.name)


def _scalars(run_dir: str) -> EventAccumulator:
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_example_trains_with_monitor(example: ModuleType, tmp_path: Path) -> None:
    run_dir = example.main([*TINY, "--log-dir", str(tmp_path), "--run-name", "tiny"])

    assert Path(run_dir) == tmp_path / "tiny" / "version_0"
    assert list(Path(run_dir).glob("events.out.tfevents.*"))
    events = _scalars(run_dir)
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "warmup/loss", "warmup/lr"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))
    # The example's warmup: lr = peak * (step + 1) / warmup_steps on the first updates.
    peak = example.PRESETS["demo"]["lr"]
    lrs = [e.value for e in events.Scalars("warmup/lr")][:3]
    assert lrs == pytest.approx([peak / 3, 2 * peak / 3, peak], rel=1e-6)


def test_example_trains_without_monitor(example: ModuleType, tmp_path: Path) -> None:
    argv = [*TINY, "--log-dir", str(tmp_path), "--no-monitor", "--accumulate", "2"]
    run_dir = example.main([*argv, "--preset", "sane"])

    assert Path(run_dir) == tmp_path / "sane" / "version_0"
    assert list(Path(run_dir).glob("events.out.tfevents.*"))
    tags = set(_scalars(run_dir).Tags()["scalars"])
    assert "train/loss" in tags
    assert not any(tag.startswith("warmup/") for tag in tags)
    assert not (Path(run_dir) / example.ALERTS_FILENAME).exists()


def test_post_ln_blocks_normalise_after_each_residual_add(example: ModuleType) -> None:
    import torch

    torch.manual_seed(0)
    block = example.Block(16, 2, post_ln=True)
    x = torch.randn(3, 5, 16)
    # Vaswani et al.: ln(x + attn(x)), then ln(h + mlp(h)), written out again.
    h = block.ln1(x + block.attn(x))
    expected = block.ln2(h + block.proj(torch.nn.functional.gelu(block.fc(h))))
    assert torch.allclose(block(x), expected)
    model = example.CharTransformer(20, 8, 16, 2, 2, post_ln=True)
    assert isinstance(model.ln_f, torch.nn.Identity)  # the last block ends with a LayerNorm
    assert isinstance(example.CharTransformer(20, 8, 16, 2, 2).ln_f, torch.nn.LayerNorm)

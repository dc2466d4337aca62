"""The event reader keeps what TensorBoard's ``EventAccumulator`` keeps: repeated and
overlapping steps, resumed runs, restarts whose steps go backwards; broken files are diagnosed.

Files are written by the real ``SummaryWriter`` and, for the cases it cannot produce (files
without a ``file_version``), by TensorBoard's own ``RecordWriter``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from warmup_monitor.report.events import event_files, read_event_files, superseded_note


def accumulated(run_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard keeps: every scalar point, in its order (no reservoir sampling)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def ours(run_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    data = read_event_files(event_files(str(run_dir)))
    return {
        tag: list(zip(s.steps.tolist(), s.values.tolist(), strict=True))
        for tag, s in data.tensorboard.items()
    }


def _write(run_dir: Path, points: Sequence[tuple[int, float]], **kw: object) -> None:
    w = SummaryWriter(str(run_dir), **kw)  # type: ignore[arg-type]
    for step, value in points:
        w.add_scalar("warmup/loss", value, step)
        w.add_scalar("warmup/lr", value / 10, step)
    w.close()
    time.sleep(1.05)  # the next writer's file name (its timestamp) sorts after this one


def test_resumed_run_with_overlapping_files(tmp_path: Path) -> None:
    """A run logged steps 0-10, crashed, and was resumed from step 5 to step 7 in a new file of
    the same directory (as Lightning does): TensorBoard keeps all 14 points."""
    _write(tmp_path, [(s, float(s)) for s in range(11)])
    _write(tmp_path, [(s, 100.0 + s) for s in range(5, 8)])
    assert len(event_files(str(tmp_path))) == 2
    expected = accumulated(tmp_path)
    assert expected["warmup/loss"] == [(s, float(s)) for s in range(11)] + [
        (s, 100.0 + s) for s in range(5, 8)
    ]
    assert ours(tmp_path) == expected
    data = read_event_files(event_files(str(tmp_path)))
    loss = data.scalars["warmup/loss"]
    # The timeline: the resumed points supersede steps 5-10 of the first file; the final loss
    # is TensorBoard's last point (step 7 of the resumed run), not step 10 of the abandoned one.
    assert loss.steps.tolist() == list(range(8))
    assert loss.values.tolist() == [0, 1, 2, 3, 4, 105, 106, 107]
    assert loss.values[-1] == expected["warmup/loss"][-1][1]
    assert data.superseded == {"warmup/loss": (6, 5, 10), "warmup/lr": (6, 5, 10)}
    assert superseded_note(data, "warmup/") == (
        "12 logged points (steps 5-10) written again later, by a resumed or restarted run or a "
        "repeated step: the later values are used; TensorBoard shows both"
    )
    assert superseded_note(data, "other/") is None


def test_restart_with_purge_step_drops_the_orphaned_steps(tmp_path: Path) -> None:
    """``SummaryWriter(purge_step=5)`` writes SessionLog.START at step 5: TensorBoard drops
    every earlier point at step 5 or later."""
    _write(tmp_path, [(s, float(s)) for s in range(11)])
    _write(tmp_path, [(s, 100.0 + s) for s in range(5, 8)], purge_step=5)
    expected = accumulated(tmp_path)
    assert expected["warmup/loss"] == [(s, float(s)) for s in range(5)] + [
        (s, 100.0 + s) for s in range(5, 8)
    ]
    assert ours(tmp_path) == expected
    data = read_event_files(event_files(str(tmp_path)))
    assert data.scalars["warmup/loss"].steps.tolist() == list(range(8))
    assert data.superseded == {}


def test_repeated_step_in_one_file(tmp_path: Path) -> None:
    _write(tmp_path, [(0, 1.0), (1, 2.0), (1, 3.0), (2, 4.0)])
    assert ours(tmp_path) == accumulated(tmp_path)
    loss = read_event_files(event_files(str(tmp_path))).scalars["warmup/loss"]
    assert loss.steps.tolist() == [0, 1, 2] and loss.values.tolist() == [1.0, 3.0, 4.0]


# ------------------------------------------------------------------------------ any order


def _event(step: int, tags: Sequence[str] = (), *, version: str = "", start: bool = False) -> bytes:
    e = event_pb2.Event(wall_time=1.0, step=step)
    if version:
        e.file_version = version
    if start:
        e.session_log.status = event_pb2.SessionLog.START
    if tags:
        e.summary.CopyFrom(
            summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=t, simple_value=float(step * 10 + i))
                    for i, t in enumerate(tags)
                ]
            )
        )
    return e.SerializeToString()


_tags = st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=2, unique=True)
_events = st.lists(
    st.tuples(st.integers(0, 12), _tags, st.booleans()),  # step, tags, SessionLog.START
    min_size=0,
    max_size=25,
)
_files = st.lists(
    st.tuples(st.sampled_from(["", "brain.Event:2", "brain.Event:1"]), _events),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_files)
def test_any_sequence_of_events_reads_as_event_accumulator_reads_it(
    tmp_path_factory: pytest.TempPathFactory, files: list[tuple[str, list]]
) -> None:
    """Random files with or without a file_version, steps that repeat and go backwards, several
    tags per event, SessionLog.START events: the same points as EventAccumulator, in order."""
    run_dir = tmp_path_factory.mktemp("any")
    for i, (version, events) in enumerate(files):
        with open(run_dir / f"events.out.tfevents.{1000 + i}.host", "wb") as f:
            w = RecordWriter(f)
            if version:
                w.write(_event(0, version=version))
            for step, tags, start in events:
                w.write(_event(step, tags, start=start and not tags))
            w.flush()
    expected = accumulated(run_dir)
    got = ours(run_dir)
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}


# ------------------------------------------------------------------------------ broken files


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty (0 bytes)"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a Tensor"),
        (b"\x00" * 5, "only 5 bytes"),
    ],
)
def test_broken_files_are_diagnosed(tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / "events.out.tfevents.1.host").write_bytes(content)
    data = read_event_files(event_files(str(tmp_path)))
    assert data.unreadable and data.scalars == {}
    assert len(data.problems) == 1 and why in data.problems[0]


def test_corrupt_at_byte_zero(tmp_path: Path) -> None:
    _write(tmp_path, [(0, 1.0), (1, 2.0)])
    (path,) = event_files(str(tmp_path))
    raw = bytearray(Path(path).read_bytes())
    raw[0] ^= 0xFF  # the first record's length
    Path(path).write_bytes(bytes(raw))
    data = read_event_files([path])
    assert data.unreadable
    assert "first record header fails its checksum" in data.problems[0]


def test_links_fifos_and_directories_are_never_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _write(outside, [(0, 1.0)])
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(event_files(str(outside))[0], run / "events.out.tfevents.2.host")
    os.mkfifo(run / "events.out.tfevents.3.host")  # would block a plain open()
    (run / "events.out.tfevents.4.dir").mkdir()
    assert event_files(str(run)) == []
    data = read_event_files([str(run / "events.out.tfevents.3.host")])  # given by hand
    assert data.scalars == {} and "not a regular file" in data.problems[0]
    data = read_event_files([str(run / "events.out.tfevents.2.host")])
    assert data.scalars == {} and "symbolic link" in data.problems[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.binary(max_size=64), cut=st.integers(0, 400), flip=st.integers(0, 400))
def test_fuzz_event_reader(
    tmp_path_factory: pytest.TempPathFactory, prefix: bytes, cut: int, flip: int
) -> None:
    """Random bytes, cut or flipped files: never an exception, and every file that could not
    be read to its end is named."""
    run_dir = tmp_path_factory.mktemp("fuzz")
    with open(run_dir / "events.out.tfevents.1.host", "wb") as f:
        w = RecordWriter(f)
        w.write(_event(0, version="brain.Event:2"))
        for s in range(5):
            w.write(_event(s, ["a"]))
        w.flush()
    path = run_dir / "events.out.tfevents.1.host"
    raw = bytearray(prefix + path.read_bytes())
    if raw:
        raw[flip % len(raw)] ^= 0x5A
    raw = raw[: len(raw) - cut % (len(raw) + 1)]
    path.write_bytes(bytes(raw))
    data = read_event_files([str(path)])
    complete = bool(data.scalars) and not data.problems
    assert complete or data.problems
    for s in data.scalars.values():
        assert np.all(np.diff(s.steps) > 0)

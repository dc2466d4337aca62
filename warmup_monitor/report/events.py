"""Read TensorBoard event files fast, and say exactly what could not be read.

An event file is a sequence of TFRecords: ``uint64 length``, ``uint32 masked crc32c(length)``,
``length`` bytes of a serialized ``tensorboard.Event``, ``uint32 masked crc32c(data)``.

TensorBoard's own readers (``EventAccumulator``, ``event_file_loader``) verify the checksums in
pure Python when TensorFlow is not installed, about 13 µs a record: 100,000 logged steps of ten
keys (a million records) take 15 to 25 seconds. This reader keeps the same file format and the same
protobuf classes (``tensorboard.compat.proto.event_pb2``), and differs in two places:

* the data checksum is computed by ``google_crc32c`` (C) when it is installed; the header checksum
  is only checked to explain a failure (a corrupted length always ends in a data checksum mismatch
  or an overrun);
* records with the exact layout of a scalar written by a ``SummaryWriter`` (wall time, step, one
  ``simple_value``; every byte of the layout is checked) are decoded in bulk with numpy; every other
  record is parsed with ``event_pb2.Event``.

Like TensorBoard, reading a file stops at the first record that is truncated or fails its checksum;
unlike TensorBoard, the reader says so (:attr:`EventData.problems`). Tests check that it reads the
same scalars as ``EventAccumulator``.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

__all__ = ["EVENT_FILE_MARKER", "EventData", "Series", "event_files", "read_event_files"]

EVENT_FILE_MARKER = "tfevents"


def _load_crc() -> tuple[Callable[[bytes], int], bool]:
    try:
        import google_crc32c

        return google_crc32c.value, google_crc32c.implementation == "c"
    except ImportError:  # pragma: no cover - a declared dependency; TensorBoard's own is slow
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        return crc32c, False


_crc32c, FAST_CRC = _load_crc()


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclass
class Series:
    """One scalar tag: steps ascending and unique (the last value written for a step wins)."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64

    def __len__(self) -> int:
        return int(self.steps.size)


@dataclass
class EventData:
    """What was read from a run's event files.

    Attributes:
        scalars: tag -> :class:`Series`.
        texts: tag -> ``[(step, text), ...]`` in file order.
        records: Number of records read.
        problems: One sentence for a person per thing that could not be read.
    """

    scalars: dict[str, Series] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    records: int = 0
    problems: list[str] = field(default_factory=list)


def event_files(directory: str) -> list[str]:
    """Event files directly in ``directory``, oldest first (their names start with a timestamp)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    paths = [
        os.path.join(directory, n)
        for n in names
        if EVENT_FILE_MARKER in n and os.path.isfile(os.path.join(directory, n))
    ]
    return sorted(paths)


_U64 = struct.Struct("<Q").unpack_from
_U32 = struct.Struct("<I").unpack_from


def _frame(data: bytes, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Starts and lengths of the intact records; a sentence on what stopped the read, if any."""
    heads: list[int] = []
    append = heads.append
    pos, end = 0, len(data)
    problem = None
    while pos + 12 <= end:
        (length,) = _U64(data, pos)
        if pos + 16 + length > end:
            break
        append(pos)
        pos += 16 + length
    head = np.asarray(heads, dtype=np.int64)
    starts = head + 12
    lengths = _gather(buf, head, 8, "<u8").astype(np.int64)
    # The data checksums: one C call per record, compared all at once.
    crcs = np.fromiter(
        map(
            _crc32c,
            [data[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)],
        ),
        dtype=np.uint64,
        count=head.size,
    )
    masked = (((crcs >> 15) | (crcs << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    bad = np.flatnonzero(masked != _gather(buf, starts + lengths, 4, "<u4"))
    if bad.size:
        pos = int(head[bad[0]])
        starts, lengths = starts[: bad[0]], lengths[: bad[0]]
        (header_crc,) = _U32(data, pos + 8)
        if _masked(_crc32c(data[pos : pos + 8])) != header_crc:
            problem = f"corrupted record header at byte {pos}"
        else:
            problem = f"corrupted record at byte {pos} (checksum mismatch)"
    elif pos < end:
        if end - pos < 12:
            problem = f"truncated record header at byte {pos}"
        else:
            problem = f"truncated record at byte {pos} ({_U64(data, pos)[0]} bytes announced)"
    if problem is not None:
        problem += f"; the last {end - pos} bytes were skipped"
    return starts, lengths, problem


def _gather(buf: np.ndarray, at: np.ndarray, width: int, dtype: str) -> np.ndarray:
    """The ``width``-byte little-endian numbers at byte offsets ``at``."""
    if at.size == 0:
        return np.zeros(0, dtype=dtype)
    raw = buf[at[:, None] + np.arange(width)]
    return np.ascontiguousarray(raw).view(dtype).reshape(-1)


def _decode_simple_scalars(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bulk-decode records laid out as a ``SummaryWriter`` scalar.

    The layout: ``09 <f64 wall_time> [10 <varint step>] 2a L1 0a L2 0a L3 <tag> 15 <f32 value>``
    with ``L2 = L3 + 7``, ``L1 = L2 + 2`` and nothing after the value.

    Returns:
        ``ok`` (bool per record), and for the records where ``ok``: step, value, tag start, tag
        length.
    """
    n = starts.size
    last = buf.size - 1

    def at(idx: np.ndarray) -> np.ndarray:
        return buf[np.minimum(idx, last)].astype(np.int64)

    ok = (lengths >= 18) & (at(starts) == 0x09)
    has_step = at(starts + 9) == 0x10
    # Varint step (at most 10 bytes), decoded for every record at once.
    step = np.zeros(n, dtype=np.uint64)
    vlen = np.zeros(n, dtype=np.int64)
    going = has_step.copy()
    for k in range(10):
        byte = at(starts + 10 + k)
        step |= np.where(going, (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k), 0).astype(
            np.uint64
        )
        vlen += going
        going &= byte >= 0x80
    ok &= ~going
    p = starts + 9 + np.where(has_step, 1 + vlen, 0)
    l1, l2, l3 = at(p + 1), at(p + 3), at(p + 5)
    end = starts + lengths
    ok &= (at(p) == 0x2A) & (at(p + 2) == 0x0A) & (at(p + 4) == 0x0A)
    ok &= (l1 == l2 + 2) & (l2 == l3 + 7) & (l3 < 0x80) & (l3 > 0)
    ok &= (p + 11 + l3 == end) & (at(p + 6 + l3) == 0x15)
    sel = np.flatnonzero(ok)
    vstart = (p + 7 + l3)[sel]
    values = _gather(buf, vstart, 4, "<f4").astype(np.float64)
    return ok, step[sel].astype(np.int64), values, (p + 6)[sel], l3[sel]


def _group_tags(
    buf: np.ndarray, tag_start: np.ndarray, tag_len: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Distinct tags and, per record, the index of its tag."""
    codes = np.full(tag_start.size, -1, dtype=np.int64)
    names: list[str] = []
    for length in np.unique(tag_len):
        rows_idx = np.flatnonzero(tag_len == length)
        rows = buf[tag_start[rows_idx, None] + np.arange(int(length))]
        # A polynomial hash per row, then an exact check of every row against its group's first.
        h = np.zeros(rows_idx.size, dtype=np.uint64)
        for j in range(int(length)):
            h = h * np.uint64(1099511628211) + rows[:, j].astype(np.uint64)
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        if not np.array_equal(rows, rows[first][inverse]):  # pragma: no cover - hash collision
            uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
            first = np.array([np.flatnonzero(inverse == i)[0] for i in range(len(uniq))])
        base = len(names)
        names.extend(bytes(rows[i]).decode("utf-8", "replace") for i in first)
        codes[rows_idx] = base + inverse.reshape(-1)
    return names, codes


def _add_fallback(
    record: bytes,
    order: int,
    scalars: dict[str, list[tuple[int, int, float]]],
    texts: dict[str, list[tuple[int, str]]],
    plugins: dict[str, str],
) -> bool:
    """Parse one record with TensorBoard's protobuf class; False if it is not an Event.

    ``plugins`` remembers each tag's plugin (named in its first event's metadata only).
    """
    try:
        event = event_pb2.Event.FromString(record)
    except Exception:
        return False
    if not event.HasField("summary"):
        return True
    for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name:
            plugins[value.tag] = value.metadata.plugin_data.plugin_name
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            scalars.setdefault(value.tag, []).append((order, event.step, value.simple_value))
        elif kind == "tensor":
            try:
                array = tensor_util.make_ndarray(value.tensor)
            except Exception:
                continue
            if array.dtype.kind in "SUO" and plugins.get(value.tag) == "text":
                items = [
                    x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                    for x in array.reshape(-1).tolist()
                ]
                texts.setdefault(value.tag, []).append((event.step, "\n".join(items)))
            elif array.size == 1 and array.dtype.kind in "fiub":
                scalars.setdefault(value.tag, []).append(
                    (order, event.step, float(array.reshape(-1)[0]))
                )
    return True


def _finish_series(order: np.ndarray, steps: np.ndarray, values: np.ndarray) -> Series:
    idx = np.lexsort((order, steps))
    steps, values = steps[idx], values[idx]
    keep = np.ones(steps.size, dtype=bool)
    keep[:-1] = steps[1:] != steps[:-1]  # the last written value of a step wins
    return Series(steps=steps[keep], values=values[keep])


def read_event_files(paths: Iterable[str], prefix: str = "") -> EventData:
    """Read scalars and texts from event files, in the order given.

    Args:
        paths: Event files of one run, oldest first.
        prefix: Keep only the scalar and text tags that start with it.

    Returns:
        The data, with a sentence in ``problems`` for each file or record that could not be read.
    """
    out = EventData()
    chunks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    slow: dict[str, list[tuple[int, int, float]]] = {}
    plugins: dict[str, str] = {}
    offset = 0  # record order across files
    for path in paths:
        name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            out.problems.append(f"{name}: could not be read ({e.strerror or e})")
            continue
        buf = np.frombuffer(data, dtype=np.uint8)
        starts, lengths, problem = _frame(data, buf)
        if problem is not None:
            out.problems.append(f"{name}: {problem} ({starts.size} records read before it)")
        if not starts.size:
            continue
        ok, steps, values, tag_start, tag_len = _decode_simple_scalars(buf, starts, lengths)
        order = np.flatnonzero(ok) + offset
        names, codes = _group_tags(buf, tag_start, tag_len)
        for i, tag in enumerate(names):
            if not tag.startswith(prefix):
                continue
            mask = codes == i
            chunks.setdefault(tag, []).append((order[mask], steps[mask], values[mask]))
        unparsable = 0
        for i in np.flatnonzero(~ok).tolist():
            s, n = int(starts[i]), int(lengths[i])
            if not _add_fallback(data[s : s + n], offset + i, slow, out.texts, plugins):
                unparsable += 1
        if unparsable:
            out.problems.append(
                f"{name}: {unparsable} records are not TensorBoard events (skipped)"
            )
        out.records += int(starts.size)
        offset += int(starts.size)
    for tag, rows in slow.items():
        if not tag.startswith(prefix):
            continue
        arr = np.asarray(rows, dtype=np.float64)
        chunks.setdefault(tag, []).append(
            (arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2])
        )
    out.texts = {tag: rows for tag, rows in out.texts.items() if tag.startswith(prefix)}
    for tag, parts in chunks.items():
        out.scalars[tag] = _finish_series(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
        )
    return out

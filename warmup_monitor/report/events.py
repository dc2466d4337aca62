"""Read TensorBoard event files fast, keep what TensorBoard keeps, and say what could not be read.

An event file is a sequence of TFRecords: ``uint64 length``, ``uint32 masked crc32c(length)``,
``length`` bytes of a serialized ``tensorboard.Event``, ``uint32 masked crc32c(data)``.

TensorBoard's own readers (``EventAccumulator``, ``event_file_loader``) verify the checksums in
pure Python when TensorFlow is not installed, about 13 µs a record: 100,000 logged steps of ten
keys (a million records) take 15 to 25 seconds. This reader keeps the same file format and the
same protobuf classes (``tensorboard.compat.proto.event_pb2``), and is faster in two places:

* the data checksum is computed by ``google_crc32c`` (C) when it is installed; the header checksum
  is only checked to explain a failure (a corrupted length always ends in a data checksum mismatch
  or an overrun);
* records with the exact layout of a scalar written by a ``SummaryWriter`` (wall time, step, one
  ``simple_value``; every byte of the layout is checked) are decoded in bulk with numpy; every
  other record is parsed with ``event_pb2.Event``.

**What is kept is what ``EventAccumulator`` keeps** (``purge_orphaned_data=True``, no
reservoir sampling), in its order: files are read in name order, and the accumulator's two purge
rules are applied exactly as ``_MaybePurgeOrphanedData`` applies them. Once a
``file_version`` of 2 or more has been seen (every ``SummaryWriter`` file starts with one), a
``SessionLog.START`` event at step ``s`` (``SummaryWriter(purge_step=s)``) drops every earlier
point with a step ``>= s``; before that (older files), an event whose step is below the highest
step seen drops the earlier points of its own tags with a step ``>= s``.
:attr:`EventData.tensorboard` holds that sequence; tests compare it with ``EventAccumulator``.

**One value per step** (:attr:`EventData.scalars`, what the report analyses): TensorBoard keeps
a repeated step twice and, after a restart whose steps go backwards without a purge (a resumed
Lightning run), draws the abandoned points and then a line going back. The report reads the
sequence as the run's timeline: a point at step ``s`` supersedes every earlier point at a step
``>= s``. So the last value written for a step wins, the series ends with TensorBoard's last point
(the run's final values are those of the resumed run, not of an abandoned step), and when the
resumed run goes past the old end this is exactly TensorBoard's own restart purge.
:func:`superseded_note` says how many points were superseded.

Like TensorBoard, reading a file stops at the first record that is truncated or fails its
checksum; unlike TensorBoard, the reader says so (:attr:`EventData.problems`), and tells an empty
file or a file that is not a TFRecord file at all from a damaged one. Scalars with a step outside
``[0, 2**53]`` are skipped and counted. Symbolic links, FIFOs and other non-regular files are
never opened.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from warmup_monitor import words
from warmup_monitor.schema import MAX_STEP

__all__ = [
    "EVENT_FILE_MARKER",
    "EventData",
    "Series",
    "event_files",
    "read_event_files",
    "read_regular_file",
    "superseded_note",
]

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
    """One scalar tag: steps ascending and unique (see the module docstring for repeats)."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64

    def __len__(self) -> int:
        return int(self.steps.size)


@dataclass
class EventData:
    """What was read from a run's event files.

    Attributes:
        scalars: tag -> :class:`Series`, one value per step (the run's timeline); tags in the
            order of their first point in the files (the order they were logged in).
        tensorboard: tag -> the points ``EventAccumulator`` keeps, in its order (steps may
            repeat and go backwards).
        texts: tag -> ``[(step, text), ...]`` in file order.
        records: Number of records read.
        problems: One sentence for a person per thing that could not be read.
        superseded: tag -> ``(points, first step, last step)`` of the points a later point
            superseded (see :func:`superseded_note`).
        unreadable: Whether no file held a single readable record.
    """

    scalars: dict[str, Series] = field(default_factory=dict)
    tensorboard: dict[str, Series] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    records: int = 0
    problems: list[str] = field(default_factory=list)
    superseded: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    unreadable: bool = False


def event_files(directory: str) -> list[str]:
    """Event files directly in ``directory``, in name order (their names start with a
    timestamp), as TensorBoard reads them. Symbolic links are left out: no link is followed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    paths = []
    for entry in entries:
        try:
            if EVENT_FILE_MARKER in entry.name and entry.is_file(follow_symlinks=False):
                paths.append(entry.path)
        except OSError:
            continue
    return sorted(paths)


#: Bytes read from one file at most (a larger file is read up to here, and said so).
MAX_FILE_BYTES = 2**34


def read_regular_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, never through a symbolic link (``O_NOFOLLOW``), never
    blocking on a FIFO or a device.

    Raises:
        OSError: the file is a link, not a regular file, or cannot be read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    if os.path.islink(path):
        raise OSError(f"{os.path.basename(path)} is a symbolic link; links are not followed")
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.path.basename(path)} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


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


@dataclass
class _Control:
    """An event that matters to TensorBoard's purge rules, besides plain scalars."""

    order: int
    step: int
    version: float | None  # file_version, when the event carries one
    start: bool  # SessionLog.START
    tags: tuple[str, ...] | None  # summary tags (None: no summary)


def _parse_version(text: str) -> float | None:
    """TensorBoard's ``event_util.ParseFileVersion``: ``"brain.Event:2"`` -> 2.0."""
    try:
        return float(text.split(":")[-1])
    except ValueError:
        return None


def _add_fallback(
    record: bytes,
    order: int,
    scalars: dict[str, list[tuple[int, int, float]]],
    texts: dict[str, list[tuple[int, str]]],
    plugins: dict[str, str],
    controls: list[_Control],
) -> bool:
    """Parse one record with TensorBoard's protobuf class; False if it is not an Event.

    ``plugins`` remembers each tag's plugin (named in its first event's metadata only).
    """
    try:
        event = event_pb2.Event.FromString(record)
    except Exception:
        return False
    version = _parse_version(event.file_version) if event.HasField("file_version") else None
    start = event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START
    has_summary = event.HasField("summary")
    controls.append(
        _Control(
            order,
            int(event.step),
            version,
            start,
            tuple(v.tag for v in event.summary.value) if has_summary else None,
        )
    )
    if not has_summary:
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


def _diagnose(data: bytes, problem: str | None, records: int) -> str | None:
    """A sentence for a file that yielded no record: empty, not TFRecord, or damaged."""
    if records:
        return problem
    if not data:
        return "empty (0 bytes): nothing was written, or the file was cut; skipped"
    if len(data) < 12:
        return f"only {len(data)} bytes, less than one record header; skipped"
    if _masked(_crc32c(data[:8])) != _U32(data, 8)[0]:
        return (
            "not a TensorBoard event file: the first record header fails its checksum "
            "(random or overwritten bytes from byte 0); skipped"
        )
    return f"the first record is damaged: {problem}"


def _purge(
    order: np.ndarray,
    step: np.ndarray,
    tag: np.ndarray,
    controls: list[_Control],
    tag_index: dict[str, int],
    bulk: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """The points ``EventAccumulator`` keeps (a boolean mask), by its purge rules."""
    alive = np.ones(order.size, dtype=bool)
    controls = sorted(controls, key=lambda c: c.order)
    # Orders where the legacy (out-of-order step) rule is in force: before any file_version >= 2
    # and after any later file_version < 2.
    version: float | None = None
    legacy: list[tuple[int, int]] = []
    begin: int | None = 0
    for c in controls:
        if c.version is not None:
            new_v2 = c.version >= 2
            if begin is not None and new_v2:
                legacy.append((begin, c.order))
                begin = None
            elif begin is None and not new_v2:
                begin = c.order
            version = c.version
    if begin is not None:
        legacy.append((begin, 2**62))
    in_legacy = np.zeros(order.size, dtype=bool)
    for lo, hi in legacy:
        in_legacy |= (order >= lo) & (order < hi)
    if not in_legacy.any() and not any(lo <= c.order < hi for c in controls for lo, hi in legacy):
        version = None
        for c in controls:  # fast path: only SessionLog.START purges
            if c.version is not None:
                version = c.version
            if c.start and version is not None and version >= 2:
                alive &= ~((order < c.order) & (step >= c.step))
        return alive
    # Exact sequential walk (files without a file_version; rare and small). Every bulk-decoded
    # record is an event, kept tag or not: each one moves the highest step seen.
    by_order = {c.order: c for c in controls}
    scalar_at = {int(o): i for i, o in enumerate(order.tolist())}
    bulk_step = dict(zip(bulk[0].tolist(), bulk[1].tolist(), strict=True))
    events = sorted(set(by_order) | set(bulk_step))
    version = None
    most_recent = -1
    for o in events:
        ctl = by_order.get(o)
        if ctl is not None:
            if ctl.version is not None:
                version = ctl.version
            ev_step, tags, start = ctl.step, ctl.tags, ctl.start
        else:
            ev_step, tags, start = bulk_step[o], None, False
        if version is not None and version >= 2:
            if start:
                alive &= ~((order < o) & (step >= ev_step))
            continue
        if ctl is None:
            has_summary = True
            tag_ids = [int(tag[scalar_at[o]])] if o in scalar_at else []
        else:
            has_summary = tags is not None
            tag_ids = [tag_index[t] for t in tags or () if t in tag_index]
        if ev_step < most_recent and has_summary:
            for t in tag_ids:
                alive &= ~((order < o) & (step >= ev_step) & (tag == t))
        else:
            most_recent = ev_step
    return alive


def _timeline(steps: np.ndarray) -> np.ndarray:
    """Mask of the points no later point supersedes (a later step ``<=`` theirs)."""
    if steps.size == 0:
        return np.zeros(0, dtype=bool)
    later_min = np.minimum.accumulate(steps[::-1])[::-1]  # min over i..end
    keep = np.ones(steps.size, dtype=bool)
    keep[:-1] = steps[:-1] < later_min[1:]
    return keep


def read_event_files(paths: Iterable[str], prefix: str = "") -> EventData:
    """Read scalars and texts from event files, in the order given.

    Args:
        paths: Event files of one run, in name order.
        prefix: Keep only the scalar and text tags that start with it.

    Returns:
        The data, with a sentence in ``problems`` for each file or record that could not be read.
    """
    out = EventData()
    chunks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    slow: dict[str, list[tuple[int, int, float]]] = {}
    plugins: dict[str, str] = {}
    controls: list[_Control] = []
    bulk: list[tuple[np.ndarray, np.ndarray]] = []  # order and step of every bulk record
    offset = 0  # record order across files
    readable = 0
    for path in paths:
        name = os.path.basename(path)
        try:
            data = read_regular_file(path)
        except OSError as e:
            out.problems.append(f"{name}: could not be read ({e.strerror or e}); skipped")
            continue
        buf = np.frombuffer(data, dtype=np.uint8)
        starts, lengths, problem = _frame(data, buf)
        problem = _diagnose(data, problem, int(starts.size))
        if problem is not None:
            if starts.size:
                problem += f" ({starts.size} records read before it)"
            out.problems.append(f"{name}: {problem}")
        if not starts.size:
            continue
        ok, steps, values, tag_start, tag_len = _decode_simple_scalars(buf, starts, lengths)
        order = np.flatnonzero(ok) + offset
        bulk.append((order, steps))
        names, codes = _group_tags(buf, tag_start, tag_len)
        for i, tag in enumerate(names):
            if not tag.startswith(prefix):
                continue
            mask = codes == i
            chunks.setdefault(tag, []).append((order[mask], steps[mask], values[mask]))
        unparsable = 0
        for i in np.flatnonzero(~ok).tolist():
            s, n = int(starts[i]), int(lengths[i])
            if not _add_fallback(data[s : s + n], offset + i, slow, out.texts, plugins, controls):
                unparsable += 1
        if unparsable:
            out.problems.append(f"{name}: {unparsable} records are not TensorBoard events; skipped")
        if unparsable < starts.size:
            readable += 1
        out.records += int(starts.size)
        offset += int(starts.size)
    out.unreadable = readable == 0
    for tag, rows in slow.items():
        if not tag.startswith(prefix):
            continue
        arr = np.asarray(rows, dtype=np.float64)
        chunks.setdefault(tag, []).append(
            (arr[:, 0].astype(np.int64), np.asarray([r[1] for r in rows], np.int64), arr[:, 2])
        )
    out.texts = {tag: rows for tag, rows in out.texts.items() if tag.startswith(prefix)}
    bulk_order = np.concatenate([b[0] for b in bulk]) if bulk else np.zeros(0, np.int64)
    bulk_steps = np.concatenate([b[1] for b in bulk]) if bulk else np.zeros(0, np.int64)
    _finish(out, chunks, controls, (bulk_order, bulk_steps))
    return out


def _finish(
    out: EventData,
    chunks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    controls: list[_Control],
    bulk: tuple[np.ndarray, np.ndarray],
) -> None:
    """Apply TensorBoard's purges, then build the one-value-per-step series."""
    tags = list(chunks)
    if not tags:
        return
    tag_index = {t: i for i, t in enumerate(tags)}
    order = np.concatenate([p[0] for t in tags for p in chunks[t]])
    step = np.concatenate([p[1] for t in tags for p in chunks[t]])
    value = np.concatenate([p[2] for t in tags for p in chunks[t]])
    tag = np.concatenate(
        [np.full(p[0].size, tag_index[t], dtype=np.int64) for t in tags for p in chunks[t]]
    )
    alive = _purge(order, step, tag, controls, tag_index, bulk)
    bad_step = (step < 0) | (step > MAX_STEP)
    if bad_step.any():
        out.problems.append(
            f"{int(bad_step.sum())} scalar points with a step outside [0, 2**53]; skipped"
        )
    # Tags in the order of their first record: the order the writer logged them in.
    first = np.full(len(tags), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, tag, order)
    for i in np.argsort(first, kind="stable").tolist():
        t = tags[i]
        mask = tag == i
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(order[idx], kind="stable")]
        kept = idx[alive[idx]]
        out.tensorboard[t] = Series(steps=step[kept], values=value[kept])
        kept = kept[~bad_step[kept]]
        keep = _timeline(step[kept])
        dropped = kept[~keep]
        if dropped.size:
            lo, hi = int(step[dropped].min()), int(step[dropped].max())
            out.superseded[t] = (int(dropped.size), lo, hi)
        kept = kept[keep]
        out.scalars[t] = Series(steps=step[kept], values=value[kept])


def superseded_note(data: EventData, prefix: str = "") -> str | None:
    """A sentence on the points of the tags under ``prefix`` that a later point superseded."""
    found = [v for t, v in data.superseded.items() if t.startswith(prefix)]
    if not found:
        return None
    count = sum(v[0] for v in found)
    lo, hi = min(v[1] for v in found), max(v[2] for v in found)
    return (
        f"{words.count(count, 'logged point')} ({words.span(lo, hi)}) written again later, by "
        "a resumed or restarted run or a repeated step: the later values are used; TensorBoard "
        "shows both"
    )

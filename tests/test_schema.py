"""The on-disk contract: keys, the alert record, the JSONL writer and the one tolerant reader."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmup_monitor import alerts as alerts_module
from warmup_monitor import schema
from warmup_monitor.schema import (
    ALERTS_FILENAME,
    Alert,
    AlertKind,
    JsonlWriter,
    key,
    read_alerts_file,
    split_key,
)


def test_keys() -> None:
    assert key("lr") == "warmup/lr"
    assert key("lr", opt_idx=2) == "warmup/opt2/lr"
    assert key("loss", prefix="wm/") == "wm/loss"
    assert key("lr/pg1", prefix="wm/", opt_idx=1) == "wm/opt1/lr/pg1"
    for name in schema.METRIC_NAMES:
        for opt in (0, 1, 12):
            assert split_key(key(name, "p/", opt), "p/") == (opt, name)
    assert split_key("train/loss") is None


def test_old_import_paths_still_work() -> None:
    for name in ("Alert", "AlertKind", "INSTABILITY_KINDS", "ALERTS_FILENAME", "read_alerts"):
        assert getattr(alerts_module, name) is getattr(schema, name)
    assert ALERTS_FILENAME == "warmup_alerts.jsonl"


def test_new_kinds() -> None:
    assert AlertKind("episode_end") is AlertKind.EPISODE_END
    instability = {k.value for k in schema.INSTABILITY_KINDS}
    assert "loss_divergence" in instability
    # Notices (issue 20): shown, never instability.
    notices = {k.value for k in schema.NOTICE_KINDS}
    assert notices == {"grad_norm_spike", "grad_norm_rise"} and not notices & instability
    assert not {"episode_end", "lr_backoff", "rollback", "transient"} & instability
    assert {AlertKind.LR_BACKOFF, AlertKind.ROLLBACK, AlertKind.EPISODE_END} <= schema.ACTION_KINDS


def test_round_trip_with_episode_and_non_finite(tmp_path: Path) -> None:
    path = tmp_path / ALERTS_FILENAME
    writer = JsonlWriter(path)
    written = [
        Alert(3, AlertKind.LOSS_SPIKE, "big", 50.0, 10.0, {"initial_loss": 2.0}, episode=0),
        Alert(
            9,
            AlertKind.EPISODE_END,
            "episode 0 ended",
            details={"episode": 0, "start": 3, "end": 8, "steps": [[3, 5], [8, 8]]},
            episode=0,
        ),
        Alert(11, AlertKind.NON_FINITE, "nan", math.nan, math.inf, {"x": math.nan}),
    ]
    for a in written:
        writer.write(a)
    writer.close()
    lines = path.read_text().splitlines()
    for line in lines:  # strict JSON: Python's parser would accept NaN, a browser's would not
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert "episode" not in json.loads(lines[2])
    got = read_alerts_file(path)
    assert got.problems == [] and got.lines == [1, 2, 3]
    assert [(a.step, a.kind, a.episode) for a in got.alerts] == [
        (3, AlertKind.LOSS_SPIKE, 0),
        (9, AlertKind.EPISODE_END, 0),
        (11, AlertKind.NON_FINITE, None),
    ]
    assert got.alerts[1].details["steps"] == [[3, 5], [8, 8]]
    assert math.isnan(got.alerts[2].value) and got.alerts[2].threshold == math.inf
    assert got.alerts[2].details == {"x": "nan"}


def test_unknown_kinds_are_kept_as_strings(tmp_path: Path) -> None:
    path = tmp_path / ALERTS_FILENAME
    path.write_text('{"step": 4, "kind": "from_the_future", "message": "m"}\n')
    (alert,) = read_alerts_file(path).alerts
    assert alert.kind == "from_the_future" and not isinstance(alert.kind, AlertKind)
    assert alert.to_dict()["kind"] == "from_the_future"
    assert not schema.is_instability(alert.kind)


# Defect 1 of issue 16: each of these lines made the report crash (OverflowError, RecursionError)
# or silently change a step (7.9 became 7; 1e23 stretched the picture).
BAD_LINES = [
    ('{"step": Infinity, "kind": "loss_spike"}', "'step' is not finite"),
    ('{"step": 1e400, "kind": "loss_spike"}', "'step' is not finite"),
    ('{"step": NaN, "kind": "loss_spike"}', "'step' is not finite"),
    ('{"step": 1e23, "kind": "loss_spike"}', "beyond 2**53"),
    (f'{{"step": {2**53 + 1}, "kind": "loss_spike"}}', "beyond 2**53"),
    ('{"step": 7.9, "kind": "loss_spike"}', "7.9 is not a whole number"),
    ('{"step": -1, "kind": "loss_spike"}', "negative"),
    ('{"step": "3", "kind": "loss_spike"}', "'step' is not a number (str)"),
    ('{"step": true, "kind": "loss_spike"}', "'step' is not a number (bool)"),
    ('{"kind": "loss_spike"}', "no 'step' field"),
    ('{"step": 1}', "no 'kind' field"),
    ('{"step": 1, "kind": 5}', "'kind' is not a non-empty string"),
    ('{"step": 1, "kind": "x", "details": [1]}', "'details' is not an object"),
    ('{"step": 1, "kind": "x", "value": "big"}', "'value' is not a number"),
    ('{"step": 1, "kind": "x", "episode": 1.5}', "'episode' 1.5 is not a whole number"),
    ("[1, 2]", "not a JSON object (list)"),
    ('"text"', "not a JSON object (str)"),
    ("{not json", "not JSON"),
    ("[" * 100_000, "nested deeper than 64 levels"),
    ('{"step": 1, "kind": "x", "details": ' + '{"a": ' * 70 + "1" + "}" * 71, "nested deeper"),
]


@pytest.mark.parametrize(("line", "why"), BAD_LINES)
def test_each_bad_line_is_skipped_and_named(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / ALERTS_FILENAME
    good = '{"step": 2, "kind": "loss_spike", "message": "ok"}'
    path.write_text(f"{good}\n{line}\n{good}\n")
    got = read_alerts_file(path)
    assert [a.step for a in got.alerts] == [2, 2] and got.lines == [1, 3]
    assert len(got.problems) == 1
    assert got.problems[0].startswith("line 2: ") and got.problems[0].endswith("; skipped")
    assert why in got.problems[0]


def test_whole_floats_and_strings_of_non_finite_values_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / ALERTS_FILENAME
    path.write_text('{"step": 7.0, "kind": "x", "value": "-inf", "threshold": null}\n')
    (a,) = read_alerts_file(path).alerts
    assert a.step == 7 and type(a.step) is int
    assert a.value == -math.inf and math.isnan(a.threshold)


def test_bad_utf8_truncated_last_line_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / ALERTS_FILENAME
    path.write_bytes(b'{"step": 1, "kind": "x"}\n{"step": 2, "kind": "\xff"}\n{"step": 3, "ki')
    got = read_alerts_file(path)
    assert [a.step for a in got.alerts] == [1]
    assert got.problems[0].startswith("line 2: not valid UTF-8")
    assert got.problems[1].startswith("line 3: truncated or not JSON")
    missing = read_alerts_file(tmp_path / "nope.jsonl")
    assert missing.alerts == [] and "could not be read" in missing.problems[0]


# ------------------------------------------------------------------------------ fuzz

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
_records = st.fixed_dictionaries(
    {},
    optional={
        "step": _json_values,
        "kind": st.sampled_from(["loss_spike", "episode_end", "new_kind", ""]) | _json_values,
        "message": _json_values,
        "value": _json_values,
        "threshold": _json_values,
        "details": _json_values,
        "episode": _json_values,
    },
)
_lines = st.lists(
    st.one_of(
        _records.map(lambda d: json.dumps(d).encode()),
        _json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_lines)
def test_fuzz_alerts_reader(tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]) -> None:
    """Random JSON records, JSON values and bytes: no exception; every non-blank line is either
    read or reported by its number."""
    path = tmp_path_factory.mktemp("fuzz") / ALERTS_FILENAME
    path.write_bytes(b"\n".join(lines) + b"\n")
    got = read_alerts_file(path)
    reported = {int(p.split(":")[0].split()[1]) for p in got.problems}
    non_blank = {i for i, line in enumerate(lines, start=1) if line.strip()}
    assert set(got.lines) | reported == non_blank
    assert not set(got.lines) & reported
    for a in got.alerts:
        assert 0 <= a.step <= 2**53 and type(a.step) is int
        assert isinstance(a.kind, str) and a.kind
        json.dumps(a.to_dict(), allow_nan=False, default=str)  # writable again


def test_writer_never_writes_non_strict_json(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "sub", ALERTS_FILENAME)
    writer = JsonlWriter(path)
    writer.write(Alert(0, AlertKind.MONITOR, "m", details={"v": [math.inf, {"w": -math.inf}]}))
    writer.close()
    with open(path, encoding="utf-8") as f:
        (line,) = f.read().splitlines()
    assert json.loads(line)["details"] == {"v": ["inf", {"w": "-inf"}]}

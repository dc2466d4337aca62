"""Short run names for the report's title, legend, captions and table.

Runs given together usually differ in one part of their path (``runs/demo/short/version_0``
and ``runs/demo/rollback/version_0``): the parts every name shares, at the start and at the
end, are said once (:attr:`RunNames.pattern`, ``runs/demo/<run>/version_0``) and each run is
called by what is left (``short``, ``rollback``). Names are never cut.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RunNames", "run_names"]

_SEP = re.compile(r"[/\\]" if os.sep == "\\" else "/")


@dataclass(frozen=True)
class RunNames:
    """Short names of runs given together.

    Attributes:
        short: One short name per run, in the order given (the whole name for a single run).
        pattern: The shared path around the short names, ``<run>`` standing for them
            (``runs/demo/<run>/version_0``); ``""`` when nothing is shared.
    """

    short: list[str]
    pattern: str


def _parts(name: str) -> list[str]:
    return [p for p in _SEP.split(name) if p not in ("", ".")]


def run_names(names: Sequence[str]) -> RunNames:
    """The names without the leading and trailing path parts they all share (see the module
    docstring). A single run keeps its whole name; no short name is ever empty."""
    if len(names) < 2:
        return RunNames(list(names), "")
    parts = [_parts(n) for n in names]
    lead = 0
    while all(len(p) > lead for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    while all(len(p) > lead + trail for p in parts) and len({p[-1 - trail] for p in parts}) == 1:
        trail += 1
    # A name that is the other's prefix, or the same name twice: give parts back until every
    # short name has one.
    while trail and any(len(p) <= lead + trail for p in parts):
        trail -= 1
    while lead and any(len(p) <= lead for p in parts):
        lead -= 1
    short = ["/".join(p[lead : len(p) - trail]) or n for p, n in zip(parts, names, strict=True)]
    if not lead and not trail:
        return RunNames(short, "")
    head = parts[0][:lead]
    tail = parts[0][len(parts[0]) - trail :] if trail else []
    absolute = "/" if names[0].startswith(("/", "\\")) and lead else ""
    return RunNames(short, absolute + "/".join([*head, "<run>", *tail]))

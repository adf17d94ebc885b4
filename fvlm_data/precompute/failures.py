"""Which recorded failures may pass when the same input is tried again (`precompute.py --retry-failed`).

A failure is recorded once and skipped by every rerun, which is right for a file that is broken and
wrong for one that was missing then, met an I/O error or whose decoder was killed (out of memory).
The summary names the latter kind, so that the user knows a retry is worth it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

# A substring of the recorded reason -> the kind of failure it tells (the first that matches).
TRANSIENT = (
    ("No such file or directory", "missing file"),
    ("Permission denied", "no access"),
    ("Input/output error", "I/O error"),
    ("Stale file handle", "I/O error"),
    ("timed out", "I/O error"),
    ("decoder process was killed", "killed decoder"),  # workers.py: KILLED, a SIGKILL (the OOM killer's)
    ("decoder processes keep dying", "killed decoder"),
    ("MemoryError", "out of memory"),
    ("Cannot allocate memory", "out of memory"),
)


def transient_kind(reason: str) -> str | None:
    """What kind of transient failure `reason` tells (e.g. "missing file"), or None for one that a retry
    gives again (a corrupt or too short video, a bad segment)."""
    return next((kind for text, kind in TRANSIENT if text in reason), None)


def transient_kinds(reasons: Iterable[str]) -> collections.Counter:
    """How many of `reasons` look transient, by kind."""
    return collections.Counter(kind for kind in map(transient_kind, reasons) if kind is not None)


def retry_hint(kinds: collections.Counter, earlier: bool) -> str | None:
    """The summary's line on transient failures (of this run, or recorded by earlier runs), or None."""
    n = sum(kinds.values())
    if not n:
        return None
    what = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    whose = "recorded by earlier runs " if earlier else ""
    return (f"  {n} failure{'s' if n != 1 else ''} {whose}look{'s' if n == 1 else ''} transient ({what}): the same "
            "command with --retry-failed tries them again, once the cause is gone")

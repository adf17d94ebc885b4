"""CSV and JSONL manifests: one input per row, every field checked, a wrong one named with its row.

Columns (JSONL keys): ``path`` (required; relative to the manifest's folder), ``caption``,
``video_id``, ``start`` and ``end`` (seconds: the row is that segment of the file) and, in JSONL,
``captions`` (a list of every caption, in order; in CSV a cell holding a JSON list). A CSV saved
with a byte-order mark (Excel's "CSV UTF-8") reads like one without. A row whose text cannot be
stored (a lone surrogate, valid JSON as "\\ud800") is listed with its `problem`: a failure of that
row, named with its line, not of the run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm_data.records import VideoInput
from fvlm_data.sources.captions import all_captions, clean, storable, unstorable
from fvlm_data.video.segments import segment_id

__all__ = ["ManifestRow", "read_manifest", "list_manifest"]


# Segment bounds above this are refused with their row (a default id spells them out: `end: 1e308` would
# make a 309-digit id); 10^7 s is 115 days, far beyond any video.
MAX_SECONDS = 1e7


@dataclass(frozen=True)
class ManifestRow:
    path: str  # as written in the manifest
    video_id: str | None
    caption: str | None  # stripped; None if missing or empty
    captions: tuple[str, ...]  # stripped, empty ones dropped
    start: float | None
    end: float | None
    line: int = 0  # its line in the manifest, for errors that name the row
    problem: str | None = None  # why the row fails without being decoded (text that cannot be stored)


def read_manifest(manifest: Path) -> list[ManifestRow]:
    """The rows of a .csv or .jsonl manifest in file order; ValueError (one line) for a bad row."""
    rows: list[ManifestRow] = []
    if manifest.suffix.lower() == ".csv":
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"manifest {manifest} has no 'path' column")
            for row in reader:
                rows.append(_row({k: (v if v != "" else None) for k, v in row.items() if k is not None},
                                 manifest, reader.line_num, from_csv=True))
    else:
        with open(manifest, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"manifest {manifest} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
                rows.append(_row(row, manifest, n, from_csv=False))
    return rows


def _row(row: dict[str, Any], manifest: Path, line: int, from_csv: bool) -> ManifestRow:
    where = f"manifest {manifest} line {line}"
    path = row.get("path")
    if path is None or path == "":
        raise ValueError(f"{where}: no 'path'")
    if not isinstance(path, str):
        raise ValueError(f"{where}: 'path' must be a string, got {_shown(path)}")
    video_id = row.get("video_id")
    if video_id is not None and (isinstance(video_id, bool) or not isinstance(video_id, (str, int))):
        raise ValueError(f"{where}: 'video_id' must be a string, got {_shown(video_id)}")
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"{where}: 'caption' must be a string, got {_shown(caption)}")
    captions = row.get("captions")
    if from_csv and isinstance(captions, str):
        try:
            captions = json.loads(captions)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: 'captions' must be a JSON list of strings, got {_shown(captions)}") from None
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise ValueError(f"{where}: 'captions' must be a list of strings, got {_shown(captions)}")
    texts = {"path": path, "video_id": video_id if isinstance(video_id, str) else None, "caption": caption,
             **{f"captions[{i}]": c for i, c in enumerate(captions or [])}}
    problem = next((f"text that cannot be stored: {where}: {name!r} {why}: fix the row"
                    for name, text in texts.items() if text is not None and (why := unstorable(text))), None)
    if problem:  # the row is recorded as failed: its text as the store can keep it
        path, caption, problem = storable(path), caption and storable(caption), storable(problem)
        video_id = storable(video_id) if isinstance(video_id, str) else video_id
        captions = [storable(c) for c in captions or []]
    return ManifestRow(path=path, video_id=None if video_id in (None, "") else str(video_id),
                       caption=clean(caption) if caption is not None else None,
                       captions=tuple(c for c in map(clean, captions or []) if c is not None),
                       start=_seconds(row.get("start"), "start", where), end=_seconds(row.get("end"), "end", where),
                       line=line, problem=problem)


def _seconds(value: Any, name: str, where: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value)  # a CSV cell is a string; JSON gives a number (a numeric string is fine)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: '{name}' must be a number of seconds, got {_shown(value)}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{where}: '{name}' must be a finite number of seconds, got {_shown(value)}")
    if abs(seconds) > MAX_SECONDS:
        raise ValueError(f"{where}: '{name}' must be between -{MAX_SECONDS:.0e} and {MAX_SECONDS:.0e} seconds, "
                         f"got {_shown(value)}")
    return seconds


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def list_manifest(manifest: Path) -> list[VideoInput]:
    """A manifest's rows in the user's order. Every row of one file has that file's id (its path
    relative to the manifest, without suffix) as its file_id, whatever the rows' video ids, so the
    split keeps every row of a file on one side. A segment row's video_id defaults to
    `<name>#<start>-<end>`, `<name>` being the video_id of the file's last whole-file row if the
    manifest has one, else the file id. A video_id given twice (or two segments whose default ids,
    rounded to the millisecond, agree) is refused naming both lines."""
    base = manifest.parent
    rows = read_manifest(manifest)
    paths = [Path(row.path) if Path(row.path).is_absolute() else base / row.path for row in rows]
    file_ids = [Path(os.path.relpath(path, base)).with_suffix("").as_posix() for path in paths]
    whole_file_ids = {str(path): row.video_id or default
                      for row, path, default in zip(rows, paths, file_ids, strict=True)
                      if row.start is None and row.end is None}
    items: list[VideoInput] = []
    first_row: dict[str, ManifestRow] = {}  # video_id -> the row that gave it first
    for row, path, file_id in zip(rows, paths, file_ids, strict=True):
        caption, captions = all_captions(row.caption, row.captions)
        # The file as the list names it (relative to the manifest, or absolute as written): what the input
        # fingerprint records, so the same list read from another folder or by another path is the same list.
        common = dict(source=str(path), caption=caption, captions=captions, path=str(path), file_id=file_id,
                      relpath=posixpath.normpath(Path(row.path).as_posix()), problem=row.problem)
        if row.start is None and row.end is None:
            item = VideoInput(video_id=row.video_id or file_id, **common)
        else:
            name = whole_file_ids.get(str(path), file_id)
            item = VideoInput(video_id=row.video_id or segment_id(name, row.start, row.end), start=row.start,
                              end=row.end, **common)
        if item.video_id in first_row:
            other = first_row[item.video_id]
            rounded = " (default segment ids are rounded to the millisecond)" if row.video_id is None else ""
            raise ValueError(f"manifest {manifest} line {row.line}: video_id {item.video_id!r} is also line "
                             f"{other.line}'s{rounded}: give each row its own video_id")
        first_row[item.video_id] = row
        items.append(item)
    return items

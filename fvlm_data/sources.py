"""Video sources: a folder or manifest of files, webdataset tar shards, or the synthetic source.

``list_inputs`` only lists (cheap, deterministic order); ``load_frames`` decodes one input and
turns every problem with it into an ``InputError``, so the pipeline can skip it and record why.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvlm_data.synthetic import DURATION_S, get_task, render_synthetic, source_tag, synthetic_caption
from fvlm_data.video import SEEK_MODES, InputError, VideoFile, sample_timestamps

__all__ = ["VideoInput", "InputError", "DecodedVideo", "Decoding", "list_inputs", "load_frames", "expand_braces"]

CAPTION_EXTS = (".txt", ".json")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")  # webdataset members, in order of preference


@dataclass(frozen=True)
class VideoInput:
    """One input to decode; small and picklable (it is sent to decode worker processes)."""

    video_id: str
    source: str
    caption: str | None
    path: str | None = None  # video file, or the tar file for webdataset inputs
    member: str | None = None  # member name of the video inside the tar
    synthetic: tuple | None = None  # (task, seed, index)


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, S, S, 3] RGB
    timestamps: np.ndarray  # float64 [T], seconds of each sampled frame within the video
    duration: float  # seconds


@dataclass(frozen=True)
class Decoding:
    """How each input becomes frames (see `load_frames`): the decode workers' part of a precompute's
    configuration, sent to them as this one small record."""

    num_frames: int
    image_size: int
    min_duration: float
    max_duration: float | None
    seek: str


def list_inputs(
    videos: str | None = None,
    webdataset: str | None = None,
    synthetic: int | None = None,
    synthetic_task: str = "shapes",
    seed: int = 0,
) -> list[VideoInput]:
    """List the inputs of exactly one source, in a deterministic order."""
    given = [name for name, v in (("videos", videos), ("webdataset", webdataset), ("synthetic", synthetic))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of videos, webdataset or synthetic (got {', '.join(given) or 'none'})")
    if videos is not None:
        path = Path(videos)
        if path.is_dir():
            items = _list_folder(path)
        elif path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
            items = _list_manifest(path)
        elif path.exists():
            raise ValueError(f"videos must be a folder or a .csv/.jsonl manifest: {videos}")
        else:
            raise ValueError(f"videos folder or manifest not found: {videos}")
    elif webdataset is not None:
        items = _list_webdataset(webdataset)
    else:
        if synthetic < 0:
            raise ValueError(f"synthetic must be >= 0, got {synthetic}")
        get_task(synthetic_task)  # unknown task: ValueError now, not in a worker
        items = [
            VideoInput(
                video_id=f"synthetic-{synthetic_task}-{seed}-{i:06d}",
                source=source_tag(synthetic_task, i),
                caption=synthetic_caption(synthetic_task, seed, i),
                synthetic=(synthetic_task, seed, i),
            )
            for i in range(synthetic)
        ]
    _check_unique(items)
    return items


def load_frames(
    item: VideoInput, num_frames: int, image_size: int, min_duration: float = 0.0,
    max_duration: float | None = None, seek: str = "exact",
) -> DecodedVideo:
    """Decode ``num_frames`` frames spread over the whole video, each ``image_size`` square.

    ``seek="exact"`` takes the frame nearest to each uniform target; ``"keyframe"`` the nearest
    keyframe (decodes keyframes only: faster, frames up to half a keyframe interval off target;
    ``timestamps`` are the frames' actual times either way). Synthetic videos are rendered at
    the targets in both modes. Raises ``InputError`` for any bad input. The duration filter
    applies to real videos only (synthetic clips have a fixed nominal length of ``DURATION_S``).
    """
    if seek not in SEEK_MODES:
        raise ValueError(f"seek must be one of {SEEK_MODES}, got {seek!r}")
    if item.synthetic is not None:
        task, seed, index = item.synthetic
        frames, timestamps, _ = render_synthetic(task, seed, index, num_frames, image_size)
        return DecodedVideo(frames=frames, timestamps=timestamps, duration=DURATION_S)
    if item.path is None:
        raise InputError("no video path")
    src = _read_member(item.path, item.member) if item.member is not None else item.path
    # Open and check the cheap things (container, duration, caption) before decoding any frame.
    with VideoFile(src) as video:
        duration = video.duration
        if duration < min_duration:
            raise InputError(f"too short: {duration:.1f} s < {min_duration:g} s")
        if max_duration is not None and duration > max_duration:
            raise InputError(f"too long: {duration:.1f} s > {max_duration:g} s")
        if item.caption is None:
            raise InputError("no caption")
        targets = sample_timestamps(duration, num_frames)
        if seek == "keyframe":
            frames, timestamps = video.keyframes_at(targets, image_size)
        else:
            frames, timestamps = video.frames_at(targets, image_size)
    return DecodedVideo(frames=frames, timestamps=timestamps, duration=duration)


# --- folders and manifests -------------------------------------------------------------------


def _list_folder(root: Path) -> list[VideoInput]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip hidden folders
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() in CAPTION_EXTS or not path.is_file():
                continue  # hidden files, caption sidecars (and other .txt/.json metadata)
            items.append(
                VideoInput(
                    video_id=path.relative_to(root).with_suffix("").as_posix(),
                    source=str(path),
                    caption=_sidecar_caption(path),
                    path=str(path),
                )
            )
    return sorted(items, key=lambda it: it.path)


def _sidecar_caption(path: Path) -> str | None:
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        return _clean(txt.read_text(encoding="utf-8", errors="replace"))
    if js.is_file():
        try:
            return _json_caption(js.read_bytes())
        except ValueError:
            return None  # an unreadable sidecar makes the video caption-less, not the listing fail
    return None


def _list_manifest(manifest: Path) -> list[VideoInput]:
    base = manifest.parent
    rows: list[dict] = []
    if manifest.suffix.lower() == ".csv":
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"manifest {manifest} has no 'path' column")
            rows = list(reader)
    else:
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"manifest {manifest} line {n}: invalid JSON ({e.msg})") from None
                    if not isinstance(row, dict) or not row.get("path"):
                        raise ValueError(f"manifest {manifest} line {n}: no 'path'")
                    rows.append(row)
    items = []
    for row in rows:
        if not row.get("path"):
            raise ValueError(f"manifest {manifest}: a row has an empty 'path'")
        rel = Path(row["path"])
        path = rel if rel.is_absolute() else base / rel
        video_id = row.get("video_id") or Path(os.path.relpath(path, base)).with_suffix("").as_posix()
        caption = row.get("caption")
        items.append(
            VideoInput(video_id=str(video_id), source=str(path),
                       caption=_clean(caption) if isinstance(caption, str) else None, path=str(path))
        )
    return items  # manifest order is the user's order


# --- webdataset ------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` numeric ranges (zero padding kept) and ``{x,y}`` lists, like bash."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.groups()
        width = max(len(a), len(b)) if (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0") else 0
        step = 1 if int(b) >= int(a) else -1
        parts = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        parts = ["{" + body + "}"]  # not a brace expression: keep literally
        return [head + parts[0] + t for t in expand_braces(tail)]
    return [e for p in parts for e in expand_braces(head + p + tail)]


def _list_webdataset(pattern: str) -> list[VideoInput]:
    if os.path.isdir(pattern):
        shards = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not shards:
            raise ValueError(f"no .tar shards in {pattern}")
    else:
        shards = expand_braces(pattern)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ValueError(f"webdataset shard not found: {missing[0]} ({len(missing)} of {len(shards)} missing)")
    items = []
    for shard in shards:
        samples: dict[str, dict[str, str | None]] = {}  # key -> video member and caption
        try:
            # Reads the headers, seeking over the video bytes; only caption members are read.
            with tarfile.open(shard, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_key(info.name)
                    sample = samples.setdefault(key, {"video": None, "caption": None, "json": None})
                    current = sample["video"]
                    if ext in VIDEO_EXTS and (current is None or _pref(ext) < _pref(_split_key(current)[1])):
                        sample["video"] = info.name
                    elif ext == ".txt":
                        sample["caption"] = _clean(tar.extractfile(info).read().decode("utf-8", "replace"))
                    elif ext == ".json":
                        with contextlib.suppress(ValueError):  # bad metadata: just no caption
                            sample["json"] = _json_caption(tar.extractfile(info).read())
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"cannot read webdataset shard {shard}: {e}") from None
        stem = Path(shard).name.removesuffix(".tar")
        for key, s in samples.items():
            if s["video"] is None:
                continue  # e.g. a failed download: metadata only, nothing to decode
            items.append(
                VideoInput(video_id=f"{stem}/{key}", source=f"{shard}:{key}",
                           caption=s["caption"] if s["caption"] is not None else s["json"],
                           path=shard, member=s["video"])
            )
    return items


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the member path up to the first dot of its basename."""
    folder, _, base = name.removeprefix("./").rpartition("/")
    stem, dot, rest = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ("." + rest.rsplit(".", 1)[-1].lower()) if dot else ""


def _pref(ext: str) -> int:
    return VIDEO_EXTS.index(ext)


@functools.lru_cache(maxsize=16)
def _tar_index(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size); built once per shard per worker process."""
    with tarfile.open(path, mode="r:") as tar:
        return {info.name: (info.offset_data, info.size) for info in tar if info.isfile()}


def _read_member(path: str, member: str) -> bytes:
    try:
        st = os.stat(path)
        offset, size = _tar_index(path, st.st_mtime_ns, st.st_size)[member]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except KeyError:
        raise InputError(f"missing member {member} in {path}") from None
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"unreadable tar: {e}") from None
    if len(data) < size:
        raise InputError(f"truncated: tar member {member} has {len(data)} of {size} bytes")
    return data


# --- helpers ---------------------------------------------------------------------------------


def _json_caption(raw: bytes) -> str | None:
    data = json.loads(raw)  # json.JSONDecodeError is a ValueError
    caption = data.get("caption") if isinstance(data, dict) else None
    return _clean(caption) if isinstance(caption, str) else None


def _clean(text: str) -> str | None:
    """Stripped caption; empty means caption-less."""
    text = text.strip()
    return text or None


def _check_unique(items: list[VideoInput]) -> None:
    seen: set[str] = set()
    for it in items:
        if it.video_id in seen:
            raise ValueError(f"duplicate video_id {it.video_id!r} (e.g. clip.mp4 and clip.webm in one folder)")
        seen.add(it.video_id)

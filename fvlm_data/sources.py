"""Video sources: a folder or manifest of files, webdataset tar shards, or the synthetic source.

``list_inputs`` only lists (cheap, deterministic order); ``load_frames`` decodes one input and
turns every problem with it into an ``InputError``, so the pipeline can skip it and record why;
``load_file_frames`` decodes several inputs of one file (segments) with one open and one pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvlm_data.manifest import all_captions, clean, read_manifest
from fvlm_data.segments import decode_spans, segment_id, span_of
from fvlm_data.synthetic import DURATION_S, get_task, render_synthetic, source_tag, synthetic_caption
from fvlm_data.video import SEEK_MODES, InputError, VideoFile

__all__ = ["VideoInput", "InputError", "DecodedVideo", "Decoding", "list_inputs", "load_frames", "load_file_frames",
           "expand_braces"]

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
    captions: tuple[str, ...] = ()  # every caption in order; filled from `caption` if not given
    file_id: str | None = None  # id of the file a segment is cut from (None: a whole file, its video_id)
    start: float | None = None  # a segment [start, end] of the file, seconds (None: from its start / to its end)
    end: float | None = None

    def __post_init__(self) -> None:
        # One fact, two views: `caption` is the first of `captions`.
        if not self.captions and self.caption is not None:
            object.__setattr__(self, "captions", (self.caption,))
        elif self.captions and self.caption is None:
            object.__setattr__(self, "caption", self.captions[0])
        elif self.captions and self.caption != self.captions[0]:
            raise ValueError(f"{self.video_id}: caption {self.caption!r} is not the first of captions")


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, S, S, 3] RGB
    timestamps: np.ndarray  # float64 [T], seconds of each sampled frame within the video file
    duration: float  # seconds: of the whole video, or of the segment


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
    """Decode ``num_frames`` frames spread over the whole video (or its segment), each ``image_size`` square.

    ``seek="exact"`` takes the frame nearest to each uniform target; ``"keyframe"`` the nearest
    keyframe (decodes keyframes only: faster, frames up to half a keyframe interval off target;
    ``timestamps`` are the frames' actual times either way). Synthetic videos are rendered at
    the targets in both modes. Raises ``InputError`` for any bad input. The duration filter
    applies to real videos only (synthetic clips have a fixed nominal length of ``DURATION_S``).
    """
    result = load_file_frames([item], Decoding(num_frames, image_size, min_duration, max_duration, seek))[0]
    if isinstance(result, InputError):
        raise result
    return result


def load_file_frames(items: list[VideoInput], decoding: Decoding) -> list[DecodedVideo | InputError]:
    """Decode inputs of one file (e.g. its segments) with one open and one pass over the file.

    Each result is the input's frames or the ``InputError`` saying why it is skipped; a problem of
    the file itself is every input's. If the one pass fails (a file cut short, say), each input is
    decoded alone, so the segments before the damage are kept."""
    if decoding.seek not in SEEK_MODES:
        raise ValueError(f"seek must be one of {SEEK_MODES}, got {decoding.seek!r}")
    if any(item.synthetic is not None for item in items):
        return [_render(item, decoding) for item in items]
    if items[0].path is None:
        return [InputError("no video path")] * len(items)
    first = items[0]
    results: list[DecodedVideo | InputError | None] = [None] * len(items)  # None: the file's own problem
    spans: dict[int, tuple[float, float]] = {}  # input -> its checked span of the file
    try:
        src = _read_member(first.path, first.member) if first.member is not None else first.path
        # Open and check the cheap things (container, span, duration, caption) before decoding any frame.
        with VideoFile(src) as video:
            for k, item in enumerate(items):
                try:
                    span = span_of(item, video.duration, decoding)
                    if item.caption is None:
                        raise InputError("no caption")
                    spans[k] = span
                except InputError as e:
                    results[k] = e
            if spans:
                decoded = decode_spans(video, list(spans.values()), decoding.num_frames, decoding.image_size,
                                       decoding.seek)
                for k, (frames, timestamps) in zip(spans, decoded, strict=True):
                    lo, hi = spans[k]
                    results[k] = DecodedVideo(frames=frames, timestamps=timestamps, duration=hi - lo)
    except InputError as e:
        if len(spans) > 1:  # decode each alone (their own errors come back the same)
            return [load_file_frames([item], decoding)[0] for item in items]
        return [e if r is None or k in spans else r for k, r in enumerate(results)]
    return results


def _render(item: VideoInput, decoding: Decoding) -> DecodedVideo:
    task, seed, index = item.synthetic
    frames, timestamps, _ = render_synthetic(task, seed, index, decoding.num_frames, decoding.image_size)
    return DecodedVideo(frames=frames, timestamps=timestamps, duration=DURATION_S)


# --- folders and manifests -------------------------------------------------------------------


def _list_folder(root: Path) -> list[VideoInput]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip hidden folders
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() in CAPTION_EXTS or not path.is_file():
                continue  # hidden files, caption sidecars (and other .txt/.json metadata)
            caption, captions = _sidecar_captions(path)
            items.append(VideoInput(video_id=path.relative_to(root).with_suffix("").as_posix(), source=str(path),
                                    caption=caption, captions=captions, path=str(path)))
    return sorted(items, key=lambda it: it.path)


def _sidecar_captions(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """(caption, captions) from <stem>.txt (one caption: the whole text) or <stem>.json."""
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        return all_captions(clean(txt.read_text(encoding="utf-8", errors="replace")), ())
    if js.is_file():
        try:
            return _json_captions(js.read_bytes())
        except ValueError:
            pass  # an unreadable sidecar makes the video caption-less, not the listing fail
    return None, ()


def _list_manifest(manifest: Path) -> list[VideoInput]:
    """A manifest's rows in the user's order. A segment row's video_id defaults to `<file id>#<start>-<end>`;
    its file_id is the video_id of its file's whole-file row if the manifest has one, else the file id
    (the path relative to the manifest, without suffix), so the split keeps every row of a file together."""
    base = manifest.parent
    rows = read_manifest(manifest)
    paths = [Path(row.path) if Path(row.path).is_absolute() else base / row.path for row in rows]
    default_ids = [Path(os.path.relpath(path, base)).with_suffix("").as_posix() for path in paths]
    whole_file_ids = {str(path): row.video_id or default
                      for row, path, default in zip(rows, paths, default_ids, strict=True)
                      if row.start is None and row.end is None}
    items = []
    for row, path, default in zip(rows, paths, default_ids, strict=True):
        caption, captions = all_captions(row.caption, row.captions)
        common = dict(source=str(path), caption=caption, captions=captions, path=str(path))
        if row.start is None and row.end is None:
            items.append(VideoInput(video_id=row.video_id or default, **common))
        else:
            file_id = whole_file_ids.get(str(path), default)
            items.append(VideoInput(video_id=row.video_id or segment_id(file_id, row.start, row.end),
                                    file_id=file_id, start=row.start, end=row.end, **common))
    return items


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
                    sample = samples.setdefault(key, {"video": None, "caption": None, "json": (None, ())})
                    current = sample["video"]
                    if ext in VIDEO_EXTS and (current is None or _pref(ext) < _pref(_split_key(current)[1])):
                        sample["video"] = info.name
                    elif ext == ".txt":
                        sample["caption"] = clean(tar.extractfile(info).read().decode("utf-8", "replace"))
                    elif ext == ".json":
                        with contextlib.suppress(ValueError):  # bad metadata: just no caption
                            sample["json"] = _json_captions(tar.extractfile(info).read())
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"cannot read webdataset shard {shard}: {e}") from None
        stem = Path(shard).name.removesuffix(".tar")
        for key, s in samples.items():
            if s["video"] is None:
                continue  # e.g. a failed download: metadata only, nothing to decode
            caption, captions = all_captions(s["caption"], ()) if s["caption"] is not None else s["json"]
            items.append(VideoInput(video_id=f"{stem}/{key}", source=f"{shard}:{key}", caption=caption,
                                    captions=captions, path=shard, member=s["video"]))
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


def _json_captions(raw: bytes) -> tuple[str | None, tuple[str, ...]]:
    """(caption, captions) of a JSON sidecar's `caption` and `captions` (a list); wrong types are ignored."""
    data = json.loads(raw)  # json.JSONDecodeError is a ValueError
    data = data if isinstance(data, dict) else {}
    caption, captions = data.get("caption"), data.get("captions")
    captions = [c for c in map(clean, captions) if c] if isinstance(captions, list) and all(
        isinstance(c, str) for c in captions) else []
    return all_captions(clean(caption) if isinstance(caption, str) else None, captions)


def _check_unique(items: list[VideoInput]) -> None:
    seen: set[str] = set()
    for it in items:
        if it.video_id in seen:
            raise ValueError(f"duplicate video_id {it.video_id!r} (e.g. clip.mp4 and clip.webm in one folder)")
        seen.add(it.video_id)

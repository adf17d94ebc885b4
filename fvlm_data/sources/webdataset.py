"""`--webdataset PATTERN`: tar shards as video2dataset writes them (<key>.mp4 + <key>.txt/.json).
Listing reads the headers only; a worker reads an input's member by its offset, no tar scan per video."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from fvlm_data.errors import InputError
from fvlm_data.records import DecodedVideo, Decoding, Source, VideoInput
from fvlm_data.sources.captions import all_captions, clean, json_captions
from fvlm_data.video.segments import decode_file

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")  # webdataset members, in order of preference


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


def list_inputs(pattern: str, options: dict[str, Any]) -> list[VideoInput]:
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
                            sample["json"] = json_captions(tar.extractfile(info).read())
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"cannot read webdataset shard {shard}: {e}") from None
        stem = Path(shard).name.removesuffix(".tar")
        for key, s in samples.items():
            if s["video"] is None:
                continue  # e.g. a failed download: metadata only, nothing to decode
            caption, captions = all_captions(s["caption"], ()) if s["caption"] is not None else s["json"]
            items.append(VideoInput(video_id=f"{stem}/{key}", source=f"{shard}:{key}", caption=caption,
                                    captions=captions, kind="webdataset", path=shard,
                                    locator=(s["video"],), relpath=Path(shard).name))
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


def _read(item: VideoInput) -> bytes:
    return _read_member(item.path, item.locator[0])


def decode(items: list[VideoInput], decoding: Decoding) -> list[DecodedVideo | InputError]:
    return decode_file(items, decoding, read=_read)


SOURCE = Source(option="webdataset", kind="webdataset", list_inputs=list_inputs, decode=decode)

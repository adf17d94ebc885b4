"""`--videos DIR_OR_MANIFEST`: a folder of video files (captions in <stem>.txt or <stem>.json), or a
CSV/JSONL manifest (`fvlm_data.sources.manifest`). Inputs are files, decoded from their path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fvlm_data.errors import InputError
from fvlm_data.records import DecodedVideo, Decoding, Source, VideoInput
from fvlm_data.sources.captions import all_captions, clean, json_captions
from fvlm_data.sources.manifest import list_manifest
from fvlm_data.video.segments import decode_file

CAPTION_EXTS = (".txt", ".json")


def list_inputs(videos: str, options: dict[str, Any]) -> list[VideoInput]:
    """A folder's video files (sorted by path), or a manifest's rows in its order."""
    path = Path(videos)
    if path.is_dir():
        return _list_folder(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return list_manifest(path)
    if path.exists():
        raise ValueError(f"videos must be a folder or a .csv/.jsonl manifest: {videos}")
    raise ValueError(f"videos folder or manifest not found: {videos}")


def _list_folder(root: Path) -> list[VideoInput]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip hidden folders
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() in CAPTION_EXTS or not path.is_file():
                continue  # hidden files, caption sidecars (and other .txt/.json metadata)
            caption, captions = _sidecar_captions(path)
            relpath = path.relative_to(root).as_posix()
            items.append(VideoInput(video_id=Path(relpath).with_suffix("").as_posix(), source=str(path),
                                    caption=caption, captions=captions, path=str(path), relpath=relpath))
    return sorted(items, key=lambda it: it.path)


def _sidecar_captions(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """(caption, captions) from <stem>.txt (one caption: the whole text) or <stem>.json."""
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.is_file():
        return all_captions(clean(txt.read_text(encoding="utf-8", errors="replace")), ())
    if js.is_file():
        try:
            return json_captions(js.read_bytes())
        except ValueError:
            pass  # an unreadable sidecar makes the video caption-less, not the listing fail
    return None, ()


def decode(items: list[VideoInput], decoding: Decoding) -> list[DecodedVideo | InputError]:
    return decode_file(items, decoding)


SOURCE = Source(option="videos", kind="file", list_inputs=list_inputs, decode=decode)

"""Video sources: what precompute's `--videos`, `--webdataset` and `--synthetic` list and decode.

One module per kind of input, each with its `SOURCE` (`fvlm_data.records.Source`): `folder` (a folder
of files or a CSV/JSONL manifest, `manifest`), `webdataset` (tar shards), `synthetic` (rendered, no
files). A new kind is one module and its precompute option, registered in `SOURCES`.

``list_inputs`` only lists (cheap, deterministic order); ``load_file_frames`` decodes inputs of one
file (one input, or a file's segments, with one open and one pass) and turns every problem with an
input into an ``InputError``, so the pipeline can skip it and record why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fvlm_data.errors import InputError
from fvlm_data.records import DecodedVideo, Decoding, Source, VideoInput
from fvlm_data.sources import folder, synthetic, webdataset
from fvlm_data.sources.captions import storable, unstorable
from fvlm_data.video.decode import SEEK_MODES

__all__ = ["SOURCES", "list_inputs", "load_frames", "load_file_frames"]

SOURCES: tuple[Source, ...] = (folder.SOURCE, webdataset.SOURCE, synthetic.SOURCE)
_BY_KIND = {source.kind: source for source in SOURCES}


def list_inputs(**given: Any) -> list[VideoInput]:
    """List the inputs of exactly one source, in a deterministic order: one of `videos=`,
    `webdataset=`, `synthetic=` (a source's option) not None; the rest are options of the sources
    (`synthetic_task`, `seed`)."""
    options = {source.option: given.pop(source.option, None) for source in SOURCES}
    chosen = [source for source in SOURCES if options[source.option] is not None]
    if len(chosen) != 1:
        *others, last = [source.option for source in SOURCES]
        got = ", ".join(source.option for source in chosen) or "none"
        raise ValueError(f"give exactly one of {', '.join(others)} or {last} (got {got})")
    items = [_storable(item) for item in chosen[0].list_inputs(options[chosen[0].option], given)]
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
    known = {k: InputError(item.problem) for k, item in enumerate(items) if item.problem}
    rest = [item for k, item in enumerate(items) if k not in known]
    decoded = iter(_BY_KIND[rest[0].kind].decode(rest, decoding) if rest else ())
    return [known[k] if k in known else next(decoded) for k in range(len(items))]


def _storable(item: VideoInput) -> VideoInput:
    """An input whose text the store cannot keep (a file name of undecodable bytes, a sidecar caption with
    a lone surrogate) fails as its row, with its text escaped; a manifest row says so with its line."""
    texts = {"video_id": item.video_id, "source": item.source,
             **{f"captions[{i}]" if i else "caption": c for i, c in enumerate(item.captions)}}
    problem = next((f"{name} {why}" for name, text in texts.items() if (why := unstorable(text))), None)
    if item.problem or not problem:
        return item
    captions = tuple(storable(c) for c in item.captions)
    return dataclasses.replace(item, video_id=storable(item.video_id), source=storable(item.source),
                               caption=captions[0] if captions else None, captions=captions,
                               problem=f"text that cannot be stored: {storable(item.source)}: {problem}")


def _check_unique(items: list[VideoInput]) -> None:
    seen: set[str] = set()
    for it in items:
        if it.video_id in seen:
            raise ValueError(f"duplicate video_id {it.video_id!r} (e.g. clip.mp4 and clip.webm in one folder)")
        seen.add(it.video_id)

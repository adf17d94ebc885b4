"""What the video sources, the decoders and the decode workers hand each other: small, picklable
records (inputs go to worker processes, decoded frames come back). This module imports nothing of
fvlm, so no layer needs another to name them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class VideoInput:
    """One input to decode; small and picklable (it is sent to decode worker processes)."""

    video_id: str
    source: str  # where it came from, as the store records it
    caption: str | None
    kind: str = "file"  # the source that decodes it (`fvlm_data.sources.SOURCES`): file, webdataset, synthetic
    path: str | None = None  # the file to open (a webdataset input: its tar)
    locator: tuple = ()  # what its source needs besides the path: a tar member, a synthetic (task, seed, index)
    captions: tuple[str, ...] = ()  # every caption in order; filled from `caption` if not given
    file_id: str | None = None  # id of the file the row is cut from, shared by all its rows (None: its video_id)
    start: float | None = None  # a segment [start, end] of the file, seconds (None: from its start / to its end)
    end: float | None = None
    # The file as its input list names it: relative to the manifest (or absolute, as written) or to the video
    # folder; a tar's file name. The input fingerprint records this, not `source`, so a list read by another
    # path, or a moved video folder, is the same list.
    relpath: str | None = None
    problem: str | None = None  # why it fails before any decoding (a row whose text cannot be stored)

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
    """How each input becomes frames: the decode workers' part of a precompute's configuration,
    sent to them as this one small record."""

    num_frames: int
    image_size: int
    min_duration: float
    max_duration: float | None
    seek: str


@dataclass(frozen=True)
class Source:
    """A kind of video input: one module of `fvlm_data.sources` each (folder and manifest, webdataset,
    synthetic). `list_inputs(value, options)` lists the inputs of precompute's `--<option> value`
    (`options`: the other precompute options, e.g. the synthetic seed) in a deterministic order;
    `decode(items, decoding)` decodes inputs of this kind that share a file (one item, or a file's
    segments), each to its frames or the InputError that says why it is skipped."""

    option: str  # the precompute option that selects it (--videos, --webdataset, --synthetic)
    kind: str  # VideoInput.kind of its inputs
    list_inputs: Callable[[Any, dict[str, Any]], list[VideoInput]]
    decode: Callable[[list[VideoInput], Decoding], list[Any]]  # DecodedVideo or InputError each

"""Segments of one video file: where each input's frames are sampled, and all of them decoded together.

A manifest row may name a segment ``[start, end]`` (seconds) of a file; a row without one stands
for the whole file. Each input's T frames are sampled with the whole-video rule over its span
(`sample_timestamps`, shifted by ``start``), so timestamps stay seconds in the file. The inputs of
one file are decoded with one open and one pass: every span's targets sorted together, one
``frames_at`` (or ``keyframes_at``) call, the frames split back per input.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from fvlm_data.errors import InputError
from fvlm_data.records import DecodedVideo, Decoding, VideoInput
from fvlm_data.video.decode import VideoFile, sample_timestamps

__all__ = ["SEGMENT_SLACK_S", "file_key", "segment_id", "span_of", "decode_spans", "decode_file"]

# Annotations often end a little past the file (rounded times, a container's duration that is a
# frame short): an end this close to the file's end is clipped to it; one further out is a failure.
SEGMENT_SLACK_S = 0.25


def _seconds(x: float) -> str:
    """Millisecond precision, no trailing zeros: 12.5 -> '12.5', 30.0 -> '30'."""
    return f"{x:.3f}".rstrip("0").rstrip(".")


def segment_id(file_id: str, start: float | None, end: float | None) -> str:
    """The default video_id of a segment row: ``<file id>#<start>-<end>`` (stable, unique per span)."""
    return f"{file_id}#{_seconds(start or 0.0)}-{'end' if end is None else _seconds(end)}"


def file_key(item: VideoInput) -> Hashable | None:
    """What inputs decoded together share (the file, or the tar member); None for inputs of no file
    (synthetic ones)."""
    if item.path is None:
        return None
    return (item.kind, item.path, item.locator)


def span_of(item: VideoInput, duration: float, decoding: Decoding) -> tuple[float, float]:
    """The ``[lo, hi]`` seconds of the file that ``item`` covers, checked against the file's duration
    and the duration filter (which applies to the span); InputError says why an input is refused."""
    lo, hi = 0.0, duration
    if item.start is not None or item.end is not None:
        lo = 0.0 if item.start is None else item.start
        hi = duration if item.end is None else item.end
        if hi <= lo:
            raise InputError(f"bad segment: end {_seconds(hi)} s <= start {_seconds(lo)} s")
        if lo < 0 or lo >= duration or hi > duration + SEGMENT_SLACK_S:
            raise InputError(f"segment outside the file: {_seconds(lo)}-{_seconds(hi)} s of a {duration:.1f} s video")
        hi = min(hi, duration)
    length = hi - lo
    if length < decoding.min_duration:
        raise InputError(f"too short: {length:.1f} s < {decoding.min_duration:g} s")
    if decoding.max_duration is not None and length > decoding.max_duration:
        raise InputError(f"too long: {length:.1f} s > {decoding.max_duration:g} s")
    return lo, hi


def decode_spans(video: VideoFile, spans: list[tuple[float, float]], num_frames: int, image_size: int,
                 seek: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frames uint8 [T, S, S, 3], timestamps float64 [T]) of each span, in one pass over ``video``.

    Targets of overlapping spans interleave; sorting them all lets ``frames_at`` walk the file once
    (seeking forward only), and a target's frame is the same as when its span is decoded alone."""
    decode = video.keyframes_at if seek == "keyframe" else video.frames_at
    if len(spans) == 1:  # a whole video or a lone segment: exactly the whole-video path
        lo, hi = spans[0]
        return [decode(lo + sample_timestamps(hi - lo, num_frames), image_size)]
    targets = np.concatenate([lo + sample_timestamps(hi - lo, num_frames) for lo, hi in spans])
    order = np.argsort(targets, kind="stable")
    frames, times = decode(targets[order], image_size)
    unsorted_frames, unsorted_times = np.empty_like(frames), np.empty_like(times)
    unsorted_frames[order], unsorted_times[order] = frames, times
    parts = [slice(k * num_frames, (k + 1) * num_frames) for k in range(len(spans))]
    return [(unsorted_frames[part], unsorted_times[part]) for part in parts]


def decode_file(items: list[VideoInput], decoding: Decoding,
                read: Callable[[VideoInput], bytes] | None = None) -> list[DecodedVideo | InputError]:
    """Decode inputs of one file (e.g. its segments) with one open and one pass over the file: its
    `path`, or the bytes `read(item)` returns (a tar member).

    Each result is the input's frames or the ``InputError`` saying why it is skipped; a problem of
    the file itself is every input's. If the one pass fails (a file cut short, say), each input is
    decoded alone, so the segments before the damage are kept."""
    if items[0].path is None:
        return [InputError("no video path")] * len(items)
    results: list[DecodedVideo | InputError | None] = [None] * len(items)  # None: the file's own problem
    spans: dict[int, tuple[float, float]] = {}  # input -> its checked span of the file
    try:
        src = read(items[0]) if read is not None else items[0].path
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
            return [decode_file([item], decoding, read)[0] for item in items]
        return [e if r is None or k in spans else r for k, r in enumerate(results)]
    return results  # type: ignore[return-value]

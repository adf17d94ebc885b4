"""Exact decoding that decodes only what its targets need, GOP by GOP, with the frames of a full decode.

`frames_at` picks, for each target, the decoded frame nearest to it (ties to the later one). Which
frame that is follows from the packets' timestamps alone, so one demuxing pass (no seeks) can
plan the decode: a GOP that holds no picked frame is not decoded at all; in one that does, only
its packets up to the last picked one (in decoding order) go to the decoder, the non-reference
frames among them skipped (`skip_frame="NONREF"`) unless picked, and the decoder is drained and
reset after it. That gives the frames a full decode gives only where every keyframe is an H.264
IDR picture (nothing after it refers to anything before it) and no frame is shown out of its GOP;
`decode_by_gop` checks both, and every picked frame's timestamp, and returns False (the caller
then decodes as before) for anything else: other codecs, open GOPs, missing timestamps, a decode
or demux error, a picked frame that did not come out.
"""

from __future__ import annotations

from collections.abc import Callable

import av
import numpy as np
from av.codec.context import ThreadType

from fvlm_data.video.probe import FFMPEG_ERRORS

_IDR_SLICE = 5  # H.264 nal_unit_type of an IDR picture's slice


def _nal_types(data: bytes, length_size: int | None) -> list[int]:
    """The NAL unit types in one H.264 packet: length-prefixed (MP4's avcC) or with start codes."""
    types = []
    if length_size is not None:
        i = 0
        while i + length_size < len(data):
            n = int.from_bytes(data[i : i + length_size], "big")
            types.append(data[i + length_size] & 0x1F)
            i += length_size + n
        return types
    i = data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        types.append(data[i + 3] & 0x1F)
        i = data.find(b"\x00\x00\x01", i + 3)
    return types


def _length_size(extradata: bytes | None) -> int | None:
    """Bytes of each NAL's length prefix (avcC extradata), or None for start codes (Annex B)."""
    if extradata and extradata[0] == 1 and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    return None


def _nearest(times: list[float], target: float) -> int:
    """Index of the frame `frames_at` takes for `target`: the one just before it if strictly nearer,
    else the first at/after it (times sorted; past the end, the last)."""
    i = int(np.searchsorted(times, target, side="left"))
    if i == len(times):
        return i - 1
    return i - 1 if i > 0 and target - times[i - 1] < times[i] - target else i


def decode_by_gop(container: av.container.InputContainer, stream: av.VideoStream, start: float,
                  tolerance: float, targets: np.ndarray,
                  take: Callable[[int, av.VideoFrame, float], None]) -> bool:
    """Call `take(k, frame, seconds)` for every target k with the frame a full decode would pick;
    False (some takes possibly made) where this shortcut cannot promise that."""
    ctx = stream.codec_context
    if ctx.name != "h264" or ctx.thread_type & ThreadType.FRAME and ctx.thread_count != 1:
        return False  # frame threads would read skip_frame when they get to a packet, not when it is sent
    tb = stream.time_base
    num, den = tb.numerator, tb.denominator
    length_size = _length_size(ctx.extradata)
    gop: list = []  # the current GOP's packets, in decoding order
    seen: set[int] = set()
    latest = -np.inf  # the latest frame time so far
    j = 0  # next target to resolve
    carried: list[int] = []  # targets whose frame is the next GOP's keyframe

    def seconds(pts: int) -> float:
        return float(pts) * num / den - start  # as `frame.time - start` computes it

    def finish_gop(next_key: float | None) -> bool:
        """The GOP is complete (the next keyframe's time is known, or the stream ended): resolve the
        targets before `next_key`, decode what they pick in this GOP. Earlier targets were resolved
        at earlier GOPs, so only this GOP's frames and the next keyframe are candidates."""
        nonlocal j, carried
        gop_times = sorted(seconds(p.pts) for p in gop)
        wanted: dict[float, list[int]] = {gop_times[0]: carried} if carried else {}
        carried = []
        if next_key is None and len(targets) and targets[-1] - gop_times[-1] > tolerance:
            return False  # cut short: the full decode reports it
        known = gop_times if next_key is None else [*gop_times, next_key]
        while j < len(targets) and (next_key is None or targets[j] < next_key):
            i = _nearest(known, targets[j])
            if i == len(gop_times):
                carried.append(j)
            else:
                wanted.setdefault(gop_times[i], []).append(j)
            j += 1
        return not wanted or _decode_gop(ctx, gop, wanted, seconds, start, take)

    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue  # the demuxer's end-of-stream packet
            if packet.pts is None or packet.pts in seen:
                return False
            seen.add(packet.pts)
            t = seconds(packet.pts)
            if packet.is_keyframe:
                if t <= latest or _IDR_SLICE not in _nal_types(bytes(packet), length_size):
                    return False  # a frame shown after a later keyframe (open GOP), or not an IDR picture
                if gop and not finish_gop(t):
                    return False
                gop = [packet]
            elif not gop or t <= seconds(gop[0].pts):
                return False  # no keyframe first, or a frame shown before its GOP's keyframe
            else:
                gop.append(packet)
            latest = max(latest, t)
        return bool(gop) and finish_gop(None) and j == len(targets)
    except FFMPEG_ERRORS:
        return False
    finally:
        ctx.skip_frame = "DEFAULT"
        ctx.flush_buffers()


def _decode_gop(ctx: av.CodecContext, gop: list, wanted: dict[float, list[int]], seconds: Callable[[int], float],
                start: float, take: Callable[[int, av.VideoFrame, float], None]) -> bool:
    """Decode one GOP's packets up to its last wanted one, skipping unwanted non-reference frames."""
    wanted_pts = {p.pts for p in gop if seconds(p.pts) in wanted}
    time_base = gop[0].time_base
    if len(wanted_pts) != len(wanted):
        return False
    last = max(i for i, p in enumerate(gop) if p.pts in wanted_pts)
    got: set[int] = set()

    def keep(frames: list) -> None:
        for frame in frames:
            if frame.pts in wanted_pts and frame.pts not in got:
                if frame.time_base is None:  # drained frames carry none; a demuxed flush packet gives the stream's
                    frame.time_base = time_base
                t = seconds(frame.pts)
                if frame.time is None or frame.time - start != t:
                    return  # not the time a full decode would give it: not counted as got
                for k in wanted[t]:
                    take(k, frame, t)
                got.add(frame.pts)

    for packet in gop[: last + 1]:
        ctx.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
        keep(ctx.decode(packet))
    ctx.skip_frame = "DEFAULT"
    keep(ctx.decode(None))  # drain: the decoder holds frames back for reordering
    ctx.flush_buffers()  # and starts afresh at the next GOP's IDR picture
    return got == wanted_pts

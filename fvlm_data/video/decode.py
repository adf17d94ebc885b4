"""Frame sampling and decoding with PyAV.

``T`` frames are sampled uniformly over the *whole* clip (the centres of ``T`` equal segments),
never just its first seconds, and each frame is resized on its short side and centre-cropped
(never squashed). ``frames_at`` decodes the frame nearest to each target exactly;
``keyframes_at`` (``seek="keyframe"`` upstream) decodes keyframes only and takes the keyframe
nearest to each target: several times faster, at the cost of frames up to half a keyframe
interval off their targets (the actual times are returned either way). Every failure caused by
the input file becomes an ``InputError`` with a short one-line reason (`fvlm_data.video.probe`).
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from fvlm_data.errors import InputError
from fvlm_data.video.gops import decode_by_gop
from fvlm_data.video.probe import FFMPEG_ERRORS, error_line, open_container, probe_duration

__all__ = ["FRAME_SAMPLING", "SEEK_MODES", "InputError", "VideoFile", "resize_center_crop", "sample_timestamps"]

# Decoding forward is cheaper than a seek (which restarts at a keyframe) for short gaps.
SEEK_GAP_S = 2.0
# With the keyframe times known, seek whenever a keyframe lies at least this far past the last
# decoded frame and at/before the target: decoding restarts there instead of running through the gap.
SEEK_MIN_SKIP_S = 0.25
# How frames are taken: "exact" (the frame nearest each target) or "keyframe" (the nearest keyframe).
SEEK_MODES = ("exact", "keyframe")
# The store's `frame_sampling` attribute for each --seek mode (a segment's "whole duration" is its [start, end]).
FRAME_SAMPLING = {
    "exact": "uniform over the whole duration (segment centres); short side resized, centre crop",
    "keyframe": "keyframe nearest to each uniform target over the whole duration (segment centres), "
                "decoding keyframes only; actual frame times in 'timestamps'; short side resized, centre crop",
}


def sample_timestamps(duration: float, num_frames: int) -> np.ndarray:
    """Centres of ``num_frames`` equal segments of ``[0, duration]`` (float64 seconds)."""
    return (np.arange(num_frames, dtype=np.float64) + 0.5) * (duration / num_frames)


def resize_center_crop(frame: av.VideoFrame, size: int, sar: Fraction | None = None) -> np.ndarray:
    """Resize so the short side is ``size`` (keeping the display aspect), turn upright, centre-crop to a square.

    ``sar`` is the stream's sample aspect ratio (non-square pixels of anamorphic video). The frame is
    turned as its display matrix says (phones store portrait video as landscape frames with a rotation
    of 90 or 270; FFmpeg attaches the stream's matrix to every decoded frame, PyAV reads it as
    ``frame.rotation``, counter-clockwise degrees), so the crop is taken on the upright picture.
    Returns uint8 RGB ``[size, size, 3]``.
    """
    width, height = frame.width, frame.height
    if sar and sar > 0 and sar != 1:
        width = width * float(sar)
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    rgb = frame.reformat(width=new_w, height=new_h, format="rgb24", interpolation="AREA").to_ndarray()
    quarter_turns = round(frame.rotation / 90) % 4  # np.rot90 turns counter-clockwise, as the matrix does
    if quarter_turns:
        rgb = np.rot90(rgb, quarter_turns)
        new_h, new_w = rgb.shape[:2]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


class VideoFile:
    """An opened video: validates the input on construction; use as a context manager.

    ``src`` is a file path or the bytes of a video (e.g. a tar member); ``name`` is used in messages.
    ``plan_gops``: exact decoding planned GOP by GOP (gops.py) where it can vouch for the same frames;
    False: always the full path of `frames_at` (the reference that planned decoding is tested against).
    """

    def __init__(self, src: str | bytes, threads: bool = False, plan_gops: bool = True) -> None:
        self.plan_gops = plan_gops
        self._container = None
        if isinstance(src, bytes):
            size, f = len(src), io.BytesIO(src)
        else:
            try:
                size, f = os.path.getsize(src), open(src, "rb")  # noqa: SIM115 -- closed in close()
            except OSError as e:
                raise InputError(f"unreadable: {e.strerror or e}") from None
        self._file = f
        try:
            self._open(f, size, threads)
        except BaseException:
            self.close()
            raise

    def _open(self, f: BinaryIO, size: int, threads: bool) -> None:
        self._container = open_container(f, size)
        if not self._container.streams.video:
            raise InputError("not a video: no video stream")
        self.stream = self._container.streams.video[0]
        if threads:
            # Off by default: decode workers already use every core, and on 2 cores threading
            # was slower with seeks (0.85 vs 0.59 s per 60 s clip), only 20% faster without.
            self.stream.codec_context.thread_type = "AUTO"
        tb = self.stream.time_base
        self._start = float(self.stream.start_time * tb) if self.stream.start_time is not None else 0.0
        rate = self.stream.average_rate or self.stream.guessed_rate
        self._frame_interval = 1.0 / float(rate) if rate else 1.0 / 25
        self.duration = probe_duration(self._container, self.stream, self._start)

    def frames_at(self, targets: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode the frame nearest to each of the sorted ``targets`` (seconds from the start).

        Decoding restarts at the keyframe before a target (a seek) whenever that keyframe lies
        past the last decoded frame, instead of decoding through the gap; the keyframe times come
        from one demuxing pass. Without them, it seeks only across gaps over ``SEEK_GAP_S``.
        Returns (uint8 ``[T, S, S, 3]`` RGB frames, float64 ``[T]`` timestamps of those frames).
        """
        out = np.empty((len(targets), image_size, image_size, 3), dtype=np.uint8)
        times = np.zeros(len(targets), dtype=np.float64)
        converted: list = [None, None]  # last (frame, rgb): a frame nearest to several targets

        def take(k: int, frame: av.VideoFrame, t: float) -> None:
            # Convert as soon as chosen, so full-resolution frames are not kept around.
            if converted[0] is not frame:
                converted[:] = frame, resize_center_crop(frame, image_size, self.stream.sample_aspect_ratio)
            out[k], times[k] = converted[1], t

        tolerance = max(1.0, 3 * self._frame_interval)  # how far past the last frame a target may lie
        if self.plan_gops:
            if decode_by_gop(self._container, self.stream, self._start, tolerance, targets, take):
                return out, times  # the same frames, decoding only what the targets need (gops.py)
            self._rewind()  # anything that shortcut cannot vouch for: decode as always
        j = 0  # next target to fill
        prev, prev_t = None, -np.inf  # last decoded frame before targets[j]
        pos = 0.0  # time of the last decoded frame
        may_seek = True
        keys = self._keyframe_times()
        frames = self._decode()
        error = None

        def worth_seeking(target: float) -> bool:
            if keys is None:  # unknown keyframes: only across long gaps
                return target - pos > SEEK_GAP_S
            # The keyframe at/before the target: seeking restarts decoding there.
            k = np.searchsorted(keys, target + 1e-9, side="right") - 1
            return k >= 0 and keys[k] - pos >= SEEK_MIN_SKIP_S

        def next_frame(frames: Iterator) -> tuple[av.VideoFrame, float] | None:
            """The next decoded (frame, time), or None at the end of the stream or on a decoding error
            (then kept in `error`)."""
            nonlocal error
            try:
                return next(frames, None)
            except FFMPEG_ERRORS as e:
                error = error_line(e)
                return None

        while j < len(targets):
            if may_seek and worth_seeking(targets[j]):
                # Seek to the keyframe at/before the target; if it lands behind where we already
                # were, keyframes are sparse here, so stop seeking for this video.
                before = pos
                frames = self._decode(seek_to=targets[j])
                first = next_frame(frames)
                if first is None:
                    break
                frames = itertools.chain([first], frames)
                prev, prev_t = None, -np.inf
                pos = first[1]
                may_seek = pos > before + self._frame_interval / 2
                continue
            item = next_frame(frames)
            if item is None:
                break
            frame, t = item
            pos = t
            while j < len(targets) and t >= targets[j]:
                # Nearest of the frame just before the target and this one at/after it.
                take(j, *((prev, prev_t) if targets[j] - prev_t < t - targets[j] else (frame, t)))
                j += 1
            prev, prev_t = frame, t
        if j < len(targets):
            # End of stream before the last targets: fine for the last frame interval or so,
            # otherwise the file is cut short (or its metadata lies).
            if prev is None:
                raise InputError(f"corrupt video: {error}" if error else
                                 f"truncated: no frames decoded at {targets[0]:.1f} s of {self.duration:.1f} s")
            if targets[-1] - prev_t > tolerance:
                what = f"decoding failed: {error}" if error else "frames end"
                raise InputError(f"truncated: {what} at {prev_t:.1f} s of {self.duration:.1f} s")
            for k in range(j, len(targets)):
                take(k, prev, prev_t)
        return out, times

    def _keyframe_times(self) -> np.ndarray | None:
        """Sorted keyframe times (s from the start) from one demuxing pass (no decoding; ~1% of a
        decode), then rewound to the start; None if the packets carry no keyframe times or
        demuxing fails (then seeking falls back to the gap rule, and decoding reports errors)."""
        stream, tb = self.stream, self.stream.time_base
        try:
            times = [float(p.pts * tb) - self._start for p in self._container.demux(stream)
                     if p.is_keyframe and p.pts is not None and p.size]
            self._container.seek(0)
        except FFMPEG_ERRORS:
            self._rewind()
            return None
        return np.sort(np.array(times)) if times else None

    def keyframes_at(self, targets: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The *keyframe* nearest to each of the sorted ``targets`` (seconds from the start).

        One demuxing pass (no decoding) lists the keyframe packets; only the keyframes nearest to
        some target are then decoded, so a video costs a few intra frames instead of every frame
        up to each target. The price is accuracy: each frame is off its target by up to half the
        keyframe interval (1 s for a 2 s GOP), more where keyframes are sparser or past the last
        one, and targets closer together than the keyframe interval may share a frame. The
        returned timestamps are the frames' actual times. A stream without keyframe flags or
        timestamps falls back to ``frames_at``.
        Returns (uint8 ``[T, S, S, 3]`` RGB frames, float64 ``[T]`` timestamps).
        """
        stream, tb = self.stream, self.stream.time_base
        keys: list = []  # (seconds, packet) of each keyframe, in file order
        end, error = -np.inf, None
        try:
            for packet in self._container.demux(stream):
                if packet.pts is None or not packet.size:
                    continue
                t = float(packet.pts * tb) - self._start
                end = max(end, t + float((packet.duration or 0) * tb))
                if packet.is_keyframe:
                    keys.append((t, packet))
        except FFMPEG_ERRORS as e:
            error = error_line(e)
        if not keys:
            if error is not None:
                raise InputError(f"corrupt video: {error}")
            self._rewind()  # nothing to snap to: decode exactly (timestamps still say what was taken)
            return self.frames_at(targets, image_size)
        keys.sort(key=lambda k: k[0])
        times = np.array([t for t, _ in keys])
        # Nearest keyframe per target; a tie goes to the later one (as frames_at does).
        after = np.minimum(np.searchsorted(times, targets, side="left"), len(times) - 1)
        before = np.maximum(after - 1, 0)
        pick = np.where(np.abs(targets - times[before]) < np.abs(times[after] - targets), before, after)
        # Past the last keyframe is fine (it is the nearest) unless the data itself stops early.
        if targets[-1] - end > max(1.0, 3 * self._frame_interval):
            what = f"decoding failed: {error}" if error else "frames end"
            raise InputError(f"truncated: {what} at {end:.1f} s of {self.duration:.1f} s")

        wanted = sorted(set(pick.tolist()))
        decoded: dict[float | None, np.ndarray] = {}  # frame time (s from the start) -> RGB crop

        def keep(frame: av.VideoFrame) -> None:
            # Flushed frames carry no time base: their time comes from pts and the stream's.
            t = None if frame.pts is None else float(frame.pts * tb) - self._start
            decoded[t] = resize_center_crop(frame, image_size, stream.sample_aspect_ratio)

        try:
            for k in wanted:  # keyframes decode alone; the decoder may hold some back until the flush
                for frame in keys[k][1].decode():
                    keep(frame)
            for frame in stream.codec_context.decode(None):
                keep(frame)
        except FFMPEG_ERRORS as e:
            raise InputError(f"corrupt video: {error_line(e)}") from None
        if None in decoded:
            self._rewind()
            return self.frames_at(targets, image_size)
        # Match the decoded frames to their packets by time.
        by_key = {}
        for k in wanted:
            t = min(decoded, key=lambda ft, k=k: abs(ft - times[k]), default=None)
            if t is None or abs(t - times[k]) > self._frame_interval / 2:
                raise InputError(f"corrupt video: keyframe at {times[k]:.2f} s did not decode")
            by_key[k] = decoded[t]
        out = np.stack([by_key[k] for k in pick.tolist()])
        return out, times[pick]

    def _rewind(self) -> None:
        try:
            self._container.seek(int(self._start / self.stream.time_base), stream=self.stream, backward=True)
        except FFMPEG_ERRORS as e:
            raise InputError(f"corrupt video: seek failed: {error_line(e)}") from None

    def _decode(self, seek_to: float | None = None):
        """Yield (frame, seconds from the start); optionally seek first (to the keyframe before)."""
        stream = self.stream
        if seek_to is not None:
            offset = int((seek_to + self._start) / stream.time_base)
            try:
                self._container.seek(offset, stream=stream, backward=True, any_frame=False)
            except FFMPEG_ERRORS as e:
                raise InputError(f"corrupt video: seek failed: {error_line(e)}") from None
        last = None
        for frame in self._container.decode(stream):
            t = frame.time
            # Frames without a pts (rare, raw streams): count on from the previous one.
            t = (last + self._frame_interval if last is not None else 0.0) if t is None else t - self._start
            last = t
            yield frame, t

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        self._file.close()

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


"""Today's exact decoder, kept verbatim as the reference the new one is checked against.

`ReferenceVideoFile(path).frames_at(targets, image_size)` is `fvlm_data.video.VideoFile.frames_at`
as it was before GOP-planned decoding (fvlm_data/video_gops.py): it decodes every frame from the
keyframe before each target on. tests/test_video_gops.py and `python -m bench.precompute_speed
--part decode` compare the two frame for frame.
"""

from __future__ import annotations

import itertools

import av
import numpy as np

from fvlm_data.video import SEEK_GAP_S, SEEK_MIN_SKIP_S, VideoFile, resize_center_crop
from fvlm_data.video_probe import FFMPEG_ERRORS, InputError, error_line


class ReferenceVideoFile(VideoFile):
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

        while j < len(targets):
            if may_seek and worth_seeking(targets[j]):
                # Seek to the keyframe at/before the target; if it lands behind where we already
                # were, keyframes are sparse here, so stop seeking for this video.
                before = pos
                frames = self._decode(seek_to=targets[j])
                try:
                    first = next(frames, None)
                except FFMPEG_ERRORS as e:
                    error = error_line(e)
                    break
                if first is None:
                    break
                frames = itertools.chain([first], frames)
                prev, prev_t = None, -np.inf
                pos = first[1]
                may_seek = pos > before + self._frame_interval / 2
                continue
            try:
                item = next(frames, None)
            except FFMPEG_ERRORS as e:
                error = error_line(e)
                break
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
                raise InputError(f"corrupt video: {error}" if error else "truncated: no frames decoded")
            tolerance = max(1.0, 3 * self._frame_interval)
            if targets[-1] - prev_t > tolerance:
                what = f"decoding failed: {error}" if error else "frames end"
                raise InputError(f"truncated: {what} at {prev_t:.1f} s of {self.duration:.1f} s")
            for k in range(j, len(targets)):
                take(k, prev, prev_t)
        return out, times


"""H.264 clips with moving, textured content (CABAC and B frames, a keyframe exactly every `gop_seconds`), like
the typical clips of video datasets: what the GOP-planned decoder is tested on (tests/test_video_gops.py), and what
the decode benchmarks generate (`python -m bench.make_clips`, bench/segments.py). Needs PyAV."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random RGB texture twice the frame size (low-pass noise), uint8 [2H, 2W, 3]."""
    h, w = 2 * height, 2 * width
    small = rng.integers(0, 256, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    # Bilinear upsampling by 16: smooth blobs, plus a finer layer for detail.
    ys, xs = np.linspace(0, small.shape[0] - 1.001, h), np.linspace(0, small.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = small[y0][:, x0]
    b = small[y0][:, x0 + 1]
    c = small[y0 + 1][:, x0]
    d = small[y0 + 1][:, x0 + 1]
    smooth = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
    fine = rng.normal(0, 5, size=(h, w, 1)).astype(np.float32)
    return np.clip(smooth + fine, 0, 255).astype(np.uint8)


def write_clip(path: Path, seconds: float, width: int, height: int, fps: int, gop_seconds: float,
               crf: int = 23, seed: int = 0, open_gop: bool = False) -> dict:
    import av  # PyAV: only writing clips needs it here

    rng = np.random.default_rng(seed)
    tex = _texture(height, width, rng)
    n = int(round(seconds * fps))
    yy, xx = np.mgrid[:height, :width]
    ys, xs = np.arange(height), np.arange(width)
    shapes = [(rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3),
               rng.uniform(0.04, 0.12) * height, rng.integers(0, 256, 3)) for _ in range(4)]
    gop = max(1, int(round(gop_seconds * fps)))
    t0 = time.perf_counter()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        stream.options = {"crf": str(crf), "preset": "veryfast", "sc_threshold": "0",
                          "keyint_min": str(gop), "g": str(gop)}
        if open_gop:  # keyframes become recovery-point I frames that the B frames before them refer across
            stream.options["x264-params"] = "open-gop=1"
        for i in range(n):
            t = i / fps
            # Pan across the texture (a full cycle every 20 s) and move the shapes.
            # Pan and zoom (1x..1.5x) over the texture, so motion is not a pure translation.
            zoom = 1.0 + 0.25 * (1 - np.cos(2 * np.pi * t / 7))
            oy = (0.5 - 0.5 * np.cos(2 * np.pi * t / 20)) * (2 * height - height * zoom)
            ox = (0.5 - 0.5 * np.cos(2 * np.pi * t / 13)) * (2 * width - width * zoom)
            img = tex[(oy + ys * zoom).astype(int)][:, (ox + xs * zoom).astype(int)]
            for cy, cx, vy, vx, r, colour in shapes:
                py = (cy + vy * t) % 1.0 * height
                px = (cx + vx * t) % 1.0 * width
                y_lo, y_hi = max(0, int(py - r)), min(height, int(py + r) + 1)
                x_lo, x_hi = max(0, int(px - r)), min(width, int(px + r) + 1)
                sub = (yy[y_lo:y_hi, x_lo:x_hi] - py) ** 2 + (xx[y_lo:y_hi, x_lo:x_hi] - px) ** 2 <= r * r
                img[y_lo:y_hi, x_lo:x_hi][sub] = colour
            # Camera-like temporal noise: every frame differs a little everywhere, as real footage does.
            img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16),
                          0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    size = os.path.getsize(path)
    return {"path": str(path), "seconds": seconds, "size": f"{width}x{height}", "fps": fps, "frames": n,
            "gop_frames": gop, "mbit_s": size * 8 / seconds / 1e6, "encode_s": time.perf_counter() - t0}

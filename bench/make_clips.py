"""Write 20-60 s h264 test clips (moving, textured content) for the decode benchmarks.

    python -m bench.make_clips --out /tmp/clips                          # 20/40/60 s at 640x360 and 1280x720
    python -m bench.make_clips --out /tmp/clips --durations 40 --sizes 640x360 --fps 30 --gop-seconds 2

Each clip is libx264 (preset veryfast: CABAC and B-frames, like most web video), yuv420p, with a
keyframe exactly every --gop-seconds (scene-cut keyframes off), so decode figures are comparable
with the typical 20-60 s, ~2 s-GOP clips of video datasets. The content is a panning texture with
moving shapes, so the encoder has real motion and detail to code (not flat frames). A caption
sidecar (<name>.txt) is written beside each clip so the folder is a valid precompute.py input.
Needs PyAV (CPU machine only).
"""

from __future__ import annotations

import argparse
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
    import av  # PyAV: only this script needs it

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Folder to write the clips into (created).")
    p.add_argument("--durations", default="20,40,60", help="Clip lengths, seconds, comma-separated.")
    p.add_argument("--sizes", default="640x360,1280x720", help="WxH list, comma-separated.")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--gop-seconds", type=float, default=2.0, help="Keyframe interval, seconds.")
    p.add_argument("--crf", type=int, default=23, help="x264 quality (23: its default).")
    p.add_argument("--open-gop", action="store_true", help="x264's open GOPs (B frames refer across keyframes).")
    p.add_argument("--force", action="store_true", help="Rewrite clips that already exist.")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        for seconds in (float(s) for s in args.durations.split(",")):
            name = f"clip_{width}x{height}_{seconds:g}s_gop{args.gop_seconds:g}{'_open' if args.open_gop else ''}.mp4"
            path = out / name
            if path.exists() and not args.force:
                print(f"exists: {path}")
                continue
            info = write_clip(path, seconds, width, height, args.fps, args.gop_seconds, args.crf,
                              seed=width + int(seconds), open_gop=args.open_gop)
            path.with_suffix(".txt").write_text(f"a {seconds:g} second test clip with moving shapes\n")
            print(f"wrote {path}: {info['frames']} frames, {info['mbit_s']:.2f} Mbit/s, "
                  f"encoded in {info['encode_s']:.1f} s")


if __name__ == "__main__":
    main()

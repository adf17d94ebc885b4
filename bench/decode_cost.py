"""CPU seconds per video of precompute's decoding, and the decode cores a GPU needs at a given rate.

    OMP_NUM_THREADS=1 python -m bench.decode_cost                          # 40 s clips, 360p/720p, 2 s/10 s GOPs
    OMP_NUM_THREADS=1 python -m bench.decode_cost --seconds 10 --repeats 1  # quicker

Writes (once, into --clips) an h264 clip per size and keyframe interval (tests/helpers/clips.py:
libx264 veryfast, a keyframe exactly every GOP, a panning texture with moving shapes), then decodes
each as precompute does (`load_frames`: --frames frames at --image-size px, one decode thread) with
`--seek exact` and `--seek keyframe`, repeats interleaved, and prints the median CPU seconds per
video (`time.process_time`: this process's CPU, whatever else the machine runs) and the decode
cores one GPU needs to be fed --target videos/s (CPU s per video x target).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from fvlm_data.records import VideoInput
from fvlm_data.sources import load_frames
from tests.helpers.clips import write_clip

HEADER = ("| clip | GOP | `--seek exact` CPU s/video | `--seek keyframe` CPU s/video | decode cores per GPU at {t:g} "
          "videos/s (exact / keyframe) |\n|---|---|---|---|---|")


def clip(folder: Path, width: int, height: int, seconds: float, gop: float, fps: int) -> Path:
    path = folder / f"cost_{width}x{height}_{seconds:g}s_gop{gop:g}.mp4"
    if not path.exists():
        info = write_clip(path, seconds, width, height, fps, gop, seed=width + int(seconds))
        print(f"# wrote {path}: {info['frames']} frames, {info['mbit_s']:.2f} Mbit/s", flush=True)
    return path


def cpu_seconds(path: Path, seek: str, frames: int, image_size: int) -> float:
    item = VideoInput(video_id=path.stem, source=str(path), caption="x", path=str(path))
    c0 = time.process_time()
    load_frames(item, frames, image_size, seek=seek)
    return time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--clips", default="/tmp/fvlm_decode_cost", help="Where the clips are written (kept, reused).")
    p.add_argument("--sizes", default="640x360,1280x720")
    p.add_argument("--gops", default="2,10", help="Keyframe intervals, seconds.")
    p.add_argument("--seconds", type=float, default=40.0, help="Clip length.")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--frames", type=int, default=24, help="Frames per video (precompute's --num-frames).")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="Decodes per clip and mode (median).")
    p.add_argument("--target", type=float, default=60.0, help="Videos/s one GPU encodes.")
    args = p.parse_args()
    folder = Path(args.clips)
    folder.mkdir(parents=True, exist_ok=True)
    clips = [(size, gop, clip(folder, *(int(v) for v in size.split("x")), args.seconds, gop, args.fps))
             for size in args.sizes.split(",") for gop in (float(g) for g in args.gops.split(","))]
    times: dict[tuple[str, float, str], list[float]] = {}
    for r in range(args.repeats):
        for seek in ("exact", "keyframe") if r % 2 == 0 else ("keyframe", "exact"):  # interleaved
            for size, gop, path in clips:
                times.setdefault((size, gop, seek), []).append(cpu_seconds(path, seek, args.frames, args.image_size))
    print(f"# {args.frames} frames at {args.image_size} px from {args.seconds:g} s h264 clips at {args.fps} fps, "
          f"median CPU s of {args.repeats} decodes (one thread)", flush=True)
    print(HEADER.format(t=args.target))
    for size, gop, _ in clips:
        exact, key = (statistics.median(times[(size, gop, seek)]) for seek in ("exact", "keyframe"))
        print(f"| {size.replace('x', '×')}, {args.seconds:g} s | {gop:g} s | {exact:.3f} | {key:.3f} | "
              f"{exact * args.target:.0f} / {key * args.target:.0f} |", flush=True)


if __name__ == "__main__":
    main()

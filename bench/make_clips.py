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
from pathlib import Path

from tests.helpers.clips import write_clip


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

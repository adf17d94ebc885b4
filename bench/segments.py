"""Decoding the segments of one long file: one open per segment against one open and one pass for all.

    python -m bench.segments                                   # a generated 10-minute 640x360 clip, 20 segments
    python -m bench.segments --minutes 1 --segments 5 --repeats 1 --size 160x90   # a quick look

Dense-caption datasets cut many, often overlapping, segments from each long video. Decoding each
segment alone (`load_frames` per row) opens the file, scans its keyframes and seeks for every row;
`load_file_frames` (what precompute's decode workers do for the rows of one file) opens it once,
sorts every segment's targets and decodes them in one forward pass. Segments are 10-60 s, drawn
at random (seeded) over the file, listed by start as annotations are; each gets `--num-frames`
frames. The two ways run alternately, each `--repeats` times, on one pinned core; the table gives
medians and their ratio, and checks that both ways give the same frames.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import pin_to_one_core, work_folder
from fvlm_data.records import Decoding, VideoInput
from fvlm_data.sources import load_file_frames, load_frames
from tests.helpers.clips import write_clip


def segments_of(path: Path, seconds: float, count: int, seed: int = 0) -> list[VideoInput]:
    """`count` segments of 10-60 s (shorter files: up to half the file) spread over the file, by start."""
    rng = np.random.default_rng(seed)
    longest = min(60.0, seconds / 2)
    lengths = rng.uniform(min(10.0, longest / 2), longest, count)
    starts = rng.uniform(0, seconds - lengths)
    spans = sorted((round(float(a), 2), round(float(a + n), 2)) for a, n in zip(starts, lengths, strict=True))
    return [VideoInput(video_id=f"seg{k}", source=str(path), caption="a segment", path=str(path),
                       start=min(a, seconds), end=min(b, seconds), file_id="long") for k, (a, b) in enumerate(spans)]


def measure(path: Path, items: list[VideoInput], decoding: Decoding, repeats: int) -> dict[str, float]:
    """Median seconds to decode every segment each way, alternating; asserts both give the same frames."""
    per_segment, one_pass = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        alone = [load_frames(it, decoding.num_frames, decoding.image_size, seek=decoding.seek) for it in items]
        per_segment.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        together = load_file_frames(items, decoding)
        one_pass.append(time.perf_counter() - t0)
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.timestamps, b.timestamps)
    a, b = statistics.median(per_segment), statistics.median(one_pass)
    return {"per_segment_s": a, "one_pass_s": b, "ratio": a / b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="Length of the generated file.")
    p.add_argument("--size", default="640x360", help="WxH of the generated file.")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop-seconds", type=float, default=2.0, help="Keyframe interval of the generated file.")
    p.add_argument("--segments", type=int, default=20)
    p.add_argument("--num-frames", type=int, default=24, help="Frames per segment.")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seek", default="exact,keyframe", help="Seek modes to measure, comma-separated.")
    p.add_argument("--repeats", type=int, default=3, help="Decodes of all segments per way and mode (median).")
    p.add_argument("--workdir", default=None, help="Keep the generated file here (reused if present).")
    args = p.parse_args()
    core = pin_to_one_core()
    width, height = (int(v) for v in args.size.lower().split("x"))
    seconds = args.minutes * 60
    with work_folder(args.workdir, "fvlm-segments-") as folder:
        path = Path(folder) / f"long_{width}x{height}_{seconds:g}s_gop{args.gop_seconds:g}.mp4"
        if not path.exists():
            info = write_clip(path, seconds, width, height, args.fps, args.gop_seconds)
            print(f"generated {path.name}: {info['frames']} frames in {info['encode_s']:.0f} s", flush=True)
        items = segments_of(path, seconds, args.segments)
        covered = sum(it.end - it.start for it in items)
        print(f"\n### {args.segments} segments ({covered:.0f} s in all) of a {seconds:g} s {args.size} file, "
              f"{args.num_frames} frames each at {args.image_size} px; core {core}, median of {args.repeats}\n")
        print("| seek | one open per segment, s | one open and one pass, s | ratio |")
        print("|---|---|---|---|")
        for seek in args.seek.split(","):
            decoding = Decoding(args.num_frames, args.image_size, 0.0, None, seek)
            r = measure(path, items, decoding, args.repeats)
            print(f"| {seek} | {r['per_segment_s']:.2f} | {r['one_pass_s']:.2f} | {r['ratio']:.2f}x |", flush=True)
        print("\nsame frames and timestamps both ways: yes (checked every repeat)")


if __name__ == "__main__":
    main()

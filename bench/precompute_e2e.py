"""Precompute end to end at real sizes: synthetic videos -> decode workers -> DINOv2-small + SD-VAE -> a store.

    python -m bench.precompute_e2e --videos 512                   # on a GPU: videos/s against the 60 videos/s goal
    python -m bench.precompute_e2e --tiny --videos 8 --device cpu --workers 1   # checks the script (seconds)

`run_precompute` as precompute.py runs it (decode worker processes, batches of --batch-videos,
the writer thread), with the real encoders' architectures random-initialised from their configs
(bench/common.py's `dinov2_small`, bench/precompute_speed.py's `sd_vae`: no network), 24 frames
of 256 px per video from the synthetic source. A first run of two batches compiles and warms up;
the timed run then fills a fresh store. Prints videos/s, the decode workers it used, and the
same figure as a fraction of the goal.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import dinov2_small
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.precompute.encoders import FrozenEncoders
from fvlm_data.precompute.pipeline import run_precompute
from fvlm_data.sources import list_inputs

GOAL = 60.0  # videos/s on one H100/H200 (issue 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=512, help="Videos in the timed run.")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="Decode worker processes.")
    p.add_argument("--batch-videos", type=int, default=8)
    p.add_argument("--num-frames", type=int, default=24)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default=None, help="[default: cuda if available, else cpu]")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoders [default: on for CUDA, off on the CPU].")
    p.add_argument("--tiny", action="store_true", help="The tiny preset's encoders (a check of the script).")
    p.add_argument("--workdir", default=None, help="Where the stores go [default: system temp].")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    compile_on = args.compile if args.compile is not None else device.startswith("cuda")
    if args.tiny:
        encoders = FrozenEncoders("tiny", "tiny", device=device, compile=compile_on)
    else:
        from bench.precompute_speed import sd_vae

        encoders = FrozenEncoders.from_modules(dinov2_small(), sd_vae(), device, dino_id="dinov2-small-random",
                                               vae_id="sd-vae-random", compile=compile_on)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"# precompute end to end on {name}: {'tiny' if args.tiny else 'DINOv2-small + SD-VAE (random init)'}, "
          f"{args.num_frames} frames of {args.image_size}px, batches of {args.batch_videos}, {args.workers} decode "
          f"workers, compile {'on' if compile_on else 'off'}", flush=True)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fvlm_e2e_", dir=args.workdir) as tmp:
        def run(out: str, n: int) -> float:
            config = PrecomputeConfig(out=str(Path(tmp) / out), synthetic=n, num_frames=args.num_frames,
                                      image_size=args.image_size, workers=args.workers,
                                      batch_videos=args.batch_videos, quiet=True)
            inputs = list_inputs(synthetic=n, seed=0)
            t0 = time.perf_counter()
            summary = run_precompute(config, inputs, encoders, progress=False)
            assert summary.written == n, summary.lines(config.out)
            return time.perf_counter() - t0

        warm = run("warmup.zarr", 2 * args.batch_videos)
        print(f"# warm-up (compilation included): {2 * args.batch_videos} videos in {warm:.1f} s", flush=True)
        seconds = run("timed.zarr", args.videos)
    rate = args.videos / seconds
    row = {"videos": args.videos, "seconds": seconds, "videos_per_s": rate, "goal_videos_per_s": GOAL,
           "of_goal": rate / GOAL, "decode_workers": args.workers, "device": name, "compile": compile_on,
           "tiny": args.tiny, "warmup_s": warm}
    print(f"precompute end to end: {rate:.1f} videos/s ({args.videos} videos in {seconds:.1f} s) with "
          f"{args.workers} decode workers: {rate / GOAL:.2f}x the {GOAL:g} videos/s goal", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([row], indent=2))


if __name__ == "__main__":
    main()

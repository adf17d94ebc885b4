"""Validation's share of a training run's wall time with the defaults (`--val-batches`, `--val-every`).

    python -m bench.val_share --videos 20000 --max-steps 1000      # the issue's store size, tiny preset

Writes a store of `--videos` videos of tiny-preset feature shapes (random features: 6 frames of
17 x 384 DINO tokens and 4 x 7 x 7 latents, small captions; the content does not change the cost),
then runs `train.py --preset tiny` twice with the same steps, alternating order: with validation as
configured, and with `--val-every` beyond the run, where only the end-of-run evaluation of the whole
held-out split remains. Prints both wall times, the validation time train.py reports, and the share.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import work_folder
from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter

WORDS = ["a", "red", "green", "blue", "circle", "square", "moves", "left", "right", "up", "down", "slowly"]
TINY = FeatureShapes(6, {"dino": (17, 384), "latents": (4, 7, 7)})
REAL = FeatureShapes(24, {"dino": (325, 384), "latents": (4, 32, 32)})  # DINOv2-s, SD-VAE


def write_store(path: Path, videos: int, shapes: FeatureShapes, shard: int = 64) -> None:
    t, (n, d), latent = shapes.num_frames, shapes.per_frame["dino"], tuple(shapes.per_frame["latents"])
    attrs = dict(dino="tiny", vae="tiny", num_frames=t, image_size=56 if n == 17 else 256, feature_dtype="float16",
                 dino_tokens=n, dino_dim=d, latent_shape=list(latent), preset="tiny")
    store = StoreWriter.create_or_open(path, attrs, shapes, capacity=videos, shard_videos=shard)
    rng = np.random.default_rng(0)
    template = rng.standard_normal((8, t, n, d)).astype(np.float16)
    for s in range(-(-videos // shard)):
        buf = store.shard_buffer(s)
        for i in range(s * shard, min(videos, (s + 1) * shard)):
            words = rng.choice(WORDS, size=3 + i % 5).tolist()
            buf.add_row(i, dino=template[i % 8], latents=rng.standard_normal((t, *latent)),
                        caption=" ".join(words), video_id=f"v{i:07d}", source=f"bench/{i}",
                        timestamps=np.arange(float(t)), duration=float(t))
        buf.publish()


def train(store: Path, out: Path, steps: int, val_every: int, extra: list[str]) -> tuple[float, float, float]:
    """(wall s, validation s as train.py reports it, median samples/s of its training logs)."""
    cmd = [sys.executable, "train.py", "--store", str(store), "--out", str(out), "--max-steps", str(steps),
           "--val-every", str(val_every), "--save-every", str(10 * steps), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    m = re.search(r"of which validation ([0-9.]+) s", proc.stderr)
    rates = [float(x) for x in re.findall(r"([0-9.]+) samples/s", proc.stdout)][1:]  # the first: compiling
    return wall, float(m.group(1)) if m else float("nan"), float(np.median(rates)) if rates else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=20000)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=500, help="train.py's default")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--real-shapes", action="store_true", help="24 frames of 325 x 384 DINO tokens, 4 x 32 x 32 "
                   "latents (train.py's default 16 frames); give the LM with -- --lm DIR")
    p.add_argument("extra", nargs="*", help="more train.py options, after --; default: --preset tiny --num-frames 4 "
                   "--device cpu")
    args = p.parse_args()
    extra = args.extra or ["--preset", "tiny", "--num-frames", "4", "--device", "cpu"]
    with work_folder(args.workdir, "fvlm_valshare_") as root:
        store = root / "store.zarr"
        t0 = time.perf_counter()
        if not store.exists():
            write_store(store, args.videos, REAL if args.real_shapes else TINY)
        print(f"store of {args.videos} videos in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = {"with": [], "without": []}
        for r in range(args.rounds):
            for name in (["with", "without"] if r % 2 == 0 else ["without", "with"]):
                every = args.val_every if name == "with" else 10 * args.max_steps
                rows[name].append(train(store, root / f"run_{name}_{r}", args.max_steps, every, extra))
                print(f"round {r} {name} validation: wall {rows[name][-1][0]:.1f} s, validation "
                      f"{rows[name][-1][1]:.1f} s, training {rows[name][-1][2]:.1f} samples/s", flush=True)
        w = np.median([x[0] for x in rows["with"]])
        wo = np.median([x[0] for x in rows["without"]])
        v = np.median([x[1] for x in rows["with"]])
        v_end = np.median([x[1] for x in rows["without"]])
        rate = np.median([x[2] for x in rows["with"] + rows["without"]])
        print("\n| run | wall s | validation s (train.py) |\n|---|---|---|")
        print(f"| --val-every {args.val_every} | {w:.1f} | {v:.1f} |\n| end-of-run evaluation only | {wo:.1f} | "
              f"{v_end:.1f} |\n\ntraining: {rate:.1f} samples/s (median of the logged intervals but the first)")
        print(f"\nvalidation share with the defaults: {100 * v / w:.1f}% of wall time (train.py's timer); "
              f"wall time with / without the periodic validations: {w / wo:.3f}x; of which the end-of-run "
              f"whole-split evaluation: {100 * v_end / wo:.1f}%")


if __name__ == "__main__":
    main()

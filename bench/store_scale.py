"""Open-time scaling of the store: files on disk, FeatureStore.open, a train split and `inspect`.

    python -m bench.store_scale                         # 10K, 100K and 1M slots under /tmp/fvlm_store_scale
    python -m bench.store_scale --sizes 10000 --root DIR

Each store has the real feature shapes in its metadata (24 x 325 x 384 DINO tokens, 24 x 4 x 32 x 32
latents) and every small per-video array filled (caption, video_id, source, failure, timestamps,
duration, committed: all slots committed; format 3's captions and file_id too, one caption per
video), written by zarr-python itself; the features stay
unwritten (no feature objects), which opening never touches anyway. Timings are medians of
`--repeats` fresh opens in this process, pinned to one core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import zarr

try:
    from bench.common import T, create_store, pin_to_one_core
except ModuleNotFoundError:  # `python bench/store_scale.py` puts bench/ on the path, not the repository
    raise SystemExit("run it from the repository root as a module: python -m bench.store_scale") from None
from fvlm_data import FeatureDataset, FeatureStore
from fvlm_data.inspect import inspect_store

ATTRS = dict(dino="facebook/dinov2-small", vae="stabilityai/sd-vae-ft-mse", image_size=448)


def build(path: Path, n: int, shard_videos: int | None) -> None:
    """A store of n committed slots whose small arrays are filled (zarr writes whole shards)."""
    create_store(path, n, "float16", shard_videos, **ATTRS)
    group = zarr.open_group(str(path), mode="r+")
    ids = np.array([f"video-{i:08d}" for i in range(n)], dtype=object)
    values = {
        "video_id": ids,
        "caption": np.array([f"a caption of about this length for video {i}" for i in range(n)], dtype=object),
        "source": np.array([f"s3://bucket/videos/{i:08d}.mp4" for i in range(n)], dtype=object),
        "failure": np.full(n, "", dtype=object),
        "captions": np.full(n, "", dtype=object),  # one caption per video: the common case
        "file_id": ids,  # whole videos: the split hashes these, as it hashed the video ids before
        "timestamps": np.broadcast_to(np.arange(T, dtype=np.float32) + 0.5, (n, T)),
        "duration": np.full(n, 24.0, dtype=np.float32),
        "committed": np.ones(n, dtype=np.uint8),  # last
    }
    for name, data in values.items():
        group[name].with_config({"write_empty_chunks": True})[:] = data


def count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/fvlm_store_scale"))
    parser.add_argument("--shard-videos", type=int, default=None, help="videos per shard (default: the store's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pin_to_one_core()
    print(f"shard_videos={args.shard_videos or 'the store default'}; medians of {args.repeats} opens; one core")
    print(f"{'slots':>10} {'build s':>8} {'files':>8} {'open+len s':>10} {'train split s':>14} {'train videos':>13} "
          f"{'inspect s':>10}")
    for n in args.sizes:
        path = args.root / f"s{n}-{args.shard_videos or 'default'}.zarr"
        built = "reused"
        if not path.exists():
            start = time.perf_counter()
            build(path, n, args.shard_videos)
            built = f"{time.perf_counter() - start:.1f}"
        store = FeatureStore.open(path)
        assert len(store) == n, f"{path} holds {len(store)} committed slots, expected {n}: remove it"
        open_s = median_seconds(lambda p=path: len(FeatureStore.open(p)), args.repeats)
        split_s = median_seconds(lambda p=path: FeatureDataset(p, num_frames=16, split="train"), args.repeats)
        train = len(FeatureDataset(path, num_frames=16, split="train"))
        inspect_s = median_seconds(lambda p=path: inspect_store(str(p)), args.repeats)
        print(f"{n:>10,} {built:>8} {count_files(path):>8,} {open_s:>10.2f} {split_s:>14.2f} {train:>13,} "
              f"{inspect_s:>10.2f}", flush=True)


if __name__ == "__main__":
    main()

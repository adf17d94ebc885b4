"""Local read path of a format-2 store: `pread` of frame runs (what FeatureStore does) vs an mmap of
each shard object kept open per process, with one gather copy of the needed frames.

    python bench/shard_reads.py [--videos 48] [--rounds 5] [--batch 32]

Same store, same random batches of 16 of 24 frames (dino 24 x 325 x 384 float16, latents 24 x 4 x 32 x 32,
timestamps), warm page cache, one core, the two methods alternating each round; medians over rounds.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fvlm_data import FeatureStore  # noqa: E402
from fvlm_data.dataset import frame_indices  # noqa: E402
from fvlm_data.store import FeatureShapes  # noqa: E402

SHAPES = FeatureShapes(num_frames=24, dino_tokens=325, dino_dim=384, latent_shape=(4, 32, 32))
FRAMES = frame_indices(24, 16)
NAMES = ("dino", "latents", "timestamps")


def build(path: Path, videos: int, shard_videos: int) -> None:
    attrs = dict(dino="bench", vae="bench", num_frames=24, image_size=256, feature_dtype="float16")
    store = FeatureStore.create_or_open(path, attrs, SHAPES, capacity=videos, shard_videos=shard_videos)
    rng = np.random.default_rng(0)
    for shard in range(store.num_shard_objects):
        buf = store.shard_buffer(shard)
        for slot in range(buf.start, buf.stop):
            buf.add_row(slot, dino=rng.standard_normal((24, 325, 384), dtype=np.float32).astype(np.float16),
                        latents=rng.standard_normal((24, 4, 32, 32), dtype=np.float32).astype(np.float16),
                        caption=f"video {slot}", video_id=f"v{slot}", source="", timestamps=np.arange(24) + 0.5,
                        duration=24.0)
        buf.publish()


class MmapReader:
    """Each shard object mapped once; a sample's frames gathered with one numpy fancy-index copy."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.maps: dict[str, np.ndarray] = {}

    def _map(self, key: str) -> np.ndarray:
        if key not in self.maps:
            with open(Path(self.store.path) / key, "rb") as f:
                self.maps[key] = np.frombuffer(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), dtype=np.uint8)
        return self.maps[key]

    def read(self, slot: int) -> dict[str, np.ndarray]:
        out = {}
        for name in NAMES:
            arr = self.store._arrays[name]
            key, offset, nbytes = self.store.chunk_location(name, slot)
            video = self._map(key)[offset : offset + nbytes].view(np.dtype(arr.dtype)).reshape(arr.shape[1:])
            out[name] = video[FRAMES]  # the one copy
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--shard-videos", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fvlm_shard_reads_"))
    path = root / "store.zarr"
    if not path.exists():
        build(path, args.videos, args.shard_videos)
    store = FeatureStore.open(path)
    mm = MmapReader(store)
    methods = {
        "pread of frame runs (FeatureStore.read_slots)":
            lambda slots: store.read_slots(slots, [FRAMES] * len(slots)),
        "mmap per shard object + one gather copy": lambda slots: [mm.read(s) for s in slots],
    }
    rng = np.random.default_rng(1)
    for slots in rng.integers(0, args.videos, (2, args.batch)).tolist():  # warm the page cache and caches
        for fn in methods.values():
            fn(slots)
    a, b = store.read_slots(slots, [FRAMES] * len(slots)), mm.read(slots[0])
    assert all(np.array_equal(a[0][n], b[n]) for n in NAMES)
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        batches = rng.integers(0, args.videos, (args.batches, args.batch)).tolist()
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for name in order:
            start = time.perf_counter()
            for slots in batches:
                methods[name](slots)
            rates[name].append(args.batches * args.batch / (time.perf_counter() - start))
    print(f"{args.videos} videos, shards of {args.shard_videos}, batches of {args.batch} x 16 of 24 frames, "
          f"warm, one core, median of {args.rounds} alternating rounds")
    base = statistics.median(rates[next(iter(methods))])
    print("| read path | samples/s | ratio |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()

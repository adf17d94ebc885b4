"""What the deep query costs: the loader's bytes and samples/s per core for the block states it reads, and its
extra training FLOPs per sample.

    python -m bench.deep_query [--videos 8] [--rounds 5]

Stores of the real shapes (24 frames, 325 tokens, width 384: DINOv2-small at 256 px, SD-VAE latents 4x32x32),
written through the store's own shard buffers, with the states entering DINO's last N blocks for N = 0, 2, 4,
12 (DINOv2-small has 12), float16 and int8; and, for the other layout the issue asked about, the blocks' keys
AND values (`kv`: two arrays of the same shape per block, what a store of K/V would hold). A sample is 16 of the
24 frames read by `FeatureDataset.__getitems__` in batches of 8 (what the DataLoader calls), with the block
states a `--query-depth N` run reads; every layout is timed alternating in one process pinned to one core,
from the page cache (the CPU's cost per sample; a cold disk adds the bytes at its own rate). Bytes per sample
are measured (`rchar` of /proc/self/io).

FLOPs: torch's FlopCounterMode over one training sample (16 frames, a coarse and 2 fine passes) of the deep
query with DINOv2-small's architecture (random weights): the keys and values of the stored states (once per
sample, no gradient) and the query's path through the blocks (forward and backward, per pass).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.common import LATENT, TIMESTAMPS, WANT, D, N, T, dinov2_small, io_counters, pin_to_one_core, work_folder
from fvlm_data import FeatureDataset
from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter
from fvlm_model.deep_query import DeepQuery

DEPTH = 12  # DINOv2-small's blocks
PASSES = 3  # a coarse pass and 2 fine passes (the default fine_iterations)


def layouts() -> list[tuple[str, int, str, int]]:
    """(label, blocks read, feature dtype, arrays per block)."""
    rows = [(f"N={n} {dt}", n, dt, 1) for n in (0, 2, 4, 12) for dt in ("float16", "int8")]
    return rows + [(f"N={n} float16 kv", n, "float16", 2) for n in (2, 4)]


def make_store(path, videos: int, blocks: int, dtype: str, per_block: int) -> FeatureDataset:
    arrays = blocks * per_block  # a K/V layout is two arrays of the same shape per block
    ids = list(range(DEPTH - arrays, DEPTH)) if arrays else []
    shapes = FeatureShapes(T, {"dino": (N, D), "latents": LATENT, **{f"dino_block{k}": (N, D) for k in ids}})
    attrs = dict(dino="bench-synthetic", vae="bench-synthetic", num_frames=T, image_size=256, feature_dtype=dtype,
                 **({"dino_layers": len(ids), "dino_blocks": ids} if ids else {}))
    store = StoreWriter.create_or_open(path, attrs, shapes, capacity=videos, shard_videos=4)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((T, N, D), dtype=np.float32)  # the bytes' values do not change a raw read
    for shard in range(store.num_shard_objects):
        buf = store.shard_buffer(shard)
        for slot in range(buf.start, buf.stop):
            buf.add_row(slot, dino=tokens, latents=rng.standard_normal((T, *LATENT), dtype=np.float32),
                        caption="a caption", video_id=f"v{slot}", source=f"/v{slot}.mp4", timestamps=TIMESTAMPS,
                        duration=36.0, **{f"dino_block{k}": tokens for k in ids})
        buf.publish()
    return FeatureDataset(path, num_frames=WANT, split="all").read_block_states(tuple(ids))


def loader_table(videos: int, rounds: int, workdir: str | None) -> None:
    with work_folder(workdir, "fvlm-deep-query-") as root:
        sets = {label: make_store(root / f"{i}.zarr", videos, n, dt, per)
                for i, (label, n, dt, per) in enumerate(layouts())}
        times: dict[str, list[float]] = {k: [] for k in sets}
        nbytes: dict[str, float] = {}
        for r in range(rounds):
            order = list(sets)[r % len(sets):] + list(sets)[: r % len(sets)]  # rotate the order each round
            for label in order:
                ds = sets[label]
                before, t0 = io_counters().get("rchar", 0), time.perf_counter()
                for start in range(0, len(ds), 8):
                    ds.__getitems__(list(range(start, min(start + 8, len(ds)))))
                times[label].append((time.perf_counter() - t0) / len(ds))
                nbytes[label] = (io_counters().get("rchar", 0) - before) / len(ds)
    base = statistics.median(times["N=0 float16"])
    print(f"\n{'layout':<20} {'MB/sample':>10} {'samples/s/core':>15} {'vs N=0 fp16':>12}")
    for label in sets:
        med = statistics.median(times[label])
        print(f"{label:<20} {nbytes[label] / 1e6:>10.1f} {1 / med:>15.1f} {base / med:>11.2f}x")


def flops_table() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    dino = dinov2_small()
    print(f"\n{'query depth':<12} {'K/V GFLOP':>10} {'query GFLOP':>12} {'total GFLOP/sample':>19}")
    for depth in (2, 4, 12):
        deep = DeepQuery.from_dino(dino, "transformers", depth)
        states = [torch.randn(1, WANT, N, D) for _ in range(depth)]
        with FlopCounterMode(display=False) as kv_count:
            kv = deep.keys_values(states)
        queries = torch.randn(1, WANT, D, requires_grad=True)
        with FlopCounterMode(display=False) as q_count:
            for _ in range(PASSES):
                z, _ = deep(queries, kv)
                z.sum().backward()
        kv_g, q_g = kv_count.get_total_flops() / 1e9, q_count.get_total_flops() / 1e9
        print(f"{depth:<12} {kv_g:>10.2f} {q_g:>12.3f} {kv_g + q_g:>19.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8, help="videos per store")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="keep the stores here (default: a temporary folder)")
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    cpu = pin_to_one_core()
    print(f"one core (cpu {cpu}), {args.videos} videos per store, {args.rounds} rounds; medians")
    if not args.skip_loader:
        loader_table(args.videos, args.rounds, args.workdir)
    flops_table()


if __name__ == "__main__":
    main()

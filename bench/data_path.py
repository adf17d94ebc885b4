"""Data-path benchmark: the seed's one `.pt` file per video, LitData, and the fvlm feature store.

    python -m bench.data_path                      # one core, warm and page-cache-cold reads
    python -m bench.data_path --dataloader         # the training loader, 1 and 2 workers, against the reader,
                                                   # LitData's StreamingDataLoader and the seed's .pt files
    python -m bench.data_path --checksums          # the cost of verifying every byte read (format 3 vs 2)

Every format holds the same real-model-shaped features (DINOv2-small at 256 px: 24 x 325 x 384,
SD-VAE latents 24 x 4 x 32 x 32) with a DINO-like value distribution (not zeros, not plain N(0, 1)).
A sample is 16 of the 24 frames (plus timestamps and the caption), in memory the caller owns.

- seed: `{"dino_features": bf16, "latents": bf16, "caption": str}` per video via torch.save; a
  sample = torch.load of the whole file (weights_only=True), convert to float32, keep 16 of 24
  frames (what the reference did).
- litdata (when `pip install litdata` is done): the same float16 tensors written by
  `litdata.optimize` (no compression, one chunk per `--shard-videos` videos, like our shards);
  a sample = `StreamingDataset[i]` then `index_select` of the 16 frames (the fastest of torch
  indexing, numpy take and index_select here; LitData hands out views of its memory map).
- ours: rows written with `FeatureStore.shard_buffer` (whole shards, as precompute writes them),
  float16 and int8; a sample = `FeatureDataset[i]`, or `FeatureDataset.__getitems__` of a batch
  of 32 (what a DataLoader calls).

Formats are timed ALTERNATING in one process (the order rotates each round), pinned to one core
with torch.set_num_threads(1); each figure is the median over rounds. Bytes read per sample are
measured, not computed: `rchar` of /proc/self/io counts bytes returned by read syscalls (memory
mapped reads do not appear there), `read_bytes` what came from the block device in cold reads;
minor page faults per sample (getrusage) show the cost of fresh output memory.
"Cold" drops a batch's files from the page cache before each read (untimed): this process's
mappings of them first (madvise DONTNEED: mapped pages are not evicted otherwise), then
posix_fadvise DONTNEED; the eviction is checked with mincore. On a virtual machine the host may
still cache the disk image, so "cold" means cold for this kernel, not necessarily a disk read.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    LATENT,
    TIMESTAMPS,
    WANT,
    WORDS,
    D,
    N,
    T,
    create_store,
    evict,
    fmt_bytes,
    io_counters,
    median,
    pin_to_one_core,
    resident_fraction,
    shard_files,
    synthetic_caption,
    synthetic_features,
    synthetic_latents,
    work_folder,
)
from fvlm_data import FeatureDataset, FeatureStore
from fvlm_data.dataset import frame_indices
from fvlm_data.store.writer import StoreWriter

SEED_FRAMES = torch.linspace(0, T - 1, WANT).long()  # the reference kept 16 of 24 frames like this
OURS_FRAMES = frame_indices(T, WANT)  # what FeatureDataset picks (uniform sampling)
GPU_RATE = 100.0  # samples/s the seed recorded for joint training (RTX 4090, batch 32, 16 frames)


# ----------------------------------------------------------------------------- writing the formats
def video_features(seed: int, i: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Video i's features and caption, the same whichever format is being written."""
    rng = np.random.default_rng((seed, i))
    return synthetic_features(rng), synthetic_latents(rng), synthetic_caption(rng)


def video_id(i: int) -> str:
    return f"video_{i:06d}"


def litdata_sample(i: int, seed: int = 0) -> dict[str, Any]:
    """Video i as a LitData item: the store's float16 tensors, timestamps and strings."""
    dino, latents, caption = video_features(seed, i)
    return {"dino": torch.from_numpy(dino.astype(np.float16)), "latents": torch.from_numpy(latents.astype(np.float16)),
            "timestamps": torch.from_numpy(TIMESTAMPS.copy()), "caption": caption, "video_id": video_id(i)}


def litdata_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("litdata") is not None


def write_litdata(out: Path, videos: int, chunk_videos: int, seed: int) -> None:
    """`litdata.optimize` (one worker process, no compression, `chunk_videos` items per chunk file)."""
    import functools
    import multiprocessing

    import litdata

    method = multiprocessing.get_start_method(allow_none=True)
    try:  # optimize sets the process-wide start method; put it back afterwards
        litdata.optimize(fn=functools.partial(litdata_sample, seed=seed), inputs=list(range(videos)),
                         output_dir=str(out), chunk_size=chunk_videos, compression=None, num_workers=1,
                         start_method="spawn", verbose=False)
    finally:
        multiprocessing.set_start_method(method, force=True)


def write_datasets(root: Path, videos: int, with_int8: bool, with_litdata: bool, shard_videos: int | None,
                   seed: int = 0) -> dict[str, Any]:
    """The same features written the seed's way, into our store(s) and with LitData; returns paths."""
    seed_dir = root / "seed_pt"
    seed_dir.mkdir(parents=True, exist_ok=True)
    dtypes = ["float16", "int8"] if with_int8 else ["float16"]
    stores = {}
    for dt in dtypes:
        stores[dt] = create_store(root / f"store_{dt}.zarr", videos, dt, shard_videos)
    s = stores["float16"].shard_videos
    paths = []
    for shard in range(-(-videos // s)):
        # Whole shards, as precompute writes them: rows buffered in memory, each array's shard published once.
        buffers = [store.shard_buffer(shard) for store in stores.values()]
        for i in range(shard * s, min((shard + 1) * s, videos)):
            dino, latents, caption = video_features(seed, i)
            path = seed_dir / f"{video_id(i)}.pt"
            torch.save({"dino_features": torch.from_numpy(dino).to(torch.bfloat16),
                        "latents": torch.from_numpy(latents).to(torch.bfloat16), "caption": caption}, path)
            paths.append(path)
            for buf in buffers:
                buf.add_row(i, dino=dino, latents=latents, caption=caption, video_id=video_id(i), source=str(path),
                            timestamps=TIMESTAMPS, duration=36.0)
        for buf in buffers:
            buf.publish()
    out = {"seed": paths, "shard_videos": s, **{dt: root / f"store_{dt}.zarr" for dt in dtypes}}
    if with_litdata:
        write_litdata(root / "litdata", videos, min(s, videos), seed)
        out["litdata"] = root / "litdata"
    os.sync()  # dirty pages cannot be evicted: make every file clean before any cold read
    return out


# ----------------------------------------------------------------------------- reading them
def read_seed(path: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The reference's read: the whole file, to float32 on the CPU, then 16 of the 24 frames."""
    data = torch.load(path, weights_only=True)
    dino = data["dino_features"].float()[SEED_FRAMES]
    latents = data["latents"].float()[SEED_FRAMES]
    return dino, latents, data["caption"]



class Method:
    """One way to read samples: `read(indices)` returns a batch's samples, all alive until the batch
    is done, as a DataLoader worker holds them until its collate (per sample or in one call)."""

    def __init__(self, name: str, label: str, read: Callable[[list[int]], Any], files: Callable[[int], list[Path]],
                 disk_per_video: float, mapped: bool = False) -> None:
        self.name, self.label, self.read, self.files = name, label, read, files
        self.disk_per_video, self.mapped = disk_per_video, mapped


def litdata_method(root: Path, videos: int) -> Method:
    import litdata

    ds = litdata.StreamingDataset(str(root))
    # Our index i is video i: find it through the video ids LitData returns (not its write order).
    position = {ds[k]["video_id"]: k for k in range(len(ds))}
    where = [position[video_id(i)] for i in range(videos)]
    frames = torch.from_numpy(OURS_FRAMES)
    chunks = sorted(root.glob("*.bin"))

    def read(indices: list[int]) -> list[tuple]:
        out = []
        for i in indices:
            item = ds[where[i]]
            out.append((item["dino"].index_select(0, frames), item["latents"].index_select(0, frames),
                        item["timestamps"].index_select(0, frames), item["caption"]))
        return out

    disk = sum(p.stat().st_size for p in chunks) / videos
    return Method("litdata", "LitData: StreamingDataset[i] per sample (litdata.optimize, no compression), "
                  "index_select 16 of 24",
                  read, lambda i: chunks, disk, mapped=True)


def make_methods(paths: dict[str, Any], videos: int, batch: int) -> list[Method]:
    seed_paths = paths["seed"]
    methods = [Method("seed", "seed .pt (bf16; torch.load whole file, to fp32, 16 of 24)",
                      lambda ix: [read_seed(seed_paths[i]) for i in ix], lambda i: [seed_paths[i]],
                      sum(p.stat().st_size for p in seed_paths) / videos)]
    if "litdata" in paths:
        methods.append(litdata_method(paths["litdata"], videos))
    f16 = FeatureStore.open(paths["float16"])
    disk = f16.nbytes_on_disk() / videos
    ours = FeatureDataset(paths["float16"], num_frames=WANT, split="all")
    methods += [
        Method("ours", "fvlm store float16: FeatureDataset[i] per sample (preadv of the 16 frames)",
               lambda ix: [ours[i] for i in ix], lambda i: shard_files(f16, i), disk),
        Method("ours_batch", f"fvlm store float16: FeatureDataset.__getitems__ of {batch}",
               ours.__getitems__, lambda i: shard_files(f16, i), disk),
    ]
    if "int8" in paths:
        i8 = FeatureStore.open(paths["int8"])
        ours8 = FeatureDataset(paths["int8"], num_frames=WANT, split="all")
        methods.append(Method("int8_batch", f"fvlm store int8 + fp16 scale: FeatureDataset.__getitems__ of {batch}",
                              ours8.__getitems__, lambda i: shard_files(i8, i), i8.nbytes_on_disk() / videos))
    return methods


def sample_order(rng: np.random.Generator, videos: int, samples: int, batch: int) -> list[int]:
    """`samples` random videos in which every batch holds distinct videos, as a shuffling sampler gives
    (a repeated video in a batch would be read once by the batched readers)."""
    per_perm = max(batch, videos // batch * batch)
    order: list[int] = []
    while len(order) < samples:
        order += rng.permutation(videos)[:per_perm].tolist()
    return order[:samples]


def time_reads(methods: list[Method], videos: int, rounds: int, samples: int, batch: int, cold: bool,
               seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per method: samples/s, rchar and read_bytes per sample, for each round (methods alternate).
    Every method reads the same random samples in a round, one call per sample or per batch."""
    rng = np.random.default_rng(seed)
    res = {m.name: {"sps": [], "rchar": [], "read_bytes": [], "faults": []} for m in methods}
    for r in range(rounds):
        order = sample_order(rng, videos, samples, batch)
        calls = [order[j : j + batch] for j in range(0, samples, batch)]
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            io0, faults0 = io_counters(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            elapsed = 0.0
            if cold:
                for ix in calls:
                    evict(sorted({f for i in ix for f in m.files(i)}))
                    t0 = time.perf_counter()
                    m.read(ix)
                    elapsed += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                for ix in calls:
                    m.read(ix)
                elapsed = time.perf_counter() - t0
            io1, faults1 = io_counters(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            res[m.name]["sps"].append(samples / elapsed)
            res[m.name]["faults"].append((faults1 - faults0) / samples)
            if io0:
                res[m.name]["rchar"].append((io1["rchar"] - io0["rchar"]) / samples)
                res[m.name]["read_bytes"].append((io1["read_bytes"] - io0["read_bytes"]) / samples)
    return res


def per_round_ratio(res: dict[str, dict[str, list[float]]], a: str, b: str) -> float:
    return median([x / y for x, y in zip(res[a]["sps"], res[b]["sps"], strict=True)])


def print_read_table(title: str, methods: list[Method], res: dict[str, dict[str, list[float]]], rounds: int,
                     cold: bool) -> None:
    has_lit = "litdata" in res
    seed_rchar = median(res["seed"]["rchar"])
    seed_dev = median(res["seed"]["read_bytes"])
    print(f"\n### {title}\n")
    cols = ["format", f"samples/s per core (median of {rounds})", "x seed"] + (["x LitData"] if has_lit else []) + [
        "bytes on disk per video", "bytes read per sample (read syscalls)", "minor page faults per sample"]
    if cold:
        cols += ["bytes from block device per sample", "x seed (block device)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for m in methods:
        r = res[m.name]
        row = [m.label, f"{median(r['sps']):.1f}", f"{per_round_ratio(res, m.name, 'seed'):.2f}x"]
        if has_lit:
            row.append(f"{per_round_ratio(res, m.name, 'litdata'):.2f}x")
        row.append(fmt_bytes(m.disk_per_video))
        rchar = fmt_bytes(median(r["rchar"])) if r["rchar"] else "n/a"
        row.append(f"{rchar} (memory-mapped: not counted)" if m.mapped else rchar)
        row.append(f"{median(r['faults']):.0f}")
        if cold:
            dev = median(r["read_bytes"]) if r["read_bytes"] else float("nan")
            row += [fmt_bytes(dev) if r["read_bytes"] else "n/a", f"{dev / seed_dev:.3f}x" if seed_dev else "n/a"]
        print("| " + " | ".join(row) + " |")
    print()
    for m in methods:
        if m.name in ("seed", "litdata"):
            continue
        r = res[m.name]
        parts = []
        if has_lit:
            need = 2.0 if cold else 1.0
            x = per_round_ratio(res, m.name, "litdata")
            parts.append(f">= {need:g}x LitData: {x:.2f}x ({'met' if x >= need else 'NOT met'})")
        if not cold:
            x = per_round_ratio(res, m.name, "seed")
            parts.append(f">= 6x seed: {x:.2f}x ({'met' if x >= 6 else 'NOT met'})")
            if not m.mapped and r["rchar"]:
                cap = 0.35 if m.name.startswith("int8") else 0.67
                x = median(r["rchar"]) / seed_rchar
                parts.append(f"bytes read <= {cap}x seed: {x:.3f}x ({'met' if x <= cap else 'NOT met'})")
        elif r["read_bytes"] and seed_dev:  # readahead and page rounding included: for information
            parts.append(f"block-device bytes {median(r['read_bytes']) / seed_dev:.3f}x seed's")
        print(f"target {m.name}: " + "; ".join(parts))


def run_reads(args: argparse.Namespace, paths: dict[str, Any]) -> None:
    cpu = pin_to_one_core()
    methods = make_methods(paths, args.videos, args.batch_size)
    print(f"one core: pinned to CPU {cpu}, torch threads {torch.get_num_threads()}; {args.videos} videos, "
          f"{args.samples} random samples per format per round in batches of {args.batch_size} (a batch's samples "
          f"stay alive until it is done, as in a DataLoader worker), {args.rounds} rounds, formats alternating; "
          f"store shards of {paths['shard_videos']} videos" +
          ("" if "litdata" in paths else "; LitData not compared (--no-litdata, or not installed: "
                                         "pip install litdata)"))
    for m in methods:  # warm the page cache (and the code paths) before the warm timing
        for j in range(0, args.videos, args.batch_size):
            m.read(list(range(j, min(j + args.batch_size, args.videos))))
    res = time_reads(methods, args.videos, args.rounds, args.samples, args.batch_size, cold=False)
    print_read_table("Warm page cache (every file read once before timing)", methods, res, args.rounds, False)
    if args.cold:
        checks = []
        for m in methods:
            m.read([0])  # map and touch sample 0's files, then check that the eviction empties them
            evict(m.files(0))
            frac = resident_fraction(m.files(0))
            checks.append(f"{m.name} {frac * 100:.1f}%" if frac is not None else f"{m.name} unchecked")
        res = time_reads(methods, args.videos, args.rounds, args.samples, args.batch_size, cold=True, seed=1)
        print_read_table("Page-cache cold (each call's files evicted before it, untimed; pages resident after "
                         f"eviction (mincore): {', '.join(checks)})", methods, res, args.rounds, True)


# ----------------------------------------------------------------------------- DataLoader mode
class SeedFormatDataset(torch.utils.data.Dataset):
    """The seed's Dataset: one .pt per video, read with `read_seed`."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        dino, latents, caption = read_seed(self.paths[i])
        return {"dino": dino, "latents": latents, "caption": caption, "video_id": self.paths[i].stem, "index": i}


def timed_rate(batches: Any, seconds: float, warmup: int) -> float:
    """Sustained samples/s of an iterator of batches, after `warmup` batches."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    while True:
        n += next(it)["dino"].shape[0]
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def random_keys(n: int, batch_size: int, seed: int) -> Any:
    g = np.random.default_rng(seed)
    while True:
        yield g.integers(0, n, batch_size).tolist()


def loader_rate(ds: torch.utils.data.Dataset, collate: Any, workers: int, batch_size: int, seconds: float,
                warmup: int, seed: int) -> float:
    """The seed's way, and this project's before the in-place loader: a DataLoader of items, stacked by
    the collate, then copied into pinned memory on CUDA."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(ds, replacement=True, num_samples=10**7, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None,
                        persistent_workers=False)
    return timed_rate(loader, seconds, warmup)


def ours_rate(ds: FeatureDataset, collate: Any, workers: int, batch_size: int, seconds: float, warmup: int,
              seed: int) -> float:
    """The training loader, `fvlm_train.data.make_loader`: whole batches read in place (shared memory in
    a worker), captions tokenised, nothing stacked."""
    from torch.utils.data import RandomSampler

    from fvlm_train.data import make_loader

    sampler = RandomSampler(ds, replacement=True, num_samples=10**7, generator=torch.Generator().manual_seed(seed))
    return timed_rate(make_loader(ds, collate, batch_size, workers, sampler, torch.cuda.is_available()), seconds,
                      warmup)


def in_process_rate(ds: FeatureDataset, collate: Any, threads: int, batch_size: int, seconds: float, warmup: int,
                    seed: int) -> float:
    """The reader in this process: `read_batch` + tokenising, one batch at a time (threads=0) or
    `threads` batches in flight in a thread pool (pread releases the GIL)."""
    keys = random_keys(len(ds), batch_size, seed)
    if threads == 0:
        return timed_rate((collate(ds.read_batch(k)) for k in keys), seconds, warmup)
    from concurrent.futures import ThreadPoolExecutor

    def batches(pool: ThreadPoolExecutor) -> Any:
        pending = [pool.submit(ds.read_batch, next(keys)) for _ in range(2 * threads)]
        while True:  # 2 batches in flight per thread, handed out in order
            done = pending.pop(0).result()
            pending.append(pool.submit(ds.read_batch, next(keys)))
            yield collate(done)

    with ThreadPoolExecutor(threads) as pool:
        return timed_rate(batches(pool), seconds, warmup)


def litdata_rate(root: Path, collate: Any, workers: int, batch_size: int, seconds: float, warmup: int,
                 seed: int) -> float:
    """LitData's `StreamingDataLoader` over the same float16 features (shuffled, workers persistent,
    epochs chained); its collate takes the same 16 frames and tokenises with the same collator."""
    import litdata

    frames = torch.from_numpy(OURS_FRAMES)

    def collate_lit(items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate([{"dino": it["dino"].index_select(0, frames), "latents": it["latents"].index_select(0, frames),
                         "caption": it["caption"], "video_id": it["video_id"], "index": 0} for it in items])

    loader = litdata.StreamingDataLoader(litdata.StreamingDataset(str(root), shuffle=True, seed=seed),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate_lit,
                                         drop_last=True, persistent_workers=workers > 0)

    def forever() -> Any:
        while True:
            yield from loader

    return timed_rate(forever(), seconds, warmup)


def run_dataloader(args: argparse.Namespace, paths: dict[str, Any]) -> None:
    from fvlm_data import CaptionCollator
    from fvlm_model import load_lm

    torch.set_num_threads(1)
    _, tokenizer = load_lm("tiny", words=WORDS)
    collate = CaptionCollator(tokenizer)
    ours = FeatureDataset(paths["float16"], num_frames=WANT, split="all")
    ours.__getitems__(list(range(len(ours))))  # warm the page cache
    b, s, w = args.batch_size, args.seconds, args.warmup
    runs: dict[tuple[str, int], Callable[[int], float]] = {("inproc", 0): lambda r: in_process_rate(
        ours, collate, 0, b, s, w, r), ("threads", 2): lambda r: in_process_rate(ours, collate, 2, b, s, w, r)}
    for n in args.workers:
        runs[("ours", n)] = lambda r, n=n: ours_rate(ours, collate, n, b, s, w, r)
        runs[("items", n)] = lambda r, n=n: loader_rate(ours, collate, n, b, s, w, r)
        if "litdata" in paths:
            runs[("litdata", n)] = lambda r, n=n: litdata_rate(paths["litdata"], collate, n, b, s, w, r)
        if args.seed_format:
            runs[("seed", n)] = lambda r, n=n: loader_rate(SeedFormatDataset(paths["seed"]), collate, n, b, s, w, r)
    if args.seed_format:
        for path in paths["seed"]:
            read_seed(path)  # in the page cache
    labels = {"inproc": "in-process reader (FeatureDataset.read_batch + tokenise, one batch at a time)",
              "threads": "in-process reader, batches in a thread pool",
              "ours": "fvlm training loader (fvlm_train.data.make_loader: read in place, shared memory)",
              "items": "fvlm store float16 (FeatureDataset.__getitems__ + CaptionCollator)",
              "litdata": "LitData StreamingDataLoader (same features, same collator)",
              "seed": "seed .pt (torch.load, fp32, 16 of 24; same collator)"}
    res: dict[tuple[str, int], list[float]] = {}
    order = list(runs)
    for r in range(args.rounds):
        k = r % len(order)
        for key in order[k:] + order[:k]:  # alternating: the order rotates each round
            res.setdefault(key, []).append(runs[key](r))
            gc.collect()  # the run's loader and its workers go now, not during the next run
    pin = torch.cuda.is_available()
    print(f"\n### DataLoader, {WANT}-frame samples, batch {b}, pin_memory={pin}, "
          f"{os.cpu_count()} CPUs shared; {args.videos} videos in the page cache; median of {args.rounds} rounds "
          f"of {s:g} s after {w} warm-up batches\n")
    print("| format | workers | samples/s | samples/s per worker | projection: 16 workers on 16 cores |")
    print("|---|---|---|---|---|")
    for (name, n) in order:
        rate = median(res[(name, n)])
        per = rate / max(n, 1)
        print(f"| {labels[name]} | {n} | {rate:.1f} | {per:.1f} | {16 * per:.0f} |")

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> str:  # median of the per-round ratios
        if a not in res or b not in res:
            return "n/a"
        return f"{median([x / y for x, y in zip(res[a], res[b], strict=True)]):.2f}x"

    one = ("ours", args.workers[0])
    print(f"\ntargets, ours with {one[1]} worker(s): >= 0.8x the in-process reader per core: "
          f"{ratio(one, ('inproc', 0))}; "
          f">= 2x LitData: {ratio(one, ('litdata', one[1]))}; >= 10x seed .pt: {ratio(one, ('seed', one[1]))}; "
          f"vs the item DataLoader before: {ratio(one, ('items', one[1]))}")
    print(f"\nThe projection is per-worker samples/s x 16, NOT a measurement: it assumes linear scaling, one worker "
          f"per core, a main process and storage that keep up. For scale: the seed recorded ~{GPU_RATE:.0f} "
          f"samples/s of joint training on an RTX 4090 (batch 32, 16 frames).")


# ----------------------------------------------------------------------------- profile
def run_profile(paths: dict[str, Any], videos: int, batch: int) -> None:
    import cProfile
    import pstats

    from fvlm_data import CaptionCollator
    from fvlm_model import load_lm

    pin_to_one_core()
    _, tokenizer = load_lm("tiny", words=WORDS)
    ds = FeatureDataset(paths["float16"], num_frames=WANT, split="all")
    collate = CaptionCollator(tokenizer)
    ds.__getitems__(list(range(len(ds))))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        for start in range(0, videos - batch + 1, batch):
            collate(ds.__getitems__(list(range(start, start + batch))))
    prof.disable()
    print(f"\n### Profile: FeatureDataset.__getitems__ + CaptionCollator, batches of {batch}, one core\n")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


# ----------------------------------------------------------------------------- checksum cost
def run_checksum_cost(args: argparse.Namespace, root: Path) -> None:
    """Warm samples/s of `FeatureDataset.__getitems__` on the same rows in a format-3 store (every frame
    read checked against its crc32c, small arrays against zarr's crc32c codec) and in a format-2 store
    (no checksums), alternating in one process on one core; the ratio is taken per round."""
    from bench.common import SHAPES
    from fvlm_data.store.format import schema
    from fvlm_data.store.objects import LocalObjects
    from fvlm_data.store.reader import open_group

    attrs = dict(dino="bench-synthetic", vae="bench-synthetic", num_frames=T, image_size=256, feature_dtype="float16")
    on = StoreWriter.create_or_open(root / "format3.zarr", attrs, SHAPES, capacity=args.videos,
                                     shard_videos=args.shard_videos)
    off_path = root / "format2.zarr"
    for key, data in schema(attrs, SHAPES, args.videos, on.shard_videos, version=2).items():
        (off_path / key).parent.mkdir(parents=True, exist_ok=True)
        (off_path / key).write_bytes(data)
    off = FeatureStore(off_path, LocalObjects(off_path), open_group(off_path, LocalObjects(off_path), "r+"), True)
    for shard in range(on.num_shard_objects):
        buffers = [store.shard_buffer(shard) for store in (on, off)]
        for i in range(buffers[0].start, buffers[0].stop):
            dino, latents, caption = video_features(0, i)
            for buf in buffers:
                buf.add_row(i, dino=dino, latents=latents, caption=caption, video_id=video_id(i), source="synthetic",
                            timestamps=TIMESTAMPS, duration=36.0)
        for buf in buffers:
            buf.publish()
    cpu = pin_to_one_core()
    datasets = {"on": FeatureDataset(root / "format3.zarr", num_frames=WANT, split="all"),
                "off": FeatureDataset(off_path, num_frames=WANT, split="all")}
    rng = np.random.default_rng(0)
    for ds in datasets.values():  # warm the page cache and the shard caches
        ds.__getitems__(list(range(args.videos)))
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):
        order = sample_order(rng, args.videos, args.samples, args.batch_size)
        for name in (["on", "off"] if r % 2 == 0 else ["off", "on"]):
            t0 = time.perf_counter()
            for j in range(0, args.samples, args.batch_size):
                datasets[name].__getitems__(order[j : j + args.batch_size])
            rates[name].append(args.samples / (time.perf_counter() - t0))
    ratio = median([a / b for a, b in zip(rates["on"], rates["off"], strict=True)])
    print(f"\n### Checksums on the read path (warm page cache, one core: CPU {cpu}; {args.videos} videos, {WANT} of "
          f"{T} frames, batches of {args.batch_size}, {args.rounds} alternating rounds of {args.samples} samples)\n")
    print("| store | samples/s (median) |\n|---|---|")
    print(f"| format 3: every frame read checked (crc32c), small arrays' crc32c codec | {median(rates['on']):.1f} |")
    print(f"| format 2: no checksums | {median(rates['off']):.1f} |")
    print(f"\nchecksums on / off: {ratio:.3f} (median of per-round ratios; target >= 0.90: "
          f"{'met' if ratio >= 0.9 else 'NOT met'})")
    # What `precompute.py --verify data` (the default) adds to a rerun: every byte of every shard checked.
    from fvlm_data.store import shard_states

    shards = list(range(on.num_shard_objects))
    times = {True: [], False: []}
    for _ in range(3):
        for verify in (True, False):
            t0 = time.perf_counter()
            states = shard_states(on, shards, verify_data=verify)
            times[verify].append(time.perf_counter() - t0)
            assert all(state.problem is None for state in states.values())
    size = on.nbytes_on_disk()
    print(f"rerun check of {len(shards)} shards ({size / 1e9:.2f} GB, warm): --verify data {median(times[True]):.3f} s "
          f"({size / 1e9 / median(times[True]):.2f} GB/s), --verify index {median(times[False]):.3f} s (median of 3)")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", type=int, default=48, help="videos written in each format (default 48)")
    p.add_argument("--rounds", type=int, default=11, help="alternating rounds; figures are medians (default 11)")
    p.add_argument("--samples", type=int, default=64,
                   help="random samples per format per round, a multiple of --batch-size (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of the __getitems__ rows and the DataLoader")
    p.add_argument("--shard-videos", type=int, default=None, help="store shard size (default: the store's default)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 store")
    p.add_argument("--no-litdata", dest="litdata", action="store_false",
                   help="skip LitData even when it is installed")
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the page-cache-cold measurement")
    p.add_argument("--dataloader", action="store_true", help="measure a full DataLoader instead")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="with --dataloader: worker counts, comma-separated (default 1,2)")
    p.add_argument("--seconds", type=float, default=4.0, help="with --dataloader: timed seconds per run (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="with --dataloader: batches before timing (default 3)")
    p.add_argument("--no-seed-format", dest="seed_format", action="store_false",
                   help="with --dataloader: skip the seed-format DataLoader")
    p.add_argument("--profile", action="store_true", help="cProfile the Dataset + collate path and exit")
    p.add_argument("--checksums", action="store_true",
                   help="only the cost of checksums on the read path: format 3 (verified) vs format 2, warm")
    p.add_argument("--workdir", default=None,
                   help="write (and keep) the data here (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    if args.samples % args.batch_size:
        p.error(f"--samples ({args.samples}) must be a multiple of --batch-size ({args.batch_size})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.profile and args.videos < args.batch_size:
        raise SystemExit("--profile needs --videos >= --batch-size")
    reads = not (args.dataloader or args.profile)
    with work_folder(args.workdir, "fvlm_bench_") as root:
        if args.checksums:
            run_checksum_cost(args, root)
            return
        t0 = time.perf_counter()
        paths = write_datasets(root, args.videos, with_int8=args.int8 and reads,
                               with_litdata=args.litdata and not args.profile and litdata_available(),
                               shard_videos=args.shard_videos)
        print(f"wrote {args.videos} videos per format under {root} in {time.perf_counter() - t0:.1f} s "
              f"(features: synthetic, DINO-like value distribution; shapes dino [{T},{N},{D}], latents "
              f"[{T},{','.join(map(str, LATENT))}])")
        if args.profile:
            run_profile(paths, args.videos, args.batch_size)
        elif args.dataloader:
            run_dataloader(args, paths)
        else:
            run_reads(args, paths)


if __name__ == "__main__":
    main()

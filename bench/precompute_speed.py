"""Benchmark precompute: frozen-encoder throughput (GPU or CPU) and frame decoding per CPU core.

    python bench/precompute_speed.py --part encoders                 # real-size random-init DINOv2-small + SD-VAE
    python bench/precompute_speed.py --part decode --clips /tmp/clips  # clips from bench/make_clips.py
    python bench/precompute_speed.py --part encoders --device cpu --frames-per-batch 2 --iters 1

Encoders (part `encoders`): DINOv2-small (transformers `Dinov2Config`: 384 wide, 12 layers, 6 heads,
MLP x4, patch 14, 518 px position grid interpolated to 18x18 at 256 px) and the SD-VAE encoder of
`stabilityai/sd-vae-ft-mse` (block_out_channels 128/256/512/512, 2 layers per block, 32 norm
groups, 4 latent channels), both random-initialised from their configs (no network). The VAE is
diffusers' AutoencoderKL when diffusers is installed, otherwise a plain-torch replica of its
encoder + quant_conv (`SDVAEEncoder`, same parameter names, checked equal to diffusers' on CPU);
only the encoder runs, never the decoder. Frames are 256x256, batches of --videos x --frames-per-video
(the precompute default: 8 videos x 24 frames). bf16 on CUDA, fp32 on CPU. Variants:
  dino eager / compiled; vae eager NCHW / eager channels-last / compiled channels-last;
  pipeline: FrozenEncoders.encode end to end (uint8 frames from the CPU, results back to the CPU),
  eager and compiled, -> videos/s.
Decode (part `decode`, CPU only): `load_frames` on every .mp4 in --clips with --seek exact and
keyframe: CPU seconds per video (one decode thread, so per core), videos/s per core, cores needed
to feed --target videos/s, and keyframe mode's sampling error |actual - target| (s).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_step import peak_flops  # noqa: E402

SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "norm_num_groups": 32, "scaling_factor": 0.18215}


# ----------------------------------------------------------------------------- models
def dinov2_small(seed: int = 0) -> nn.Module:
    """facebook/dinov2-small's architecture, random-initialised."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                       image_size=518, layerscale_value=1.0, qkv_bias=True, layer_norm_eps=1e-6,
                       use_swiglu_ffn=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(cfg)


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def sd_vae_diffusers(seed: int = 1, **overrides) -> nn.Module:
    from diffusers import AutoencoderKL

    cfg = {**SD_VAE, **overrides}
    blocks = len(cfg["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                             up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=256, **cfg)


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # diffusers' asymmetric padding


class _Attention(nn.Module):
    """diffusers' single-head VAE mid-block attention (GroupNorm, q/k/v/out linears, residual)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (f(t).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([_Down(cout)]) if down else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(channels, channels, groups), _Resnet(channels, channels, groups)])
        self.attentions = nn.ModuleList([_Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Encoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], layers: int, latent: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            _Block(channels[max(i - 1, 0)], c, layers, groups, down=i < len(channels) - 1)
            for i, c in enumerate(channels)])
        self.mid_block = _Mid(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class SDVAEEncoder(nn.Module):
    """The encoder half of diffusers' AutoencoderKL in plain torch (for machines without diffusers).

    Parameter names equal diffusers' (`encoder.*`, `quant_conv.*`), so its state dict loads here;
    `encode(x).latent_dist.mean` and `config.scaling_factor` mirror its interface.
    """

    def __init__(self, block_out_channels=SD_VAE["block_out_channels"], layers_per_block=SD_VAE["layers_per_block"],
                 latent_channels=SD_VAE["latent_channels"], norm_num_groups=SD_VAE["norm_num_groups"],
                 scaling_factor=SD_VAE["scaling_factor"], seed: int = 1):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = _Encoder(tuple(block_out_channels), layers_per_block, latent_channels, norm_num_groups)
            self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.latent_channels = latent_channels
        self.config = SimpleNamespace(scaling_factor=scaling_factor)

    def encode(self, x):
        moments = self.quant_conv(self.encoder(x))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=moments[:, : self.latent_channels]))


def sd_vae(impl: str = "auto") -> tuple[nn.Module, str]:
    if impl == "diffusers" or (impl == "auto" and have_diffusers()):
        return sd_vae_diffusers(), "diffusers AutoencoderKL"
    return SDVAEEncoder(), "plain-torch SD-VAE encoder replica" + ("" if have_diffusers() else " (no diffusers)")


def check_replica() -> float:
    """Max |replica - diffusers| of the mean latent, real config, same weights, 64 px, fp32 CPU."""
    ref = sd_vae_diffusers().eval()
    rep = SDVAEEncoder().eval()
    state = {k: v for k, v in ref.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    rep.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref.encode(x).latent_dist.mean, rep.encode(x).latent_dist.mean
    return float((a - b).abs().max() / a.abs().max())


# ----------------------------------------------------------------------------- encoder timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_fn(fn, x, device, iters: int, warmup: int) -> tuple[float, float]:
    """(median seconds per call, first call seconds)."""
    times = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        fn(x)
        sync(device)
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = times[0]
    return statistics.median(times[warmup:]), first


def flops_per_frame(fn, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn(x[:1])
    return counter.get_total_flops()


def encoder_rows(args, device: torch.device, rows: list[dict], emit) -> None:
    from fvlm_data.encoders import FrozenEncoders

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames = args.videos * args.frames_per_video if args.frames_per_batch is None else args.frames_per_batch
    size = args.image_size
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(frames, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    peak = peak_flops(device)
    variants = [v for v in args.variants.split(",") if v]

    def wanted(name: str) -> bool:
        return any(v in name for v in variants)

    def run(name, model_name, fn, inp, flops):
        if not wanted(name):
            return
        try:
            med, first = time_fn(fn, inp, device, args.iters, args.warmup)
            fps = frames / med
            rows.append({"part": "encoders", "variant": name, "model": model_name, "frames": frames,
                         "frames_per_s": fps, "ms_per_batch": med * 1e3, "first_call_s": first,
                         "gflop_per_frame": flops / 1e9 if flops else None,
                         "mfu": fps * flops / peak if (peak and flops) else None})
        except Exception as e:  # OOM or a compile failure: keep the other rows
            rows.append({"part": "encoders", "variant": name, "model": model_name,
                         "error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"})
        emit(rows[-1])

    dino = dinov2_small().eval().requires_grad_(False).to(device, dtype)
    dino_fn = lambda t: dino(pixel_values=t).last_hidden_state  # noqa: E731
    dflops = flops_per_frame(dino_fn, x) if not args.no_flops else None
    run("dino-eager", "DINOv2-small", dino_fn, x, dflops)
    run("dino-compiled", "DINOv2-small", torch.compile(dino_fn, dynamic=False), x, dflops)

    vae, vae_name = sd_vae(args.vae_impl)
    vae = vae.eval().requires_grad_(False).to(device, dtype)
    vae_fn = lambda t: vae.encode(t).latent_dist.mean  # noqa: E731
    vflops = flops_per_frame(vae_fn, x) if not args.no_flops else None
    run("vae-eager-nchw", vae_name, vae_fn, x, vflops)
    vae_cl = vae.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run("vae-eager-cl", vae_name, vae_fn, x_cl, vflops)
    run("vae-compiled-cl", vae_name, torch.compile(vae_fn, dynamic=False), x_cl, vflops)
    del x, x_cl
    gc.collect()

    # End to end as precompute runs it: uint8 HWC frames from the CPU in, fp32 results back to the CPU.
    frames_u8 = torch.randint(0, 256, (frames, size, size, 3), dtype=torch.uint8, generator=gen)
    for compiled in (False, True):
        name = "pipeline-compiled" if compiled else "pipeline-eager"
        if not wanted(name):
            continue
        enc = FrozenEncoders.from_modules(dino, vae_cl, str(device), dino_id="dinov2-small-random",
                                          vae_id="sd-vae-random", compile=compiled)

        def encode(u8, enc=enc):
            out = enc.encode(u8)
            return out.dino.cpu(), out.latents.cpu()

        try:
            med, first = time_fn(encode, frames_u8, device, args.iters, args.warmup)
            videos = frames / args.frames_per_video
            rows.append({"part": "encoders", "variant": name, "model": "FrozenEncoders.encode", "frames": frames,
                         "frames_per_s": frames / med, "videos_per_s": videos / med, "ms_per_batch": med * 1e3,
                         "first_call_s": first})
        except Exception as e:
            rows.append({"part": "encoders", "variant": name, "model": "FrozenEncoders.encode",
                         "error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"})
        emit(rows[-1])
    # Combined from the best component rows (the two models run one after the other).
    best = {m: max((r["frames_per_s"] for r in rows if r.get("variant", "").startswith(m) and "frames_per_s" in r),
                   default=None) for m in ("dino", "vae")}
    if best["dino"] and best["vae"]:
        per_frame = 1 / best["dino"] + 1 / best["vae"]
        rows.append({"part": "encoders", "variant": "best dino + best vae", "model": "sum of per-frame times",
                     "frames": frames, "frames_per_s": 1 / per_frame,
                     "videos_per_s": 1 / (per_frame * args.frames_per_video)})
        emit(rows[-1])


def fmt_enc(r: dict) -> str:
    if "error" in r:
        return f"| {r['variant']} | {r['model']} | failed: {r['error']} | | | | |"
    v = f"{r['videos_per_s']:.3g}" if r.get("videos_per_s") else ""
    g = f"{r['gflop_per_frame']:.1f}" if r.get("gflop_per_frame") else ""
    m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ("n/a" if g else "")
    first = f"{r['first_call_s']:.1f}" if r.get("first_call_s") is not None else ""
    return f"| {r['variant']} | {r['model']} | {r['frames_per_s']:.3g} | {v} | {first} | {g} | {m} |"


ENC_HEADER = ("| encoder variant | model | frames/s | videos/s | first call s | GFLOP/frame | of bf16 peak |\n"
              "|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------- decoding
def decode_rows(args, rows: list[dict], emit) -> None:
    import numpy as np

    from fvlm_data.sources import VideoInput, load_frames
    from fvlm_data.video import sample_timestamps

    clips = sorted(Path(args.clips).glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no .mp4 clips in {args.clips}: run bench/make_clips.py --out {args.clips} first")
    for clip in clips:
        item = VideoInput(video_id=clip.stem, source=str(clip), caption="x", path=str(clip))
        for seek in args.seek.split(","):
            cpu, wall = [], []
            for _ in range(args.repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                out = load_frames(item, args.frames_per_video, args.image_size, seek=seek)
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            err = np.abs(out.timestamps - sample_timestamps(out.duration, args.frames_per_video))
            cpu_s = statistics.median(cpu)
            rows.append({"part": "decode", "clip": clip.name, "seek": seek, "duration_s": out.duration,
                         "cpu_s_per_video": cpu_s, "wall_s_per_video": statistics.median(wall),
                         "videos_per_s_per_core": 1 / cpu_s, "cores_for_target": args.target * cpu_s,
                         "err_mean_s": float(err.mean()), "err_max_s": float(err.max()),
                         "unique_frames": int(len(np.unique(out.timestamps)))})
            emit(rows[-1])
    for seek in args.seek.split(","):
        sel = [r for r in rows if r["seek"] == seek]
        cpu_s = statistics.mean(r["cpu_s_per_video"] for r in sel)
        rows.append({"part": "decode", "clip": f"mean of {len(sel)} clips", "seek": seek, "duration_s": None,
                     "cpu_s_per_video": cpu_s, "wall_s_per_video": statistics.mean(r["wall_s_per_video"] for r in sel),
                     "videos_per_s_per_core": 1 / cpu_s, "cores_for_target": args.target * cpu_s,
                     "err_mean_s": statistics.mean(r["err_mean_s"] for r in sel),
                     "err_max_s": max(r["err_max_s"] for r in sel),
                     "unique_frames": statistics.mean(r["unique_frames"] for r in sel)})
        emit(rows[-1])


def fmt_dec(r: dict, target: float) -> str:
    u = r["unique_frames"]
    return (f"| {r['clip']} | {r['seek']} | {r['cpu_s_per_video']:.3f} | {r['wall_s_per_video']:.3f} | "
            f"{r['videos_per_s_per_core']:.2f} | {r['cores_for_target']:.1f} | {r['err_mean_s']:.3f} | "
            f"{r['err_max_s']:.3f} | {u if isinstance(u, int) else f'{u:.1f}'} |")


def dec_header(target: float, frames: int) -> str:
    return (f"| clip | seek | CPU s/video | wall s/video | videos/s per core | cores for {target:g} videos/s | "
            f"mean abs(actual-target) s | max s | unique of {frames} frames |\n|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--part", default="encoders,decode", help="encoders, decode, or both (comma-separated).")
    p.add_argument("--device", default=None, help="Encoder device [default: cuda if available, else cpu].")
    p.add_argument("--videos", type=int, default=8, help="Videos per encoder batch (precompute's --batch-videos).")
    p.add_argument("--frames-per-video", type=int, default=24)
    p.add_argument("--frames-per-batch", type=int, default=None,
                   help="Override videos x frames (e.g. 2 on CPU); videos/s still counts --frames-per-video per video.")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="Timed calls per encoder variant.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="dino,vae,pipeline",
                   help="Encoder variants to run (substrings of: dino-eager, dino-compiled, vae-eager-nchw, "
                        "vae-eager-cl, vae-compiled-cl, pipeline-eager, pipeline-compiled).")
    p.add_argument("--vae-impl", choices=["auto", "diffusers", "replica"], default="auto")
    p.add_argument("--check-replica", action="store_true",
                   help="Check the plain-torch VAE encoder against diffusers' (needs diffusers) and exit.")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--clips", default="/tmp/clips", help="Folder of .mp4 clips for the decode part.")
    p.add_argument("--seek", default="exact,keyframe")
    p.add_argument("--repeats", type=int, default=2, help="Decodes per clip and mode (median).")
    p.add_argument("--target", type=float, default=40.0, help="Videos/s the decoders must feed.")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    if args.check_replica:
        if not have_diffusers():
            raise SystemExit("--check-replica needs diffusers")
        print(f"SD-VAE replica vs diffusers, max relative difference of the latent mean: {check_replica():.2e}")
        return
    parts = set(args.part.split(","))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        print(fmt_enc(row) if row["part"] == "encoders" else fmt_dec(row, args.target), flush=True)
        if args.json:  # after every row: a run killed by a time limit keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "encoders" in parts:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        frames = args.frames_per_batch or args.videos * args.frames_per_video
        print(f"# encoders on {dev}, {frames} frames of {args.image_size}px per batch, "
              f"{'bf16' if device.type == 'cuda' else 'fp32'}; diffusers {'yes' if have_diffusers() else 'no'}",
              flush=True)
        encoder_rows(args, device, rows, emit)
    if "decode" in parts:
        print(f"# decode on CPU (one thread per decode), {args.frames_per_video} frames at {args.image_size}px, "
              f"median of {args.repeats}", flush=True)
        decode_rows(args, rows, emit)
    if any(r["part"] == "encoders" for r in rows):
        print(ENC_HEADER)
        for r in rows:
            if r["part"] == "encoders":
                print(fmt_enc(r))
    if any(r["part"] == "decode" for r in rows):
        print(dec_header(args.target, args.frames_per_video))
        for r in rows:
            if r["part"] == "decode":
                print(fmt_dec(r, args.target))


if __name__ == "__main__":
    main()

"""Benchmark precompute: frozen-encoder throughput (GPU or CPU) and frame decoding per CPU core.

    python -m bench.precompute_speed --part encoders                 # real-size random-init DINOv2-small + SD-VAE
    python -m bench.precompute_speed --part decode --clips /tmp/clips  # clips from python -m bench.make_clips
    python -m bench.precompute_speed --part encoders --device cpu --frames-per-batch 2 --iters 1
    python -m bench.precompute_speed --part pipeline                  # the main thread's time per batch (CPU)

Encoders (part `encoders`): DINOv2-small (transformers `Dinov2Config`: 384 wide, 12 layers, 6 heads,
MLP x4, patch 14, 518 px position grid interpolated to 18x18 at 256 px) and the SD-VAE encoder of
`stabilityai/sd-vae-ft-mse` (block_out_channels 128/256/512/512, 2 layers per block, 32 norm
groups, 4 latent channels), both random-initialised from their configs (no network). The VAE is
diffusers' AutoencoderKL (a dependency); only its encoder runs, never the decoder. Frames are
256x256, batches of --videos x --frames-per-video
(the precompute default: 8 videos x 24 frames). bf16 on CUDA, fp32 on CPU. Variants:
  dino eager / compiled; vae eager NCHW / eager channels-last / compiled channels-last;
  pipeline: FrozenEncoders.encode end to end (uint8 frames from the CPU, results back to the CPU),
  eager and compiled, -> videos/s.
Decode (part `decode`, CPU only): `load_frames` on every .mp4 in --clips with --seek exact and
keyframe: CPU seconds per video (one decode thread, so per core), videos/s per core, cores needed
to feed --target videos/s, and keyframe mode's sampling error |actual - target| (s); then exact
decoding against the decoder before GOP planning (bench/reference_decode.py), repeats interleaved:
CPU seconds of each, their ratio, and whether frames and timestamps are identical.
Pipeline (part `pipeline`, bench/main_thread.py): `run_precompute` around a stand-in encoder of
the real output shapes, the main thread's time per batch outside the encoders, against the loop
as it was.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import dinov2_small, peak_flops, sync
from bench.main_thread import PIPE_HEADER, fmt_pipe, pipeline_rows

SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "norm_num_groups": 32, "scaling_factor": 0.18215}


# ----------------------------------------------------------------------------- models
def sd_vae(seed: int = 1, **overrides) -> nn.Module:
    """stabilityai/sd-vae-ft-mse's architecture (diffusers AutoencoderKL), random-initialised."""
    from diffusers import AutoencoderKL

    cfg = {**SD_VAE, **overrides}
    blocks = len(cfg["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                             up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=256, **cfg)


# ----------------------------------------------------------------------------- encoder timing
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
    from fvlm_data.precompute.encoders import FrozenEncoders

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

    vae, vae_name = sd_vae(), "diffusers AutoencoderKL"
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
            return out["dino"].cpu(), out["latents"].cpu()

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

    from fvlm_data.records import VideoInput
    from fvlm_data.sources import load_frames
    from fvlm_data.video.decode import sample_timestamps

    clips = sorted(Path(args.clips).glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no .mp4 clips in {args.clips}: run python -m bench.make_clips --out {args.clips} first")
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


def decode_ratio_rows(args, rows: list[dict], emit) -> None:
    """New exact decoding against today's (bench/reference_decode.py) on each clip: CPU time of
    `frames_at` (opening the file included), repeats interleaved in alternating order, and whether
    the frames and timestamps are identical."""
    from bench.reference_decode import ReferenceVideoFile
    from fvlm_data.video.decode import VideoFile, sample_timestamps

    for clip in sorted(Path(args.clips).glob("*.mp4")):
        cpu: dict[str, list[float]] = {"new": [], "today": []}
        outputs = {}
        for r in range(args.repeats):
            order = [("new", VideoFile), ("today", ReferenceVideoFile)]
            for name, cls in order if r % 2 == 0 else order[::-1]:
                c0 = time.process_time()
                with cls(str(clip)) as video:
                    outputs[name] = video.frames_at(sample_timestamps(video.duration, args.frames_per_video),
                                                    args.image_size)
                cpu[name].append(time.process_time() - c0)
        same = all(a.tobytes() == b.tobytes() for a, b in zip(outputs["new"], outputs["today"], strict=True))
        new, today = statistics.median(cpu["new"]), statistics.median(cpu["today"])
        rows.append({"part": "decode-ratio", "clip": clip.name, "new_cpu_s": new, "today_cpu_s": today,
                     "ratio": new / today, "identical": same, "repeats": args.repeats})
        emit(rows[-1])


def fmt_ratio(r: dict) -> str:
    return (f"| {r['clip']} | {r['today_cpu_s']:.3f} | {r['new_cpu_s']:.3f} | {r['ratio']:.2f}x | "
            f"{'yes' if r['identical'] else 'NO'} |")


RATIO_HEADER = ("| clip | today's exact CPU s/video | new exact CPU s/video | new / today | identical frames |\n"
                "|---|---|---|---|---|")


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
    p.add_argument("--part", default="encoders,decode",
                   help="encoders, decode, pipeline (the main thread's time per batch), comma-separated.")
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
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--clips", default="/tmp/clips", help="Folder of .mp4 clips for the decode part.")
    p.add_argument("--seek", default="exact,keyframe")
    p.add_argument("--repeats", type=int, default=2, help="Decodes per clip and mode (median).")
    p.add_argument("--target", type=float, default=40.0, help="Videos/s the decoders must feed.")
    p.add_argument("--pipeline-videos", type=int, default=256,
                   help="Videos per round of the pipeline part (4 shards: a long run reuses its shard buffers).")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of the pipeline part (median).")
    p.add_argument("--gpu-ms", type=float, default=360.0, help="The stand-in encoder's time per batch (pipeline).")
    p.add_argument("--dino-tokens", type=int, default=257, help="DINO tokens per frame (pipeline part).")
    p.add_argument("--workdir", default=None, help="Where the pipeline part writes its stores [default: system temp].")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    parts = set(args.part.split(","))
    rows: list[dict] = []

    formats = {"encoders": fmt_enc, "decode": lambda r: fmt_dec(r, args.target), "decode-ratio": fmt_ratio,
               "pipeline": fmt_pipe}

    def emit(row: dict) -> None:
        print(formats[row["part"]](row), flush=True)
        if args.json:  # after every row: a run killed by a time limit keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "encoders" in parts:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        frames = args.frames_per_batch or args.videos * args.frames_per_video
        print(f"# encoders on {dev}, {frames} frames of {args.image_size}px per batch, "
              f"{'bf16' if device.type == 'cuda' else 'fp32'}",
              flush=True)
        encoder_rows(args, device, rows, emit)
    if "pipeline" in parts:
        print(f"# precompute main loop, {args.videos} videos x {args.frames_per_video} frames per batch, DINO "
              f"[{args.dino_tokens}, 384] and latents [4, 32, 32] stored as float16, a {args.gpu_ms:g} ms stand-in "
              f"encoder, {args.pipeline_videos} videos per round, median of {args.rounds} interleaved rounds",
              flush=True)
        pipeline_rows(args, rows, emit)
    if "decode" in parts:
        print(f"# decode on CPU (one thread per decode), {args.frames_per_video} frames at {args.image_size}px, "
              f"median of {args.repeats}", flush=True)
        decode_rows(args, rows, emit)
        print(f"# exact decoding, new against today's, CPU s per video, median of {args.repeats} interleaved",
              flush=True)
        decode_ratio_rows(args, rows, emit)
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
    for part, header in (("decode-ratio", RATIO_HEADER), ("pipeline", PIPE_HEADER)):
        if any(r["part"] == part for r in rows):
            print(header)
            for r in rows:
                if r["part"] == part:
                    print(formats[part](r))


if __name__ == "__main__":
    main()

"""Precompute DINOv2 tokens and SD-VAE latents for a set of videos into a Zarr feature store.

    python precompute.py --out store.zarr                      # synthetic videos, real encoders
    python precompute.py --out store.zarr --preset tiny        # offline tiny encoders (tests, demo)
    python precompute.py --out store.zarr --videos clips/      # a folder or a CSV/JSONL manifest
    python precompute.py --out store.zarr --webdataset 'shards/{00000..00009}.tar'

Re-running the same command continues where it stopped. K processes (or machines sharing a
file system or an object store such as --out s3://bucket/prefix/store.zarr) fill one store
together with --num-shards K --shard-index I: process I owns store shards I, I+K, ...
"""

from __future__ import annotations

import os

import click
import torch

from fvlm_data.encoders import PRESETS, EncoderLoadError, FrozenEncoders
from fvlm_data.pipeline import run_precompute
from fvlm_data.sources import list_inputs
from fvlm_data.store import DEFAULT_SHARD_VIDEOS, FeatureStore, StoreError, check_compatible
from fvlm_data.synthetic import TASKS
from fvlm_data.video import SEEK_MODES

DEFAULT_SYNTHETIC_VIDEOS = 256


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, help="Zarr store to create or continue: a folder or a URL (s3://bucket/prefix/s.zarr).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default",
              help="Encoder preset: the real hub models, or 'tiny' random-initialised offline ones.")
@click.option("--dino", default=None, help="DINO encoder: hub id or local path, or timm:NAME (overrides the preset).")
@click.option("--vae", default=None,
              help="VAE: hub id or local path of a diffusers AutoencoderKL (overrides the preset).")
@click.option("--videos", default=None,
              help="A folder of video files (captions in <stem>.txt/.json) or a CSV/JSONL manifest.")
@click.option("--webdataset", default=None,
              help="Tar shards as video2dataset writes them, e.g. 'shards/{00000..00009}.tar'.")
@click.option("--synthetic", type=click.IntRange(min=1), default=None,
              help=f"Render N synthetic videos (the default source, N={DEFAULT_SYNTHETIC_VIDEOS}).")
@click.option("--synthetic-task", type=click.Choice(sorted(TASKS)), default="shapes", help="Which synthetic videos.")
@click.option("--num-frames", type=click.IntRange(min=1), default=24, help="Frames sampled over each whole video.")
@click.option("--image-size", type=click.IntRange(min=14), default=256,
              help="Short side resize and centre crop, pixels.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N inputs.")
@click.option("--min-duration", type=float, default=0.0,
              help="Skip videos shorter than this, seconds (the seed used 20).")
@click.option("--max-duration", type=float, default=None,
              help="Skip videos longer than this, seconds (the seed used 60).")
@click.option("--seek", type=click.Choice(SEEK_MODES), default="exact",
              help="exact: the frame nearest each uniform target. keyframe: the nearest keyframe, decoding "
                   "keyframes only (several times faster; frames up to half a keyframe interval, 1 s for "
                   "a 2 s GOP, off target; the store keeps the actual times).")
@click.option("--feature-dtype", type=click.Choice(["float16", "int8"]), default="float16",
              help="DINO token storage: float16, or int8 with a float16 scale per token (half the bytes).")
@click.option("--device", default=None, help="Encoder device [default: cuda if available, else cpu].")
@click.option("--num-shards", type=click.IntRange(min=1), default=1,
              help="Split the work among K processes (by whole store shards).")
@click.option("--shard-index", type=click.IntRange(min=0), default=0,
              help="This process is I of K: it fills store shards I, I+K, ...")
@click.option("--shard-videos", type=click.IntRange(min=1), default=None,
              help=f"Videos per store shard (one object per array per shard; a writer buffers one shard) "
                   f"[default: {DEFAULT_SHARD_VIDEOS} for a new store, an existing store's own].")
@click.option("--workers", type=click.IntRange(min=0), default=min(8, os.cpu_count() or 1),
              help="Decode worker processes (0: decode in this process).")
@click.option("--batch-videos", type=click.IntRange(min=1), default=8, help="Videos encoded together in one batch.")
@click.option("--seed", type=int, default=0, help="Seed of the synthetic source.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(**args) -> None:
    """Videos -> frames over the whole video -> frozen DINOv2 + SD-VAE -> a Zarr feature store."""
    sources = [k for k in ("videos", "webdataset", "synthetic") if args[k] is not None]
    if len(sources) > 1:
        raise click.UsageError("give at most one of --videos, --webdataset, --synthetic")
    if not sources:
        args["synthetic"] = DEFAULT_SYNTHETIC_VIDEOS  # the embedded default source
    if args["shard_index"] >= args["num_shards"]:
        raise click.UsageError(f"--shard-index must be below --num-shards ({args['num_shards']})")
    device = args["device"] or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: no CUDA device is available here")
    preset_dino, preset_vae = PRESETS[args["preset"]]
    dino, vae = args["dino"] or preset_dino, args["vae"] or preset_vae
    recorded = {k: v for k, v in args.items() if k not in ("quiet", "workers", "device")}

    try:
        recorded_scaling = None
        if FeatureStore.exists(args["out"]):  # refuse a mismatched store before loading any model
            wanted = {"dino": dino, "vae": vae, "num_frames": args["num_frames"], "image_size": args["image_size"],
                      "feature_dtype": args["feature_dtype"], "shard_videos": args["shard_videos"]}
            existing = FeatureStore.open(args["out"]).attrs
            check_compatible(args["out"], existing, wanted)
            # New rows get the latent scale the store already records (a store made before a preset's
            # factor changed keeps its own): the store's attributes are the one source of the factor.
            recorded_scaling = existing.get("encoders", {}).get("vae_scaling_factor")
        inputs = list_inputs(videos=args["videos"], webdataset=args["webdataset"], synthetic=args["synthetic"],
                             synthetic_task=args["synthetic_task"], seed=args["seed"])
        if args["limit"]:
            inputs = inputs[: args["limit"]]
        if not inputs:
            raise click.ClickException("no inputs found")
        click.echo(f"{len(inputs)} inputs; encoders dino={dino} vae={vae} on {device}", err=True)
        encoders = FrozenEncoders(dino=dino, vae=vae, device=device, vae_scaling_factor=recorded_scaling)
        summary = run_precompute(
            inputs, args["out"], encoders,
            num_frames=args["num_frames"], image_size=args["image_size"],
            min_duration=args["min_duration"], max_duration=args["max_duration"],
            num_shards=args["num_shards"], shard_index=args["shard_index"],
            workers=args["workers"], batch_videos=args["batch_videos"],
            feature_dtype=args["feature_dtype"], shard_videos=args["shard_videos"], seek=args["seek"],
            preset=args["preset"], args=recorded,
            progress=not args["quiet"],
        )
    except (StoreError, EncoderLoadError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for line in summary.lines(args["out"]):
        click.echo(line)


if __name__ == "__main__":
    main()

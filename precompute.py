"""Precompute DINOv2 tokens and SD-VAE latents for a set of videos into a Zarr feature store.

    python precompute.py --out store.zarr                      # synthetic videos, real encoders
    python precompute.py --out store.zarr --preset tiny        # offline tiny encoders (tests, demo)
    python precompute.py --out store.zarr --videos clips/      # a folder or a CSV/JSONL manifest
    python precompute.py --out store.zarr --webdataset 'shards/{00000..00009}.tar'

Re-running the same command continues where it stopped. Several GPUs and machines fill one store
together under torchrun (each rank uses GPU LOCAL_RANK and is process RANK of WORLD_SIZE), or as K
processes started by hand or by a Slurm array with --num-shards K --shard-index I (process I owns
store shards I, I+K, ...). --out may be a folder or an object-store URL such as s3://bucket/prefix/store.zarr.

    torchrun --nproc_per_node 8 precompute.py --out store.zarr --videos clips/
"""

from __future__ import annotations

import os
import signal
import sys

import click
import torch
from click.core import ParameterSource

from fvlm_data.distributed import Launch, RankGroup, torchrun_launch
from fvlm_data.encoders import PRESETS, EncoderLoadError, FrozenEncoders
from fvlm_data.pipeline import PrecomputeSummary, run_precompute
from fvlm_data.sources import list_inputs
from fvlm_data.store import DEFAULT_SHARD_VIDEOS, FeatureStore, StoreError, check_compatible
from fvlm_data.synthetic import TASKS
from fvlm_data.video import SEEK_MODES
from fvlm_data.workers import Stopped, stop_on_sigterm

DEFAULT_SYNTHETIC_VIDEOS = 256


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _take_torchrun_ranks(launch: Launch, args: dict) -> None:
    """Under torchrun this process is shard RANK of WORLD_SIZE, on GPU LOCAL_RANK; refuse contradicting flags."""
    ctx = click.get_current_context()
    for name, value in (("num_shards", launch.world_size), ("shard_index", launch.rank)):
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT and args[name] != value:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} {args[name]} contradicts torchrun's rank layout "
                                   f"(rank {launch.rank} of {launch.world_size}): leave {flag} out under torchrun")
        args[name] = value
    if args["device"] in (None, "cuda") and torch.cuda.is_available():  # an explicit cuda:N is kept
        gpus = torch.cuda.device_count()
        if launch.local_rank >= gpus:
            raise click.UsageError(f"local rank {launch.local_rank} has no GPU of its own (this machine has {gpus}): "
                                   f"start at most {gpus} processes per machine (--nproc_per_node)")
        args["device"] = f"cuda:{launch.local_rank}"
    if ctx.get_parameter_source("workers") is ParameterSource.DEFAULT:  # share the cores among local ranks
        args["workers"] = max(1, min(8, (os.cpu_count() or 1) // launch.local_world_size))


def _store_write_failed(out: str, error: OSError) -> str:
    """One line for a store that could not be written: a full disk, a quota, a refused object write."""
    reason = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
    try:
        store = FeatureStore.open(out)
        rows = len(store)
        holds = f"it holds {rows} finished video{'' if rows == 1 else 's'}, {store.nbytes_on_disk() / 1e6:.1f} MB"
    except (StoreError, OSError):
        holds = "it holds nothing yet"
    return (f"cannot write to the store {out}: {reason}; {holds}. Free space (or fix access) and run "
            "the same command again to continue.")


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
    launch = torchrun_launch()
    if launch is not None:
        _take_torchrun_ranks(launch, args)
    if args["shard_index"] >= args["num_shards"]:
        raise click.UsageError(f"--shard-index must be below --num-shards ({args['num_shards']})")
    device = args["device"] or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: no CUDA device is available here")
    preset_dino, preset_vae = PRESETS[args["preset"]]
    dino, vae = args["dino"] or preset_dino, args["vae"] or preset_vae
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))  # so that no library touches cuda:0 from every rank
    recorded = {k: v for k, v in args.items() if k not in ("quiet", "workers", "device")}
    # Only the first rank of each machine draws a progress bar; every rank's summary is printed as one.
    progress = not args["quiet"] and (launch is None or launch.local_rank == 0)
    stop_on_sigterm()  # a SIGTERM stops the decode workers and ends with one line, like Ctrl-C

    group = RankGroup(launch) if launch else None
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
        rank = f"rank {launch.rank} of {launch.world_size}: " if launch else ""
        click.echo(f"{rank}{len(inputs)} inputs; encoders dino={dino} vae={vae} on {device}", err=True)
        encoders = FrozenEncoders(dino=dino, vae=vae, device=device, vae_scaling_factor=recorded_scaling)
        try:
            summary = run_precompute(
                inputs, args["out"], encoders,
                num_frames=args["num_frames"], image_size=args["image_size"],
                min_duration=args["min_duration"], max_duration=args["max_duration"],
                num_shards=args["num_shards"], shard_index=args["shard_index"],
                workers=args["workers"], batch_videos=args["batch_videos"],
                feature_dtype=args["feature_dtype"], shard_videos=args["shard_videos"], seek=args["seek"],
                preset=args["preset"], args=recorded,
                progress=progress, barrier=group.barrier if group else None,
            )
        except OSError as e:  # writing the store failed; inputs are read (and fail) in the workers
            raise click.ClickException(_store_write_failed(args["out"], e)) from None
        if group is not None:
            parts = group.gather(summary)
            if parts is None:
                return  # rank 0 prints the one summary of the run
            summary = PrecomputeSummary.merge(parts)
    except (StoreError, EncoderLoadError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except (Stopped, KeyboardInterrupt) as e:
        name = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C"
        click.echo(f"stopped by {name}: {args['out']} keeps every finished video; run the same command again "
                   "to continue", err=True)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT))
    finally:
        if group is not None:
            group.close()
    for line in summary.lines(args["out"]):
        click.echo(line)


if __name__ == "__main__":
    main()

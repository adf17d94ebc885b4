"""Precompute DINOv2 tokens and SD-VAE latents for a set of videos into a Zarr feature store.

    python precompute.py --out store.zarr                      # synthetic videos, real encoders
    python precompute.py --out store.zarr --preset tiny        # offline tiny encoders (tests, demo)
    python precompute.py --out store.zarr --videos clips/      # a folder or a CSV/JSONL manifest
    python precompute.py --out store.zarr --webdataset 'shards/{00000..00009}.tar'

Re-running the same command continues where it stopped; with --retry-failed it also redoes the inputs
recorded as failed (a file copied in since, an I/O error, a decoder killed when out of memory).

Several GPUs and machines fill one store together under torchrun (each rank uses GPU LOCAL_RANK and
is process RANK of WORLD_SIZE), or as K processes started by hand or by a Slurm array with
--num-shards K --shard-index I (process I owns store shards I, I+K, ...). --out may be a folder or an
object-store URL such as s3://bucket/prefix/store.zarr.

    torchrun --nproc_per_node 8 precompute.py --out store.zarr --videos clips/
"""

from __future__ import annotations

import os
import signal
import sys

import click
import torch
from click.core import ParameterSource

from fvlm_data.environment import Launch, hub_reachable, torchrun_launch
from fvlm_data.errors import EncoderLoadError, StoreError
from fvlm_data.precompute.config import DEFAULT_SYNTHETIC_VIDEOS, PrecomputeConfig, click_options
from fvlm_data.precompute.encoders import FrozenEncoders, is_tiny
from fvlm_data.precompute.pipeline import PrecomputeSummary, run_precompute
from fvlm_data.precompute.ranks import RankGroup
from fvlm_data.precompute.workers import Stopped, stop_on_sigterm
from fvlm_data.sources import SOURCES, list_inputs
from fvlm_data.store import FeatureStore, check_compatible


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _take_torchrun_ranks(launch: Launch, config: PrecomputeConfig) -> None:
    """Under torchrun this process is shard RANK of WORLD_SIZE, on GPU LOCAL_RANK; refuse contradicting flags."""
    ctx = click.get_current_context()
    for name, value in (("num_shards", launch.world_size), ("shard_index", launch.rank)):
        given = getattr(config, name)
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT and given != value:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} {given} contradicts torchrun's rank layout "
                                   f"(rank {launch.rank} of {launch.world_size}): leave {flag} out under torchrun")
        setattr(config, name, value)
    if config.device in (None, "cuda") and torch.cuda.is_available():  # an explicit cuda:N is kept
        gpus = torch.cuda.device_count()
        if launch.local_rank >= gpus:
            raise click.UsageError(f"local rank {launch.local_rank} has no GPU of its own (this machine has {gpus}): "
                                   f"start at most {gpus} processes per machine (--nproc_per_node)")
        config.device = f"cuda:{launch.local_rank}"
    if ctx.get_parameter_source("workers") is ParameterSource.DEFAULT:  # share the cores among local ranks
        config.workers = max(1, min(8, (os.cpu_count() or 1) // launch.local_world_size))


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise click.UsageError(f"--device {device}: not a device type torch knows (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: no CUDA device is available here")
    if dev.type not in ("cpu", "cuda") and not getattr(getattr(torch, dev.type, None), "is_available", bool)():
        raise click.UsageError(f"--device {device}: no {dev.type} device is available here (use cpu, cuda or cuda:N)")


def _hub_models_reachable(config: PrecomputeConfig) -> None:
    """Hub encoders that are neither cached nor downloadable here fail now, in one line with what to do,
    instead of after the hub client's retries (~35 s); cached ones are then loaded offline, without them."""
    from huggingface_hub import constants, try_to_load_from_cache

    hub_ids = [m for m in (config.dino_id, config.vae_id)
               if not is_tiny(m) and not m.startswith("timm:") and not os.path.isdir(os.path.expanduser(m))]
    if not hub_ids or not (constants.HF_HUB_OFFLINE or not hub_reachable()):
        return
    missing = [m for m in hub_ids if not isinstance(try_to_load_from_cache(m, "config.json"), str)]
    if missing:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached from here"
        raise click.ClickException(
            f"cannot load encoder {missing[0]!r}: it is not in the local Hugging Face cache and {where}; add "
            "--preset tiny for the offline tiny encoders (tests, demo), or give --dino PATH / --vae PATH to local "
            "copies (or download once where there is network; then HF_HUB_OFFLINE=1 uses the cache)")
    os.environ["HF_HUB_OFFLINE"] = "1"  # all cached: load them without asking the unreachable hub
    constants.HF_HUB_OFFLINE = True


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
@click_options
def main(**args) -> None:
    """Videos -> frames over the whole video -> frozen DINOv2 + SD-VAE -> a Zarr feature store."""
    config = PrecomputeConfig(**args)
    given = [source.option for source in SOURCES if getattr(config, source.option) is not None]
    if len(given) > 1:
        raise click.UsageError(f"give at most one of {', '.join('--' + source.option for source in SOURCES)}")
    if not given:
        config.synthetic = DEFAULT_SYNTHETIC_VIDEOS  # the embedded default source
    launch = torchrun_launch()
    if launch is not None:
        _take_torchrun_ranks(launch, config)
    if config.shard_index >= config.num_shards:
        raise click.UsageError(f"--shard-index must be below --num-shards ({config.num_shards})")
    device = config.device or _default_device()
    _check_device(device)
    try:
        config.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))  # so that no library touches cuda:0 from every rank
    # Only the first rank of each machine draws a progress bar; every rank's summary is printed as one.
    progress = not config.quiet and (launch is None or launch.local_rank == 0)
    stop_on_sigterm()  # a SIGTERM stops the decode workers and ends with one line, like Ctrl-C

    group = RankGroup(launch) if launch else None
    try:
        recorded_scaling, existing = None, {}
        if FeatureStore.exists(config.out):  # refuse a mismatched store before loading any model
            existing = FeatureStore.open(config.out).attrs
            check_compatible(config.out, existing, config.recipe, config.shard_videos)
            # New rows get the latent scale the store already records (a store made before a preset's
            # factor changed keeps its own): the store's attributes are the one source of the factor.
            recorded_scaling = existing.get("encoders", {}).get("vae_scaling_factor")
        _hub_models_reachable(config)
        chosen = {source.option: getattr(config, source.option) for source in SOURCES}
        inputs = list_inputs(**chosen, synthetic_task=config.synthetic_task, seed=config.seed)[: config.limit]
        if not inputs:
            raise click.ClickException("no inputs found")
        rank = f"rank {launch.rank} of {launch.world_size}: " if launch else ""
        click.echo(f"{rank}{len(inputs)} inputs; encoders dino={config.dino_id} vae={config.vae_id} on {device}",
                   err=True)
        encoders = FrozenEncoders(dino=config.dino_id, vae=config.vae_id, device=device,
                                  compile=config.compile_on(device), vae_scaling_factor=recorded_scaling,
                                  dino_layers=config.dino_layers)
        if existing.get("dino_fingerprint", encoders.dino_fingerprint) != encoders.dino_fingerprint:
            raise StoreError(f"{config.out} holds DINO block states made by other {config.dino_id} weights "
                             f"({existing['dino_fingerprint'][:19]}..., these are "
                             f"{encoders.dino_fingerprint[:19]}...): use a new --out")
        try:
            summary = run_precompute(config, inputs, encoders, progress=progress,
                                     barrier=group.barrier if group else None)
        except OSError as e:  # writing the store failed; inputs are read (and fail) in the workers
            raise click.ClickException(_store_write_failed(config.out, e)) from None
        if group is not None:
            parts = group.gather(summary)
            if parts is None:
                return  # rank 0 prints the one summary of the run
            summary = PrecomputeSummary.merge(parts)
    except (StoreError, EncoderLoadError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except (Stopped, KeyboardInterrupt) as e:
        name = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C"
        click.echo(f"stopped by {name}: {config.out} keeps every finished video; run the same command again "
                   "to continue", err=True)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT))
    finally:
        if group is not None:
            group.close()
    for line in summary.lines(config.out):
        click.echo(line)


if __name__ == "__main__":
    main()

"""The precompute configuration: one typed record of a precompute run; precompute.py's flags are its fields.

A field with `help` is a command-line option (`--num-frames` for `num_frames`) with the default
below. The store records the run in its `precompute_args` attribute (every option but those that
only change how fast a run goes or what it prints), and the decode workers get the config's
`decoding` part as one small record.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import click

from fvlm_data.precompute.encoders import PRESETS
from fvlm_data.records import Decoding
from fvlm_data.sources.synthetic import TASKS
from fvlm_data.store import DEFAULT_SHARD_VIDEOS, FeatureRecipe
from fvlm_data.video.decode import FRAME_SAMPLING, SEEK_MODES

DEFAULT_SYNTHETIC_VIDEOS = 256
FEATURE_DTYPES = ("float16", "int8")


def option(default: Any, help: str, type: Any = None, recorded: bool = True, **click_kwargs: Any) -> Any:  # noqa: A002
    """A field that is a command-line option; `recorded=False` keeps it out of the store's `precompute_args`."""
    return field(default=default, metadata={"help": help, "type": type, "recorded": recorded, "click": click_kwargs})


@dataclass
class PrecomputeConfig:
    out: str = option(MISSING, "Zarr store to create or continue: a folder or a URL (s3://bucket/prefix/s.zarr).",
                      required=True)
    # Which encoders.
    preset: str = option("default", "Encoder preset: the real hub models, or 'tiny' random-initialised offline ones.",
                         click.Choice(sorted(PRESETS)))
    dino: str | None = option(None, "DINO encoder: hub id or local path, or timm:NAME (overrides the preset).")
    vae: str | None = option(None, "VAE: hub id or local path of a diffusers AutoencoderKL (overrides the preset).")
    # Which inputs.
    videos: str | None = option(None, "A folder of video files (captions in <stem>.txt/.json) or a CSV/JSONL manifest.")
    webdataset: str | None = option(None, "Tar shards as video2dataset writes them, e.g. 'shards/{00000..00009}.tar'.")
    synthetic: int | None = option(None, "Render N synthetic videos (the default source, "
                                   f"N={DEFAULT_SYNTHETIC_VIDEOS}).", click.IntRange(min=1))
    synthetic_task: str = option("shapes", "Which synthetic videos.", click.Choice(sorted(TASKS)))
    # How each input becomes frames, and the frames features.
    num_frames: int = option(24, "Frames sampled over each whole video.", click.IntRange(min=1))
    image_size: int = option(256, "Short side resize and centre crop, pixels.", click.IntRange(min=14))
    limit: int | None = option(None, "Use only the first N inputs.", click.IntRange(min=1))
    min_duration: float = option(0.0, "Skip videos shorter than this, seconds (the seed used 20).", float)
    max_duration: float | None = option(None, "Skip videos longer than this, seconds (the seed used 60).", float)
    seek: str = option("exact", "exact: the frame nearest each uniform target. keyframe: the nearest keyframe, "
                       "decoding keyframes only (several times faster; frames up to half a keyframe interval, 1 s "
                       "for a 2 s GOP, off target; the store keeps the actual times).", click.Choice(SEEK_MODES))
    feature_dtype: str = option("float16", "DINO token storage: float16, or int8 with a float16 scale per token "
                                "(half the bytes).", click.Choice(FEATURE_DTYPES))
    # Not in precompute_args: the store records it as `dino_layers` (with `dino_blocks`, `dino_fingerprint`)
    # only when above 0, so that a store made without it is the same store as before the option.
    dino_layers: int = option(0, "Also store the hidden states entering each of DINO's last N blocks (one array per "
                              "block, stored like the final tokens: --feature-dtype applies), for train.py "
                              "--query-depth; each block adds the final tokens' bytes again.", click.IntRange(min=0),
                              recorded=False)
    # Where and how fast it runs.
    device: str | None = option(None, "Encoder device [default: cuda if available, else cpu].", recorded=False)
    num_shards: int = option(1, "Split the work among K processes (by whole store shards).", click.IntRange(min=1))
    shard_index: int = option(0, "This process is I of K: it fills store shards I, I+K, ...", click.IntRange(min=0))
    shard_videos: int | None = option(None, "Videos per store shard (one object per array per shard; a writer "
                                      f"buffers one shard) [default: {DEFAULT_SHARD_VIDEOS} for a new store, an "
                                      "existing store's own].", click.IntRange(min=1))
    workers: int = option(min(8, os.cpu_count() or 1), "Decode worker processes (0: decode in this process).",
                          click.IntRange(min=0), recorded=False)
    batch_videos: int = option(8, "Videos encoded together in one batch.", click.IntRange(min=1))
    compile: bool | None = option(None, "torch.compile the encoders (one compilation per batch shape) [default: on for "
                                  "CUDA, off on the CPU].", recorded=False, flag_decls=("--compile/--no-compile",))
    seed: int = option(0, "Seed of the synthetic source.", int)
    verify: str = option("data", "What a rerun checks of the shards already in the store: data (every byte against "
                         "its checksums) or index (object sizes and shard indexes only: for huge stores).",
                         click.Choice(("data", "index")), recorded=False)
    retry_failed: bool = option(False, "Recompute the inputs recorded as failed (a file copied in since, an I/O "
                                "error, a decoder killed when out of memory); their shards are rewritten whole.",
                                recorded=False, is_flag=True)
    quiet: bool = option(False, "No progress bar.", recorded=False, is_flag=True)

    @property
    def dino_id(self) -> str:
        return self.dino or PRESETS[self.preset][0]

    @property
    def vae_id(self) -> str:
        return self.vae or PRESETS[self.preset][1]

    @property
    def recipe(self) -> FeatureRecipe:
        """What a store this run adds rows to must have been made with."""
        return FeatureRecipe(self.dino_id, self.vae_id, self.num_frames, self.image_size, self.feature_dtype,
                             FRAME_SAMPLING[self.seek], self.dino_layers)

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.num_frames, self.image_size, self.min_duration, self.max_duration, self.seek)

    def compile_on(self, device: str) -> bool:
        """Whether the encoders are compiled on `device`: --compile/--no-compile, else only on CUDA."""
        return self.compile if self.compile is not None else device.startswith("cuda")

    def recorded(self) -> dict[str, Any]:
        """The store's `precompute_args`: every option but those that only change speed or output."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["recorded"]}

    def check(self) -> None:
        """Refuse values that no option type checks (the config can also be built in code)."""
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index must be in 0..{self.num_shards - 1}, got {self.shard_index}")
        if self.seek not in SEEK_MODES:
            raise ValueError(f"--seek must be one of {', '.join(SEEK_MODES)}, got {self.seek!r}")
        if not self.min_duration >= 0:  # also refuses nan
            raise ValueError(f"--min-duration must be at least 0 seconds, got {self.min_duration}")
        if self.max_duration is not None and not self.max_duration > self.min_duration:
            raise ValueError(f"--max-duration {self.max_duration} is not above --min-duration {self.min_duration}: "
                             "every video would be skipped")


def click_options(func: Any) -> Any:
    """One click option per PrecomputeConfig field, with its default, type and help."""
    for f in reversed(fields(PrecomputeConfig)):
        meta = f.metadata
        kwargs: dict[str, Any] = dict(meta["click"], help=meta["help"])
        decls = kwargs.pop("flag_decls", (f"--{f.name.replace('_', '-')}",))
        if f.default is not MISSING:
            kwargs["default"] = f.default
        if meta["type"] is not None:
            kwargs["type"] = meta["type"]
        func = click.option(*decls, f.name, **kwargs)(func)
    return func

"""The run configuration: one typed record of how a run is trained, saved in every checkpoint.

It is the single source of truth for resume and evaluation. A value comes from the command line
if given there, else from the checkpoint being resumed or evaluated, else the default below. What
changes the numbers (the model, the store's encoders, the held-out split) must then agree with
the checkpoint, or the run is refused with one line naming both values.

And what train.py's command line settles before any training: the device, the --json report's
folder, the default run folder (tied to the store's identity), and errors as the one line they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import click
import torch

from fvlm_data.environment import is_remote
from fvlm_data.store.format import FEATURE_KEYS, SHAPE_KEYS
from fvlm_data.store.reader import FeatureStore
from fvlm_model.heads import RECON_HEADS
from fvlm_model.lm import DEFAULT_LM, TINY
from fvlm_model.model import ModelConfig

from . import TrainError

LM_PRESETS = {"default": DEFAULT_LM, "tiny": TINY}
MODEL_DEFAULTS = ModelConfig()  # the model options' defaults are the model's own


def option(default: Any, help: str, type: Any = None) -> Any:  # noqa: A002 (click's own word)
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class RunConfig:
    # What the model is and what it is evaluated on: these must agree with a checkpoint.
    preset: str = option("default", "LM preset: SmolLM2-135M-Instruct, or 'tiny' (random-initialised, offline "
                         "tokenizer).", click.Choice(sorted(LM_PRESETS)))
    lm: str | None = option(None, "Causal LM: hub id or local folder [default: the preset's].")
    num_frames: int = option(16, "Frames per sample, of those stored.", click.IntRange(min=1))
    fine_iterations: int = option(MODEL_DEFAULTS.fine_iterations, "Fine passes after the coarse one.",
                                  click.IntRange(min=1))
    lambda_recon: float = option(MODEL_DEFAULTS.lambda_recon, "Weight of the next-frame reconstruction loss.",
                                 click.FloatRange(min=0))
    lambda_coarse: float = option(MODEL_DEFAULTS.lambda_coarse, "Weight of the coarse pass's losses.",
                                  click.FloatRange(min=0))
    lambda_caption: float = option(MODEL_DEFAULTS.lambda_caption, "Weight of the caption loss; 0 trains next-frame "
                                   "reconstruction alone (the caption losses are still scored).",
                                   click.FloatRange(min=0))
    recon_head: str = option(MODEL_DEFAULTS.recon_head, "Next-frame head: film (the seed's: FiLM on the previous "
                             "latent x_{t-1}), delta (x_{t-1} plus a change predicted from the hidden state alone), "
                             "hidden (the latent from the hidden state alone).", click.Choice(RECON_HEADS))
    query_depth: int = option(MODEL_DEFAULTS.query_depth, "0: each frame's query is one attention over DINO's final "
                              "tokens. N: the query passes DINO's last N frozen blocks over the patch states the "
                              "store holds (a store made with precompute --dino-layers >= N), then its final norm.",
                              click.IntRange(min=0))
    max_caption_tokens: int = option(64, "Caption tokens kept (EOS included).", click.IntRange(min=2))
    val_fraction: float = option(0.05, "Share of files held out (by a hash of the file id, so every segment of a "
                                 "file is on one side; a whole video's file id is its video id).",
                                 click.FloatRange(0.0, 1.0))
    # How it is trained: may change on resume.
    frame_sampling: str = option("uniform", "Which frames a training sample takes: evenly spaced, or with a "
                                 "random offset per epoch.", click.Choice(["uniform", "random"]))
    batch_size: int = option(32, "Micro-batch per process.", click.IntRange(min=1))
    grad_accum: int = option(2, "Micro-batches per optimiser step.", click.IntRange(min=1))
    lr: float = option(1e-4, "Peak learning rate (AdamW).", click.FloatRange(min=0))
    weight_decay: float = option(0.01, "AdamW weight decay of weight matrices (not of queries, embeddings, "
                                 "norms, biases).", click.FloatRange(min=0))
    warmup: int = option(500, "Linear warmup steps, then cosine decay to 10%.", click.IntRange(min=0))
    clip: float = option(1.0, "Gradient norm clipping.", click.FloatRange(min=0, min_open=True))
    max_steps: int = option(10_000, "Optimiser steps of the whole run.", click.IntRange(min=1))
    max_hours: float | None = option(None, "Stop (and checkpoint) after this much wall time.",
                                     click.FloatRange(min=0, min_open=True))
    seed: int = option(0, "Initialisation and data order.", int)
    max_nonfinite: int = option(20, "Stop after this many non-finite steps in a row.", click.IntRange(min=1))
    log_every: int = option(10, "Steps between training logs.", click.IntRange(min=1))
    val_every: int = option(500, "Steps between validations (and one at the end).", click.IntRange(min=1))
    val_batches: int | None = option(32, "Held-out batches per validation during training: the same videos "
                                     "every time (the whole split is evaluated at the end of training and by "
                                     "--eval-only). With the defaults a validation costs about as much as 6 "
                                     "training steps, ~1.3% of the wall time between validations at any store "
                                     "size (bench/val_share.py).", click.IntRange(min=1))
    eval_captions: int | None = option(None, "Captions scored per held-out video, the first K of each (validation "
                                       "and --eval-only) [default: all].", click.IntRange(min=1))
    save_every: int = option(1000, "Steps between checkpoints (and one at the end).", click.IntRange(min=1))
    keep: int = option(3, "Step checkpoints kept.", click.IntRange(min=1))
    visual_videos: int = option(2, "Validation videos shown in TensorBoard (attention maps, captions).",
                                click.IntRange(min=0))
    # Filled in from the store and the split, never options.
    store: dict[str, Any] = field(default_factory=dict)
    held_out: dict[str, Any] = field(default_factory=dict)

    @property
    def lm_id(self) -> str:
        return self.lm or LM_PRESETS[self.preset]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def saved_config_problem(d: dict[str, Any]) -> str | None:
    """What is wrong with a saved run configuration (a checkpoint's), or None: every field it has must be of
    the field's type and, for an option, a value the option accepts. Fields it lacks take their defaults
    (a checkpoint older than a field was trained with its default); names it has that RunConfig lacks are
    ignored."""
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        if f.name not in d:
            continue
        value, hint = d[f.name], hints[f.name]
        if not _is_a(value, hint):
            return f"its config's {f.name} is {value!r:.40} ({type(value).__name__}), not {_type_name(hint)}"
        kind = f.metadata.get("type")
        if value is not None and isinstance(kind, click.ParamType):
            try:
                kind.convert(value, None, None)
            except click.BadParameter as e:
                return f"its config's {f.name} is {value!r:.40}: {e.message}"
    held_out = d.get("held_out") or {}
    missing = [k for k in ("val_fraction", "videos", "sha1") if held_out and k not in held_out]
    if missing:
        return f"its config's held_out lacks {', '.join(map(repr, missing))}"
    return None


def _is_a(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    hint = typing.get_origin(hint) or hint  # dict[str, Any] -> dict
    if isinstance(value, bool) and hint is not bool:
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


# A checkpoint from before lambda_caption and recon_head has neither: it was trained with their defaults.
MODEL_FIELDS = ("lm_id", "num_frames", "fine_iterations", "lambda_recon", "lambda_coarse", "lambda_caption",
                "recon_head", "query_depth", "max_caption_tokens")
OPTION_FIELDS = tuple(f.name for f in fields(RunConfig) if "help" in f.metadata)


def click_options(func: Any) -> Any:
    """One click option per RunConfig option, default None (= the checkpoint's, else the default)."""
    for f in reversed([f for f in fields(RunConfig) if "help" in f.metadata]):
        default = f.default if f.default is not MISSING else None
        shown = "" if default is None else f" [default: {default}; on resume or eval: the checkpoint's]"
        func = click.option(f"--{f.name.replace('_', '-')}", type=f.metadata["type"], default=None,
                            help=f.metadata["help"] + shown)(func)
    return func


def resolve(given: dict[str, Any], saved: RunConfig | None) -> RunConfig:
    """Command line over the checkpoint's values over the defaults; a given value that changes the
    model is refused."""
    base = saved.to_dict() if saved else {}
    values = {**base, **{k: v for k, v in given.items() if k in OPTION_FIELDS and v is not None}}
    config = RunConfig.from_dict(values)
    if saved is not None:
        if given.get("lm") is None and given.get("preset") is not None:
            config.lm = None  # --preset given: the LM is the preset's
        check_same(saved, config, MODEL_FIELDS, "model")
    if config.lambda_caption == 0 and config.lambda_recon == 0:
        raise TrainError("--lambda-caption 0 and --lambda-recon 0: the loss would be 0, nothing would be trained")
    return config


def check_same(saved: RunConfig, now: RunConfig, names: tuple[str, ...], what: str) -> None:
    diffs = [f"{n.removesuffix('_id')}: checkpoint {getattr(saved, n)!r}, now {getattr(now, n)!r}"
             for n in names if getattr(saved, n) != getattr(now, n)]
    if diffs:
        raise TrainError(f"the checkpoint was trained with another {what} ({'; '.join(diffs)})")


# The store settings a checkpoint records and a run must agree with: the features, and how their frames
# were taken (precompute's --seek). A checkpoint older than a setting has no value for it and is not compared.
STORE_SETTINGS = (*FEATURE_KEYS, "frame_sampling")


def store_location(path: str) -> str:
    """Where a store is: its URL, or its resolved absolute path (the same folder however it is named)."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.realpath(path.removeprefix("file://"))


def store_identity(attrs: dict[str, Any], path: str) -> str:
    """What identifies a store: its `store_id` attribute (format 3: written once, when it is created, so a
    copied or moved store keeps it); a format-2 store has none and is identified by its location,
    `path:<resolved path or URL>`."""
    return attrs.get("store_id") or f"path:{store_location(path)}"


def store_provenance(attrs: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """What a run records of its store: the settings of STORE_SETTINGS and, given its path, its identity
    (`store_id`) and location (`store_path`)."""
    record = {k: attrs.get(k) for k in STORE_SETTINGS}
    if path is not None:
        record.update(store_id=store_identity(attrs, path), store_path=store_location(path))
    return record


def check_store(saved: RunConfig, attrs: dict[str, Any], path: str, allow_other: bool = False) -> list[str]:
    """A checkpoint runs on features made the way its training store's were; `allow_other` (evaluation
    only, asked for explicitly) lets other encoders or settings through but never other shapes.
    Returns the differences."""
    now = store_provenance(attrs)
    compared = [k for k in STORE_SETTINGS if k in FEATURE_KEYS or k in saved.store]
    diffs = [f"{k}: checkpoint's store {saved.store.get(k)!r}, {path} {now[k]!r}"
             for k in compared if saved.store and saved.store.get(k) != now[k]]
    shapes_differ = any(saved.store.get(k) != now[k] for k in SHAPE_KEYS) if saved.store else False
    if diffs and (shapes_differ or not allow_other):
        hint = "" if shapes_differ else "; add --other-store to evaluate on it anyway (it is labelled so)"
        raise TrainError(f"{path} was made with other encoders or settings than the checkpoint's store "
                         f"({'; '.join(diffs)}){hint}")
    return diffs


def check_store_identity(saved: RunConfig, attrs: dict[str, Any], path: str, allow_other: bool = False) -> list[str]:
    """A checkpoint continues (or is evaluated) on the very store it was trained on, unless `allow_other`
    (--other-store); a checkpoint that recorded no identity (older runs) is not checked. Returns the
    difference, if allowed."""
    was, now = saved.store.get("store_id"), store_identity(attrs, path)
    if not was or was == now:
        return []
    diff = (f"store_id: checkpoint's store {was!r} ({saved.store.get('store_path')}), "
            f"{path} {now!r} ({store_location(path)})")
    if not allow_other:
        raise TrainError(f"the checkpoint was trained on another store: {saved.store.get('store_path')} (store_id "
                         f"{was}), not {store_location(path)} (store_id {now}); add --other-store to use this one "
                         "anyway")
    return [diff]


def query_blocks(query_depth: int, attrs: dict[str, Any], path: str | os.PathLike = "the store") -> tuple[int, ...]:
    """The DINO blocks a deep query of `query_depth` passes: the last ones of those whose input states the
    store holds (none at depth 0). A store with fewer is a TrainError naming both numbers."""
    blocks = tuple(int(k) for k in attrs.get("dino_blocks", ()))
    if query_depth > len(blocks):
        raise TrainError(f"--query-depth {query_depth} but {path} was made with --dino-layers {len(blocks)}: "
                         f"precompute a store with --dino-layers {query_depth} or more, or lower --query-depth")
    return blocks[len(blocks) - query_depth:]


def held_out_fingerprint(video_ids: list[str], val_fraction: float) -> dict[str, Any]:
    """What identifies a held-out split: its fraction and a hash of its video ids."""
    digest = hashlib.sha1("\n".join(sorted(video_ids)).encode("utf-8")).hexdigest()[:16]
    return {"val_fraction": val_fraction, "videos": len(video_ids), "sha1": digest}


def check_split(saved: RunConfig, now: dict[str, Any], hint: str) -> None:
    """The held-out videos must be the checkpoint's (a different split would leak training videos)."""
    if saved.held_out and saved.held_out != now:
        was, new = saved.held_out, now
        raise TrainError(f"the held-out split differs from the checkpoint's: checkpoint val_fraction "
                         f"{was['val_fraction']} ({was['videos']} videos, sha1 {was['sha1']}), now "
                         f"{new['val_fraction']} ({new['videos']} videos, sha1 {new['sha1']}){hint}")


def one_line(error: Exception) -> str:
    """The error's own line, also when a DataLoader worker raised it (PyTorch adds the worker's traceback)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # "...\n<module>.StoreError: <the line>"
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def pick_device(device: str | None, local_rank: int) -> torch.device:
    """--device, or this rank's GPU, or the CPU; a device torch does not know or this machine lacks is a TrainError."""
    try:
        dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise TrainError(f"--device {device}: not a device type torch knows (use cpu, cuda or cuda:N)") from None
    if dev.type != "cpu" and not getattr(getattr(torch, dev.type, None), "is_available", bool)():  # torch.cuda, ...
        raise TrainError(f"--device {dev}: no {'CUDA' if dev.type == 'cuda' else dev.type} device is available here")
    return dev


def check_json_path(json_path: str) -> None:
    """The --json report's folder exists (it is created) before anything is evaluated."""
    if (path := Path(json_path)).is_dir():
        raise TrainError(f"--json {json_path} is a folder: give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--json {json_path}: cannot create its folder ({e.strerror or e})") from None


def default_run_dir(store: str, given: dict[str, Any]) -> Path:
    """runs/<store name>-<hash>, the hash of the store's identity and the given options: two stores of one file
    name (exact/clips.zarr and keyframe/clips.zarr) never share a run folder."""
    identity = store_identity(FeatureStore.open(store).attrs, store)
    options = {k: v for k, v in sorted(given.items()) if v is not None}
    key = json.dumps({"store_id": identity, **options})
    run_dir = Path("runs") / f"{Path(store).stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    # Before store identities, the folder hashed the options alone: say where such a run is, not resume it
    # (it may have been trained on another store of the same name).
    legacy = Path("runs") / f"{Path(store).stem}-{hashlib.sha1(json.dumps(options).encode()).hexdigest()[:8]}"
    if (legacy / "checkpoint_latest.pt").exists() and not run_dir.exists():
        click.echo(f"note: {legacy} (an older run folder for these options, not tied to a store) is not resumed; "
                   f"give --out {legacy} to continue it", err=True)
    return run_dir

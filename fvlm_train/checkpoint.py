"""Checkpoints: written atomically, loaded without unpickling code, refused with one line if wrong.

A checkpoint is a dict of tensors and plain values: `config` (the RunConfig as a dict), `model`,
`optimizer`, `step`, `epoch`, `micro_in_epoch`, `nonfinite_total`, `rng`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import TrainError
from .config import RunConfig

FORMAT = "fvlm-checkpoint"
VERSION = 2  # 2: the run configuration (`config`) replaces `args` + `model_config`


def atomic_torch_save(obj: Any, path: Path) -> None:
    """temp file, fsync, rename: a kill at any moment leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    step_path = run_dir / f"checkpoint_step{step:08d}.pt"
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, step_path)
    # checkpoint_latest is a hard link to the newest step file, swapped in atomically.
    tmp = run_dir / f".checkpoint_latest.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.link(step_path, tmp)
    os.replace(tmp, run_dir / "checkpoint_latest.pt")
    for old in sorted(run_dir.glob("checkpoint_step*.pt"))[:-keep]:
        old.unlink()
    return step_path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, or a TrainError saying what is wrong and what to do."""
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise TrainError(f"{path} is empty (0 bytes): not a checkpoint; use the run's checkpoint_latest.pt "
                         "or an earlier checkpoint_step*.pt")
    if not zipfile.is_zipfile(path):
        raise TrainError(f"{path} is not a checkpoint (not a file torch.save writes): give a checkpoint_*.pt "
                         "that train.py wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        kind = "holds Python objects other than tensors and plain values, which fvlm never loads" if isinstance(
            e, pickle.UnpicklingError) else f"cannot be read ({type(e).__name__}): truncated?"
        raise TrainError(f"{path} {kind}; give a checkpoint_*.pt that train.py wrote") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainError(f"{path} is not an fvlm checkpoint: give a checkpoint_*.pt that train.py wrote")
    if ckpt.get("version", 0) > VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt['version']}; this fvlm reads up to {VERSION}: "
                         "upgrade fvlm")
    if ckpt.get("version", 0) < VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt.get('version')} (before the run configuration "
                         f"was saved); this fvlm reads version {VERSION}: retrain, or evaluate it with an "
                         "older fvlm")
    return ckpt


def saved_config(ckpt: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(ckpt["config"])

"""What train.py's command line settles before any training: the device, the --json report's folder,
the default run folder (tied to the store's identity), and errors as the one line they are."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click
import torch

from fvlm_data.store import FeatureStore
from fvlm_train import TrainError
from fvlm_train.config import store_identity


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

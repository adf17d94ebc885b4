"""The model a run configuration describes, and the checkpoint that saves it: building the model on
a store's feature shapes, the `Checkpoint` record (atomic save, safe load with one-line errors,
restore), and a trained model on its store (`load_trained`)."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fvlm_data.dataset import synthetic_vocabulary
from fvlm_data.errors import EncoderLoadError
from fvlm_data.precompute.encoders import load_dino, weights_fingerprint
from fvlm_data.store.reader import FeatureStore
from fvlm_model import FoveatedVLM, ModelConfig, load_lm
from fvlm_model.deep_query import DeepQuery

from . import TrainError
from .config import RunConfig, check_store, check_store_identity, query_blocks

FORMAT = "fvlm-checkpoint"
VERSION = 2  # 2: the run configuration (`config`) replaces `args` + `model_config`
WRITTEN_BY = "give a checkpoint_*.pt that train.py wrote"


@dataclass
class Checkpoint:
    """What a run saves and resumes from: its configuration, the weights and the loop's position."""

    config: RunConfig
    model: dict[str, torch.Tensor]  # the state_dict of the model itself (no DDP or compile prefix)
    optimizer: dict[str, Any]
    step: int
    epoch: int  # with micro_in_epoch: the data order's position (fvlm_train.data.TrainBatches)
    micro_in_epoch: int
    nonfinite_total: int
    rng: dict[str, torch.Tensor]  # "torch", and "cuda" when trained on CUDA

    def save(self, run_dir: Path, keep: int) -> Path:
        """checkpoint_step<step>.pt, with checkpoint_latest.pt a hard link to it swapped in atomically;
        only the `keep` newest step files stay."""
        step_path = run_dir / f"checkpoint_step{self.step:08d}.pt"
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        # Written under a hidden name, made the latest, then given its step name: whoever sees the step
        # file also finds it as checkpoint_latest.pt (a kill in between leaves only a hidden file).
        pending = run_dir / f".{step_path.name}.pending"
        atomic_torch_save({"format": FORMAT, "version": VERSION, **state, "config": self.config.to_dict()}, pending)
        tmp = run_dir / f".checkpoint_latest.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.link(pending, tmp)
        os.replace(tmp, run_dir / "checkpoint_latest.pt")
        os.replace(pending, step_path)
        for old in sorted(run_dir.glob("checkpoint_step*.pt"))[:-keep]:
            old.unlink()
        return step_path

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """The checkpoint at `path`, or a TrainError saying what is wrong and what to do."""
        ckpt = _read(path)
        missing = [f.name for f in fields(cls) if f.name not in ckpt]
        if missing:
            raise TrainError(f"{path} lacks {', '.join(missing)}: {WRITTEN_BY}")
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)} | {"config": RunConfig.from_dict(ckpt["config"])})

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """The weights, the optimiser's state and the random state, as they were saved."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        torch.set_rng_state(self.rng["torch"])
        if device.type == "cuda" and "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a checkpoint saves (`Checkpoint.rng`)."""
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                               if device.type == "cuda" else {})}


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


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint file's dict, after the checks that say in one line what is wrong."""
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise TrainError(f"{path} is empty (0 bytes): not a checkpoint; use the run's checkpoint_latest.pt "
                         "or an earlier checkpoint_step*.pt")
    if not zipfile.is_zipfile(path):
        raise TrainError(f"{path} is not a checkpoint (not a file torch.save writes): {WRITTEN_BY}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        kind = "holds Python objects other than tensors and plain values, which fvlm never loads" if isinstance(
            e, pickle.UnpicklingError) else f"cannot be read ({type(e).__name__}): truncated?"
        raise TrainError(f"{path} {kind}; {WRITTEN_BY}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainError(f"{path} is not an fvlm checkpoint: {WRITTEN_BY}")
    if ckpt.get("version", 0) > VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt['version']}; this fvlm reads up to {VERSION}: "
                         "upgrade fvlm")
    if ckpt.get("version", 0) < VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt.get('version')} (before the run configuration "
                         f"was saved); this fvlm reads version {VERSION}: retrain, or evaluate it with an "
                         "older fvlm")
    return ckpt


def model_config(config: RunConfig, attrs: dict[str, Any]) -> ModelConfig:
    """The run's model options on the store's feature shapes (`attrs`)."""
    c, h, _ = attrs["latent_shape"]
    return ModelConfig(dino_dim=int(attrs["dino_dim"]), num_tokens=int(attrs["dino_tokens"]), latent_channels=c,
                       latent_size=h, fine_iterations=config.fine_iterations, lambda_recon=config.lambda_recon,
                       lambda_coarse=config.lambda_coarse, lambda_caption=config.lambda_caption,
                       recon_head=config.recon_head, query_depth=config.query_depth)


def frozen_dino_blocks(config: RunConfig, attrs: dict[str, Any]) -> DeepQuery | None:
    """The deep query's frozen blocks: the store's own DINO (its `dino` id; the tiny one is rebuilt), refused
    unless its weights are the ones that made the store's block states (`dino_fingerprint`). None at depth 0."""
    if config.query_depth == 0:
        return None
    query_blocks(config.query_depth, attrs)
    try:
        with torch.random.fork_rng(devices=[]):  # loading draws nothing: the model starts as it would at depth 0
            dino, kind = load_dino(attrs["dino"])
    except EncoderLoadError as e:
        raise TrainError(f"--query-depth {config.query_depth} needs the store's DINO weights: {e}") from None
    if (have := weights_fingerprint(dino)) != attrs.get("dino_fingerprint"):
        raise TrainError(f"--query-depth {config.query_depth}: the DINO weights of {attrs['dino']!r} ({have[:19]}...) "
                         f"are not the ones that made the store ({str(attrs.get('dino_fingerprint'))[:19]}...)")
    return DeepQuery.from_dino(dino, kind, config.query_depth)


def build_model(config: RunConfig, attrs: dict[str, Any]) -> tuple[FoveatedVLM, Any]:
    """(model, tokenizer); a LM that cannot be loaded is one line, with a hint if the store is tiny."""
    lm_id = config.lm_id
    try:
        lm, tokenizer = load_lm(lm_id, words=synthetic_vocabulary() if lm_id == "tiny" else None)
    except ValueError as e:
        hint = ""
        if attrs.get("preset") == "tiny" and lm_id != "tiny":
            hint = "; this store was made with the tiny preset: add --preset tiny to train on it offline"
        raise TrainError(f"{e}{hint}") from None
    deep_query = frozen_dino_blocks(config, attrs)
    return FoveatedVLM(lm, model_config(config, attrs), deep_query), tokenizer


def load_trained(store_path: str, checkpoint: str | Path) -> tuple[FoveatedVLM, Any, RunConfig, FeatureStore, int]:
    """(model in eval mode, tokenizer, run config, store, step) of a checkpoint on the store it was
    trained on (the analysis scripts' start); a mismatched store or checkpoint is a TrainError."""
    ckpt = Checkpoint.load(Path(checkpoint))
    store = FeatureStore.open(store_path)
    check_store(ckpt.config, store.attrs, store_path)
    check_store_identity(ckpt.config, store.attrs, store_path)
    model, tokenizer = build_model(ckpt.config, store.attrs)
    model.load_state_dict(ckpt.model)
    return model.eval(), tokenizer, ckpt.config, store, ckpt.step

"""The model a run configuration describes, and the checkpoint that saves it: building the model on
a store's feature shapes, the `Checkpoint` record (atomic save, safe load with one-line errors,
restore), and a trained model on its store (`load_trained`)."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fvlm_data.dataset import synthetic_vocabulary
from fvlm_data.environment import process_alive
from fvlm_data.errors import EncoderLoadError
from fvlm_data.precompute.encoders import load_dino, weights_fingerprint
from fvlm_data.store.reader import FeatureStore
from fvlm_model import FoveatedVLM, ModelConfig, load_lm
from fvlm_model.deep_query import DeepQuery

from . import TrainError
from .config import RunConfig, check_store, check_store_identity, query_blocks, saved_config_problem

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
    source = None  # the file it was loaded from (not a field: never saved)

    def save(self, run_dir: Path, keep: int) -> Path:
        """checkpoint_step<step>.pt, with checkpoint_latest.pt a hard link to it swapped in atomically;
        only the `keep` newest step files stay. A failed write (a full disk) removes its temp files and
        is a TrainError saying what the run folder holds."""
        step_path = run_dir / f"checkpoint_step{self.step:08d}.pt"
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        # Written under a hidden name, made the latest, then given its step name: whoever sees the step
        # file also finds it as checkpoint_latest.pt (a kill in between leaves only a hidden file, which
        # the next run removes: its name carries the pid of the process that wrote it).
        pending = run_dir / f".{step_path.name}.pending{os.getpid()}"
        tmp = run_dir / f".checkpoint_latest.tmp{os.getpid()}"
        try:
            _write_synced({"format": FORMAT, "version": VERSION, **state, "config": self.config.to_dict()}, pending)
            tmp.unlink(missing_ok=True)
            os.link(pending, tmp)
            os.replace(tmp, run_dir / "checkpoint_latest.pt")
            os.replace(pending, step_path)
            _sync_folder(run_dir)
        except (OSError, RuntimeError) as e:
            cause = os_error(e)
            if cause is None:
                raise
            pending.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            raise TrainError(f"cannot save the checkpoint of step {self.step} in {run_dir}: "
                             f"{cause.strerror or cause}; {run_folder_report(run_dir)}") from None
        for old in sorted(run_dir.glob("checkpoint_step*.pt"))[:-keep]:
            old.unlink()
        return step_path

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """The checkpoint at `path` with its bytes verified and its fields checked, or a TrainError
        saying what is wrong and what to do."""
        ckpt = _read(path)
        missing = [f.name for f in fields(cls) if f.name not in ckpt]
        if missing:
            raise TrainError(f"{path} lacks {', '.join(missing)}: {WRITTEN_BY}")
        problem = _field_problem(ckpt)
        if problem:
            raise TrainError(f"{path}: {problem}: {WRITTEN_BY}")
        loaded = cls(**{f.name: ckpt[f.name] for f in fields(cls)} | {"config": RunConfig.from_dict(ckpt["config"])})
        loaded.source = path
        return loaded

    def _refuse(self, problem: str) -> TrainError:
        return TrainError(f"{self.source or 'the checkpoint'}: {problem}: {WRITTEN_BY}")

    def load_weights(self, model: torch.nn.Module) -> None:
        """The saved weights into `model` (built from the saved config); tensors missing, extra or of
        another shape are a TrainError naming the first."""
        want = model.state_dict()
        missing = [k for k in want if k not in self.model]
        if missing:
            raise self._refuse(f"its model lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                               else "") + f" (the model has {len(want)} tensors, it has {len(self.model)})")
        extra = [k for k in self.model if k not in want]
        if extra:
            raise self._refuse(f"its model has {extra[0]!r}, which the model lacks")
        for k, v in want.items():
            if self.model[k].shape != v.shape:
                raise self._refuse(f"its model's {k!r} has shape {list(self.model[k].shape)}, the model's "
                                   f"{list(v.shape)}")
        model.load_state_dict(self.model)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """The weights, the optimiser's state and the random state, as they were saved; a part that does not
        fit is a TrainError naming it."""
        self.load_weights(model)
        saved = self.optimizer
        try:
            optimizer.load_state_dict(saved)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise self._refuse(f"its optimizer state does not fit the model's optimizer ({_first_line(e)})") from None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        for index, param in zip(ids, params, strict=True):
            for key, value in saved["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise self._refuse(f"its optimizer state of parameter {index} has {key!r} of shape "
                                       f"{list(value.shape)}, the parameter's {list(param.shape)}")
        now = {"torch": torch.get_rng_state()}
        if device.type == "cuda" and "cuda" in self.rng:
            now["cuda"] = torch.cuda.get_rng_state(device)
        for name, state in now.items():
            got = self.rng[name]
            if not isinstance(got, torch.Tensor) or got.dtype != state.dtype or got.shape != state.shape:
                what = (f"{got.numel()} bytes of {str(got.dtype).removeprefix('torch.')}"
                        if isinstance(got, torch.Tensor) else f"a {type(got).__name__}")
                raise self._refuse(f"its random state {name!r} has {what}, this torch's has {state.numel()}")
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in now:
            torch.cuda.set_rng_state(self.rng["cuda"], device)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a checkpoint saves (`Checkpoint.rng`)."""
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                               if device.type == "cuda" else {})}


def _write_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error` (torch.save reports a failed write as a RuntimeError raised while handling it)."""
    seen = error
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ------------------------------------------------------------------ what a run folder holds

_STEP_FILE = re.compile(r"checkpoint_step(\d+)\.pt")
# Temp files of a save: ".<name>.pending<pid>", ".<name>.tmp<pid>", and an older fvlm's ".<name>.pending".
_TEMP_FILE = re.compile(r"\.\.?checkpoint_.*\.(?:pending|tmp)(\d+)|\.checkpoint_step\d+\.pt\.pending")


def damage(path: Path) -> str | None:
    """What is damaged in a checkpoint's bytes, or None. torch.save writes a zip with a CRC-32 of every
    record; torch.load does not check them, so flipped bytes in a tensor would load silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return _first_line(e)
    return f"bad CRC-32 of {bad}" if bad else None


def holdings(run_dir: Path) -> tuple[str, Path | None]:
    """What `run_dir` holds, in words ("<dir> holds the checkpoints of steps 2 (intact) and 4 (damaged)"),
    and its newest intact checkpoint."""
    steps = sorted((int(m.group(1)), p) for p in run_dir.glob("checkpoint_step*.pt")
                   if (m := _STEP_FILE.fullmatch(p.name)))
    latest = run_dir / "checkpoint_latest.pt"
    if not steps:
        if latest.is_file():
            ok = damage(latest) is None
            return f"{run_dir} holds checkpoint_latest.pt ({'intact' if ok else 'damaged'})", latest if ok else None
        return f"{run_dir} holds no checkpoint", None
    states = [(step, path, damage(path) is None) for step, path in steps]
    words = [f"{step} ({'intact' if ok else 'damaged'})" for step, _, ok in states]
    listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    intact = [path for _, path, ok in states if ok]
    return f"{run_dir} holds the checkpoint{'s' if len(words) > 1 else ''} of step{'s' if len(words) > 1 else ''} " \
           f"{listed}", intact[-1] if intact else None


def run_folder_report(run_dir: Path) -> str:
    """What `run_dir` holds and what running the same command again does: the end of a one-line error."""
    text, intact = holdings(run_dir)
    latest = run_dir / "checkpoint_latest.pt"
    if intact is None:
        then = "it starts over" if not latest.exists() else "it stops at the damaged checkpoint_latest.pt"
    elif latest.exists() and latest.samefile(intact):
        m = _STEP_FILE.fullmatch(intact.name)
        then = "it resumes from checkpoint_latest.pt" + (f" (step {int(m.group(1))})" if m else "")
    else:
        then = f"add --resume {intact} to resume from the newest intact checkpoint"
    return f"{text}. Free space and run the same command again: {then}"


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temp files of saves whose process is gone (killed, or stopped by a full disk)."""
    removed = []
    for path in run_dir.glob(".*"):
        m = _TEMP_FILE.fullmatch(path.name)
        if m and not (m.group(1) and process_alive(int(m.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------ reading one


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint file's dict, after the checks that say in one line what is wrong."""
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise TrainError(f"{path} is empty (0 bytes): not a checkpoint; use the run's checkpoint_latest.pt "
                         "or an earlier checkpoint_step*.pt")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's start without its end
                raise _damaged(path, "truncated: the zip's directory at its end is missing")
        raise TrainError(f"{path} is not a checkpoint (not a file torch.save writes): {WRITTEN_BY}")
    problem = damage(path)
    if problem:
        raise _damaged(path, problem)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        kind = "holds Python objects other than tensors and plain values, which fvlm never loads" if isinstance(
            e, pickle.UnpicklingError) else f"cannot be read ({type(e).__name__}): truncated?"
        raise TrainError(f"{path} {kind}; {WRITTEN_BY}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainError(f"{path} is not an fvlm checkpoint: {WRITTEN_BY}")
    if not isinstance(ckpt.get("version", 0), int):
        raise TrainError(f"{path}: its version is {ckpt['version']!r}, not a number: {WRITTEN_BY}")
    if ckpt.get("version", 0) > VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt['version']}; this fvlm reads up to {VERSION}: "
                         "upgrade fvlm")
    if ckpt.get("version", 0) < VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt.get('version')} (before the run configuration "
                         f"was saved); this fvlm reads version {VERSION}: retrain, or evaluate it with an "
                         "older fvlm")
    return ckpt


def _damaged(path: Path, problem: str) -> TrainError:
    text, intact = holdings(path.parent)
    if intact is not None and not intact.samefile(path):
        return TrainError(f"{path} is damaged ({problem}); {text}: give --resume {intact} to use the newest "
                          "intact one")
    return TrainError(f"{path} is damaged ({problem}) and {path.parent} holds no intact checkpoint: restore it "
                      "from a copy, or train again")


def _field_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with a loaded checkpoint's fields, on their own (`Checkpoint.restore` checks them
    against the model): types, and the configuration's values (`config.saved_config_problem`)."""
    config = ckpt["config"]
    if not isinstance(config, dict):
        return f"its config is {_short(config)}, not a run configuration"
    problem = saved_config_problem(config)
    if problem:
        return problem
    for name in ("step", "epoch", "micro_in_epoch", "nonfinite_total"):
        value = ckpt[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"its {name} is {_short(value)} ({type(value).__name__}), not a whole number >= 0"
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return f"its model is {_short(model)} ({type(model).__name__}), not a mapping of names to tensors"
    optimizer = ckpt["optimizer"]
    if not isinstance(optimizer, dict):
        return f"its optimizer state is {_short(optimizer)} ({type(optimizer).__name__}), not a mapping"
    missing = [k for k in ("state", "param_groups") if k not in optimizer]
    if missing:
        return f"its optimizer state lacks {', '.join(map(repr, missing))}"
    if not isinstance(optimizer["state"], dict) or not isinstance(optimizer["param_groups"], list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"]):
        return "its optimizer state is not what torch.optim saves (state, param_groups with params)"
    rng = ckpt["rng"]
    if not isinstance(rng, dict) or "torch" not in rng:
        return "its random state lacks 'torch'" if isinstance(rng, dict) else \
            f"its random state is {_short(rng)} ({type(rng).__name__}), not a mapping"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    ckpt.load_weights(model)
    return model.eval(), tokenizer, ckpt.config, store, ckpt.step

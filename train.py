"""Train the foveated VLM on a feature store: caption + next-frame reconstruction, plain PyTorch.

    python train.py --store store.zarr                             # SmolLM2-135M, the seed's settings
    python train.py --store store.zarr --preset tiny --max-steps 200
    torchrun --nproc_per_node 8 train.py --store store.zarr        # DDP over GPUs (or machines)
    python train.py --store store.zarr --resume runs/x/checkpoint_latest.pt --eval-only --json e.json

Logs to TensorBoard (one folder per run under runs/), checkpoints atomically into the run folder
and resumes from its latest checkpoint when the same command is run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fvlm_data.dataset import CaptionCollator, FeatureDataset, to_device
from fvlm_data.store import FeatureStore, StoreError
from fvlm_data.synthetic import get_task, synthetic_vocabulary
from fvlm_model import FoveatedVLM, load_lm
from fvlm_model.evaluation import bootstrap_ratio_ci
from fvlm_model.generate import MODES, generate_captions
from fvlm_model.visualize import attention_figure, attention_grid, inspect_batch

CHECKPOINT_FORMAT = "fvlm-checkpoint"
CHECKPOINT_VERSION = 1
LM_PRESETS = {"default": "HuggingFaceTB/SmolLM2-135M-Instruct", "tiny": "tiny"}
COMPILE_PAD = 16  # with --compile, captions are padded to a multiple of this (bounded set of shapes)
# Settings that define the model: a checkpoint made with other values cannot be loaded.
LOSS_KEYS = ("loss", "cap_fine", "cap_coarse", "rec_fine", "rec_coarse")
MODEL_KEYS = ("lm", "dino_tokens", "dino_dim", "latent_shape", "fine_iterations", "vocab_size")
# What --eval-only reads from the checkpoint's training arguments (the model, the frames, the split).
EVAL_SETTINGS = ("preset", "lm", "num_frames", "fine_iterations", "lambda_recon", "lambda_coarse",
                 "val_fraction", "max_caption_tokens")


class TrainError(Exception):
    """A problem the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    return d


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world
    return values


# ----------------------------------------------------------------------------- data order
class ResumableSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch); this rank takes every world-th index.

    `start` skips the samples already consumed in the epoch, so a resumed run continues the
    exact sample sequence of an uninterrupted one.
    """

    def __init__(self, n: int, seed: int, rank: int, world: int, per_rank: int) -> None:
        self.n, self.seed, self.rank, self.world, self.per_rank = n, seed, rank, world, per_rank
        self.epoch, self.start = 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[self.rank :: self.world][: self.per_rank]
        return iter(perm[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


# ----------------------------------------------------------------------------- checkpoints
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
    atomic_torch_save(state, step_path)
    # checkpoint_latest is a hard link to the newest step file, swapped in atomically.
    tmp = run_dir / f".checkpoint_latest.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.link(step_path, tmp)
    os.replace(tmp, run_dir / "checkpoint_latest.pt")
    for old in sorted(run_dir.glob("checkpoint_step*.pt"))[:-keep]:
        old.unlink()
    return step_path


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        raise TrainError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not an fvlm checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise TrainError(f"{path} has checkpoint version {ckpt['version']}; upgrade fvlm")
    return ckpt


def check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in MODEL_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise TrainError(f"{path} is from a different model configuration ({'; '.join(diffs)})")


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at `total` steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- metrics
def derived_metrics(m: dict[str, float]) -> dict[str, float]:
    """The seed's headline numbers: cap_ratio = coarse/fine (> 1: foveation helps)."""
    out = dict(m)
    out["cap_ratio"] = m["cap_coarse"] / max(m["cap_fine"], 1e-12)
    out["cap_improvement_pct"] = (out["cap_ratio"] - 1.0) * 100.0
    out["rec_ratio"] = m["rec_coarse"] / max(m["rec_fine"], 1e-12)
    return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB, process RSS on CPU


@torch.no_grad()
def evaluate(model: FoveatedVLM, loader: DataLoader, device: torch.device, dtype: torch.dtype,
             max_batches: int | None = None, shuffled_control: bool = False) -> dict[str, Any]:
    """Mean losses over a split, plus per-video caption losses of every pass (for intervals).

    With `shuffled_control`, also the last pass's loss with its queries (frames 2..T) taken from
    another video (`FoveatedVLM.shuffled_query_loss`), as `cap_fine_shuffled` and
    `shuffled_ratio` = cap_fine_shuffled / cap_fine with its interval: > 1 means the fine pass
    gains from where this video's own earlier frames make its queries look.
    """
    model.eval()
    per_video: list[torch.Tensor] = []
    shuffled: list[torch.Tensor] = []
    rec_sum, count = None, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device, dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch["dino"], batch["latents"], batch["input_ids"], batch["labels"])
        per_video.append(out["cap_per_sample"].float().cpu())
        n = batch["input_ids"].shape[0]
        if shuffled_control:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model.shuffled_query_loss(batch["dino"], out["last_queries"], batch["input_ids"],
                                                 batch["labels"])
            # A batch of one has no other video to take queries from.
            shuffled.append(loss.float().cpu() if n > 1 else torch.full((n,), float("nan")))
        rec = out["rec_passes"].float().cpu() * n
        rec_sum = rec if rec_sum is None else rec_sum + rec
        count += n
    model.train()
    if count == 0:
        return {}
    caps = torch.cat(per_video, dim=1).numpy()  # [passes, videos]
    recs = (rec_sum / count).numpy()
    m = {"cap_coarse": float(caps[0].mean()), "cap_fine": float(caps[-1].mean()),
         "rec_coarse": float(recs[0]), "rec_fine": float(recs[-1])}
    m["loss"] = (m["cap_fine"] + model.config.lambda_recon * m["rec_fine"]) + model.config.lambda_coarse * (
        m["cap_coarse"] + model.config.lambda_recon * m["rec_coarse"])
    m = derived_metrics(m)
    m["num_videos"] = count
    m["cap_passes"] = [float(c) for c in caps.mean(axis=1)]
    m["rec_passes"] = [float(r) for r in recs]
    m["cap_ratio_ci"] = list(bootstrap_ratio_ci(caps[0], caps[-1]))
    if shuffled_control:
        loss = torch.cat(shuffled).numpy()
        keep = ~np.isnan(loss)
        if keep.any():
            m["cap_fine_shuffled"] = float(loss[keep].mean())
            m["shuffled_ratio"] = m["cap_fine_shuffled"] / float(caps[-1][keep].mean())
            m["shuffled_ratio_ci"] = list(bootstrap_ratio_ci(loss[keep], caps[-1][keep]))
    return m


# ----------------------------------------------------------------------------- what the queries do
def synthetic_frames(attrs: dict[str, Any], source: str, timestamps: np.ndarray) -> np.ndarray | None:
    """The store keeps no pixels; a synthetic video can be rendered again from its source tag."""
    kind, _, rest = source.partition(":")
    task, _, index = rest.rpartition(":")
    if kind != "synthetic" or not index.isdigit():
        return None
    seed = int(attrs.get("precompute_args", {}).get("seed", 0))
    return get_task(task)(seed, int(index), timestamps, int(attrs["image_size"]))[0]


def caption_table(model: FoveatedVLM, tokenizer: Any, batch: dict[str, Any], max_tokens: int,
                  modes: tuple[str, ...] = ("coarse", "fine")) -> list[dict[str, str]]:
    """Greedy captions of each mode beside the ground truth."""
    rows = [{"video_id": v, "truth": c} for v, c in zip(batch["video_ids"], batch["captions"], strict=True)]
    for mode in modes:
        ids = generate_captions(model, batch["dino"], tokenizer.eos_token_id, max_tokens=max_tokens, mode=mode)
        for row, seq in zip(rows, ids, strict=True):
            row[mode] = tokenizer.decode(seq, skip_special_tokens=True)
    return rows


def log_visuals(writer: SummaryWriter, model: FoveatedVLM, tokenizer: Any, batch: dict[str, Any],
                frames: list[np.ndarray | None], step: int, max_tokens: int) -> None:
    """Attention maps, their entropy, coarse-vs-fine token similarity and generated captions."""
    info = inspect_batch(model, batch["dino"], batch["latents"], batch["input_ids"], batch["labels"])
    for name, value in info["entropy"].items():
        writer.add_scalar(f"val/attention_entropy/{name}", value, step)
    for name, value in info["token_cosine"].items():
        writer.add_scalar(f"val/token_cosine/{name}", value, step)
    for k, video_frames in enumerate(frames):
        maps = {name: attention_grid(att[k]) for name, att in info["attention"].items()}
        writer.add_image(f"val/attention/{k}", attention_figure(maps, video_frames), step)
    rows = caption_table(model, tokenizer, batch, max_tokens)
    lines = ["| video | ground truth | coarse | fine |", "|---|---|---|---|"]
    lines += [f"| {r['video_id']} | {r['truth']} | {r['coarse']} | {r['fine']} |" for r in rows]
    writer.add_text("val/captions", "\n".join(lines), step)


def pad_captions(batch: dict[str, Any], multiple: int, pad_id: int) -> dict[str, Any]:
    """Right-pad input_ids (pad_id) and labels (-100) to a multiple of `multiple` tokens.

    Changes no loss: padding is causal-masked from every real position and its labels are ignored.
    It bounds the caption lengths a compiled model sees (64-token captions: 4 shapes, not 64).
    """
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch
    pad = (0, extra)
    return {**batch, "input_ids": torch.nn.functional.pad(batch["input_ids"], pad, value=pad_id),
            "labels": torch.nn.functional.pad(batch["labels"], pad, value=-100)}


# ----------------------------------------------------------------------------- setup
def open_store(path: str, num_frames: int) -> dict[str, Any]:
    try:
        store = FeatureStore.open(path)
    except StoreError as e:
        raise TrainError(str(e)) from None
    if len(store) == 0:
        raise TrainError(f"{path} has no committed videos: run precompute.py first")
    stored = int(store.attrs["num_frames"])
    if num_frames > stored:
        raise TrainError(f"--num-frames {num_frames} but {path} stores {stored} frames per video")
    return store.attrs


def with_checkpoint_settings(args: dict[str, Any], given: set[str], ckpt: dict[str, Any]) -> dict[str, Any]:
    """--eval-only evaluates the model and split the checkpoint was trained with: its settings in
    EVAL_SETTINGS replace the defaults, but not what was given on the command line."""
    saved = ckpt.get("args", {})
    return {**args, **{k: saved[k] for k in EVAL_SETTINGS if k in saved and k not in given}}


def build_model(lm_id: str, attrs: dict[str, Any], args: dict[str, Any]) -> tuple[FoveatedVLM, Any, dict]:
    try:
        lm, tokenizer = load_lm(lm_id, words=synthetic_vocabulary() if lm_id == "tiny" else None)
    except ValueError as e:
        raise TrainError(str(e)) from None
    c, h, w = attrs["latent_shape"]
    model = FoveatedVLM(lm, dino_dim=int(attrs["dino_dim"]), latent_channels=c, latent_size=h,
                        fine_iterations=args["fine_iterations"], lambda_recon=args["lambda_recon"],
                        lambda_coarse=args["lambda_coarse"])
    config = {"lm": lm_id, "dino_tokens": int(attrs["dino_tokens"]), "dino_dim": int(attrs["dino_dim"]),
              "latent_shape": [c, h, w], "fine_iterations": args["fine_iterations"],
              "vocab_size": int(lm.get_input_embeddings().weight.shape[0]),
              "store_dino": attrs["dino"], "store_vae": attrs["vae"], "store_num_frames": attrs["num_frames"]}
    return model, tokenizer, config


def find_run_dir(args: dict[str, Any], d: Dist) -> Path:
    """--out, or the newest folder under runs/ made by the same command, or a new one there."""
    if args["out"]:
        return Path(args["out"])
    same = [p.parent for p in sorted(Path("runs").glob("*/run.json"))
            if json.loads(p.read_text()).get("command") == command_key(args)]
    if same:
        return same[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{Path(args['store']).stem}-{args['preset']}"


def command_key(args: dict[str, Any]) -> dict[str, Any]:
    ignore = ("out", "resume", "eval_only", "json", "workers", "max_hours", "compile_model")
    return {k: v for k, v in sorted(args.items()) if k not in ignore}


def make_loader(ds: FeatureDataset, collate: CaptionCollator, batch_size: int, workers: int,
                sampler: Sampler | None, pin: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=pin, drop_last=sampler is not None, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------- main
@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--store", required=True, help="Feature store written by precompute.py.")
@click.option("--preset", type=click.Choice(sorted(LM_PRESETS)), default="default",
              help="LM preset: SmolLM2-135M-Instruct, or 'tiny' (random-initialised, offline tokenizer).")
@click.option("--lm", default=None, help="Causal LM hub id or local path (overrides the preset).")
@click.option("--out", default=None,
              help="Run folder for TensorBoard events and checkpoints [default: new under runs/].")
@click.option("--resume", default=None, type=click.Path(dir_okay=False), help="Checkpoint to resume from.")
@click.option("--eval-only", is_flag=True, help="Evaluate --resume's checkpoint on the validation split and exit.")
@click.option("--json", "json_path", default=None, help="With --eval-only: also write the metrics as JSON here.")
@click.option("--captions", type=click.IntRange(min=0), default=0,
              help="With --eval-only: print generated captions (every mode) for this many validation videos.")
@click.option("--visual-videos", type=click.IntRange(min=0), default=2,
              help="Validation videos shown in TensorBoard (attention maps, generated captions).")
@click.option("--max-steps", type=click.IntRange(min=1), default=10_000)
@click.option("--max-hours", type=float, default=None, help="Stop (and checkpoint) after this much wall time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Micro-batch per process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=2)
@click.option("--num-frames", type=click.IntRange(min=1), default=16, help="Frames per sample, of those stored.")
@click.option("--frame-sampling", type=click.Choice(["uniform", "random"]), default="uniform")
@click.option("--lr", type=float, default=1e-4)
@click.option("--weight-decay", type=float, default=0.01)
@click.option("--warmup", type=click.IntRange(min=0), default=500)
@click.option("--clip", type=float, default=1.0, help="Gradient norm clipping.")
@click.option("--fine-iterations", type=click.IntRange(min=1), default=2)
@click.option("--lambda-recon", type=float, default=0.1)
@click.option("--lambda-coarse", type=float, default=1.0)
@click.option("--max-caption-tokens", type=click.IntRange(min=2), default=64)
@click.option("--val-fraction", type=float, default=0.05, help="Share of videos (by id hash) held out.")
@click.option("--log-every", type=click.IntRange(min=1), default=10)
@click.option("--val-every", type=click.IntRange(min=1), default=500)
@click.option("--val-batches", type=click.IntRange(min=1), default=None, help="Cap on validation batches.")
@click.option("--save-every", type=click.IntRange(min=1), default=1000)
@click.option("--keep", type=click.IntRange(min=1), default=3, help="Step checkpoints kept.")
@click.option("--max-nonfinite", type=click.IntRange(min=1), default=20,
              help="Stop after this many non-finite losses in a row.")
@click.option("--workers", type=click.IntRange(min=0), default=4, help="DataLoader worker processes.")
@click.option("--device", default=None, help="[default: cuda if available, else cpu]")
@click.option("--compile/--no-compile", "compile_model", default=None,
              help="torch.compile the model for the training steps (captions padded to a multiple of "
                   f"{COMPILE_PAD} tokens, so few shapes compile) [default: on for CUDA, off for CPU].")
@click.option("--seed", type=int, default=0)
def main(**args: Any) -> None:
    """Train (or with --eval-only, evaluate) the foveated VLM on precomputed features."""
    ctx = click.get_current_context()
    given = {k for k in args if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    try:
        eval_ckpt = None
        if args["eval_only"] and args["resume"]:
            eval_ckpt = load_checkpoint(Path(args["resume"]))
            args = with_checkpoint_settings(args, given, eval_ckpt)
        run(args, eval_ckpt)
    except (TrainError, StoreError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def run(args: dict[str, Any], eval_ckpt: dict[str, Any] | None = None) -> None:
    d = init_distributed()
    if args["device"]:
        device = torch.device(args["device"])
    else:
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: no CUDA device is available here")
    dtype = torch.float32  # parameters stay fp32; bf16 autocast on GPU does the math in half precision
    torch.manual_seed(args["seed"])
    attrs = open_store(args["store"], args["num_frames"])
    lm_id = args["lm"] or LM_PRESETS[args["preset"]]
    model, tokenizer, model_config = build_model(lm_id, attrs, args)
    model.to(device)
    collate = CaptionCollator(tokenizer, args["max_caption_tokens"])
    val_ds = FeatureDataset(args["store"], args["num_frames"], split="val", val_fraction=args["val_fraction"])
    pin = device.type == "cuda"

    if args["eval_only"]:
        if not args["resume"]:
            raise TrainError("--eval-only needs --resume CHECKPOINT")
        ckpt = eval_ckpt or load_checkpoint(Path(args["resume"]))
        check_same_model(ckpt["model_config"], model_config, Path(args["resume"]))
        model.load_state_dict(ckpt["model"])
        if len(val_ds) == 0:
            raise TrainError(f"{args['store']} has no validation videos (--val-fraction {args['val_fraction']})")
        loader = make_loader(val_ds, collate, args["batch_size"], args["workers"], None, pin)
        metrics = evaluate(model, loader, device, dtype, args["val_batches"], shuffled_control=True)
        metrics["checkpoint_step"] = ckpt["step"]
        print_eval_table(metrics)
        if args["captions"]:
            items = [val_ds[i] for i in range(min(args["captions"], len(val_ds)))]
            batch = to_device(collate(items), device, dtype)
            for row in caption_table(model, tokenizer, batch, args["max_caption_tokens"], MODES):
                click.echo(f"\n{row['video_id']}\n  truth:          {row['truth']}")
                for mode in MODES:
                    click.echo(f"  {mode + ':':<15} {row[mode]}")
        if args["json_path"]:
            Path(args["json_path"]).write_text(json.dumps(metrics, indent=2))
        return

    train_ds = FeatureDataset(args["store"], args["num_frames"], split="train", val_fraction=args["val_fraction"],
                              frame_sampling=args["frame_sampling"], seed=args["seed"])
    per_rank = len(train_ds) // d.world
    micro_per_epoch = per_rank // args["batch_size"]
    if micro_per_epoch == 0:
        raise TrainError(f"{len(train_ds)} training videos over {d.world} process(es) is less than one "
                         f"batch of {args['batch_size']}: lower --batch-size")
    sampler = ResumableSampler(len(train_ds), args["seed"], d.rank, d.world, per_rank)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args["lr"], betas=(0.9, 0.95), fused=device.type == "cuda")

    run_dir = find_run_dir(args, d)
    step, epoch, micro_in_epoch, nonfinite_total = 0, 0, 0, 0
    resume = Path(args["resume"]) if args["resume"] else run_dir / "checkpoint_latest.pt"
    if resume.exists() or args["resume"]:
        ckpt = load_checkpoint(resume)
        check_same_model(ckpt["model_config"], model_config, resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, micro_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"]
        nonfinite_total = ckpt["nonfinite_total"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if d.main:
            click.echo(f"resumed from {resume} at step {step}", err=True)
    if step >= args["max_steps"]:
        if d.main:
            click.echo(f"{run_dir} is already at step {step} (--max-steps {args['max_steps']}): nothing to do",
                       err=True)
        return

    writer = None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"command": command_key(args), "store_attrs": attrs,
                                                      "model_config": model_config}, indent=2, default=str))
        writer = SummaryWriter(str(run_dir), purge_step=step + 1 if step else None)
        if step == 0:
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in args.items()}
            hparams.update({f"store/{k}": str(attrs[k]) for k in ("dino", "vae", "num_frames", "image_size")})
            writer.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items())), 0)
            writer.add_hparams(hparams, {"hparam/placeholder": 0.0}, run_name=".")

    ddp_model = DistributedDataParallel(model) if d.world > 1 else model
    # --compile: only the training forward/backward is compiled; evaluation, generation and
    # checkpoints use `model` itself (so state_dict keys carry no _orig_mod prefix).
    use_compile = args["compile_model"] if args["compile_model"] is not None else device.type == "cuda"
    if use_compile:
        ddp_model = torch.compile(ddp_model, dynamic=False)
    val_loader = make_loader(val_ds, collate, args["batch_size"], args["workers"], None, pin)
    # A few fixed validation videos whose attention and captions are shown in TensorBoard.
    visual_items = [val_ds[i] for i in range(min(args["visual_videos"], len(val_ds)))] if d.main else []
    val_store = FeatureStore.open(args["store"])
    visual_frames = [synthetic_frames(attrs, val_store.read_string("source", int(val_ds.slots[it["index"]])),
                                      it["timestamps"].numpy()) for it in visual_items]
    use_bf16 = device.type == "cuda"

    def new_epoch_iter():
        sampler.epoch, sampler.start = epoch, micro_in_epoch * args["batch_size"]
        train_ds.set_epoch(epoch)
        return iter(make_loader(train_ds, collate, args["batch_size"], args["workers"], sampler, pin))

    def checkpoint_state() -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "micro_in_epoch": micro_in_epoch, "nonfinite_total": nonfinite_total, "rng": rng,
                "model_config": model_config, "args": {k: v for k, v in args.items() if v is not None}}

    def validate() -> None:
        metrics = evaluate(model, val_loader, device, dtype, args["val_batches"], shuffled_control=True)
        if writer is not None and metrics:
            for k in ("loss", "cap_fine", "cap_coarse", "cap_ratio", "cap_improvement_pct",
                      "rec_fine", "rec_coarse", "rec_ratio", "cap_fine_shuffled", "shuffled_ratio"):
                if k in metrics:  # the shuffled control needs a batch of 2 or more videos
                    writer.add_scalar(f"val/{k}", metrics[k], step)
            if visual_items:
                batch = to_device(collate(visual_items), device, dtype)
                log_visuals(writer, model, tokenizer, batch, visual_frames, step, args["max_caption_tokens"])
            lo, hi = metrics["cap_ratio_ci"]
            tqdm.write(f"step {step} val: cap_coarse {metrics['cap_coarse']:.4f} cap_fine {metrics['cap_fine']:.4f} "
                       f"cap_ratio {metrics['cap_ratio']:.4f} [{lo:.4f}, {hi:.4f}] "
                       f"shuffled_ratio {metrics.get('shuffled_ratio', float('nan')):.4f} "
                       f"on {metrics['num_videos']} videos")

    data = new_epoch_iter()
    start_time, interval_start = time.time(), time.time()
    interval_samples, consecutive_nonfinite = 0, 0
    acc = torch.zeros(6, dtype=torch.float64)  # loss, cap_f, cap_c, rec_f, rec_c, grad_norm
    acc_steps = 0
    bar = tqdm(total=args["max_steps"], initial=step, disable=not d.main, dynamic_ncols=True, unit="step")
    model.train()
    stop_reason = None
    while step < args["max_steps"]:
        lr = lr_at(step, args["lr"], args["warmup"], args["max_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_metrics = torch.zeros(5, device=device)
        for micro in range(args["grad_accum"]):
            batch = next(data, None)
            if batch is None:  # end of epoch: the next permutation
                epoch, micro_in_epoch = epoch + 1, 0
                data = new_epoch_iter()
                batch = next(data)
            micro_in_epoch += 1
            batch = to_device(batch, device, dtype)
            if use_compile:
                batch = pad_captions(batch, COMPILE_PAD, collate.pad_id)
            sync = micro == args["grad_accum"] - 1 or d.world == 1
            ctx = ddp_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = ddp_model(batch["dino"], batch["latents"], batch["input_ids"], batch["labels"])
            # Always backward, even a non-finite loss: DDP ranks must all join the gradient all-reduce.
            (out["loss"] / args["grad_accum"]).backward()
            step_metrics += torch.stack([out[k].detach().float() for k in LOSS_KEYS]) / args["grad_accum"]
            interval_samples += batch["input_ids"].shape[0] * d.world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args["clip"])
        ok = (torch.isfinite(step_metrics).all() & torch.isfinite(grad_norm)).float().reshape(1)
        finite = bool(all_mean(ok, d).item() == 1.0)  # one sync per step; every rank skips together
        if finite:
            optimizer.step()
            consecutive_nonfinite = 0
            acc[:5] += step_metrics.double().cpu()
            acc[5] += float(grad_norm)
            acc_steps += 1
        else:
            nonfinite_total += 1
            consecutive_nonfinite += 1
            if writer is not None:
                writer.add_scalar("nonfinite_steps", nonfinite_total, step)
                tqdm.write(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite_total} so far)")
            if consecutive_nonfinite >= args["max_nonfinite"]:
                stop_reason = (f"{consecutive_nonfinite} non-finite losses in a row at step {step}: stopping; "
                               f"the last good weights are in {run_dir / 'checkpoint_latest.pt'}")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % args["log_every"] == 0 or step == args["max_steps"]:
            avg = all_mean(acc / max(acc_steps, 1), d)
            m = derived_metrics(dict(zip((*LOSS_KEYS, "grad_norm"), avg.tolist(), strict=True)))
            elapsed = time.time() - interval_start
            m["lr"], m["samples_per_s"], m["peak_memory_gb"] = lr, interval_samples / elapsed, peak_memory_gb(device)
            m["nonfinite_steps"] = nonfinite_total
            if writer is not None:
                for k, v in m.items():
                    writer.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{m['loss']:.4f}", cap_ratio=f"{m['cap_ratio']:.4f}",
                                refresh=False)
                tqdm.write(f"step {step}: loss {m['loss']:.4f} cap_fine {m['cap_fine']:.4f} "
                           f"cap_coarse {m['cap_coarse']:.4f} cap_ratio {m['cap_ratio']:.4f} "
                           f"rec_fine {m['rec_fine']:.4f} lr {lr:.2e} {m['samples_per_s']:.1f} samples/s")
            acc.zero_()
            acc_steps, interval_samples, interval_start = 0, 0, time.time()

        out_of_time = args["max_hours"] is not None and time.time() - start_time > args["max_hours"] * 3600
        if d.world > 1:
            out_of_time = bool(all_mean(torch.tensor([float(out_of_time)], device=device), d).item() > 0)
        last = step == args["max_steps"] or out_of_time or stop_reason is not None
        if (step % args["val_every"] == 0 or last) and d.main and len(val_ds):
            validate()
        if (step % args["save_every"] == 0 or last) and d.main and stop_reason is None:
            save_checkpoint(run_dir, checkpoint_state(), step, args["keep"])
        if last:
            break
    bar.close()
    if writer is not None:
        writer.close()
        click.echo(f"run folder (TensorBoard events, checkpoints): {run_dir}", err=True)
    if d.world > 1:
        dist.destroy_process_group()
    if stop_reason:
        raise TrainError(stop_reason)


def print_eval_table(m: dict[str, Any]) -> None:
    lo, hi = m["cap_ratio_ci"]
    rows = [("videos", f"{m['num_videos']}"), ("checkpoint step", f"{m.get('checkpoint_step')}"),
            ("cap_coarse", f"{m['cap_coarse']:.4f}")]
    rows += [(f"cap_fine_{k}", f"{c:.4f}") for k, c in enumerate(m["cap_passes"][1:], start=1)]
    rows += [("cap_fine", f"{m['cap_fine']:.4f}"), ("cap_ratio", f"{m['cap_ratio']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]"),
             ("cap_improvement_pct", f"{m['cap_improvement_pct']:.2f}"), ("rec_coarse", f"{m['rec_coarse']:.5f}"),
             ("rec_fine", f"{m['rec_fine']:.5f}"), ("rec_ratio", f"{m['rec_ratio']:.4f}")]
    if "shuffled_ratio" in m:
        lo, hi = m["shuffled_ratio_ci"]
        rows += [("cap_fine_shuffled", f"{m['cap_fine_shuffled']:.4f}"),
                 ("shuffled_ratio", f"{m['shuffled_ratio']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()

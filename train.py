"""Train the foveated VLM on a feature store: caption + next-frame reconstruction, plain PyTorch.

    python train.py --store store.zarr                             # SmolLM2-135M, the seed's settings
    python train.py --store store.zarr --preset tiny --max-steps 200
    torchrun --nproc_per_node 8 train.py --store store.zarr        # DDP over GPUs (or machines)
    python train.py --store store.zarr --resume runs/x/checkpoint_latest.pt --eval-only --json e.json

Logs to TensorBoard, checkpoints atomically into the run folder, and resumes from its latest
checkpoint when the same command is run again. The parts live in fvlm_train/; this is the loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fvlm_data.dataset import CaptionCollator, Splits, is_validation, to_device
from fvlm_data.environment import Launch
from fvlm_data.errors import StoreError
from fvlm_data.store.reader import FeatureStore
from fvlm_model.generate import MODES
from fvlm_train import TrainError
from fvlm_train.checkpoint import Checkpoint, build_model, remove_stale_temp_files, rng_state
from fvlm_train.config import (
    RunConfig,
    check_json_path,
    check_split,
    check_store,
    check_store_identity,
    click_options,
    default_run_dir,
    held_out_fingerprint,
    one_line,
    pick_device,
    resolve,
    store_provenance,
)
from fvlm_train.data import TrainBatches, default_workers, make_loader, open_splits, open_store, pad_captions
from fvlm_train.distributed import any_rank, init_distributed, shutdown
from fvlm_train.evaluation import (
    caption_table,
    evaluate,
    log_validation,
    log_visuals,
    print_eval_table,
    summary_line,
    visual_samples,
)
from fvlm_train.progress import IntervalLog, open_writer, write_log
from fvlm_train.step import CompiledStep, caption_bucket, lr_at, make_optimizer, set_lr, train_step


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", required=True, help="Feature store written by precompute.py.")
@click.option("--out", default=None, help="Run folder for TensorBoard events and checkpoints "
              "[default: runs/<store name>-<hash of the store's identity and the given options>, so the same "
              "command on the same store resumes, and another store never shares it].")
@click.option("--resume", default=None, type=click.Path(dir_okay=False), help="Checkpoint to resume from.")
@click.option("--eval-only", is_flag=True, help="Evaluate --resume's checkpoint on its held-out split and exit.")
@click.option("--json", "json_path", default=None, help="With --eval-only: also write the metrics as JSON here.")
@click.option("--captions", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --eval-only: print generated captions (every mode) for this many held-out videos.")
@click.option("--other-split", is_flag=True, help="With --eval-only: evaluate on the split --val-fraction gives "
              "even though it is not the checkpoint's held-out split (labelled, with the videos seen in training).")
@click.option("--other-store", is_flag=True, help="With --eval-only: evaluate on a store made with other encoders "
              "or settings than the checkpoint's training store (labelled, the differences in the JSON). "
              "Evaluating, or resuming training, on a store other than the checkpoint's (another store_id, or "
              "a format-2 store at another path) also needs it.")
@click.option("--workers", type=click.IntRange(min=0), default=default_workers(), show_default=True,
              help="DataLoader worker processes per rank (the cores this process may use, divided among the "
              "ranks on this machine, less one for the loop; at most 16).")
@click.option("--device", default=None, help="Device [default: cuda if available, else cpu].")
@click.option("--compile/--no-compile", "compile_model", default=None, help="torch.compile the training step "
              "(captions padded to half or all of --max-caption-tokens: two graphs; CUDA graphs on CUDA with "
              "--grad-accum 1, plain compilation if they fail) [default: on for CUDA, off for CPU].")
@click_options
def main(store: str, out: str | None, resume: str | None, eval_only: bool, json_path: str | None, captions: int,
         other_split: bool, other_store: bool, workers: int, device: str | None, compile_model: bool | None,
         **given: Any) -> None:
    """Train (or with --eval-only, evaluate) the foveated VLM on precomputed features."""
    try:
        launch = init_distributed()
        dev = pick_device(device, launch.local_rank)
        if eval_only:
            if not resume:
                raise TrainError("--eval-only needs --resume CHECKPOINT")
            if json_path:
                check_json_path(json_path)
            evaluate_checkpoint(store, Path(resume), given, dev, workers, json_path, captions, other_split,
                                other_store)
        else:
            run_dir = Path(out) if out else default_run_dir(store, given)
            train(store, run_dir, Path(resume) if resume else None, given, launch, dev, workers, compile_model,
                  other_store)
        shutdown(launch.world_size)
    except (TrainError, StoreError) as e:
        raise click.ClickException(one_line(e)) from None  # "Error: <the line>", as precompute.py and click say


def prepare(store_path: str, config: RunConfig, saved: RunConfig | None,
            other_store: bool = False, other_identity: bool | None = None) -> tuple[FeatureStore, Splits, list[str]]:
    """The store, opened once, its two splits, and how it differs from the checkpoint's training store
    (only where `other_store` allows it; `other_identity`, default `other_store`, allows another store of
    the same features)."""
    store = open_store(store_path)
    differences = []
    if saved is not None:
        differences = check_store(saved, store.attrs, store_path, other_store)
        allow = other_store if other_identity is None else other_identity
        differences += check_store_identity(saved, store.attrs, store_path, allow)
    config.store = store_provenance(store.attrs, store_path)
    return store, open_splits(store, config), differences


def evaluate_checkpoint(store_path: str, path: Path, given: dict[str, Any], device: torch.device, workers: int,
                        json_path: str | None, captions: int, other_split: bool, other_store: bool) -> None:
    ckpt = Checkpoint.load(path)
    saved = ckpt.config
    config = resolve(given, saved)
    _, splits, differences = prepare(store_path, config, saved, other_store)
    if splits.note:
        click.echo(f"note: {splits.note}", err=True)
    val_ds = splits.val
    held_out = held_out_fingerprint(splits.val_ids, config.val_fraction)
    same_split = held_out == saved.held_out
    if not same_split and not other_split:
        check_split(saved, held_out, "; add --other-split to evaluate on this split anyway (it is labelled so)")
    if len(val_ds) == 0:
        raise TrainError(f"{store_path} has no held-out videos at --val-fraction {config.val_fraction}")
    model, tokenizer = build_model(config, val_ds.attrs)
    ckpt.load_weights(model)
    model.to(device)
    collate = CaptionCollator(tokenizer, config.max_caption_tokens)
    pairs = val_ds.with_captions(config.eval_captions)
    loader = make_loader(pairs, collate, config.batch_size, workers, None, device.type == "cuda")
    # The whole held-out split, unless --val-batches is given here (a checkpoint's value bounds the
    # validations during its training, not this evaluation).
    m = evaluate(model, loader, device, given.get("val_batches"), files=splits.val_files)
    m["checkpoint_step"] = ckpt.step
    m["eval_captions"] = config.eval_captions
    m["split"] = {"name": "held_out" if same_split else "other", **held_out,
                  "checkpoint_val_fraction": saved.val_fraction}
    # Seen in training: on the checkpoint's training side of the split, which is by file.
    trained = [not is_validation(f, saved.val_fraction) for f in splits.val_files[: m["num_videos"]]]
    m["seen_in_training"] = sum(trained)
    m["files_seen_in_training"] = len({f for f, t in zip(splits.val_files, trained, strict=False) if t})
    m["store_differences"] = differences
    print_eval_table(m)
    if captions:
        batch = to_device(collate([val_ds[i] for i in range(min(captions, len(val_ds)))]), device)
        for row in caption_table(model, tokenizer, batch, config.max_caption_tokens, MODES):
            click.echo(f"\n{row['video_id']}")
            for k, ref in enumerate(row["references"]):
                click.echo(f"  {('truth:' if k == 0 else ''):<15} {ref}")
            for mode in MODES:
                click.echo(f"  {mode + ':':<15} {row[mode]}")
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(m, indent=2))
        except OSError as e:
            raise TrainError(f"cannot write --json {json_path}: {e.strerror or e} (the table above has the "
                             "metrics)") from None
        click.echo(f"wrote {json_path}", err=True)


def train(store_path: str, run_dir: Path, resume: Path | None, given: dict[str, Any], launch: Launch,
          device: torch.device, workers: int, compile_model: bool | None, other_store: bool = False) -> None:
    latest = run_dir / "checkpoint_latest.pt"
    if launch.rank == 0 and run_dir.is_dir():
        for path in remove_stale_temp_files(run_dir):
            click.echo(f"note: removed {path.name}, left by an interrupted checkpoint save", err=True)
    resume = resume or (latest if latest.exists() else None)
    ckpt = Checkpoint.load(resume) if resume else None
    saved = ckpt.config if ckpt else None
    config = resolve(given, saved)
    torch.manual_seed(config.seed)
    store, splits, _ = prepare(store_path, config, saved, other_identity=other_store)
    if splits.note and launch.rank == 0:
        click.echo(f"note: {splits.note}", err=True)
    config.held_out = held_out_fingerprint(splits.val_ids, config.val_fraction)
    if saved is not None:
        check_split(saved, config.held_out, "")
    model, tokenizer = build_model(config, store.attrs)
    model.to(device)
    collate = CaptionCollator(tokenizer, config.max_caption_tokens)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, device)
    step, epoch, micro_in_epoch, nonfinite_total = 0, 0, 0, 0
    main_rank, world_size = launch.rank == 0, launch.world_size
    if ckpt is not None:
        ckpt.restore(model, optimizer, device)
        step, epoch, micro_in_epoch, nonfinite_total = ckpt.step, ckpt.epoch, ckpt.micro_in_epoch, ckpt.nonfinite_total
        if main_rank:
            click.echo(f"resumed from {resume} at step {step}", err=True)
    if step >= config.max_steps:
        if main_rank:
            click.echo(f"{run_dir} is already at step {step} (--max-steps {config.max_steps}): nothing to do", err=True)
        return
    pin = device.type == "cuda"
    batches = TrainBatches(splits.train, collate, config.batch_size, workers, config.seed, launch.rank, world_size,
                           pin, epoch, micro_in_epoch, device)
    writer = open_writer(run_dir, config, step) if main_rank else None
    if main_rank:  # named now, so that TensorBoard can be pointed at it during the run
        click.echo(f"run folder (TensorBoard events, checkpoints): {run_dir}", err=True)
    # Training runs through `fn` (DDP and/or compiled); evaluation, generation and checkpoints use
    # `model` itself (so state_dict keys carry no prefix).
    # Parameters without a gradient must be declared to DDP, or its second step waits for them and fails.
    unused = not model.every_parameter_gets_a_gradient()
    # Buffers are constants (the deep query's frozen DINO weights among them): not re-sent every step.
    fn = (DistributedDataParallel(model, find_unused_parameters=unused, broadcast_buffers=False) if world_size > 1
          else model)
    use_compile = compile_model if compile_model is not None else device.type == "cuda"
    compiled = CompiledStep(fn, device, config.grad_accum) if use_compile else None
    if not len(splits.val) and main_rank:
        click.echo(f"note: no held-out videos at --val-fraction {config.val_fraction} (of {len(store)} in "
                   f"{store_path}): validation is skipped; raise --val-fraction to validate", err=True)
    val_ds = splits.val.with_captions(config.eval_captions)
    val_loader = make_loader(val_ds, collate, config.batch_size, workers, None, pin)
    visual_items, visual_frames = visual_samples(store, splits.val, config.visual_videos if main_rank else 0)

    start_time = time.time()
    log = IntervalLog(device, nonfinite_total)
    stop_reason, val_seconds = None, 0.0
    bar = tqdm(total=config.max_steps, initial=step, disable=not main_rank, dynamic_ncols=True, unit="step")
    try:
        model.train()
        while step < config.max_steps:
            lr = lr_at(step, config.lr, config.warmup, config.max_steps)
            set_lr(optimizer, lr)
            micro = [next(batches) for _ in range(config.grad_accum)]  # on the device already
            if compiled is not None:
                micro = [pad_captions(b, caption_bucket(b, config.max_caption_tokens), collate.pad_id) for b in micro]
                result = compiled.step(model, optimizer, micro, config.clip, world_size)
            else:
                result = train_step(model, fn, optimizer, micro, config.clip, world_size, read=False)
            log.add(result, sum(b["labels"].shape[0] for b in micro) * world_size)
            step += 1
            bar.update(1)
            # Nothing is read back from the device except on logging, validation and checkpoint steps; the
            # time limit is checked (one collective with several ranks) on logging steps only.
            logging = step % config.log_every == 0
            last = step == config.max_steps
            if logging and config.max_hours is not None:
                out_of_time = time.time() - start_time > config.max_hours * 3600
                last = last or (any_rank(out_of_time, world_size, device) if world_size > 1 else out_of_time)
            saving = step % config.save_every == 0
            validating = step % config.val_every == 0
            if logging or saving or validating or last:
                skipped = log.counts()  # every rank reads the same counts: the skip flag is all-reduced
                if skipped and main_rank:
                    tqdm.write(f"step {step}: {skipped} non-finite step(s) skipped since the last report "
                               f"({log.nonfinite_total} so far)")
                if log.longest_run >= config.max_nonfinite:
                    stop_reason = (f"{log.longest_run} non-finite steps in a row at step {step}: stopping; the "
                                   f"last good weights are in {latest if latest.exists() else 'no checkpoint yet'}")
                    last = True
            if logging or last:
                m = log.metrics(lr, model.config, device, world_size)
                if writer is not None:
                    write_log(writer, m, step)
            if (validating or last) and writer is not None and len(val_ds):
                # During training: the first --val-batches batches (the same videos every time); at the
                # end: the whole held-out split.
                val_start = time.time()
                metrics = evaluate(model, val_loader, device, None if last else config.val_batches,
                                   files=splits.val_files)
                log_validation(writer, metrics, step)
                if visual_items:
                    log_visuals(writer, model, tokenizer, to_device(collate(visual_items), device), visual_frames, step,
                                config.max_caption_tokens)
                val_seconds += time.time() - val_start
                tqdm.write(f"step {step} val: {summary_line(metrics)}\n  {metrics['verdict']}")
            if (saving or last) and main_rank and stop_reason is None:
                Checkpoint(config, model.state_dict(), optimizer.state_dict(), step, batches.epoch,
                           batches.micro_in_epoch, log.nonfinite_total, rng_state(device)).save(run_dir, config.keep)
            if last:
                break
    except BaseException:  # the bar and the events end before the error's one line
        bar.close()
        if writer is not None:
            writer.close(quiet=True)
        raise
    if compiled is not None and main_rank:
        click.echo(compiled.summary(), err=True)
    if main_rank:
        wall = time.time() - start_time
        click.echo(f"wall time {wall:.1f} s, of which validation {val_seconds:.1f} s ({100 * val_seconds / wall:.1f}%)",
                   err=True)
    bar.close()
    if writer is not None:
        writer.close()
        click.echo(f"run folder (TensorBoard events, checkpoints): {run_dir}", err=True)
    if stop_reason:
        raise TrainError(stop_reason)


if __name__ == "__main__":
    main()

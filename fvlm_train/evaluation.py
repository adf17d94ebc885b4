"""Validation and --eval-only: per-video losses over a split, the metrics, their intervals, the
verdict; and what the queries do, for TensorBoard: attention maps, entropy, token similarity and
greedy captions of a few fixed held-out videos."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import click
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from fvlm_data.dataset import FeatureDataset, synthetic_frames, to_device
from fvlm_data.store.reader import FeatureStore
from fvlm_model import FoveatedVLM
from fvlm_model.evaluation import bootstrap_ratio_ci, pass_metrics, verdict
from fvlm_model.generate import generate_captions
from fvlm_model.visualize import attention_figure, attention_grid, inspect_batch

# Validation scalars in TensorBoard (under val/).
VAL_TAGS = ("loss", "cap_fine", "cap_coarse", "cap_ratio", "cap_improvement_pct", "rec_fine", "rec_coarse",
            "rec_ratio", "cap_fine_shuffled", "shuffled_ratio")


@torch.no_grad()
def evaluate(model: FoveatedVLM, loader: Iterable[dict[str, Any]], device: torch.device,
             max_batches: int | None = None, shuffled_control: bool = True,
             files: Sequence[str] | None = None) -> dict[str, Any]:
    """The metrics of `fvlm_model.evaluation` over the videos of `loader`, with intervals.

    `files`: the file of each video of the loader's dataset (by its `index`; default: every video its
    own file). Rows of one file (overlapping segments, say) are not independent, so every interval
    resamples files, all of a file's rows together; with one row per file that is resampling videos.

    With `shuffled_control`, also the last pass's loss with its queries (frames 2..T) taken from
    another video of the batch (`FoveatedVLM.shuffled_query_loss`), as `cap_fine_shuffled` and
    `shuffled_ratio` = cap_fine_shuffled / cap_fine with its interval: > 1 means the fine pass
    gains from where this video's own earlier frames make its queries look.
    """
    was_training = model.training
    model.eval()
    cap, tokens, rec, shuffled, videos = [], [], [], [], []
    for batch in itertools.islice(loader, max_batches):  # no batch is read beyond the cap
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch, score_all_passes=True)
            n = batch["input_ids"].shape[0]
            if shuffled_control and n > 1:  # a batch of one has no other video to take queries from
                shuffled.append(model.shuffled_query_loss(batch, out["last_queries"]).double().cpu())
            elif shuffled_control:
                shuffled.append(torch.full((n,), float("nan"), dtype=torch.float64))
        cap.append(out["cap_sum"].double().cpu())
        tokens.append(out["cap_tokens"].double().cpu())
        rec.append(out["rec_per_sample"].double().cpu())
        videos.append(batch["index"].cpu() if "index" in batch else torch.arange(n) + sum(map(len, videos)))
    model.train(was_training)
    if not cap:
        return {}
    # Per video: sums over the captions scored (a video with K captions is K samples of one video).
    index = torch.cat(videos).numpy()
    video, per = per_video(index)
    cap_sum, tok = per(torch.cat(cap, 1).numpy()), per(torch.cat(tokens).numpy())
    rec_err = per(torch.cat(rec, 1).numpy()) / per(np.ones(len(video)))  # the same frames: the mean
    m = pass_metrics(cap_sum.sum(1), tok.sum(), rec_err.sum(1), len(tok), model.config)
    m["num_videos"] = len(tok)
    m["num_captions"] = len(video)
    # Each evaluated video's file (videos in order of first appearance, as `per` gives them).
    first = index[np.sort(np.unique(index, return_index=True)[1])]
    file_of = np.asarray([files[i] for i in first] if files is not None else first)
    m["num_files"] = len(np.unique(file_of))
    m["cap_ratio_ci"] = list(bootstrap_ratio_ci(*per_file(file_of, cap_sum[0], cap_sum[-1])))
    m["rec_ratio_ci"] = list(bootstrap_ratio_ci(*per_file(file_of, rec_err[0], rec_err[-1])))  # sums cancel
    if shuffled:
        loss = per(torch.cat(shuffled).numpy())
        keep = ~np.isnan(loss)
        if keep.any():
            m["cap_fine_shuffled"] = float(loss[keep].sum() / tok[keep].sum())
            m["shuffled_ratio"] = float(loss[keep].sum() / cap_sum[-1][keep].sum())
            m["shuffled_ratio_ci"] = list(bootstrap_ratio_ci(*per_file(file_of[keep], loss[keep],
                                                                       cap_sum[-1][keep])))
    m["verdict"] = verdict(m)
    return m


def per_video(video: np.ndarray) -> tuple[np.ndarray, Any]:
    """(each sample's video, a function summing per-sample values [..., samples] per video [..., videos]),
    videos in order of first appearance (with one caption per video: the samples themselves)."""
    _, first, inverse = np.unique(video, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    slot = rank[inverse]

    def per(values: np.ndarray) -> np.ndarray:
        out = np.zeros((*values.shape[:-1], len(order)), np.float64)
        np.add.at(out, (..., slot), values)
        return out

    return slot, per


def per_file(file_of: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    """Each of `values` (one per video) summed per file, files in order of first appearance: what a
    bootstrap that resamples files resamples (with one video per file: the values themselves)."""
    _, first, inverse = np.unique(file_of, return_index=True, return_inverse=True)
    if len(first) == len(file_of):
        return [np.asarray(v, np.float64) for v in values]
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    out = []
    for v in values:
        sums = np.zeros(len(first), np.float64)
        np.add.at(sums, rank[inverse.reshape(-1)], v)
        out.append(sums)
    return out


def log_validation(writer: SummaryWriter, m: dict[str, Any], step: int) -> None:
    for k in VAL_TAGS:
        if k in m:  # the shuffled control needs a batch of 2 or more videos
            writer.add_scalar(f"val/{k}", m[k], step)
    writer.add_text("val/verdict", m["verdict"], step)


def summary_line(m: dict[str, Any]) -> str:
    lo, hi = m["cap_ratio_ci"]
    return (f"cap_coarse {m['cap_coarse']:.4f} cap_fine {m['cap_fine']:.4f} cap_ratio {m['cap_ratio']:.4f} "
            f"[{lo:.4f}, {hi:.4f}] shuffled_ratio {m.get('shuffled_ratio', float('nan')):.4f} "
            f"on {m['num_videos']} videos")


def print_eval_table(m: dict[str, Any]) -> None:
    lo, hi = m["cap_ratio_ci"]
    split = m["split"]
    rows = [("split", f"{split['name']} (val_fraction {split['val_fraction']})"),
            ("videos", f"{m['num_videos']} from {m['num_files']} files, of which seen in training: "
                       f"{m['seen_in_training']} videos ({m['files_seen_in_training']} files)"),
            ("checkpoint step", f"{m.get('checkpoint_step')}"), ("cap_coarse", f"{m['cap_coarse']:.4f}")]
    rows += [(f"cap_fine_{k}", f"{c:.4f}") for k, c in enumerate(m["cap_passes"][1:], start=1)]
    rows += [("cap_fine", f"{m['cap_fine']:.4f}"), ("cap_ratio", f"{m['cap_ratio']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]"),
             ("cap_improvement_pct", f"{m['cap_improvement_pct']:.2f}"), ("rec_coarse", f"{m['rec_coarse']:.5f}"),
             ("rec_fine", f"{m['rec_fine']:.5f}"),
             ("rec_ratio", f"{m['rec_ratio']:.4f}  95% CI [{m['rec_ratio_ci'][0]:.4f}, {m['rec_ratio_ci'][1]:.4f}]")]
    if "shuffled_ratio" in m:
        lo, hi = m["shuffled_ratio_ci"]
        rows += [("cap_fine_shuffled", f"{m['cap_fine_shuffled']:.4f}"),
                 ("shuffled_ratio", f"{m['shuffled_ratio']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")]
    if m.get("store_differences"):
        rows.append(("store", "OTHER than the checkpoint's: " + "; ".join(m["store_differences"])))
    rows.append(("verdict", m["verdict"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def visual_samples(store: FeatureStore, ds: FeatureDataset, count: int) -> tuple[list[dict[str, Any]],
                                                                                   list[np.ndarray | None]]:
    """The first `count` videos of `ds` and their rendered frames (None where not synthetic): the
    fixed validation videos whose attention and captions are shown in TensorBoard."""
    items = [ds[i] for i in range(min(count, len(ds)))]
    frames = [synthetic_frames(store.attrs, store.read_string("source", int(ds.slots[it["index"]])),
                               it["timestamps"].numpy()) for it in items]
    return items, frames


def caption_table(model: FoveatedVLM, tokenizer: Any, batch: dict[str, Any], max_tokens: int,
                  modes: tuple[str, ...] = ("coarse", "fine")) -> list[dict[str, str]]:
    """Greedy captions of each mode beside the ground truth."""
    references = batch.get("references") or [[c] for c in batch["captions"]]
    rows = [{"video_id": v, "truth": c, "references": r}
            for v, c, r in zip(batch["video_ids"], batch["captions"], references, strict=True)]
    for mode in modes:
        ids = generate_captions(model, batch, tokenizer.eos_token_id, max_tokens=max_tokens, mode=mode)
        for row, seq in zip(rows, ids, strict=True):
            row[mode] = tokenizer.decode(seq, skip_special_tokens=True)
    return rows


def log_visuals(writer: SummaryWriter, model: FoveatedVLM, tokenizer: Any, batch: dict[str, Any],
                frames: list[np.ndarray | None], step: int, max_tokens: int) -> None:
    """Attention maps, their entropy, coarse-vs-fine token similarity and generated captions."""
    info = inspect_batch(model, batch)
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

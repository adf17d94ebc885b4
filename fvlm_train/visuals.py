"""What the queries do, for TensorBoard: attention maps, entropy, token similarity, captions."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from fvlm_data.dataset import FeatureDataset
from fvlm_data.store import FeatureStore
from fvlm_data.synthetic import get_task, parse_source_tag
from fvlm_model import FoveatedVLM
from fvlm_model.generate import generate_captions
from fvlm_model.visualize import attention_figure, attention_grid, inspect_batch


def synthetic_frames(attrs: dict[str, Any], source: str, timestamps: np.ndarray) -> np.ndarray | None:
    """The store keeps no pixels; a synthetic video can be rendered again from its source tag."""
    tag = parse_source_tag(source)
    if tag is None:
        return None
    task, index = tag
    seed = int(attrs.get("precompute_args", {}).get("seed", 0))
    return get_task(task)(seed, index, timestamps, int(attrs["image_size"]))[0]


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

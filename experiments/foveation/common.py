"""What the analysis scripts share: a trained checkpoint on its store, and its first held-out
videos in batches. The model, frames and split come from the checkpoint, as for `train.py --eval-only`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fvlm_data import CaptionCollator, FeatureDataset, FeatureStore
from fvlm_data.dataset import split_slots, to_device
from fvlm_train import TrainError
from fvlm_train.checkpoint import load_trained
from fvlm_train.config import RunConfig, query_blocks


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every analysis script takes: --store, --checkpoint, --videos."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--videos", type=int, default=256, help="Held-out videos measured (the first ones).")
    return ap


@dataclass
class HeldOut:
    model: Any
    tokenizer: Any
    config: RunConfig
    store: FeatureStore
    step: int
    items: list[dict[str, Any]]  # the first held-out samples (FeatureDataset items)
    slots: list[int]  # their slots in the store

    def batches(self, size: int = 64) -> Iterator[tuple[int, list[dict[str, Any]], dict[str, torch.Tensor]]]:
        """(first index, items, collated CPU batch) of `size` items at a time."""
        collate = CaptionCollator(self.tokenizer, self.config.max_caption_tokens)
        for start in range(0, len(self.items), size):
            chunk = self.items[start : start + size]
            yield start, chunk, to_device(collate(chunk), torch.device("cpu"))


def load_held_out(opts: argparse.Namespace) -> HeldOut:
    """The checkpoint's model (eval mode) and the first `opts.videos` held-out videos; a mismatch
    between store and checkpoint, or no held-out video, ends the script with one line."""
    try:
        model, tokenizer, config, store, step = load_trained(opts.store, opts.checkpoint)
    except TrainError as e:
        sys.exit(f"error: {e}")
    _, held_out, _ = split_slots(store, config.val_fraction)  # the store load_trained opened, not a second one
    ds = FeatureDataset.from_store(store, config.num_frames, held_out)
    ds.read_block_states(query_blocks(config.query_depth, store.attrs))  # the deep query's stored states
    items = [ds[i] for i in range(min(opts.videos, len(ds)))]
    if not items:
        sys.exit("error: the store has no held-out videos")
    return HeldOut(model, tokenizer, config, store, step, items, [int(ds.slots[it["index"]]) for it in items])

"""Does either pass help predict the next frame? Per-frame latent error against copying the last frame.

    python -m experiments.foveation.next_frame --store S --checkpoint CKPT [--videos 256]

For held-out videos it prints, per frame, the next-frame reconstruction error (MSE over the
latent) of each pass's prediction, and of two baselines that use no model: copying the previous
frame's latent, and predicting zeros. The prediction head is given the previous latent and the
pass's hidden state, so a head that beats copying by the same margin with every pass's state
learned nothing about what moves from the queries (`rec_ratio` near 1 says the same in one
number). The model, frames and split come from the checkpoint, as for `train.py --eval-only`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from fvlm_data.dataset import CaptionCollator, FeatureDataset, to_device
from fvlm_model.visualize import pass_names
from fvlm_train import TrainError
from fvlm_train.build import load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--videos", type=int, default=256, help="Held-out videos measured (the first ones).")
    opts = ap.parse_args()
    try:
        model, tokenizer, config, store, step = load_trained(opts.store, opts.checkpoint)
    except TrainError as e:
        sys.exit(f"error: {e}")
    ds = FeatureDataset(opts.store, config.num_frames, split="val", val_fraction=config.val_fraction)
    items = [ds[i] for i in range(min(opts.videos, len(ds)))]
    if not items:
        sys.exit("error: the store has no held-out videos")

    errors, copy, zeros = [], [], []  # [P, B, T], [B, T - 1], [B, T]
    with torch.no_grad():
        for start in range(0, len(items), 64):
            batch = to_device(CaptionCollator(tokenizer, config.max_caption_tokens)(items[start : start + 64]),
                              torch.device("cpu"))
            out = model(batch["dino"], batch["latents"], batch["input_ids"], batch["labels"], score_all_passes=True)
            latents = batch["latents"].float()
            errors.append((out["pred_latents"].float() - latents).pow(2).mean(dim=(3, 4, 5)).numpy())
            copy.append((latents[:, 1:] - latents[:, :-1]).pow(2).mean(dim=(2, 3, 4)).numpy())
            zeros.append(latents.pow(2).mean(dim=(2, 3, 4)).numpy())
    per_pass = np.concatenate(errors, axis=1).mean(axis=1)  # [P, T]
    rows = {name: per_pass[p] for p, name in enumerate(pass_names(len(per_pass)))}
    rows["copy previous"] = np.concatenate([[np.nan], np.concatenate(copy).mean(axis=0)])
    rows["zeros"] = np.concatenate(zeros).mean(axis=0)

    frames = per_pass.shape[1]
    print(f"next-frame latent MSE per frame, {len(items)} held-out videos, checkpoint step {step} "
          "(frame 1 is the clip's first frame: the cue in the foveation tasks)")
    print(f"{'prediction':<16}" + "".join(f"{f'frame {t + 1}':>9}" for t in range(frames)))
    for name, row in rows.items():
        print(f"{name:<16}" + "".join(f"{'-' if np.isnan(x) else f'{x:.3f}':>9}" for x in row))


if __name__ == "__main__":
    main()

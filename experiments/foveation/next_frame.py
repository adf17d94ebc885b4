"""Does either pass help predict the next frame? Per-frame latent error against copying the last frame.

    python -m experiments.foveation.next_frame --store S --checkpoint CKPT [--videos 256]

For held-out videos it prints, per frame, the next-frame reconstruction error (MSE over the
latent) of each pass's prediction, and of two baselines that use no model: copying the previous
frame's latent, and predicting zeros. The seed's head (`film`) is given the previous latent and the
pass's hidden state, so a head that beats copying by the same margin with every pass's state
learned nothing about what moves from the queries (`rec_ratio` near 1 says the same in one
number); the `delta` head starts as copying, so whatever it gains over copying came from a hidden state.
The model, frames and split come from the checkpoint, as for `train.py --eval-only`.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from experiments.foveation.common import load_held_out, parser
except ModuleNotFoundError:  # run as a plain script: its folder is on the path, not the repository
    raise SystemExit("run it from the repository root: python -m experiments.foveation.next_frame") from None
from fvlm_model.visualize import pass_names


def main() -> None:
    held = load_held_out(parser(__doc__).parse_args())

    errors, copy, zeros = [], [], []  # [P, B, T], [B, T - 1], [B, T]
    with torch.no_grad():
        for _, _, batch in held.batches():
            out = held.model(batch, score_all_passes=True)
            latents = batch["latents"].float()
            errors.append((out["pred_latents"].float() - latents).pow(2).mean(dim=(3, 4, 5)).numpy())
            copy.append((latents[:, 1:] - latents[:, :-1]).pow(2).mean(dim=(2, 3, 4)).numpy())
            zeros.append(latents.pow(2).mean(dim=(2, 3, 4)).numpy())
    per_pass = np.concatenate(errors, axis=1).mean(axis=1)  # [P, T]
    rows = {name: per_pass[p] for p, name in enumerate(pass_names(len(per_pass)))}
    rows["copy previous"] = np.concatenate([[np.nan], np.concatenate(copy).mean(axis=0)])
    rows["zeros"] = np.concatenate(zeros).mean(axis=0)

    frames = per_pass.shape[1]
    print(f"next-frame latent MSE per frame, {len(held.items)} held-out videos, checkpoint step {held.step} "
          "(frame 1 is the clip's first frame: the cue in the foveation tasks)")
    print(f"{'prediction':<16}" + "".join(f"{f'frame {t + 1}':>9}" for t in range(frames)))
    for name, row in rows.items():
        print(f"{name:<16}" + "".join(f"{'-' if np.isnan(x) else f'{x:.3f}':>9}" for x in row))


if __name__ == "__main__":
    main()

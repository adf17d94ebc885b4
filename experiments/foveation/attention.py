"""Where do the queries look? Attention of every pass on the cued object of the `foveation` task.

    python -m experiments.foveation.attention --store S --checkpoint CKPT [--videos 256] [--figure attention.png]

For held-out videos of a store made with `--synthetic-task foveation` (or `foveation_nocue`), it
prints, per pass, the mean share of the query attention (CLS token left out) that lands on the
patches the cued object touches, on the patches the two other objects touch, on the patches the
cued object touches in other frames only (its path: where it was or will be), and the share those
patches are of the frame (what a uniform attention would give), over the frames after the cue.
Then the share on the cued object per frame, and the motion control: the last fine pass's share
minus the coarse pass's at frame 2 after the cue (its query has seen the shapes once, not their
motion) and how much more that difference is on frames 3+ (motion seen), with bootstrap 95%
intervals over videos. A fine pass that follows the mover has the second above 0. With a deep query
(--query-depth) the maps are its last block's, and one more table gives each block's share on the cued object.
With --figure it writes the attention maps of the first held-out videos laid over their frames
(the frames, then one row per pass, brighter = more attention; not selected: the first ones in
the split) as a PNG. The model, frames and split come from the checkpoint, as for `train.py --eval-only`.
"""

from __future__ import annotations

import sys

import numpy as np

try:
    from experiments.foveation.common import load_held_out, parser
except ModuleNotFoundError:  # run as a plain script: its folder is on the path, not the repository
    raise SystemExit("run it from the repository root as a module: python -m experiments.foveation.attention") from None
from fvlm_data.sources.synthetic import FOVEATION_CUE_S, foveation_object_masks, parse_source_tag
from fvlm_model.visualize import attention_figure, attention_grid, inspect_batch
from fvlm_train.evaluation import synthetic_frames

PATCH = 14  # DINOv2's patch size: the store's image_size / PATCH patches per side


def patch_masks(pixel_masks: np.ndarray, grid: int) -> np.ndarray:
    """bool [..., S, S] -> bool [..., g, g]: does the object touch the patch?"""
    s = pixel_masks.shape[-1]
    cell = s // grid
    blocks = pixel_masks[..., : grid * cell, : grid * cell].reshape(*pixel_masks.shape[:-2], grid, cell, grid, cell)
    return blocks.any(axis=(-3, -1))


def save_figure(path: str, attrs: dict, items: list[dict], sources: list[str], attention: dict) -> None:
    """The first videos' attention maps over their frames, one block of pass rows per video (PNG)."""
    from PIL import Image

    blocks = []
    for k, item in enumerate(items):
        frames = synthetic_frames(attrs, sources[k], item["timestamps"].numpy())  # [T, S, S, 3]
        # The frames as they are on top (2 px white separators, as in attention_figure), then the maps.
        gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
        plain = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1).transpose(2, 0, 1)
        blocks += [plain, np.full((3, 2, plain.shape[2]), 255, np.uint8)]
        blocks.append(attention_figure({n: attention_grid(a[k]) for n, a in attention.items()}, frames))
        blocks.append(np.full((3, 8, blocks[-1].shape[2]), 255, np.uint8))  # a gap between videos
    Image.fromarray(np.concatenate(blocks[:-1], axis=1).transpose(1, 2, 0)).save(path)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--figure", default=None, help="Write the first held-out videos' attention maps here (PNG).")
    ap.add_argument("--figure-videos", type=int, default=3, help="Videos in the figure (the first held-out ones).")
    opts = ap.parse_args()
    held = load_held_out(opts)
    attrs = held.store.attrs
    seed = int(attrs.get("precompute_args", {}).get("seed", 0))
    size = int(attrs["image_size"])
    grid = size // PATCH

    sources = held.store.read_strings("source", np.asarray(held.slots))
    if not all((parse_source_tag(s) or ("",))[0].startswith("foveation") for s in sources):
        sys.exit("error: needs held-out videos of --synthetic-task foveation (or foveation_nocue)")
    names, per_video = None, []  # per video: [passes + uniform, 3 masks, frames after the cue]
    per_block = []  # per video: [passes, deep-query blocks]: the share on the cued object after the cue
    for start, chunk, batch in held.batches():
        chunk_sources = sources[start : start + len(chunk)]
        info = inspect_batch(held.model, batch)
        names = list(info["attention"])
        if start == 0 and opts.figure:
            save_figure(opts.figure, attrs, chunk[: opts.figure_videos], chunk_sources, info["attention"])
        for k, (item, source) in enumerate(zip(chunk, chunk_sources, strict=True)):
            timestamps = item["timestamps"].numpy()
            after_cue = timestamps >= FOVEATION_CUE_S
            objects = patch_masks(foveation_object_masks(seed, parse_source_tag(source)[1], timestamps, size),
                                  grid)[:, after_cue]  # [K, T', g, g]
            cued, others = objects[0], objects[1:].any(axis=0)
            path = objects[0].any(axis=0, keepdims=True) & ~cued & ~others  # the mover's other positions
            masks = (cued, others, path)
            maps = [attention_grid(a[k])[after_cue] for a in info["attention"].values()]
            per_video.append([[(m * mask).sum(axis=(1, 2)) for mask in masks] for m in maps]
                             + [[mask.mean(axis=(1, 2)) for mask in masks]])
            per_block.append([[(attention_grid(b[k][:, block])[after_cue] * cued).sum(axis=(1, 2)).mean()
                               for block in range(b.shape[2])] for b in info["block_attention"].values()])
    shares = np.asarray(per_video)  # [V, P + 1, 3, T']
    mean = shares.mean(axis=(0, 3))
    print(f"attention share over frames after the cue, {len(shares)} held-out videos, checkpoint step {held.step}")
    print(f"{'pass':<16}{'cued object':>12}{'other objects':>15}{'its path':>10}")
    for name, (cued, others, path) in zip([*names, "uniform"], mean, strict=True):
        print(f"{name:<16}{cued:>12.3f}{others:>15.3f}{path:>10.3f}")

    # Per frame after the cue. The query of frame t is made from the frames before it, so it can
    # tell which shape moves only from frame 3 on (two frames of the shapes seen).
    per_frame = shares[:, :, 0].mean(axis=0)
    print("attention share on the cued object per frame after the cue")
    print(f"{'pass':<16}" + "".join(f"{f'frame {t + 1}':>9}" for t in range(per_frame.shape[1])))
    for name, row in zip([*names, "uniform"], per_frame, strict=True):
        print(f"{name:<16}" + "".join(f"{x:>9.3f}" for x in row))
    blocks = np.asarray(per_block).mean(axis=0)  # [P, L]
    if blocks.shape[1] > 1:  # the deep query: where each of its blocks looks (the table above is its last block's)
        ids = held.model.deep_query.block_ids
        print("deep query: attention share on the cued object per DINO block, frames after the cue")
        print(f"{'pass':<16}" + "".join(f"{f'block {b}':>9}" for b in ids))
        for name, row in zip(names, blocks, strict=True):
            print(f"{name:<16}" + "".join(f"{x:>9.3f}" for x in row))
    if len(names) > 1 and shares.shape[3] > 2:
        # The control: frame 2's query has seen the shapes once, not their motion. A fine pass that
        # follows the mover gains more on frames 3+ than on frame 2.
        gain = shares[:, -2, 0] - shares[:, 0, 0]  # last fine - coarse, per video and frame
        for label, x in (("frame 2 (shapes seen, motion not yet)", gain[:, 1]),
                         ("frames 3+ (motion seen)", gain[:, 2:].mean(axis=1)),
                         ("frames 3+ minus frame 2", gain[:, 2:].mean(axis=1) - gain[:, 1])):
            print(f"{names[-1]} - coarse on the cued object, {label}: {mean_ci(x)}")


def mean_ci(x: np.ndarray) -> str:
    """The mean over videos with its bootstrap 95% interval."""
    boot = np.random.default_rng(0).choice(x, size=(2000, len(x))).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{x.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"


if __name__ == "__main__":
    main()

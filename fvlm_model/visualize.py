"""Attention maps of the query attention, as grids, as one image, and as collapse diagnostics.

Each pass attends with one query per frame over the frame's DINO tokens (1 CLS + g*g patches).
When the passes collapse, every pass attends alike and produces the same visual tokens: the
entropy of the attention and the cosine between coarse and fine tokens show it as scalars, the
figure (rows = passes, columns = frames) shows where each pass looks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import FoveatedVLM

# A piecewise-linear approximation of matplotlib's 'inferno': dark for low, bright for high.
_INFERNO = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)
_HEAT_ALPHA = 0.6  # heatmap weight over a frame; the frame stays recognisable underneath
_GRID_ALPHA = 0.85  # over the neutral pattern, which only marks the patch layout
_SEPARATOR = 2  # px of white between cells


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def attention_grid(attention: Tensor | np.ndarray, grid: int | None = None) -> np.ndarray:
    """Attention [..., N] (e.g. [T, N]) over a frame's tokens -> float32 maps [..., g, g].

    A leading CLS token (N = g*g + 1, e.g. 325 -> 18x18) is dropped and each map is renormalised
    to sum 1 over the patches, so maps stay comparable however much mass the CLS token took.
    `grid` fixes g; by default it is inferred from N.
    """
    att = _to_numpy(attention)
    n = att.shape[-1]
    if grid is None:
        g = math.isqrt(n)
        grid = g if g * g == n else math.isqrt(n - 1)
    if n == grid * grid + 1:
        att = att[..., 1:]
    elif n != grid * grid:
        raise ValueError(f"{n} tokens are neither {grid}x{grid} patches nor CLS + patches")
    total = att.sum(axis=-1, keepdims=True)
    # A map with no mass on the patches stays zero rather than becoming NaN.
    att = np.divide(att, total, out=np.zeros_like(att), where=total > 0)
    return att.reshape(*att.shape[:-1], grid, grid).astype(np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] [...] -> RGB float32 [..., 3] in 0..255 (the inferno-like ramp)."""
    x = np.clip(values, 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(_INFERNO) - 2)
    frac = (x - low)[..., None]
    return _INFERNO[low] * (1.0 - frac) + _INFERNO[low + 1] * frac


def _normalise(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] per map [g, g]; a flat map is all zeros (nothing stands out)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _upsample(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """[g, g] -> [height, width], nearest: each patch stays a sharp block."""
    x = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(height, width), mode="nearest-exact")[0, 0].numpy()


def _neutral(height: int, width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """A grey checkerboard with one square per patch: [height, width, 3] float32."""
    rows = np.arange(height) * grid_h // height
    cols = np.arange(width) * grid_w // width
    checker = (rows[:, None] + cols[None, :]) % 2
    return np.repeat(np.where(checker, 112.0, 144.0)[..., None], 3, axis=-1).astype(np.float32)


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).clamp(0, 255).numpy()


def attention_figure(
    maps: dict[str, np.ndarray | Tensor],
    frames: np.ndarray | None = None,
    max_frames: int = 8,
    cell_size: int | None = None,
) -> np.ndarray:
    """One image of the attention of every pass: uint8 [3, H, W] (CHW, for TensorBoard add_image).

    maps: pass name -> [T, g, g] (or raw [T, N], gridded with `attention_grid`), one row each in
    the dict's order. Columns: up to `max_frames` frames, evenly spread over T. Each cell is the
    map min-max normalised, coloured, upsampled (nearest) and alpha-blended over the frame
    (frames uint8 [T, S, S, 3]) or, without frames, over a neutral checkerboard of the patches.
    Cells are `cell_size` px square (default: the frame size, or 4 px per patch, at least 64),
    with 2 px white separators: H = rows * cell + (rows - 1) * 2, W likewise with columns.
    """
    if not maps:
        raise ValueError("maps is empty")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    grids = {k: attention_grid(v) if np.ndim(v) == 2 else _to_numpy(v) for k, v in maps.items()}
    shapes = {v.shape for v in grids.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"maps must all be [T, g, g] of one shape, got {sorted(shapes)}")
    frames_total, grid_h, grid_w = next(iter(shapes))
    if frames is not None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] != frames_total or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [{frames_total}, S, S, 3], got {frames.shape}")
    if cell_size is not None:
        height = width = cell_size
    elif frames is not None:
        height, width = frames.shape[1:3]
    else:
        height = width = max(64, 4 * max(grid_h, grid_w))

    columns = np.unique(np.linspace(0, frames_total - 1, min(frames_total, max_frames)).round().astype(int))
    if frames is not None:
        background = _resize_frames(frames[columns], height, width)
        alpha = _HEAT_ALPHA
    else:
        background = np.broadcast_to(_neutral(height, width, grid_h, grid_w), (len(columns), height, width, 3))
        alpha = _GRID_ALPHA

    sep = _SEPARATOR
    rows = len(grids)
    out = np.full(
        (rows * height + (rows - 1) * sep, len(columns) * width + (len(columns) - 1) * sep, 3), 255.0,
        dtype=np.float32,
    )
    for r, m in enumerate(grids.values()):
        for c, t in enumerate(columns):
            heat = colormap(_upsample(_normalise(m[t]), height, width))
            y, x = r * (height + sep), c * (width + sep)
            out[y : y + height, x : x + width] = alpha * heat + (1.0 - alpha) * background[c]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(2, 0, 1).copy()


def attention_entropy(attention: Tensor | np.ndarray) -> Tensor:
    """Entropy in nats of attention [..., N] over its last dim, averaged over the leading dims.

    log(N) is uniform attention (the query sees nothing in particular), 0 a single token. Rows
    are renormalised first, so maps over patches only (CLS dropped) work as they are.
    """
    p = torch.as_tensor(attention).detach().float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()


def token_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of matching tokens a, b [B, T, H] (1.0: the passes collapsed)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.detach().float(), b.detach().float(), dim=-1).mean().item()


def pass_names(num_passes: int) -> list[str]:
    """["coarse", "fine_1", ..., "fine_{P-1}"], the order of `forward`'s per-pass outputs."""
    return ["coarse"] + [f"fine_{k}" for k in range(1, num_passes)]


def inspect_batch(model: FoveatedVLM, batch: Mapping[str, Any]) -> dict[str, dict[str, Tensor | float]]:
    """One forward of `batch` (eval mode, no grad) and what it says about the passes.

    Returns {"attention": {pass: [B, T, N] float32 on the CPU}, "block_attention": {pass: [B, T, L, N]: each
    of the deep query's L blocks (L = 1 at query depth 0)}, "entropy": {pass: nats over the N
    tokens}, "token_cosine": {"fine_k": cosine between coarse and fine_k visual tokens},
    "caption_loss": {pass: loss}}. Passes are named by `pass_names`.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch, score_all_passes=True)
            attention = out["attention"]  # [P, B, T, N]
            # Each pass's frame tokens again from its queries, and every block's attention (one at depth 0).
            inputs = model.frame_features(batch)
            tokens, blocks = zip(*(model.encode_frames(inputs, q, per_block=True) for q in out["queries"]), strict=True)
            visual = model.project_visual(torch.stack(tokens).to(model.proj.weight.dtype))  # [P, B, T, H]
    finally:
        for m, training in modes:
            m.training = training

    names = pass_names(attention.shape[0])
    return {
        "attention": {n: attention[p].float().cpu() for p, n in enumerate(names)},
        "block_attention": {n: blocks[p].float().cpu() for p, n in enumerate(names)},
        "entropy": {n: attention_entropy(attention[p]).item() for p, n in enumerate(names)},
        "token_cosine": {n: token_cosine(visual[0], visual[p]) for p, n in enumerate(names) if p > 0},
        "caption_loss": {n: float(out["cap_passes"][p]) for p, n in enumerate(names)},
    }

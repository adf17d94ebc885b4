"""The headline metric and its uncertainty: cap_ratio = cap_coarse / cap_fine over videos."""

from __future__ import annotations

import numpy as np


def caption_ratio(cap_coarse: np.ndarray, cap_fine: np.ndarray) -> float:
    """Ratio of mean per-video caption losses (> 1: the fine pass captions better)."""
    return float(np.mean(cap_coarse) / np.mean(cap_fine))


def bootstrap_ratio_ci(
    cap_coarse: np.ndarray, cap_fine: np.ndarray, num_resamples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `caption_ratio`, resampling videos (pairs) with replacement.

    Coarse and fine losses of one video are resampled together: the passes see the same video,
    so their losses are correlated and the interval of the ratio is much tighter than the two
    separate intervals would suggest.
    """
    cap_coarse, cap_fine = np.asarray(cap_coarse, np.float64), np.asarray(cap_fine, np.float64)
    if cap_coarse.shape != cap_fine.shape or cap_coarse.ndim != 1 or len(cap_coarse) == 0:
        raise ValueError("need two equal-length, non-empty 1-D arrays of per-video losses")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(cap_coarse), size=(num_resamples, len(cap_coarse)))
    ratios = cap_coarse[idx].mean(axis=1) / cap_fine[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(low), float(high)

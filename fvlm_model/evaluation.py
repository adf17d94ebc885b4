"""The one definition of the reported metrics, their uncertainty, and what they say.

Per video the model gives, for each pass, the caption loss summed over the caption's tokens
(`cap_sum`), the number of those tokens (`cap_tokens`) and the next-frame reconstruction error
(`rec_per_sample`). Every number the trainer reports (training logs, validation, `--eval-only`,
its JSON) is a ratio of sums of these over a set of videos:

    cap_<pass> = sum(cap_sum) / sum(cap_tokens)       (the loss per caption token, as trained)
    rec_<pass> = sum(rec_per_sample) / videos
    cap_ratio  = cap_coarse / cap_fine                 (> 1: the fine pass captions better)

and an interval resamples videos (a video's passes together); the trainer's evaluation resamples
files (the sums of a file's rows together: `fvlm_train.evaluation.per_file`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import ModelConfig, joint_loss


def pass_metrics(cap_sums: np.ndarray, tokens: float, rec_sums: np.ndarray, videos: float,
                 config: ModelConfig) -> dict[str, Any]:
    """Metrics from totals over a set of videos: cap_sums and rec_sums [P] (coarse first), the
    caption tokens and the videos they were summed over."""
    cap = np.asarray(cap_sums, np.float64) / max(float(tokens), 1.0)
    rec = np.asarray(rec_sums, np.float64) / max(float(videos), 1.0)
    m = {"cap_coarse": float(cap[0]), "cap_fine": float(cap[-1]), "rec_coarse": float(rec[0]),
         "rec_fine": float(rec[-1])}
    m["loss"] = float(joint_loss(config, m["cap_coarse"], m["cap_fine"], m["rec_coarse"], m["rec_fine"]))
    m["cap_ratio"] = m["cap_coarse"] / max(m["cap_fine"], 1e-12)
    m["cap_improvement_pct"] = (m["cap_ratio"] - 1.0) * 100.0
    m["rec_ratio"] = m["rec_coarse"] / max(m["rec_fine"], 1e-12)
    m["cap_passes"] = [float(c) for c in cap]
    m["rec_passes"] = [float(r) for r in rec]
    return m


def caption_ratio(numerator_sums: np.ndarray, denominator_sums: np.ndarray) -> float:
    """Ratio of two passes' caption losses over videos: sum over sum (the token counts cancel)."""
    return float(np.sum(numerator_sums) / np.sum(denominator_sums))


def bootstrap_ratio_ci(
    numerator_sums: np.ndarray, denominator_sums: np.ndarray, num_resamples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `caption_ratio`, resampling videos (pairs) with replacement.

    The two passes' losses of one video are resampled together: the passes see the same video,
    so their losses are correlated and the interval of the ratio is much tighter than the two
    separate intervals would suggest.
    """
    a, b = np.asarray(numerator_sums, np.float64), np.asarray(denominator_sums, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("need two equal-length, non-empty 1-D arrays of per-video losses")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(num_resamples, len(a)))
    ratios = a[idx].sum(axis=1) / b[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _pct(ratio: float, ci: tuple[float, float] | list[float]) -> str:
    return f"{(ratio - 1) * 100:.2f}% [{(ci[0] - 1) * 100:.2f}, {(ci[1] - 1) * 100:.2f}]"


def verdict(m: dict[str, Any]) -> str:
    """One plain sentence from the intervals of `cap_ratio` and `shuffled_ratio`.

    Foveation is claimed only when both intervals lie above 1: the fine pass captions better
    than the coarse pass AND worse when its queries come from another video.
    """
    gain = _pct(m["cap_ratio"], m["cap_ratio_ci"])
    if m["cap_ratio_ci"][0] > 1:
        first = f"the fine pass gains {gain}"
    elif m["cap_ratio_ci"][1] < 1:
        first = f"the fine pass loses {gain}"
    else:
        first = f"the fine pass's gain {gain} is not distinguishable from 0"
    if "shuffled_ratio_ci" not in m:
        return f"foveation not tested: {first}; no shuffled-query control (it needs batches of 2 or more videos)"
    own = _pct(m["shuffled_ratio"], m["shuffled_ratio_ci"])
    lo, hi = m["shuffled_ratio_ci"]
    # shuffled_ratio = cap_fine_shuffled / cap_fine: how much worse the fine pass captions with
    # another video's queries. It is not a share of the gain, so it is not worded as one.
    control = f"another video's queries make its loss {own} higher"
    if m["cap_ratio_ci"][0] > 1 and lo > 1:
        return f"foveation shown: {first}, and {control}"
    why = ("interval includes 0" if hi >= 1 else "another video's queries do better") if lo <= 1 else \
        "but the fine pass does not gain"
    return f"foveation not shown: {first}; {control} ({why})"

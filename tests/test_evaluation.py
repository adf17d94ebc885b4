"""The evaluation's arithmetic: cap_ratio, its bootstrap interval, and the shuffled-query control,
on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_model import load_lm
from fvlm_model.evaluation import bootstrap_ratio_ci, caption_ratio
from tests.test_model import CAPTIONS, make_batch, make_model
from train import evaluate


def test_ratio_is_of_the_means():
    assert caption_ratio(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(2.0)
    assert caption_ratio(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)  # not mean of ratios


def test_interval_on_two_videos_is_the_range_of_resampled_ratios():
    # Resampling two videos gives means (2, 2), (3, 3) or (4, 4) over (1, 1): ratios 2, 3, 4 with
    # probability 1/4, 1/2, 1/4, so the 95% percentile interval is [2, 4].
    assert bootstrap_ratio_ci(np.array([2.0, 4.0]), np.array([1.0, 1.0])) == (2.0, 4.0)


def test_interval_of_a_constant_ratio_is_a_point_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    fine = rng.uniform(0.5, 2.0, size=50)
    assert bootstrap_ratio_ci(1.25 * fine, fine) == pytest.approx((1.25, 1.25))
    coarse = fine * rng.uniform(1.0, 1.3, size=50)
    lo, hi = bootstrap_ratio_ci(coarse, fine)
    assert lo < caption_ratio(coarse, fine) < hi
    assert bootstrap_ratio_ci(coarse, fine) == (lo, hi)  # seeded: the same interval every time


def test_pairs_are_resampled_together():
    # Video difficulty varies tenfold but every video's fine loss is 10% lower: the paired interval
    # is tight around 1.11, several times tighter than with the pairs broken up.
    rng = np.random.default_rng(1)
    fine = rng.uniform(0.2, 2.0, size=200)
    coarse = fine / 0.9 * rng.normal(1.0, 0.01, size=200)
    lo, hi = bootstrap_ratio_ci(coarse, fine)
    assert 1.09 < lo < 1.111 < hi < 1.13
    unpaired_lo, unpaired_hi = bootstrap_ratio_ci(coarse, rng.permutation(fine))
    assert hi - lo < 0.2 * (unpaired_hi - unpaired_lo)


def test_bad_inputs():
    with pytest.raises(ValueError):
        bootstrap_ratio_ci(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        bootstrap_ratio_ci(np.ones(0), np.ones(0))


def test_evaluate_means_interval_and_shuffled_control():
    """evaluate() over a batch of three and a batch of one: the losses are means over all four
    videos; the shuffled control only over the three (a batch of one has no other video)."""
    tokenizer = load_lm("tiny")[1]
    model = make_model(fine_iterations=1)
    big, small = make_batch(tokenizer, seed=0), make_batch(tokenizer, captions=CAPTIONS[:1], seed=1)
    loader = [dict(zip(("dino", "latents", "input_ids", "labels"), b, strict=True)) for b in (big, small)]
    m = evaluate(model, loader, torch.device("cpu"), torch.float32, shuffled_control=True)

    with torch.no_grad():
        per_video = torch.cat([model(*b)["cap_per_sample"] for b in (big, small)], dim=1).numpy()  # [2, 4]
        shuffled = model.shuffled_query_loss(big[0], model(*big)["last_queries"], big[2], big[3]).numpy()
    assert m["num_videos"] == 4
    assert m["cap_coarse"] == pytest.approx(per_video[0].mean(), rel=1e-5)
    assert m["cap_fine"] == pytest.approx(per_video[1].mean(), rel=1e-5)
    assert m["cap_ratio"] == pytest.approx(per_video[0].mean() / per_video[1].mean(), rel=1e-5)
    assert m["cap_ratio_ci"] == pytest.approx(list(bootstrap_ratio_ci(per_video[0], per_video[1])), rel=1e-5)
    assert m["cap_fine_shuffled"] == pytest.approx(shuffled.mean(), rel=1e-5)
    assert m["shuffled_ratio"] == pytest.approx(shuffled.mean() / per_video[1, :3].mean(), rel=1e-5)
    lo, hi = m["shuffled_ratio_ci"]
    assert lo <= m["shuffled_ratio"] <= hi

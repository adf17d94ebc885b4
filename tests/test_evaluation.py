"""The evaluation's arithmetic: cap_ratio, its bootstrap interval, the shuffled-query control and
the verdict, on inputs whose answers are known; and that training and validation report the same
numbers for the same videos and weights (one metric definition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_model import load_lm
from fvlm_model.evaluation import bootstrap_ratio_ci, caption_ratio, pass_metrics, verdict
from fvlm_train.evaluation import evaluate
from fvlm_train.step import SUMS, make_optimizer, train_step
from tests.helpers.model import CAPTIONS, make_batch, make_model


def test_ratio_is_of_the_sums():
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


def as_batches(*batches):
    return [dict(zip(("dino", "latents", "input_ids", "labels"), b, strict=True)) for b in batches]


def test_evaluate_sums_interval_and_shuffled_control():
    """evaluate() over a batch of three and a batch of one: caption losses are per token over all
    four videos (sum of per-video sums / sum of token counts); the shuffled control only over the
    three (a batch of one has no other video)."""
    tokenizer = load_lm("tiny")[1]
    model = make_model(fine_iterations=1)
    big, small = make_batch(tokenizer, seed=0), make_batch(tokenizer, captions=CAPTIONS[:1], seed=1)
    m = evaluate(model, as_batches(big, small), torch.device("cpu"))

    with torch.no_grad():
        outs = [model(b) for b in as_batches(big, small)]
        sums = torch.cat([o["cap_sum"] for o in outs], dim=1).double().numpy()  # [2, 4]
        tokens = torch.cat([o["cap_tokens"] for o in outs]).double().numpy()
        shuffled = model.shuffled_query_loss(as_batches(big)[0], outs[0]["last_queries"]).double().numpy()
    assert m["num_videos"] == 4
    assert m["cap_coarse"] == pytest.approx(sums[0].sum() / tokens.sum(), rel=1e-5)
    assert m["cap_fine"] == pytest.approx(sums[1].sum() / tokens.sum(), rel=1e-5)
    assert m["cap_ratio"] == pytest.approx(sums[0].sum() / sums[1].sum(), rel=1e-5)
    assert m["cap_ratio"] != pytest.approx((sums[0] / tokens).mean() / (sums[1] / tokens).mean(), rel=1e-6)
    assert m["cap_ratio_ci"] == pytest.approx(list(bootstrap_ratio_ci(sums[0], sums[1])), rel=1e-5)
    assert m["cap_fine_shuffled"] == pytest.approx(shuffled.sum() / tokens[:3].sum(), rel=1e-5)
    assert m["shuffled_ratio"] == pytest.approx(shuffled.sum() / sums[1, :3].sum(), rel=1e-5)
    lo, hi = m["shuffled_ratio_ci"]
    assert lo <= m["shuffled_ratio"] <= hi
    assert m["verdict"] == verdict(m)


def test_training_and_validation_report_the_same_cap_metrics():
    """The same videos and weights: the numbers the training step's sums give (what train.py logs)
    equal what validation reports. Captions of 6/3/14 tokens, split over two micro-batches, so a
    mean of per-video or per-batch means would differ."""
    tokenizer = load_lm("tiny")[1]
    model = make_model(fine_iterations=2)
    batch = make_batch(tokenizer, seed=3)
    assert len(set((batch[3] != -100).sum(1).tolist())) == 3  # three different caption lengths
    halves = as_batches(tuple(x[:1] for x in batch), tuple(x[1:] for x in batch))
    validation = evaluate(model, halves, torch.device("cpu"), shuffled_control=False)

    optimizer = make_optimizer(model, lr=0.0, weight_decay=0.0, device=torch.device("cpu"))
    step = train_step(model, model.train(), optimizer, halves, clip=1.0)
    sums = dict(zip(SUMS, step["sums"].tolist(), strict=True))
    logged = pass_metrics([sums["cap_sum_coarse"], sums["cap_sum_fine"]], sums["cap_tokens"],
                          [sums["rec_sum_coarse"], sums["rec_sum_fine"]], sums["videos"], model.config)
    for k in ("cap_coarse", "cap_fine", "cap_ratio", "rec_coarse", "rec_fine", "rec_ratio", "loss"):
        assert logged[k] == pytest.approx(validation[k], rel=1e-5), k
    assert step["loss"] == pytest.approx(validation["loss"], rel=1e-5)  # the loss that was back-propagated
    per_video_mean = (model.eval()(as_batches(batch)[0])["cap_per_sample"][0]).mean().item()
    assert validation["cap_coarse"] != pytest.approx(per_video_mean, rel=1e-4)  # the definitions differ


def interval_metrics(cap, cap_ci, shuffled=None, shuffled_ci=None):
    m = {"cap_ratio": cap, "cap_ratio_ci": cap_ci}
    if shuffled is not None:
        m.update(shuffled_ratio=shuffled, shuffled_ratio_ci=shuffled_ci)
    return m


def test_verdict_never_calls_a_gain_foveation_unless_both_intervals_are_above_one():
    grid = [(0.95, 0.99), (0.98, 1.02), (0.99, 1.0), (1.0, 1.05), (1.001, 1.01), (1.02, 1.2)]
    for cap_ci in grid:
        for shuffled_ci in grid:
            line = verdict(interval_metrics(sum(cap_ci) / 2, cap_ci, sum(shuffled_ci) / 2, shuffled_ci))
            shown = cap_ci[0] > 1 and shuffled_ci[0] > 1
            assert line.startswith("foveation shown") == shown, (cap_ci, shuffled_ci, line)
            assert ("foveation not shown" in line) == (not shown)
    line = verdict(interval_metrics(1.033, (1.014, 1.054), 1.005, (0.9995, 1.0125)))
    assert line == ("foveation not shown: the fine pass gains 3.30% [1.40, 5.40]; another video's queries make "
                    "its loss 0.50% [-0.05, 1.25] higher (interval includes 0)")
    assert verdict(interval_metrics(1.2, (1.1, 1.3))).startswith("foveation not tested")


def test_intervals_resample_files_with_all_their_rows_and_one_row_per_file_changes_nothing():
    """Three of four evaluated rows are segments of one file: every interval resamples the two files
    (each file's sums together), not the four rows as if independent; with one row per file the
    numbers are exactly those of resampling videos."""
    tokenizer = load_lm("tiny")[1]
    model = make_model(fine_iterations=1)
    big, small = make_batch(tokenizer, seed=0), make_batch(tokenizer, captions=CAPTIONS[:1], seed=1)
    batches = as_batches(big, small)
    by_video = evaluate(model, batches, torch.device("cpu"))
    assert evaluate(model, batches, torch.device("cpu"), files=["a", "b", "c", "d"]) == {**by_video, "num_files": 4}
    assert by_video["num_files"] == 4
    m = evaluate(model, batches, torch.device("cpu"), files=["long", "long", "short", "long"])
    with torch.no_grad():
        outs = [model(b) for b in batches]
        sums = torch.cat([o["cap_sum"] for o in outs], dim=1).double().numpy()  # [2, 4]
        shuffled = model.shuffled_query_loss(batches[0], outs[0]["last_queries"]).double().numpy()  # rows 0-2
    per_file = np.stack([sums[:, [0, 1, 3]].sum(1), sums[:, 2]], axis=1)  # files in order of first appearance
    assert m["num_videos"] == 4 and m["num_files"] == 2
    assert m["cap_ratio"] == by_video["cap_ratio"]  # the point estimates are sums either way
    assert m["cap_ratio_ci"] == pytest.approx(list(bootstrap_ratio_ci(per_file[0], per_file[1])), rel=1e-5)
    assert m["cap_ratio_ci"] != pytest.approx(by_video["cap_ratio_ci"], rel=1e-6)
    own = np.array([sums[1, [0, 1]].sum(), sums[1, 2]])
    assert m["shuffled_ratio_ci"] == pytest.approx(
        list(bootstrap_ratio_ci(np.array([shuffled[[0, 1]].sum(), shuffled[2]]), own)), rel=1e-5)

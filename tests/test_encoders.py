"""The tiny preset's VAE scale: latents of unit scale, as SD's factor gives the real VAE, and a
store keeps the factor it recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from fvlm_data import FeatureStore
from fvlm_data.precompute.encoders import TINY, TINY_VAE_SCALING_FACTOR, FrozenEncoders
from fvlm_data.sources.synthetic import TASKS, render_synthetic
from tests.helpers.in_process import invoke
from tests.helpers.precompute import SMALL, precompute


@pytest.fixture(scope="module")
def tiny() -> FrozenEncoders:
    return FrozenEncoders(TINY, TINY)


def synthetic_frames(tasks, videos: int, num_frames: int, image_size: int) -> torch.Tensor:
    frames = [render_synthetic(task, 0, i, num_frames, image_size)[0] for task in tasks for i in range(videos)]
    return torch.from_numpy(np.concatenate(frames))


def test_tiny_factor_is_one_over_the_raw_latent_std_of_the_calibration_sample(tiny):
    # The sample the constant was derived from (encoders.py): 8 videos of each task, 8 frames, 112 px, seed 0.
    frames = synthetic_frames(sorted(TASKS), videos=8, num_frames=8, image_size=112)
    assert tiny.vae_scaling_factor == TINY_VAE_SCALING_FACTOR
    assert 1.0 / tiny.raw_latent_std(frames) == pytest.approx(TINY_VAE_SCALING_FACTOR, rel=0.02)
    assert tiny.describe()["vae_scaling_factor"] == TINY_VAE_SCALING_FACTOR  # what the store records


@pytest.mark.parametrize("task,image_size", [("foveation_nocue", 112), ("shapes", 64), ("foveation", 224)])
def test_tiny_latents_have_unit_scale_on_synthetic_clips(tiny, task, image_size):
    # Other videos (seed 0, indices 100+) than the calibration sample, and other sizes.
    frames = torch.from_numpy(np.concatenate(
        [render_synthetic(task, 0, 100 + i, 8, image_size)[0] for i in range(6)]))
    latents = tiny.encode(frames)["latents"]
    assert 0.5 <= float(latents.std()) <= 2.0
    # Frame-to-frame change is what next-frame prediction must learn; it must not vanish either.
    per_video = latents.view(6, 8, *latents.shape[1:])
    assert float((per_video[:, 1:] - per_video[:, :-1]).std()) > 0.02


@pytest.mark.slow  # precompute.py in a new process
def test_rows_added_to_a_store_use_the_factor_the_store_recorded(tmp_path):
    old_factor = 0.18215  # what tiny-preset stores recorded before the calibrated factor
    grown, fresh = tmp_path / "grown.zarr", tmp_path / "fresh.zarr"
    precompute("--out", str(grown), "--synthetic", "6", "--limit", "3", "--workers", "0", *SMALL)
    group = zarr.open_group(str(grown), mode="r+")
    group.attrs["encoders"] = {**group.attrs["encoders"], "vae_scaling_factor": old_factor}
    # The same command line in this process (tests/helpers/in_process.py): the rerun's factor comes from the
    # store alone.
    for out in (grown, fresh):  # grown: rows 3..5 are new
        proc = invoke("precompute", ["--out", str(out), "--synthetic", "6", "--workers", "0", *SMALL])
        assert proc.returncode == 0, proc.stderr

    g, f = FeatureStore.open(grown), FeatureStore.open(fresh)
    assert g.attrs["encoders"]["vae_scaling_factor"] == old_factor
    assert f.attrs["encoders"]["vae_scaling_factor"] == TINY_VAE_SCALING_FACTOR
    assert len(g) == len(f) == 6
    for i in range(3, 6):
        new_row, fresh_row = g.read(i), f.read(i)
        assert new_row["video_id"] == fresh_row["video_id"]
        expected = fresh_row["latents"].astype(np.float32) * (old_factor / TINY_VAE_SCALING_FACTOR)
        np.testing.assert_allclose(new_row["latents"].astype(np.float32), expected, rtol=2e-3, atol=2e-4)

"""Per-frame features are declared once (`fvlm_data.store.format.FRAME_TABLE`): an encoder that returns one
more array, declared in the table and nowhere else, reaches the store (checksummed, consistency-checked,
quantized if asked) and comes back through the dataset under its name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fvlm_data import CaptionCollator, FeatureDataset, FeatureStore, StoreError
from fvlm_data.dataset import to_device
from fvlm_data.inspect import inspect_store
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.precompute.encoders import FrozenEncoders
from fvlm_data.precompute.pipeline import run_precompute
from fvlm_data.sources import list_inputs, load_frames
from fvlm_data.store import format as store_format
from fvlm_data.store.format import FrameArray, quantize_int8

FRAMES, SIZE = 4, 56


class EncodersWithColour(FrozenEncoders):
    """The tiny encoders plus one more output: each frame's mean colour over a 2x2 grid of cells, [4, 3]."""

    def encode(self, frames: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        out = super().encode(frames, **kwargs)
        x = frames.to(self.device).float().div(255.0)  # [B, H, W, 3]
        cells = x.unflatten(1, (2, -1)).unflatten(3, (2, -1)).mean(dim=(2, 4))  # [B, 2, 2, 3]
        out["colour"] = cells.flatten(1, 2).to(out["dino"].dtype)
        return out


def expected_colour(item) -> np.ndarray:
    frames = torch.from_numpy(load_frames(item, FRAMES, SIZE).frames).float().div(255.0)
    return frames.unflatten(1, (2, -1)).unflatten(3, (2, -1)).mean(dim=(2, 4)).flatten(1, 2).numpy()


@pytest.fixture
def colour_table(monkeypatch):
    def declare(**options) -> None:
        table = (*store_format.FRAME_TABLE, FrameArray("colour", "float16", **options))
        monkeypatch.setattr(store_format, "FRAME_TABLE", table)
    return declare


def precompute(path, feature_dtype: str = "float16") -> list:
    config = PrecomputeConfig(out=str(path), preset="tiny", synthetic=5, num_frames=FRAMES, image_size=SIZE,
                              feature_dtype=feature_dtype, workers=0, batch_videos=2, shard_videos=4, quiet=True)
    inputs = list_inputs(synthetic=5)
    assert run_precompute(config, inputs, EncodersWithColour("tiny", "tiny"), progress=False).written == 5
    return inputs


def test_one_more_array_through_the_table_alone(tmp_path, colour_table):
    colour_table()
    inputs = precompute(tmp_path / "s.zarr")
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.attrs["feature_shapes"] == {"dino": [17, 384], "latents": [4, 7, 7], "colour": [4, 3]}
    assert "colour_crc32c" in store.arrays  # checksummed per frame, like every frame array
    assert inspect_store(str(tmp_path / "s.zarr"))["made"]["features"]["colour"] == {"dtype": "float16",
                                                                                     "shape": [4, 4, 3]}
    want = {item.video_id: expected_colour(item) for item in inputs}

    ds = FeatureDataset(tmp_path / "s.zarr", num_frames=2, split="all")
    item = ds[0]
    frames = ds.frames_for(0)
    assert item["colour"].dtype == torch.float16 and item["colour"].shape == (2, 4, 3)
    np.testing.assert_allclose(item["colour"].float().numpy(), want[item["video_id"]][frames], atol=1e-3)

    tokenizer = _tokenizer()
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=CaptionCollator(tokenizer))))
    assert batch["colour"].shape == (3, 2, 4, 3) and batch["dino"].shape == (3, 2, 17, 384)
    read = ds.read_batch([0, 1, 2])  # the training loader's path: read in place into batch tensors
    torch.testing.assert_close(read["colour"], batch["colour"])

    # The array is part of the store's declared layout: an attribute that disagrees with it is refused.
    group = store_format.zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    group.attrs["feature_shapes"] = {**store.attrs["feature_shapes"], "colour": [4, 2]}
    with pytest.raises(StoreError, match="array 'colour' is float16 \\[4, 4, 3\\] per slot"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_a_quantizable_array_is_stored_int8_and_dequantised_on_the_device(tmp_path, colour_table):
    colour_table(quantizable=True)
    inputs = precompute(tmp_path / "q.zarr", feature_dtype="int8")
    store = FeatureStore.open(tmp_path / "q.zarr")
    assert store.arrays["colour"].dtype == np.int8 and "colour_scale" in store.arrays
    row = store.read(0)
    scale = row["colour_scale"].astype(np.float32)[..., None]
    _, want_scale = quantize_int8(expected_colour(inputs[0]))
    np.testing.assert_allclose(scale[..., 0], want_scale, rtol=1e-3)  # one scale per token, by the same rule
    assert (np.abs(row["colour"] * scale - expected_colour(inputs[0])) <= scale / 2 + 1e-4).all()  # half a step
    batch = to_device(CaptionCollator(_tokenizer())([FeatureDataset(tmp_path / "q.zarr", num_frames=2,
                                                                    split="all")[0]]), torch.device("cpu"))
    assert "colour_scale" not in batch and batch["colour"].dtype == torch.float16


def test_a_store_without_the_new_array_is_refused_by_a_table_that_has_it(tmp_path, colour_table):
    precompute_plain = PrecomputeConfig(out=str(tmp_path / "p.zarr"), preset="tiny", synthetic=2, num_frames=FRAMES,
                                        image_size=SIZE, workers=0, shard_videos=4, quiet=True)
    run_precompute(precompute_plain, list_inputs(synthetic=2), FrozenEncoders("tiny", "tiny"), progress=False)
    assert len(FeatureStore.open(tmp_path / "p.zarr")) == 2
    colour_table()
    with pytest.raises(StoreError, match="no per-frame shape for the feature 'colour'"):
        FeatureStore.open(tmp_path / "p.zarr")


def test_a_store_made_before_feature_shapes_reads_its_shape_keys(tmp_path):
    """Stores written before the table record DINO's and the latents' shapes only as dino_tokens, dino_dim
    and latent_shape: they open and read as before."""
    run_precompute(PrecomputeConfig(out=str(tmp_path / "o.zarr"), preset="tiny", synthetic=2, num_frames=FRAMES,
                                    image_size=SIZE, workers=0, shard_videos=4, quiet=True),
                   list_inputs(synthetic=2), FrozenEncoders("tiny", "tiny"), progress=False)
    before = FeatureStore.open(tmp_path / "o.zarr").read(1)
    group = store_format.zarr.open_group(str(tmp_path / "o.zarr"), mode="r+")
    del group.attrs["feature_shapes"]
    old = FeatureStore.open(tmp_path / "o.zarr")
    assert "feature_shapes" not in old.attrs
    after = old.read(1)
    for name in ("dino", "latents", "timestamps"):
        assert after[name].tobytes() == before[name].tobytes()


def _tokenizer():
    from fvlm_model import load_lm

    return load_lm("tiny")[1]

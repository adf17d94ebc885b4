"""FeatureDataset and CaptionCollator over a real store, in multi-worker DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from fvlm_data import CaptionCollator, FeatureDataset, FeatureStore
from fvlm_data.dataset import frame_indices, split_datasets, to_device
from fvlm_model import load_lm
from tests.helpers.numbered_store import build_store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("ds") / "s.zarr")


def test_frame_indices_spread_over_all_stored_frames():
    idx = frame_indices(24, 16)
    assert len(idx) == 16 and len(set(idx.tolist())) == 16 and idx[0] == 0 and idx[-1] == 23
    assert frame_indices(24, 24).tolist() == list(range(24))
    for offset in (0.0, 0.3, 0.99):
        idx = frame_indices(24, 8, offset)
        assert np.all(np.diff(idx) == 3) and 0 <= idx[0] <= 2


def test_returns_only_the_requested_frames_in_half_precision(store_path):
    ds = FeatureDataset(store_path, num_frames=16, split="all")
    item = ds[7]
    assert item["dino"].dtype == torch.float16 and item["dino"].shape == (16, 5, 8)
    assert item["latents"].dtype == torch.float16 and item["latents"].shape == (16, 4, 2, 2)
    frames = item["dino"][:, 0, 0].float() - 100 * (int(ds.slots[7]) % 5)
    assert frames.tolist() == frame_indices(24, 16).tolist()
    assert item["caption"].startswith("video number") and item["index"] == 7
    random_ds = FeatureDataset(store_path, num_frames=8, split="all", frame_sampling="random", seed=3)
    first = random_ds[5]["dino"][:, 0, 0]
    assert torch.equal(first, random_ds[5]["dino"][:, 0, 0])  # a function of (seed, epoch, index)
    random_ds.set_epoch(1)
    offsets = {tuple(random_ds[i]["dino"][:, 0, 0].tolist()) for i in range(len(random_ds))}
    assert len(offsets) > 1


def test_batched_read_equals_single_reads_and_zarrs_reader(store_path):
    ds = FeatureDataset(store_path, num_frames=16, split="all", frame_sampling="random", seed=1)
    indices = [3, 39, 0, 17, 3]
    batch = ds.__getitems__(indices)
    z = zarr.open_group(str(store_path), mode="r")
    for item, index in zip(batch, indices, strict=True):
        single = ds[index]
        slot = int(ds.slots[index])
        frames = ds.frames_for(index)
        for key in ("dino", "latents", "timestamps"):
            assert torch.equal(item[key], single[key])
            np.testing.assert_array_equal(item[key].numpy(), z[key][slot][frames])
        assert item["caption"] == single["caption"] == z["caption"][slot] and item["index"] == index


def test_a_batch_over_more_shard_objects_than_open_files(store_path, monkeypatch):
    # 5 shards x 3 frame arrays = 15 objects in one batch, with room for 4 open files: every
    # descriptor must stay open until its own reads are done (a real batch of 32 from a large
    # store touches up to 96 objects).
    from fvlm_data.store.objects import LocalObjects

    monkeypatch.setattr(LocalObjects, "MAX_OPEN_FILES", 4)
    ds = FeatureDataset(store_path, num_frames=16, split="all")
    indices = list(range(0, 40, 3))
    expected = [ds[i] for i in indices]
    for item, single in zip(ds.__getitems__(indices), expected, strict=True):
        for key in ("dino", "latents", "timestamps"):
            assert torch.equal(item[key], single[key])


def test_split_is_deterministic_disjoint_and_complete(store_path):
    train = FeatureDataset(store_path, num_frames=4, split="train", val_fraction=0.25)
    val = FeatureDataset(store_path, num_frames=4, split="val", val_fraction=0.25)
    again = FeatureDataset(store_path, num_frames=4, split="val", val_fraction=0.25)
    assert set(train.slots.tolist()).isdisjoint(val.slots.tolist())
    assert len(train) + len(val) == 40 and 0 < len(val) < 20
    assert val.slots.tolist() == again.slots.tolist()


@pytest.mark.slow  # spawned DataLoader workers: new interpreters
def test_split_datasets_take_both_splits_in_one_pass(store_path):
    """From one open store: the same videos as FeatureDataset(split=...), the held-out ids in slot
    order, evenly spaced frames for validation, and datasets that read in spawn workers (pickled)."""
    store = FeatureStore.open(store_path)
    splits = split_datasets(store, 4, 0.25, frame_sampling="random", seed=3)
    for name, ds in (("train", splits.train), ("val", splits.val)):
        alone = FeatureDataset(store_path, num_frames=4, split=name, val_fraction=0.25)
        assert ds.slots.tolist() == alone.slots.tolist()
    assert splits.val_ids == store.read_strings("video_id", splits.val.slots) and len(splits.val_ids) > 0
    assert (splits.train.frame_sampling, splits.train.seed, splits.val.frame_sampling) == ("random", 3, "uniform")
    with pytest.raises(ValueError, match="holds 24"):
        split_datasets(store, 25, 0.25)
    _, tokenizer = load_lm("tiny")
    loader = DataLoader(splits.train, batch_size=8, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=CaptionCollator(tokenizer, max_caption_tokens=6))
    seen = []
    for batch in loader:
        for row, idx in enumerate(batch["index"].tolist()):
            assert batch["latents"][row, 0, 0, 0, 0].item() == int(splits.train.slots[idx])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(splits.train)))


def test_refuses_more_frames_than_stored(store_path):
    with pytest.raises(ValueError, match="holds 24"):
        FeatureDataset(store_path, num_frames=25)


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])  # spawn: new interpreters
def test_multiworker_dataloader_reads_every_sample_once(store_path, context):
    _, tokenizer = load_lm("tiny")
    ds = FeatureDataset(store_path, num_frames=6, split="all")
    loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=context,
                        collate_fn=CaptionCollator(tokenizer, max_caption_tokens=6))
    seen = []
    for batch in loader:
        assert batch["dino"].shape == (len(batch["index"]), 6, 5, 8) and batch["dino"].dtype == torch.float16
        for row, idx in enumerate(batch["index"].tolist()):
            assert batch["latents"][row, 0, 0, 0, 0].item() == int(ds.slots[idx])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(40))


def test_collate_appends_eos_truncates_and_masks_padding():
    _, tokenizer = load_lm("tiny")
    collate = CaptionCollator(tokenizer, max_caption_tokens=5)
    input_ids, labels = collate.tokenize(["a red circle", "a red circle moves left and a blue square moves up"])
    eos = tokenizer.eos_token_id
    short = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert input_ids.shape == (2, 5)
    assert labels[0, : len(short) + 1].tolist() == short + [eos]
    assert labels[0, len(short) + 1 :].eq(-100).all()
    assert input_ids[0, len(short) + 1 :].eq(collate.pad_id).all() and collate.pad_id != eos
    assert labels[1, -1].item() == eos  # truncated captions still end with EOS


def test_int8_store_dequantises_on_the_device(tmp_path):
    path = build_store(tmp_path / "q.zarr", n=4, feature_dtype="int8")
    _, tokenizer = load_lm("tiny")
    ds = FeatureDataset(path, num_frames=4, split="all")
    batch = CaptionCollator(tokenizer)([ds[0], ds[1]])
    assert batch["dino"].dtype == torch.int8 and batch["dino_scale"].shape == (2, 4, 5)
    moved = to_device(batch, torch.device("cpu"), torch.float32)
    assert "dino_scale" not in moved and moved["dino"].dtype == torch.float32
    expected = torch.tensor(frame_indices(24, 4), dtype=torch.float32)[:, None, None] + 100 * (int(ds.slots[1]) % 5)
    torch.testing.assert_close(moved["dino"][1], expected.expand(4, 5, 8), rtol=1 / 127, atol=1e-3)

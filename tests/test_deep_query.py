"""The deep query (precompute --dino-layers, train.py --query-depth): the query through DINO's last blocks over
the stored patch states equals one more token through DINO's own forward, masked from every token; the states
go through the store (float16, int8) and the dataset; what does not match is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_data import FeatureDataset, FeatureStore, StoreError
from fvlm_data.dataset import to_device
from fvlm_data.errors import EncoderLoadError
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.precompute.encoders import IMAGENET_MEAN, IMAGENET_STD, FrozenEncoders, load_dino
from fvlm_data.precompute.pipeline import run_precompute
from fvlm_data.sources import list_inputs, load_frames
from fvlm_data.store.format import check_compatible
from fvlm_model import FoveatedVLM, load_lm
from fvlm_model.deep_query import DeepQuery
from fvlm_model.generate import MODES, build_prefix, generate_captions
from fvlm_model.model import ModelConfig
from fvlm_model.visualize import inspect_batch
from fvlm_train import TrainError
from fvlm_train.checkpoint import build_model
from fvlm_train.config import RunConfig, resolve
from tests.helpers.in_process import invoke
from tests.helpers.model import make_batch

FRAMES, SIZE = 3, 56  # 4x4 patches + CLS: 17 tokens


def reference_query(dino, pixels: torch.Tensor, query: torch.Tensor, depth: int) -> torch.Tensor:
    """The query as one more token through DINO's own modules: the embeddings, the first blocks on the patches
    alone, then the token appended for the last `depth` blocks with a mask that hides its key from every token
    (the patches never see it; it sees the patches only), then DINO's final norm. Its output [B, D]."""
    layers = dino.encoder.layer
    h = dino.embeddings(pixels)
    for layer in layers[: len(layers) - depth]:
        h = layer(h)
    h = torch.cat([h, query[:, None]], dim=1)
    mask = torch.zeros(h.shape[0], 1, h.shape[1], h.shape[1])
    mask[..., -1] = float("-inf")
    for layer in layers[len(layers) - depth:]:
        h = layer(h, attention_mask=mask)
    return dino.layernorm(h)[:, -1]


@pytest.mark.parametrize("depth", [3, 1])  # all of DINO's blocks, and fewer
def test_deep_query_equals_a_masked_token_through_dino(depth):
    encoders = FrozenEncoders("tiny:3", "tiny", dino_layers=depth)
    assert encoders.dino_blocks == tuple(range(3 - depth, 3))
    frames = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = encoders.encode(frames)
    pixels = (frames.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD)[:, None, None]
    query = torch.randn(2, 384, generator=torch.Generator().manual_seed(1)) * 3
    deep = DeepQuery.from_dino(encoders.dino, "transformers", depth)
    states = [out[f"dino_block{k}"][:, None] for k in deep.block_ids]  # [B, T=1, N, D]
    z, maps = deep(query[:, None], deep.keys_values(states))
    with torch.no_grad():
        want = reference_query(encoders.dino, pixels, query, depth)
        np.testing.assert_allclose(out["dino"], dino_final(encoders.dino, pixels), atol=1e-5)  # same frames
    np.testing.assert_allclose(z[:, 0].detach(), want, atol=2e-4, rtol=1e-4)
    assert maps.shape == (2, 1, depth, 17)
    np.testing.assert_allclose(maps.detach().sum(-1), 1.0, atol=1e-5)  # a distribution over the patches per block
    # A query that differs gives another token: the query is not ignored.
    other, _ = deep(-query[:, None], deep.keys_values(states))
    assert (other - z).abs().max() > 1e-2


def dino_final(dino, pixels):
    return dino(pixel_values=pixels).last_hidden_state


def precompute(path, dino_layers: int, feature_dtype: str = "float16", videos: int = 4, dino: str = "tiny:3"):
    config = PrecomputeConfig(out=str(path), preset="tiny", dino=dino, synthetic=videos, num_frames=FRAMES,
                              image_size=SIZE, feature_dtype=feature_dtype, workers=0, batch_videos=2,
                              shard_videos=4, quiet=True, dino_layers=dino_layers)
    inputs = list_inputs(synthetic=videos)
    encoders = FrozenEncoders(dino, "tiny", dino_layers=dino_layers)
    assert run_precompute(config, inputs, encoders, progress=False).written == videos
    return inputs, encoders


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_block_states_through_the_store_and_the_dataset(tmp_path, feature_dtype):
    inputs, encoders = precompute(tmp_path / "s.zarr", 2, feature_dtype)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert (store.attrs["dino_layers"], store.attrs["dino_blocks"]) == (2, [1, 2])
    assert store.attrs["dino_fingerprint"] == encoders.dino_fingerprint
    for k in (1, 2):  # one array per block, checksummed, int8 with its scale like the final tokens
        assert f"dino_block{k}_crc32c" in store.arrays
        assert (f"dino_block{k}_scale" in store.arrays) == (feature_dtype == "int8")
    ds = FeatureDataset(tmp_path / "s.zarr", num_frames=FRAMES, split="all")
    assert not any(n.startswith("dino_block") for n in ds[0])  # read only when a model asks
    ds.read_block_states((2,))
    index = next(i for i in range(len(ds)) if ds[i]["video_id"] == inputs[1].video_id)
    batch = to_device({k: v[None] for k, v in ds[index].items() if torch.is_tensor(v)}, torch.device("cpu"))
    assert sorted(n for n in batch if n.startswith("dino_block")) == ["dino_block2"]
    frames = torch.from_numpy(load_frames(inputs[1], FRAMES, SIZE).frames)
    want = encoders.encode(frames)["dino_block2"]
    got = batch["dino_block2"][0].float()
    # float16 rounding, or int8 with a scale per token: at most half a step of each token's scale.
    tol = want.abs().amax(-1, keepdim=True) / 127 * 0.51 + 1e-2 if feature_dtype == "int8" else 1e-2
    assert ((got - want).abs() <= tol).all()
    with pytest.raises(ValueError, match="holds no states of DINO block"):
        ds.read_block_states((0,))


def test_a_store_without_the_option_is_todays(tmp_path):
    precompute(tmp_path / "s.zarr", 0, dino="tiny")
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert not {"dino_layers", "dino_blocks", "dino_fingerprint"} & set(store.attrs)
    assert "dino_layers" not in store.attrs["precompute_args"]
    assert set(store.attrs["feature_shapes"]) == {"dino", "latents"}
    assert not [n for n in store.arrays if n.startswith("dino_block")]


def test_rows_of_another_depth_or_weights_are_refused(tmp_path):
    precompute(tmp_path / "s.zarr", 2)
    attrs = FeatureStore.open(tmp_path / "s.zarr").attrs
    wanted = PrecomputeConfig(out="x", preset="tiny", dino="tiny:3", num_frames=FRAMES, image_size=SIZE, dino_layers=1)
    with pytest.raises(StoreError, match="made with dino_layers=2, this run asks for dino_layers=1"):
        check_compatible("s.zarr", attrs, wanted.recipe)
    with pytest.raises(EncoderLoadError, match="--dino-layers 4: DINO 'tiny:3' has 3 blocks"):
        FrozenEncoders("tiny:3", "tiny", dino_layers=4)
    with pytest.raises(EncoderLoadError, match="tiny:K"):
        load_dino("tiny:0")


def tiny_model(depth: int, seed: int = 0) -> FoveatedVLM:
    lm, _ = load_lm("tiny")
    torch.manual_seed(seed)
    dino, kind = load_dino("tiny:3")
    deep = DeepQuery.from_dino(dino, kind, depth) if depth else None
    return FoveatedVLM(lm, ModelConfig(dino_dim=384, latent_channels=4, latent_size=8, query_depth=depth), deep).eval()


def test_the_model_with_a_deep_query():
    lm, tok = load_lm("tiny")
    shallow, deep = tiny_model(0), tiny_model(2)
    # Same trainable parameters, same initial values: the frozen blocks are buffers no checkpoint saves.
    assert shallow.state_dict().keys() == deep.state_dict().keys()
    for (name, a), b in zip(shallow.state_dict().items(), deep.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not any(n.startswith("deep_query") for n, _ in deep.named_parameters())
    _, latents, input_ids, labels = make_batch(tok, seed=0)
    g = torch.Generator().manual_seed(0)
    states = {f"dino_block{k}": torch.randn(3, 4, 17, 384, generator=g) for k in (1, 2)}
    batch = {"dino": torch.randn(3, 4, 17, 384, generator=g), "latents": torch.randn(3, 4, 4, 8, 8, generator=g),
             "input_ids": input_ids, "labels": labels, **states}
    out = deep(batch)
    z, maps = deep.encode_frames(deep.frame_features(batch), out["queries"][1], per_block=True)
    kv = deep.deep_query.keys_values([states["dino_block1"], states["dino_block2"]])
    want, _ = deep.deep_query(deep.w_q(out["queries"][1]), kv)
    torch.testing.assert_close(z, want)
    assert maps.shape == (3, 4, 2, 17)
    torch.testing.assert_close(out["attention"][1], maps[:, :, -1])  # the last block's map
    info = inspect_batch(deep, batch)  # per-block maps for the attention figure
    assert info["block_attention"]["fine_1"].shape == (3, 4, 2, 17)
    out["loss"].backward()
    assert deep.q_static.grad is not None and deep.w_q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the batch's dino_block1, dino_block2"):
        deep({k: v for k, v in batch.items() if k != "dino_block1"})
    with pytest.raises(ValueError, match="query_depth 2 needs DINO's last 2 blocks"):
        FoveatedVLM(lm, ModelConfig(dino_dim=384, latent_channels=4, latent_size=8, query_depth=2))


def test_generation_with_a_deep_query():
    _, tok = load_lm("tiny")
    deep = tiny_model(2)
    _, latents, input_ids, labels = make_batch(tok, seed=0)
    g = torch.Generator().manual_seed(1)
    batch = {"dino": torch.randn(3, 4, 17, 384, generator=g),
             **{f"dino_block{k}": torch.randn(3, 4, 17, 384, generator=g) for k in (1, 2)}}
    for mode in MODES:
        assert len(generate_captions(deep, batch, tok.eos_token_id, max_tokens=3, mode=mode)) == 3
    # Frame by frame (the autoregressive prefix slices each block's keys and values per frame), the tokens are
    # those of all frames at once for the same queries.
    prefix = build_prefix(deep, batch, "autoregressive")
    with torch.no_grad():
        z, _ = deep.encode_frames(deep.frame_features(batch), prefix.queries)
        torch.testing.assert_close(prefix.visual, deep.project_visual(z))
    with pytest.raises(ValueError, match="needs the batch's"):
        generate_captions(deep, batch["dino"], tok.eos_token_id, max_tokens=3)


def test_refusals_of_the_trainer(tmp_path):
    precompute(tmp_path / "s.zarr", 2, videos=4)
    attrs = dict(FeatureStore.open(tmp_path / "s.zarr").attrs)
    config = RunConfig(preset="tiny", num_frames=FRAMES, query_depth=3)
    with pytest.raises(TrainError, match=r"--query-depth 3 but .* --dino-layers 2"):
        build_model(config, attrs)
    config.query_depth = 2
    model, _ = build_model(config, attrs)
    assert model.deep_query.block_ids == (1, 2)
    with pytest.raises(TrainError, match="are not the ones that made the store"):
        build_model(config, {**attrs, "dino_fingerprint": "sha256:" + "0" * 64})
    with pytest.raises(TrainError, match="query_depth: checkpoint 2, now 0"):
        resolve({"query_depth": 0}, RunConfig(preset="tiny", query_depth=2))
    assert resolve({}, RunConfig(preset="tiny", query_depth=2)).query_depth == 2  # kept on resume


def test_query_depth_on_a_store_without_block_states_is_one_line(tmp_path):
    precompute(tmp_path / "s.zarr", 0, dino="tiny")
    result = invoke("train", ["--store", str(tmp_path / "s.zarr"), "--preset", "tiny", "--num-frames", str(FRAMES),
                              "--query-depth", "1", "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: --query-depth 1 but {tmp_path / 's.zarr'} was made with --dino-layers 0: precompute a store with "
        "--dino-layers 1 or more, or lower --query-depth"]

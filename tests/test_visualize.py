"""Attention grids, the attention figure, and the collapse diagnostics (tiny preset, no mocks)."""

import copy
import math

import numpy as np
import pytest
import torch

from fvlm_model import FoveatedVLM, ModelConfig, load_lm
from fvlm_model.model import COARSE, FINE
from fvlm_model.visualize import (
    attention_entropy,
    attention_figure,
    attention_grid,
    colormap,
    inspect_batch,
    pass_names,
    token_cosine,
)

G = 18  # DINOv2-small at 256 px: 1 CLS + 18x18 patches
N = G * G + 1


def one_hot_maps(frames: int, patches: list[tuple[int, int]], grid: int = G) -> np.ndarray:
    maps = np.zeros((frames, grid, grid), np.float32)
    for t, (r, c) in enumerate(patches):
        maps[t, r, c] = 1.0
    return maps


# ---- attention_grid ---------------------------------------------------------------------------


def test_grid_drops_cls_and_renormalises():
    att = torch.rand(5, N, generator=torch.Generator().manual_seed(0)).softmax(-1)
    att[:, 0] = 0.5  # a CLS token with a lot of mass
    grid = attention_grid(att)
    assert grid.shape == (5, G, G) and grid.dtype == np.float32
    np.testing.assert_allclose(grid.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    expected = att[:, 1:].numpy() / att[:, 1:].numpy().sum(-1, keepdims=True)
    np.testing.assert_allclose(grid.reshape(5, -1), expected, rtol=1e-5)
    # Row-major patch order: token 1 + r * G + c is patch (r, c).
    att = np.zeros((1, N), np.float32)
    att[0, 1 + 3 * G + 7] = 1.0
    assert np.argwhere(attention_grid(att)[0]).tolist() == [[3, 7]]


def test_grid_without_cls_explicit_grid_and_errors():
    att = np.full((2, 16), 1.0, np.float32)  # 4x4 patches, no CLS
    np.testing.assert_allclose(attention_grid(att), np.full((2, 4, 4), 1 / 16))
    assert attention_grid(np.ones((2, 17)), grid=4).shape == (2, 4, 4)
    assert attention_grid(np.zeros((1, 17))).sum() == 0  # no mass: zeros, not NaN
    with pytest.raises(ValueError):
        attention_grid(np.ones((2, 20)))
    with pytest.raises(ValueError):
        attention_grid(np.ones((2, 17)), grid=5)


# ---- attention_figure -------------------------------------------------------------------------


def test_figure_layout_dtype_and_range():
    rng = np.random.default_rng(0)
    maps = {k: rng.random((12, G, G)).astype(np.float32) for k in pass_names(3)}
    img = attention_figure(maps, max_frames=8)
    cell = max(64, 4 * G)
    assert img.dtype == np.uint8 and img.shape == (3, 3 * cell + 2 * 2, 8 * cell + 7 * 2)
    assert img.min() >= 0 and img.max() <= 255 and img.max() > img.min()
    # Separators are white lines between the cells.
    assert (img[:, cell : cell + 2, :] == 255).all() and (img[:, :, cell : cell + 2] == 255).all()
    # Fewer frames than max_frames: one column per frame; frames set the cell size.
    frames = rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    img = attention_figure({"coarse": maps["coarse"][:3]}, frames=frames)
    assert img.shape == (3, 40, 3 * 40 + 2 * 2)
    img = attention_figure({"coarse": maps["coarse"][:3]}, frames=frames, cell_size=24)
    assert img.shape == (3, 24, 3 * 24 + 2 * 2)
    # Raw [T, N] attention with a CLS token is gridded on the way in.
    raw = torch.rand(4, N).softmax(-1)
    np.testing.assert_array_equal(attention_figure({"a": raw}), attention_figure({"a": attention_grid(raw)}))


def test_figure_columns_are_evenly_chosen_frames():
    # Frame t's hot patch is at row t: column c must show frame linspace(0, 15, 4)[c].
    maps = one_hot_maps(16, [(t, 0) for t in range(16)])
    img = attention_figure({"coarse": maps}, max_frames=4, cell_size=G)  # 1 px per patch
    for c, t in enumerate([0, 5, 10, 15]):
        cell = img[:, :, c * (G + 2) : c * (G + 2) + G]
        assert np.argmax(cell[:, :, 0].sum(axis=0)) == t


def test_single_hot_patch_lights_its_cell_region():
    r, c, cell = 5, 11, 4 * G
    maps = {"coarse": one_hot_maps(2, [(r, c), (0, 0)]), "fine_1": one_hot_maps(2, [(17, 17), (r, c)])}
    frames = np.zeros((2, cell, cell, 3), np.uint8)  # black frames: only the heatmap is visible
    img = attention_figure(maps, frames=frames).astype(int)
    brightness = img.sum(axis=0)
    step = cell + 2

    def region(row: int, col: int) -> np.ndarray:
        return brightness[row * step : row * step + cell, col * step : col * step + cell]

    expected = np.zeros((cell, cell), bool)
    expected[r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = True
    for row, col in [(0, 0), (1, 1)]:
        lit = region(row, col) > region(row, col).min()
        np.testing.assert_array_equal(lit, expected)
    # The hot patch is the ramp's top colour at alpha 0.6; the rest is its bottom colour.
    top = np.rint(0.6 * colormap(np.array(1.0))).astype(int)
    np.testing.assert_array_equal(img[:, r * 4 + 1, c * 4 + 1], top)
    # Without frames the cell shows the same hot block over the neutral pattern.
    lit_grid = attention_figure(maps)[:, :cell, :cell].astype(int).sum(axis=0)
    assert lit_grid[expected].min() > lit_grid[~expected].max()


def test_flat_map_shows_nothing_and_colormap_ramp():
    img = attention_figure({"coarse": np.full((1, G, G), 1 / G**2)}, frames=np.zeros((1, 32, 32, 3), np.uint8))
    assert len(np.unique(img.reshape(3, -1), axis=1)[0]) == 1  # one colour: the ramp's bottom
    ramp = colormap(np.linspace(0, 1, 50))
    assert ramp.shape == (50, 3) and ramp.min() >= 0 and ramp.max() <= 255
    assert np.all(np.diff(ramp.sum(-1)) > 0)  # brightness rises monotonically


# ---- scalar diagnostics -----------------------------------------------------------------------


def test_entropy_uniform_one_hot_and_mean():
    uniform = torch.full((2, 3, G * G), 1.0 / (G * G))
    assert attention_entropy(uniform).item() == pytest.approx(math.log(G * G), rel=1e-5)
    one_hot = torch.zeros(4, G * G)
    one_hot[torch.arange(4), torch.tensor([0, 5, 9, 300])] = 1.0
    assert attention_entropy(one_hot).item() == 0.0
    # The mean over leading dims, and numpy input.
    both = torch.stack([uniform[0, 0], one_hot[0]])
    assert attention_entropy(both.numpy()).item() == pytest.approx(math.log(G * G) / 2, rel=1e-5)
    assert attention_entropy(attention_grid(uniform).reshape(2, 3, -1)).item() == pytest.approx(math.log(G * G))


def test_token_cosine():
    a = torch.randn(2, 5, 16)
    assert token_cosine(a, a.clone()) == pytest.approx(1.0, abs=1e-6)
    assert token_cosine(a, 3.0 * a) == pytest.approx(1.0, abs=1e-6)
    assert token_cosine(a, -a) == pytest.approx(-1.0, abs=1e-6)
    b = torch.zeros(2, 5, 16)
    b[..., 0], a2 = 1.0, torch.zeros(2, 5, 16)
    a2[..., 1] = 1.0
    assert token_cosine(a2, b) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        token_cosine(a, a[:, :4])


# ---- inspect_batch ----------------------------------------------------------------------------

B, T, NT, D = 2, 3, 17, 32


@pytest.fixture(scope="module")
def setup():
    lm, tok = load_lm("tiny")
    torch.manual_seed(0)
    model = FoveatedVLM(lm, ModelConfig(dino_dim=D, latent_channels=4, latent_size=8, fine_iterations=2)).eval()
    g = torch.Generator().manual_seed(0)
    ids = [tok(c).input_ids + [tok.eos_token_id] for c in ["a red ball", "blue square moves left"]]
    length = max(map(len, ids))
    input_ids = torch.full((B, length), tok.pad_token_id)
    labels = torch.full((B, length), -100)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], labels[i, : len(x)] = torch.tensor(x), torch.tensor(x)
    batch = (torch.randn(B, T, NT, D, generator=g), torch.randn(B, T, 4, 8, 8, generator=g), input_ids, labels)
    return model, batch


def test_inspect_batch_matches_the_passes(setup):
    model, (dino, latents, input_ids, labels) = setup
    model.train()
    try:
        info = inspect_batch(model, {"dino": dino, "latents": latents, "input_ids": input_ids, "labels": labels})
        assert model.training  # mode restored
    finally:
        model.eval()
    names = ["coarse", "fine_1", "fine_2"]
    assert list(info["attention"]) == list(info["entropy"]) == list(info["caption_loss"]) == names
    assert list(info["token_cosine"]) == ["fine_1", "fine_2"]
    assert all(a.shape == (B, T, NT) for a in info["attention"].values())
    assert all(0.0 < e < math.log(NT) for e in info["entropy"].values())

    # Rebuild the passes by hand: the same attention, and the cosine of the tokens they make.
    with torch.no_grad():
        caption = model.lm.get_input_embeddings()(input_ids[:, :-1])
        queries, visual = model.static_queries(B, T), []
        for p in range(3):
            hidden, attn = model.run_pass(dino, queries, COARSE if p == 0 else FINE, caption)
            torch.testing.assert_close(attn, info["attention"][names[p]])
            visual.append(model.project_visual(model.encode_frames(dino, queries)[0]))
            queries = model.fine_queries(hidden, T)
    for p in (1, 2):
        assert info["token_cosine"][names[p]] == pytest.approx(token_cosine(visual[0], visual[p]), abs=1e-5)
        assert info["token_cosine"][names[p]] < 0.999  # healthy init: the passes differ
    assert info["entropy"]["coarse"] == pytest.approx(attention_entropy(info["attention"]["coarse"]).item())


def test_inspect_batch_reveals_collapse(setup):
    model, batch = setup
    collapsed = copy.deepcopy(model)
    with torch.no_grad():
        # Every fine query equals the static one: all passes attend alike.
        collapsed.llm_to_query.weight.zero_()
        collapsed.llm_to_query.bias.copy_(collapsed.q_static)
        collapsed.q_init.copy_(collapsed.q_static)
    info = inspect_batch(collapsed, dict(zip(("dino", "latents", "input_ids", "labels"), batch, strict=True)))
    for name in ("fine_1", "fine_2"):
        assert info["token_cosine"][name] == pytest.approx(1.0, abs=1e-5)
        assert info["entropy"][name] == pytest.approx(info["entropy"]["coarse"], rel=1e-5)

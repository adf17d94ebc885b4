"""The `foveation` synthetic task: one of the objects moves, and the caption names that one;
`foveation_late`, its control with an empty opening."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm_data.sources import list_inputs, load_frames
from fvlm_data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    DURATION_S,
    FOVEATION_LATE_S,
    FOVEATION_OBJECTS,
    SHAPES,
    TASK_VOCABULARY,
    TASKS,
    foveation_scene,
    render_synthetic,
    synthetic_vocabulary,
)
from fvlm_model import build_tokenizer_tiny

SIZE, FRAMES = 112, 8  # the demo's settings: an 8 x 8 patch grid at DINO's patch 14
VIDEOS = range(24)


def render(index: int, seed: int = 0, frames: int = FRAMES, size: int = SIZE):
    return render_synthetic("foveation", seed, index, frames, size)


def colour_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per drawn colour, its pixel mask in every frame: {name: bool [T, S, S]}."""
    masks = {name: np.all(frames == rgb, axis=-1) for name, rgb in COLOURS.items()}
    return {name: m for name, m in masks.items() if m.any()}


def parse(caption: str) -> tuple[str, str, str]:
    a, colour, shape, moves, direction = caption.split()
    assert (a, moves) == ("a", "moves"), caption
    return colour, shape, direction


def test_registered_and_listed():
    assert "foveation" in TASKS and "shapes" in TASKS
    items = list_inputs(synthetic=3, synthetic_task="foveation", seed=5)
    assert items[1].video_id == "synthetic-foveation-5-000001" and items[1].source == "synthetic:foveation:1"
    video = load_frames(items[1], FRAMES, SIZE)
    assert video.frames.shape == (FRAMES, SIZE, SIZE, 3) and video.frames.dtype == np.uint8
    assert items[1].caption == render(1, seed=5)[2]
    # The default task is still `shapes`.
    assert list_inputs(synthetic=1)[0].video_id.startswith("synthetic-shapes-")


def test_deterministic_for_seed_and_index():
    for i in range(6):
        (f1, t1, c1), (f2, t2, c2) = render(i), render(i)
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(t1, t2)
        assert c1 == c2
    # The caption comes without rendering (empty timestamps), and equals the rendered one.
    assert TASKS["foveation"](0, 3, np.zeros(0), 1)[1] == render(3)[2]
    assert len({render(i)[2] for i in range(12)}) > 4
    assert any(render(i, seed=0)[2] != render(i, seed=1)[2] for i in range(6))


def test_exactly_one_object_moves_and_is_captioned():
    directions_seen = set()
    for i in VIDEOS:
        frames, _, caption = render(i)
        colour, shape, direction = parse(caption)
        masks = colour_masks(frames)
        assert len(masks) == FOVEATION_OBJECTS, (i, sorted(masks))  # all drawn, distinct colours
        moving = [name for name, m in masks.items() if not (m == m[:1]).all()]
        assert moving == [colour], (i, caption, moving)  # only the captioned object changes
        # Everything else, background included, is the same in every frame outside the mover.
        still = ~masks[colour].any(axis=0)
        assert (frames[:, still] == frames[:1, still]).all()

        m = masks[colour]
        ys, xs = zip(*(np.nonzero(f) for f in m), strict=True)
        cx, cy = np.array([x.mean() for x in xs]), np.array([y.mean() for y in ys])
        moved = {"left": cx[0] - cx[-1], "right": cx[-1] - cx[0], "up": cy[0] - cy[-1], "down": cy[-1] - cy[0]}
        assert moved[direction] > 25, (i, caption, moved)  # pixels over the clip, the named way
        assert max(abs(cx[-1] - cx[0]), abs(cy[-1] - cy[0])) == pytest.approx(moved[direction])
        assert (np.diff(cx if direction in ("left", "right") else cy) != 0).all()  # moves every frame
        directions_seen.add(direction)

        # The shape, from how much of its bounding box the mover fills (circle pi/4, square 1,
        # triangle 1/2).
        f = m[0]
        rows, cols = np.nonzero(f.any(axis=1))[0], np.nonzero(f.any(axis=0))[0]
        fill = f.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
        assert {"triangle": fill < 0.62, "circle": 0.68 < fill < 0.88, "square": fill > 0.9}[shape], (i, fill)
        # About 20 px wide: one or two DINO patches.
        assert 14 <= cols[-1] - cols[0] + 1 <= 28
    assert directions_seen == set(DIRECTIONS)


def test_objects_stay_inside_the_frame():
    for i in VIDEOS:
        frames, _, _ = render(i)
        background = frames[0, 0, 0]
        assert tuple(background) in BACKGROUNDS and tuple(background) not in COLOURS.values()
        drawn = ~np.all(frames == background, axis=-1)  # [T, S, S]
        border = np.concatenate([drawn[:, 0], drawn[:, -1], drawn[:, :, 0], drawn[:, :, -1]], axis=1)
        assert not border.any(), i
        # No object is clipped: each keeps its pixel count in every frame.
        for name, m in colour_masks(frames).items():
            counts = m.sum(axis=(1, 2))
            assert counts.min() >= 0.9 * counts.max(), (i, name, counts)
        # In scene coordinates, over the whole nominal clip (not only the sampled frames).
        objects, _, _ = foveation_scene(0, i)
        for obj in objects:
            for t in (0.0, DURATION_S):
                for c, v in zip(obj["start"], obj["velocity"], strict=True):
                    assert 1.2 * obj["radius"] <= c + v * t <= 1 - 1.2 * obj["radius"]
        assert sum(any(v != 0 for v in obj["velocity"]) for obj in objects) == 1


def test_late_control_is_the_same_clip_after_an_empty_opening():
    assert TASK_VOCABULARY["foveation_late"] == TASK_VOCABULARY["foveation"]
    for i in range(6):
        frames, timestamps, caption = render(i)
        late, late_timestamps, late_caption = render_synthetic("foveation_late", 0, i, FRAMES, SIZE)
        assert late_caption == caption
        np.testing.assert_array_equal(late_timestamps, timestamps)
        empty = timestamps < FOVEATION_LATE_S
        assert empty.tolist() == [True] + [False] * (FRAMES - 1)  # with 8 frames: the first one
        assert (late[empty] == frames[0, 0, 0]).all()  # background only
        np.testing.assert_array_equal(late[~empty], frames[~empty])


def test_vocabulary_covers_every_caption():
    vocab = set(TASK_VOCABULARY["foveation"])
    assert vocab <= set(synthetic_vocabulary())
    tokenizer = build_tokenizer_tiny(synthetic_vocabulary())
    captions = {TASKS["foveation"](0, i, np.zeros(0), 1)[1] for i in range(500)}
    words = set()
    for caption in captions:
        assert set(caption.split()) <= vocab, caption
        assert len(tokenizer(caption).input_ids) == 5, caption  # every word is a single token
        words |= set(caption.split())
    assert words == vocab  # and every word is used
    assert {parse(c)[1] for c in captions} == set(SHAPES)

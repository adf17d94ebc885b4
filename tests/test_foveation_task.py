"""The `foveation` synthetic task: a cue colour, then three dotted shapes of which the cued one
moves; the caption names the cued shape and its dot. `foveation_nocue`: the same without the cue."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvlm_data.sources import list_inputs, load_frames
from fvlm_data.sources.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    DURATION_S,
    FOVEATION_CUE_S,
    FOVEATION_OBJECTS,
    SHAPES,
    TASK_VOCABULARY,
    TASKS,
    foveation_object_masks,
    foveation_scene,
    render_synthetic,
    synthetic_vocabulary,
)
from fvlm_model import build_tokenizer_tiny

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 112, 8  # the demo's settings: an 8 x 8 patch grid at DINO's patch 14
VIDEOS = range(24)


def render(index: int, seed: int = 0, frames: int = FRAMES, size: int = SIZE):
    return render_synthetic("foveation", seed, index, frames, size)


def parse(caption: str) -> tuple[str, str, str]:
    a, body, shape, with_, a2, dot, dot_word = caption.split()
    assert (a, with_, a2, dot_word) == ("a", "with", "a", "dot"), caption
    return body, shape, dot


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


def test_cue_then_three_dotted_shapes_and_the_cued_one_moves():
    directions_seen = set()
    for i in VIDEOS:
        frames, timestamps, caption = render(i)
        body, shape, dot = parse(caption)
        cue = timestamps < FOVEATION_CUE_S
        assert cue.tolist() == [True] + [False] * (FRAMES - 1)  # with 8 frames: the first one
        assert (frames[cue] == COLOURS[body]).all()  # the cue: one flat colour, the cued body's

        objects, background, _ = foveation_scene(0, i)
        assert len(objects) == FOVEATION_OBJECTS == 3
        bodies = [next(k for k, v in COLOURS.items() if v == o["colour"]) for o in objects]
        dots = [next(k for k, v in COLOURS.items() if v == o["dot"]) for o in objects]
        assert (bodies[0], objects[0]["shape"], dots[0]) == (body, shape, dot)
        assert len(set(bodies)) == len(set(dots)) == 3 and all(b != d for b, d in zip(bodies, dots, strict=True))

        masks = foveation_object_masks(0, i, timestamps, SIZE)  # [K, T, S, S]
        assert not masks[:, cue].any() and masks[:, ~cue].any(axis=(2, 3)).all()
        after = frames[~cue]
        for k, o in enumerate(objects):  # each object is drawn where its mask says, dot inside
            pixels = after[masks[k, ~cue]]
            is_body, is_dot = np.all(pixels == o["colour"], axis=-1), np.all(pixels == o["dot"], axis=-1)
            assert (is_body | is_dot).all() and is_dot.mean() > 0.1  # body and a visible dot, nothing else
        moving = [k for k in range(3) if not (masks[k, ~cue] == masks[k, ~cue][:1]).all()]
        assert moving == [0], (i, moving)  # only the cued object moves
        outside = ~masks[0, ~cue].any(axis=0)
        assert (after[:, outside] == after[:1, outside]).all()  # nothing else changes

        m = masks[0, ~cue]
        ys, xs = zip(*(np.nonzero(f) for f in m), strict=True)
        cx, cy = np.array([x.mean() for x in xs]), np.array([y.mean() for y in ys])
        moved = {"left": cx[0] - cx[-1], "right": cx[-1] - cx[0], "up": cy[0] - cy[-1], "down": cy[-1] - cy[0]}
        direction = max(moved, key=moved.get)
        assert moved[direction] > 15, (i, moved)  # pixels over the frames after the cue
        directions_seen.add(direction)

        # The shape, from how much of its bounding box it fills (circle pi/4, square 1, triangle 1/2).
        f = m[0]
        rows, cols = np.nonzero(f.any(axis=1))[0], np.nonzero(f.any(axis=0))[0]
        fill = f.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
        assert {"triangle": fill < 0.62, "circle": 0.68 < fill < 0.88, "square": fill > 0.9}[shape], (i, fill)
        assert 14 <= cols[-1] - cols[0] + 1 <= 34  # about two DINO patches wide
    assert directions_seen == set(DIRECTIONS)


def test_objects_stay_inside_the_frame():
    for i in VIDEOS:
        frames, timestamps, _ = render(i)
        after = frames[timestamps >= FOVEATION_CUE_S]
        background = after[0, 0, 0]
        assert tuple(background) in BACKGROUNDS and tuple(background) not in COLOURS.values()
        drawn = ~np.all(after == background, axis=-1)  # [T, S, S]
        border = np.concatenate([drawn[:, 0], drawn[:, -1], drawn[:, :, 0], drawn[:, :, -1]], axis=1)
        assert not border.any(), i
        # No object is clipped or hidden: each keeps its pixel count in every frame.
        for m in foveation_object_masks(0, i, timestamps, SIZE)[:, timestamps >= FOVEATION_CUE_S]:
            counts = m.sum(axis=(1, 2))
            assert counts.min() >= 0.9 * counts.max(), (i, counts)
        # In scene coordinates, over the whole nominal clip (not only the sampled frames).
        objects, _, _ = foveation_scene(0, i)
        for obj in objects:
            for t in (0.0, DURATION_S):
                for c, v in zip(obj["start"], obj["velocity"], strict=True):
                    assert 1.2 * obj["radius"] <= c + v * t <= 1 - 1.2 * obj["radius"]
        assert sum(any(v != 0 for v in obj["velocity"]) for obj in objects) == 1


def test_nocue_is_the_same_clip_without_the_cue():
    assert TASK_VOCABULARY["foveation_nocue"] == TASK_VOCABULARY["foveation"]
    for i in range(6):
        frames, timestamps, caption = render(i)
        late, late_timestamps, late_caption = render_synthetic("foveation_nocue", 0, i, FRAMES, SIZE)
        assert late_caption == caption
        np.testing.assert_array_equal(late_timestamps, timestamps)
        cue = timestamps < FOVEATION_CUE_S
        assert (late[cue] == foveation_scene(0, i)[1]).all()  # background only
        np.testing.assert_array_equal(late[~cue], frames[~cue])


def test_vocabulary_covers_every_caption():
    vocab = set(TASK_VOCABULARY["foveation"])
    assert vocab <= set(synthetic_vocabulary())
    tokenizer = build_tokenizer_tiny(synthetic_vocabulary())
    captions = {TASKS["foveation"](0, i, np.zeros(0), 1)[1] for i in range(500)}
    words = set()
    for caption in captions:
        assert set(caption.split()) <= vocab, caption
        assert len(tokenizer(caption).input_ids) == 7, caption  # every word is a single token
        words |= set(caption.split())
    assert words == vocab  # and every word is used
    assert {parse(c)[1] for c in captions} == set(SHAPES)
    assert {parse(c)[2] for c in captions} == set(COLOURS)


@pytest.mark.slow  # the demo script: precompute and training in new processes
def test_demo_script_end_to_end(tmp_path):
    """experiments/foveation/demo.sh at its smallest, run as one row of experiments/foveation/joint.sh (joint loss,
    lambda_recon 0.1, training seed 1, the delta next-frame head): precompute -> train -> the interface's short
    --eval-only command (settings from the checkpoint) -> attention shares and figure -> the joint table."""
    root = tmp_path / "joint"
    out = root / "foveation_lambda0.1_passes1_seed1_headdelta"
    env = {**os.environ, "FOVEATION_VIDEOS": "40", "FOVEATION_STEPS": "3", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    joint = ROOT / "experiments" / "foveation" / "joint.sh"
    proc = subprocess.run(["bash", str(joint), str(root), "foveation:0.1:1:1:delta"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    result = json.loads((out / "eval.json").read_text())
    assert result["checkpoint_step"] == 3 and len(result["cap_passes"]) == 2  # one fine pass
    config = json.loads((out / "run" / "run_config.json").read_text())
    assert (config["seed"], config["recon_head"], config["lambda_caption"]) == (1, "delta", 1.0)
    assert {"cap_ratio_ci", "shuffled_ratio", "shuffled_ratio_ci", "rec_ratio_ci", "num_videos",
            "verdict"} <= set(result)
    assert "shuffled_ratio" in log and "autoregressive:" in log and "lambda_recon 0.1" in log
    rows = [line.split() for line in log.splitlines()
            if line.split()[:1] in (["coarse"], ["fine_1"]) and re.fullmatch(r"\S+(\s+[0-9.]+)+", line.strip())]
    shares, per_frame = rows[:2], rows[2:]  # the overall table, then the per-frame one
    assert [len(row) for row in shares] == [4, 4]  # target, other objects, the target's path
    assert [len(row) for row in per_frame] == [1 + FRAMES - 1] * 2  # every frame after the cue
    assert all(0.0 <= float(x) <= 1.0 for row in rows for x in row[1:])
    assert "fine_1 - coarse on the cued object, frames 3+ minus frame 2: " in log
    row = [line for line in proc.stdout.splitlines()
           if line.startswith("| `foveation` | delta | 1 | 0.1 | 1 | 0 | 1 |")]  # query depth 0, seed 1
    assert len(row) == 1 and f"{result['cap_ratio']:.3f}" in row[0] and f"{result['rec_ratio']:.4f} [" in row[0]
    assert f"{float(shares[0][1]):.3f} / {float(shares[1][1]):.3f}" in row[0]  # on the target, coarse / fine
    assert f"{float(shares[0][2]):.3f} / {float(shares[1][2]):.3f}" in row[0]  # on the other objects
    # Where the passes' next-frame predictions stand against copying the last frame, on the same run.
    nxt = subprocess.run([sys.executable, "-m", "experiments.foveation.next_frame", "--store",
                          str(root / "foveation.zarr"), "--checkpoint", str(out / "run" / "checkpoint_latest.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    table = {line[:16].strip(): line[16:].split() for line in nxt.stdout.splitlines()[2:]}
    assert set(table) == {"coarse", "fine_1", "copy previous", "zeros"}
    assert all(len(v) == FRAMES for v in table.values()) and table["copy previous"][0] == "-"  # nothing to copy
    assert all(float(x) >= 0.0 for v in table.values() for x in v if x != "-")
    image = np.asarray(Image.open(out / "attention.png"))
    # Up to 8 videos x (frames + coarse + fine rows) of 112 px, 2 px between rows, 8 px between videos.
    videos = min(8, result["num_videos"])
    assert image.shape == (videos * (3 * SIZE + 2 * 2) + (videos - 1) * 8, FRAMES * SIZE + 7 * 2, 3)

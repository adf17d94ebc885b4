"""Synthetic videos rendered in numpy: no files, no decoding, deterministic for (task, seed, index).

A task is a function ``(seed, index, timestamps, image_size) -> (frames, caption)`` that renders
uint8 RGB ``[T, S, S, 3]`` frames directly at the given timestamps (seconds). Called with empty
``timestamps`` it must be cheap: the listing uses that to get the caption. Register a task in
``TASKS`` and every word its captions may use in ``TASK_VOCABULARY``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fvlm_data.video import sample_timestamps

DURATION_S = 4.0  # nominal length of a synthetic clip; frames are rendered at the sample times

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Backgrounds are greys distinct from every shape colour (white/black shapes stay visible).
BACKGROUNDS = ((128, 128, 128), (90, 90, 90), (170, 170, 170))
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SHAPES_VOCABULARY = ["a", "and", "moves", *COLOURS, *SHAPES, *DIRECTIONS]


def _shapes_scene(seed: int, index: int) -> tuple[list[dict], tuple[int, int, int], str]:
    """Draw the scene (1-2 shapes with colour, size, start and direction), background and caption."""
    rng = np.random.default_rng([seed, index, 0x5EA])  # independent stream per (seed, index)
    n = int(rng.integers(1, 3))
    colours = rng.choice(list(COLOURS), size=n, replace=False)  # two shapes never share a colour
    objects, words = [], []
    for k in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        dx, dy = DIRECTIONS[direction]
        radius = float(rng.uniform(0.08, 0.14))  # fraction of the frame side
        travel = float(rng.uniform(0.3, 0.5))  # distance covered over the clip
        # Start so that the whole path stays inside the frame; two shapes use different halves
        # of the cross axis so they rarely overlap.
        lo, hi = radius + 0.02, 1.0 - radius - 0.02
        along = rng.uniform(lo, hi - travel)
        across = rng.uniform(lo, hi) if n == 1 else rng.uniform(*((lo, 0.5) if k == 0 else (0.5, hi)))
        start_along = along if (dx + dy) > 0 else along + travel
        cx, cy = (start_along, across) if dx else (across, start_along)
        objects.append(
            dict(shape=shape, colour=COLOURS[colours[k]], radius=radius, start=(cx, cy),
                 velocity=(dx * travel / DURATION_S, dy * travel / DURATION_S))
        )
        words.append(f"a {colours[k]} {shape} moves {direction}")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return objects, background, " and ".join(words)


def render_shapes(seed: int, index: int, timestamps: np.ndarray, image_size: int) -> tuple[np.ndarray, str]:
    """1-2 coloured shapes moving in straight lines on a grey background; the caption names them."""
    objects, background, caption = _shapes_scene(seed, index)
    t = np.asarray(timestamps, dtype=np.float64)[:, None, None]  # [T, 1, 1]
    frames = np.empty((len(t), image_size, image_size, 3), dtype=np.uint8)
    frames[:] = background
    grid = (np.arange(image_size) + 0.5) / image_size  # pixel centres in [0, 1]
    y, x = grid[None, :, None], grid[None, None, :]
    for obj in objects:
        cx = obj["start"][0] + obj["velocity"][0] * t
        cy = obj["start"][1] + obj["velocity"][1] * t
        r, u, v = obj["radius"], x - cx, y - cy  # u, v: [T, S, S] offsets from the centre
        if obj["shape"] == "circle":
            mask = u**2 + v**2 <= r**2
        elif obj["shape"] == "square":
            mask = (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)  # similar area to the circle
        else:  # upward triangle: apex at the top, base at the bottom, widening linearly
            mask = (v >= -r) & (v <= r) & (np.abs(u) <= (v + r) * 0.6)
        frames[mask] = obj["colour"]
    return frames, caption


Task = Callable[[int, int, np.ndarray, int], tuple[np.ndarray, str]]
TASKS: dict[str, Task] = {"shapes": render_shapes}
TASK_VOCABULARY: dict[str, list[str]] = {"shapes": SHAPES_VOCABULARY}


def get_task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[task]


def synthetic_caption(task: str, seed: int, index: int) -> str:
    """The caption of one synthetic video, without rendering any frame."""
    return get_task(task)(seed, index, np.zeros(0), 1)[1]


def render_synthetic(
    task: str, seed: int, index: int, num_frames: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Render ``num_frames`` frames at the uniform sample times; returns (frames, timestamps, caption)."""
    timestamps = sample_timestamps(DURATION_S, num_frames)
    frames, caption = get_task(task)(seed, index, timestamps, image_size)
    return frames, timestamps, caption


def synthetic_vocabulary() -> list[str]:
    """Every word any synthetic caption can contain (sorted, unique), for the tiny tokenizer."""
    return sorted({word for words in TASK_VOCABULARY.values() for word in words})

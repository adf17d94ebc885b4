"""`--synthetic N`: videos rendered in numpy: no files, no decoding, deterministic for (task, seed, index).

A task is a function ``(seed, index, timestamps, image_size) -> (frames, caption)`` that renders
uint8 RGB ``[T, S, S, 3]`` frames directly at the given timestamps (seconds). Called with empty
``timestamps`` it must be cheap: the listing uses that to get the caption. Register a task in
``TASKS`` and every word its captions may use in ``TASK_VOCABULARY``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fvlm_data.errors import InputError
from fvlm_data.records import DecodedVideo, Decoding, Source, VideoInput
from fvlm_data.video.decode import sample_timestamps

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
    return _draw(objects, background, timestamps, image_size), caption


def _draw(objects: list[dict], background: tuple[int, int, int], timestamps: np.ndarray,
          image_size: int) -> np.ndarray:
    """Paint the objects (in order, later on top) at each timestamp: uint8 [T, S, S, 3]."""
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
        if "dot" in obj:  # a disc of another colour inside the shape (lower in the triangle)
            centre = 0.3 * r if obj["shape"] == "triangle" else 0.0
            frames[mask & (u**2 + (v - centre) ** 2 <= (DOT_RADIUS * r) ** 2)] = obj["dot"]
    return frames


# ---- foveation: describe the object the first frame points at --------------------------------
# The first frame is a flash of one colour (the cue). From the second frame on, three shapes of
# distinct body colours sit on a plain background, each with a dot of another colour inside; the
# shape whose body has the cue's colour moves in a straight line, the others sit still. The
# caption names that shape and its dot: "a red square with a blue dot".
#
# The dot's colour is the part only foveation can get. Each pass turns a frame into ONE token,
# an attention-weighted mean of its patches. The coarse pass's static query cannot know which
# shape the cue meant, so its tokens mix all three shapes and their three dot colours; a fine
# query computed from the LM state after the cue can attend to the cued colour and get a token
# of that shape alone. The cue frame is one flat colour, so every query reads it almost alike:
# the fine pass's own first-frame query `q_init` gives it no edge there.
#
# `foveation_nocue` is the same clip with the cue replaced by the background: the shape to
# describe is then only "the one that moves", which no single frame shows either.
FOVEATION_OBJECTS = 3  # the cued mover and two still distractors
FOVEATION_RADIUS = (0.10, 0.12)  # fraction of the frame side: ~25 px wide at 112 px (about 2 patches)
DOT_RADIUS = 0.5  # the dot's radius, a fraction of its shape's
FOVEATION_TRAVEL = (0.3, 0.45)  # distance the mover covers over the clip, fraction of the side
FOVEATION_GAP = 0.03  # clearance between objects, and between still objects and the mover's path
FOVEATION_MARGIN = 0.02  # clearance from the frame border
FOVEATION_CUE_S = 0.5  # the cue fills the frames before this time (with 8 frames: the first)
FOVEATION_VOCABULARY = ["a", "with", "dot", *COLOURS, *SHAPES]


def _extent(radius: float) -> float:
    """Half-width of the widest shape (the triangle's base is 2.4 radii wide)."""
    return 1.2 * radius


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to the segment a-b."""
    ab = b - a
    t = np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * ab)))


def foveation_scene(seed: int, index: int) -> tuple[list[dict], tuple[int, int, int], str]:
    """Objects (the mover first, then the still ones), background and caption of one video.

    Every object stays wholly inside the frame for the whole clip, and no still object touches
    another or the mover's path, so the moving object is never hidden.
    """
    rng = np.random.default_rng([seed, index, 0xF0FEA])  # independent stream per (seed, index)
    colours = rng.choice(list(COLOURS), size=FOVEATION_OBJECTS, replace=False)
    # Distinct dot colours, none the colour of its own body: the body colour says nothing about the dot.
    while True:
        dots = rng.choice(list(COLOURS), size=FOVEATION_OBJECTS, replace=False)
        if not np.any(dots == colours):
            break
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(FOVEATION_OBJECTS)]
    radii = rng.uniform(*FOVEATION_RADIUS, size=FOVEATION_OBJECTS)
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    travel = float(rng.uniform(*FOVEATION_TRAVEL))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    # The mover: a path of length `travel` along its axis, inside the frame.
    lo, hi = _extent(radii[0]) + FOVEATION_MARGIN, 1.0 - _extent(radii[0]) - FOVEATION_MARGIN
    along, across = rng.uniform(lo, hi - travel), rng.uniform(lo, hi)
    start_along = along if (dx + dy) > 0 else along + travel
    start = np.array((start_along, across) if dx else (across, start_along))
    end = start + travel * np.array((dx, dy))
    placed = [(start, end, radii[0])]  # (path start, path end, radius); still objects: start == end
    for k in range(1, FOVEATION_OBJECTS):
        lo, hi = _extent(radii[k]) + FOVEATION_MARGIN, 1.0 - _extent(radii[k]) - FOVEATION_MARGIN
        for _ in range(1000):  # rejection sampling; a free spot exists for these sizes
            centre = rng.uniform(lo, hi, size=2)
            if all(_segment_distance(centre, a, b) >= _extent(r) + _extent(radii[k]) + FOVEATION_GAP
                   for a, b, r in placed):
                break
        else:  # pragma: no cover - the frame has room for several more objects than we place
            raise RuntimeError(f"no room for object {k} in foveation video ({seed}, {index})")
        placed.append((centre, centre, radii[k]))

    objects = [
        dict(shape=shapes[k], colour=COLOURS[colours[k]], dot=COLOURS[dots[k]], radius=float(r),
             start=(float(a[0]), float(a[1])),
             velocity=(float(b[0] - a[0]) / DURATION_S, float(b[1] - a[1]) / DURATION_S))
        for k, (a, b, r) in enumerate(placed)
    ]
    return objects, background, f"a {colours[0]} {shapes[0]} with a {dots[0]} dot"


def render_foveation(seed: int, index: int, timestamps: np.ndarray, image_size: int) -> tuple[np.ndarray, str]:
    """A cue colour, then three dotted shapes; the caption names the cued one (the mover) and its dot."""
    objects, background, caption = foveation_scene(seed, index)
    frames = _draw(objects, background, timestamps, image_size)
    frames[np.asarray(timestamps) < FOVEATION_CUE_S] = objects[0]["colour"]
    return frames, caption


def foveation_object_masks(seed: int, index: int, timestamps: np.ndarray, image_size: int) -> np.ndarray:
    """Where each object of a `foveation` video is drawn: bool [K, T, S, S], the cued one first
    (for measuring where the queries look; the cue frames are all False)."""
    objects, background, _ = foveation_scene(seed, index)
    masks = np.stack([np.any(_draw([obj], background, timestamps, image_size) != background, axis=-1)
                      for obj in objects])
    masks[:, np.asarray(timestamps) < FOVEATION_CUE_S] = False
    return masks


def render_foveation_nocue(seed: int, index: int, timestamps: np.ndarray,
                           image_size: int) -> tuple[np.ndarray, str]:
    """`foveation`'s clip with the background in place of the cue."""
    objects, background, caption = foveation_scene(seed, index)
    frames = _draw(objects, background, timestamps, image_size)
    frames[np.asarray(timestamps) < FOVEATION_CUE_S] = background
    return frames, caption


Task = Callable[[int, int, np.ndarray, int], tuple[np.ndarray, str]]
TASKS: dict[str, Task] = {"shapes": render_shapes, "foveation": render_foveation,
                          "foveation_nocue": render_foveation_nocue}
TASK_VOCABULARY: dict[str, list[str]] = {"shapes": SHAPES_VOCABULARY, "foveation": FOVEATION_VOCABULARY,
                                         "foveation_nocue": FOVEATION_VOCABULARY}


def get_task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[task]


def source_tag(task: str, index: int) -> str:
    """The `source` a store records for synthetic video `index` of `task` (the seed is the store's)."""
    return f"synthetic:{task}:{index}"


def parse_source_tag(source: str) -> tuple[str, int] | None:
    """(task, index) of a synthetic video's source tag, or None for any other source."""
    kind, _, rest = source.partition(":")
    task, _, index = rest.rpartition(":")
    if kind != "synthetic" or not index.isdigit():
        return None
    return task, int(index)


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


def list_inputs(count: int, options: dict[str, Any]) -> list[VideoInput]:
    """`count` videos of `options["synthetic_task"]` (default shapes), seed `options["seed"]` (default 0)."""
    task, seed = options.get("synthetic_task", "shapes"), options.get("seed", 0)
    if count < 0:
        raise ValueError(f"synthetic must be >= 0, got {count}")
    get_task(task)  # unknown task: ValueError now, not in a worker
    return [VideoInput(video_id=f"synthetic-{task}-{seed}-{i:06d}", source=source_tag(task, i),
                       caption=synthetic_caption(task, seed, i), kind="synthetic", locator=(task, seed, i))
            for i in range(count)]


def decode(items: list[VideoInput], decoding: Decoding) -> list[DecodedVideo | InputError]:
    """Rendered at the uniform sample times of a clip of `DURATION_S`, whatever the seek mode."""
    out = []
    for item in items:
        task, seed, index = item.locator
        frames, timestamps, _ = render_synthetic(task, seed, index, decoding.num_frames, decoding.image_size)
        out.append(DecodedVideo(frames=frames, timestamps=timestamps, duration=DURATION_S))
    return out


SOURCE = Source(option="synthetic", kind="synthetic", list_inputs=list_inputs, decode=decode)

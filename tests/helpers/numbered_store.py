"""A store whose rows say what they are: row i's features encode (i, frame), so a test of a reader can tell
exactly what was read."""

from __future__ import annotations

import numpy as np

from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter
from tests.helpers.store_helpers import write_rows

SHAPES = FeatureShapes(24, {"dino": (5, 8), "latents": (4, 2, 2)})


def build_store(path, n=40, feature_dtype="float16"):
    """Row i's features encode (i, frame) so a test can tell exactly what was read."""
    attrs = dict(dino="tiny", vae="tiny", num_frames=24, image_size=28, feature_dtype=feature_dtype)
    store = StoreWriter.create_or_open(path, attrs, SHAPES, capacity=n + 2, shard_videos=8)
    frame = np.arange(24, dtype=np.float32)[:, None, None]
    write_rows(store, ((i, dict(dino=np.broadcast_to(frame + 100 * (i % 5), (24, 5, 8)).copy(),
                                latents=np.broadcast_to(frame[..., None] * 0 + i, (24, 4, 2, 2)).copy(),
                                caption=f"video number {i}" + " again" * (i % 3), video_id=f"vid-{i:03d}",
                                source=f"/v/{i}.mp4", timestamps=np.arange(24) + 0.5, duration=24.0))
                       for i in range(n)))
    return path

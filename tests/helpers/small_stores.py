"""Small real stores written in-process through the store's own shard buffers (no encoders): for tests
of what reads a store's rows, failures and shards."""

from __future__ import annotations

import os

import numpy as np

from fvlm_data.store import FeatureShapes, FeatureStore
from fvlm_data.store.writer import StoreWriter

SHAPES = FeatureShapes(4, {"dino": (3, 8), "latents": (4, 2, 2)})


def small_store(path: str | os.PathLike, video_ids: list[str], shard_videos: int = 4,
                failures: dict[int, str] | None = None, unpublished: tuple[int, ...] = (),
                file_ids: list[str] | None = None, sources: list[str] | None = None,
                inputs: list[tuple] | None = None) -> FeatureStore:
    """One slot per id; slots in `failures` recorded as failed with that reason; the shards in
    `unpublished` left unwritten (as a killed or still running precompute leaves them). `file_ids` and
    `sources` (default: the video id, `/v/<id>.mp4`) per slot; `inputs`: the input keys fingerprinted."""
    failures = failures or {}
    file_ids = file_ids or list(video_ids)
    sources = sources or [f"/v/{v}.mp4" for v in video_ids]
    attrs = dict(dino="tiny", vae="tiny", preset="tiny", num_frames=4, image_size=28, feature_dtype="float16",
                 latent_dtype="float16", frame_sampling="uniform")
    store = StoreWriter.create_or_open(path, attrs, SHAPES, capacity=len(video_ids), shard_videos=shard_videos,
                                       inputs=inputs)
    rng = np.random.default_rng(0)
    for shard in range(store.num_shard_objects):
        if shard in unpublished:
            continue
        buf = store.shard_buffer(shard)
        for slot in range(buf.start, buf.stop):
            if slot in failures:
                buf.add_failure(slot, video_id=video_ids[slot], source=sources[slot], reason=failures[slot],
                                file_id=file_ids[slot])
            else:
                buf.add_row(slot, dino=rng.standard_normal((4, 3, 8)), latents=rng.standard_normal((4, 4, 2, 2)),
                            caption=f"caption of {video_ids[slot]}", video_id=video_ids[slot],
                            source=sources[slot], file_id=file_ids[slot], timestamps=np.arange(4) + 0.5,
                            duration=4.0)
        buf.publish()
    return store

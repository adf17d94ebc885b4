"""Precompute: inputs -> decoded frames (worker processes) -> frozen encoders (batched) -> store rows.

Slot j of the store belongs to input j, and the store's shards (S consecutive slots each) are the
unit of work: process I of K (`num_shards=K, shard_index=I`) owns shards I, I+K, ..., buffers each
shard's rows in memory and publishes the shard whole once every slot of it is written or recorded
as failed. A re-run skips committed shards (after checking their objects' indexes) and redoes the
rest, so a kill loses at most the shard each process had in progress.
"""

from __future__ import annotations

import collections
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fvlm_data.encoders import FrozenEncoders
from fvlm_data.sources import DecodedVideo, InputError, VideoInput, load_frames
from fvlm_data.store import FeatureShapes, FeatureStore, ShardBuffer, StoreError
from fvlm_data.video import SEEK_MODES


@dataclass
class PrecomputeSummary:
    written: int = 0
    already_done: int = 0
    failed: int = 0
    failure_reasons: collections.Counter = field(default_factory=collections.Counter)
    store_bytes: int = 0

    def lines(self, out: str) -> list[str]:
        lines = [
            f"store: {out}",
            f"written {self.written} videos, skipped {self.already_done} already in the store, "
            f"{self.failed} failed",
        ]
        lines += [f"  failed x{n}: {reason}" for reason, n in self.failure_reasons.most_common(10)]
        lines.append(f"store size on disk: {self.store_bytes / 1e6:.1f} MB")
        return lines


def decode_one(item: VideoInput, num_frames: int, image_size: int, min_duration: float,
               max_duration: float | None, seek: str = "exact") -> DecodedVideo | str:
    """Decode one input in a worker; a bad input comes back as its one-line reason, never raises."""
    try:
        return load_frames(item, num_frames, image_size, min_duration, max_duration, seek=seek)
    except InputError as e:
        return str(e)
    except Exception as e:  # a decoder crash on one odd file must not end a long run
        return f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


class _InlineExecutor(Executor):
    """Runs tasks in the calling process (workers=0): for debugging and tiny runs."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def _decoded_in_order(executor: Executor, items: list[tuple[int, VideoInput]], window: int,
                      decode_args: tuple) -> Iterator[tuple[int, VideoInput, DecodedVideo | str]]:
    """Keep `window` decodes in flight and yield results in input order."""
    pending: collections.deque = collections.deque()
    it = iter(items)
    for slot, item in it:
        pending.append((slot, item, executor.submit(decode_one, item, *decode_args)))
        if len(pending) >= window:
            break
    while pending:
        slot, item, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt[0], nxt[1], executor.submit(decode_one, nxt[1], *decode_args)))
        yield slot, item, fut.result()


def _batches(results: Iterable, batch_videos: int, on_failure: Callable) -> Iterator[list]:
    batch: list = []
    for slot, item, result in results:
        if isinstance(result, str):
            on_failure(slot, item, result)
            continue
        batch.append((slot, item, result))
        if len(batch) == batch_videos:
            yield batch
            batch = []
    if batch:
        yield batch


# The `frame_sampling` attribute for each --seek mode.
FRAME_SAMPLING = {
    "exact": "uniform over the whole duration (segment centres); short side resized, centre crop",
    "keyframe": "keyframe nearest to each uniform target over the whole duration (segment centres), "
                "decoding keyframes only; actual frame times in 'timestamps'; short side resized, centre crop",
}


def store_attributes(encoders: FrozenEncoders, shapes: FeatureShapes, *, image_size: int,
                     feature_dtype: str, preset: str | None, args: dict[str, Any],
                     seek: str = "exact") -> dict[str, Any]:
    """The group attributes: how the store was made. Consumers read these instead of asking again."""
    return {
        "dino": encoders.dino_id,
        "vae": encoders.vae_id,
        "preset": preset,
        "encoders": encoders.describe(),
        "num_frames": shapes.num_frames,
        "image_size": image_size,
        "dino_tokens": shapes.dino_tokens,
        "dino_dim": shapes.dino_dim,
        "latent_shape": list(shapes.latent_shape),
        "feature_dtype": feature_dtype,
        "latent_dtype": "float16",
        "frame_sampling": FRAME_SAMPLING[seek],
        "precompute_args": args,
    }


def run_precompute(
    inputs: list[VideoInput],
    out: str,
    encoders: FrozenEncoders,
    *,
    num_frames: int,
    image_size: int,
    min_duration: float = 0.0,
    max_duration: float | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    workers: int = 2,
    batch_videos: int = 8,
    feature_dtype: str = "float16",
    shard_videos: int | None = None,
    seek: str = "exact",
    preset: str | None = None,
    args: dict[str, Any] | None = None,
    progress: bool = True,
) -> PrecomputeSummary:
    """Fill (or continue filling) the store at `out` with this process's shards of `inputs`.

    `shard_videos` (S) applies to a new store; an existing store keeps its own (asking for another is refused)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index}")
    if seek not in SEEK_MODES:
        raise ValueError(f"--seek must be one of {', '.join(SEEK_MODES)}, got {seek!r}")
    (n_tokens, dim), latent_shape = encoders.output_shapes(image_size)
    shapes = FeatureShapes(num_frames, n_tokens, dim, latent_shape)
    attrs = store_attributes(encoders, shapes, image_size=image_size, feature_dtype=feature_dtype,
                             preset=preset, args=args or {}, seek=seek)
    if num_shards > 1 and FeatureStore.exists(out):
        # Growing a store while other processes write it would race on the array metadata.
        capacity = FeatureStore.open(out).capacity
        if capacity < len(inputs):
            raise StoreError(f"{out} has {capacity} slots but this run lists {len(inputs)} inputs: "
                             "grow it with a single process (--num-shards 1) first")
    store = FeatureStore.create_or_open(out, attrs, shapes, capacity=len(inputs), shard_videos=shard_videos)
    size = store.shard_videos

    summary = PrecomputeSummary()
    todo: list[tuple[int, VideoInput]] = []
    keep_existing: dict[int, bool] = {}  # shard -> start from its stored rows
    buffers: dict[int, ShardBuffer] = {}  # created on first use, dropped once published: ~1-2 shards live
    done_slots: list[np.ndarray] = []  # committed or failed slots, skipped
    owned = list(range(shard_index, -(-len(inputs) // size), num_shards))
    states = {}
    for i in range(0, len(owned), 1024):  # committed shards are checked (object ends only), in batches
        states.update(store.shard_states(owned[i : i + 1024]))
    for shard in owned:
        lo, hi = shard * size, min(shard * size + size, len(inputs))
        state = states[shard]
        if isinstance(state, str):
            tqdm.write(f"recomputing shard {shard}: {state}", file=sys.stderr)
            state = None
        done = np.zeros(hi - lo, dtype=bool) if state is None else (state[0] | state[1])[: hi - lo]
        done_slots.append(np.flatnonzero(done) + lo)
        if done.all():
            continue
        # A committed shard that grew (more inputs) keeps its rows; a broken or unpublished one starts empty.
        keep_existing[shard] = state is not None
        todo += [(slot, inputs[slot]) for slot in range(lo, hi) if not done[slot - lo]]
    skipped = np.concatenate(done_slots) if done_slots else np.zeros(0, dtype=np.int64)
    for slot, stored_id in zip(skipped.tolist(), store.read_strings("video_id", skipped), strict=True):
        if stored_id != inputs[slot].video_id:
            raise StoreError(f"{out} slot {slot} holds video {stored_id!r} but this run's input {slot} is "
                             f"{inputs[slot].video_id!r}: the input list changed; use a new --out")
    summary.already_done = len(skipped)

    def buffer(slot: int) -> ShardBuffer:
        shard = slot // size
        if shard not in buffers:
            buffers[shard] = store.shard_buffer(shard, keep_existing=keep_existing[shard])
        return buffers[shard]

    def publish_if_complete(slot: int) -> None:
        if buffer(slot).complete(until=len(inputs)):
            buffers.pop(slot // size).publish()

    def on_failure(slot: int, item: VideoInput, reason: str) -> None:
        buffer(slot).add_failure(slot, video_id=item.video_id, source=item.source, reason=reason)
        publish_if_complete(slot)
        summary.failed += 1
        summary.failure_reasons[reason.split(":")[0]] += 1
        bar.update(1)

    decode_args = (num_frames, image_size, min_duration, max_duration, seek)
    if workers > 0:
        # spawn, not fork: the parent holds torch's thread pools, which fork does not copy safely.
        executor: Executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        executor = _InlineExecutor()
    bar = tqdm(total=len(todo), unit="video", disable=not progress, dynamic_ncols=True)
    try:
        results = _decoded_in_order(executor, todo, window=max(2 * workers, 1) * batch_videos,
                                    decode_args=decode_args)
        for batch in _batches(results, batch_videos, on_failure):
            frames = torch.from_numpy(np.concatenate([video.frames for _, _, video in batch]))
            encoded = encoders.encode(frames)
            dino = encoded.dino.view(len(batch), num_frames, *encoded.dino.shape[1:]).cpu().numpy()
            latents = encoded.latents.view(len(batch), num_frames, *encoded.latents.shape[1:]).cpu().numpy()
            for k, (slot, item, video) in enumerate(batch):
                buffer(slot).add_row(slot, dino=dino[k], latents=latents[k], caption=item.caption or "",
                                     video_id=item.video_id, source=item.source,
                                     timestamps=video.timestamps, duration=video.duration)
                publish_if_complete(slot)
                summary.written += 1
            bar.update(len(batch))
    finally:
        bar.close()
        executor.shutdown(wait=False, cancel_futures=True)
    summary.store_bytes = store.nbytes_on_disk()
    return summary

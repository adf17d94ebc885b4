"""Precompute: inputs -> decoded frames (worker processes) -> frozen encoders (batched) -> store rows.

Slot j of the store belongs to input j, and the store's shards (S consecutive slots each) are the
unit of work: process I of K (`num_shards=K, shard_index=I`) owns shards I, I+K, ..., buffers each
shard's rows in memory and publishes the shard whole once every slot of it is written or recorded
as failed. A re-run skips committed shards (after checking their objects' indexes) and redoes the
rest, so a kill loses at most the shards each process had in progress (the one it was filling
and up to two finished ones its publisher thread had not yet written).
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fvlm_data.errors import StoreError
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.precompute.encoders import FrozenEncoders
from fvlm_data.precompute.failures import retry_hint, transient_kinds
from fvlm_data.precompute.stages import StageTimes
from fvlm_data.precompute.workers import decode_executor, decoded_in_order, stop_decode_workers
from fvlm_data.precompute.writeback import (
    PUBLISH_QUEUE,
    BackgroundWriter,
    DeviceTransfers,
    HostCopy,
    stored_features,
)
from fvlm_data.records import DecodedVideo, VideoInput
from fvlm_data.store import FeatureShapes, FeatureStore, ShardBuffer, shard_states
from fvlm_data.store.creation import FINGERPRINT_VERSION, fingerprint_version
from fvlm_data.store.writer import StoreWriter
from fvlm_data.video.decode import FRAME_SAMPLING


@dataclass
class PrecomputeSummary:
    written: int = 0
    already_done: int = 0
    failed: int = 0
    failure_reasons: collections.Counter = field(default_factory=collections.Counter)
    store_bytes: int = 0
    transient: collections.Counter = field(default_factory=collections.Counter)  # this run's, by kind
    transient_before: collections.Counter = field(default_factory=collections.Counter)  # skipped failures'
    stages: StageTimes | None = None  # how busy each stage was, and what bounded the run

    def lines(self, out: str) -> list[str]:
        lines = [
            f"store: {out}",
            f"written {self.written} videos, skipped {self.already_done} already in the store, "
            f"{self.failed} failed",
        ]
        lines += [f"  failed x{n}: {reason}" for reason, n in self.failure_reasons.most_common(10)]
        lines += [hint for hint in (retry_hint(self.transient, earlier=False),
                                    retry_hint(self.transient_before, earlier=True)) if hint]
        lines.append(f"store size on disk: {self.store_bytes / 1e6:.1f} MB")
        if self.stages is not None and self.written + self.failed:
            lines += self.stages.lines()
        return lines

    @classmethod
    def merge(cls, parts: Iterable[PrecomputeSummary]) -> PrecomputeSummary:
        """One summary for several processes filling one store (counts and reasons add up)."""
        parts = list(parts)
        total = cls()
        for part in parts:
            total.written += part.written
            total.already_done += part.already_done
            total.failed += part.failed
            total.failure_reasons.update(part.failure_reasons)
            total.transient.update(part.transient)
            total.transient_before.update(part.transient_before)
            total.store_bytes = max(total.store_bytes, part.store_bytes)  # one store, measured by each
        stages = [part.stages for part in parts if part.stages is not None]
        total.stages = StageTimes.merge(stages) if stages else None
        return total


def run_precompute(config: PrecomputeConfig, inputs: list[VideoInput], encoders: FrozenEncoders, *,
                   progress: bool = True, barrier: Callable[[], None] | None = None) -> PrecomputeSummary:
    """Fill (or continue filling) the store at `config.out` with this process's shards of `inputs`.

    `config.shard_videos` (S) applies to a new store; an existing store keeps its own (asking for
    another is refused). `barrier` (all `num_shards` processes call it once, e.g. a torch.distributed
    barrier) makes process 0 create or grow the store before the others open it.
    """
    config.check()
    store = _open_store(config, inputs, encoders, barrier)
    plan = _plan(store, config, inputs)
    summary = PrecomputeSummary(already_done=len(plan.skipped), transient_before=plan.transient_before)
    bar = tqdm(total=len(plan.todo), unit="video", disable=not progress, dynamic_ncols=True)
    shards = _ShardsInProgress(store, len(inputs), plan.keep_existing, plan.retried, summary, bar)
    executor = decode_executor(config.workers)
    # This thread only feeds the encoders; a writer thread adds the rows and publishes (writeback.py).
    transfers, writer = DeviceTransfers(encoders.device), BackgroundWriter()
    stages = summary.stages = StageTimes(workers=config.workers, seek=config.seek)
    start = shown = time.perf_counter()
    try:
        window = max(2 * config.workers, 1) * config.batch_videos
        # A file's segments together; the time spent waiting for each decoded video is counted.
        results = stages.waited_for(decoded_in_order(executor, plan.todo, window, config.decoding, stages))
        on_failure = functools.partial(writer.submit, shards.add_failure)
        for batch in _batches(results, config.batch_videos, on_failure=on_failure):
            t0 = time.perf_counter()
            features = transfers.to_host(_encode(encoders, transfers, [video for _, _, video in batch], config))
            stages.encode_s += time.perf_counter() - t0
            writer.submit(shards.add_rows, batch, features)
            if time.perf_counter() - shown > _POSTFIX_S:
                shown = _times(stages, writer, shards, start, writer.waited_s)
                bar.set_postfix_str(stages.postfix(), refresh=False)
        t0, waited = time.perf_counter(), writer.waited_s
        writer.close()  # the last rows added; a failed write is raised here
        shards.close()  # the last shards published
        _times(stages, writer, shards, start, waited + time.perf_counter() - t0)  # its end counts as a wait for it
    finally:
        writer.abandon()  # on errors, Ctrl-C and SIGTERM: queued writes dropped (a rerun redoes them)
        shards.abandon()
        bar.close()
        stop_decode_workers(executor)  # also on errors, Ctrl-C and SIGTERM: no orphaned workers
    summary.store_bytes = store.nbytes_on_disk()
    return summary


_POSTFIX_S = 2.0  # how often the progress bar's stage figures change


def _times(stages: StageTimes, writer: BackgroundWriter, shards: _ShardsInProgress, start: float,
           waited_for_writer: float) -> float:
    """Bring `stages` up to now; returns now."""
    now = time.perf_counter()
    # The writer is two threads in a row (rows added, shards published): the busier one counts.
    stages.wall_s, stages.wait_writer_s = now - start, waited_for_writer
    stages.write_s = max(writer.busy_s, shards.publisher.busy_s)
    return now


def store_attributes(encoders: FrozenEncoders, shapes: FeatureShapes, config: PrecomputeConfig) -> dict[str, Any]:
    """The group attributes: how the store was made. Consumers read these instead of asking again."""
    return {
        "dino": encoders.dino_id,
        "vae": encoders.vae_id,
        "preset": config.preset,
        "encoders": encoders.describe(),
        "image_size": config.image_size,
        **shapes.as_attrs(),  # num_frames, feature_shapes (and dino_tokens, dino_dim, latent_shape)
        "feature_dtype": config.feature_dtype,
        "latent_dtype": "float16",
        "frame_sampling": FRAME_SAMPLING[config.seek],
        "precompute_args": config.recorded(),
        # --dino-layers: which blocks' input states are stored, and the weights that made them (the deep query
        # refuses others). Absent without the option: such a store is byte for byte the one made before it.
        **({"dino_layers": len(encoders.dino_blocks), "dino_blocks": list(encoders.dino_blocks),
            "dino_fingerprint": encoders.dino_fingerprint} if encoders.dino_blocks else {}),
    }


def _open_store(config: PrecomputeConfig, inputs: list[VideoInput], encoders: FrozenEncoders,
                barrier: Callable[[], None] | None) -> FeatureStore:
    """The store, created or grown to one slot per input (by process 0 first, if there is a barrier)."""
    shapes = FeatureShapes(config.num_frames, encoders.output_shapes(config.image_size))
    attrs = store_attributes(encoders, shapes, config)
    keys = input_keys(inputs, config)  # the store's input fingerprint is made of these
    if config.num_shards > 1 and barrier is None and FeatureStore.exists(config.out):
        # Growing a store while other processes write it would race on the array metadata.
        capacity = FeatureStore.open(config.out).capacity
        if capacity < len(inputs):
            raise StoreError(f"{config.out} has {capacity} slots but this run lists {len(inputs)} inputs: "
                             "grow it with a single process (--num-shards 1) first")
    if barrier is not None:  # process 0 creates (or grows) the store while the others wait
        if config.shard_index == 0:
            StoreWriter.create_or_open(config.out, attrs, shapes, len(inputs), config.shard_videos, keys)
        barrier()
    store = StoreWriter.create_or_open(config.out, attrs, shapes, len(inputs), config.shard_videos, keys)
    recorded = store.attrs.get("inputs")
    if recorded is not None and fingerprint_version(recorded) < FINGERPRINT_VERSION and config.shard_index == 0:
        tqdm.write(f"note: {config.out} has an old input fingerprint (video ids and paths only): changed captions, "
                   "segment bounds or --min/--max-duration are not detected, and paths must be spelled as when "
                   "it was made; a new --out records the full one", file=sys.stderr)
    return store


def input_keys(inputs: list[VideoInput], config: PrecomputeConfig) -> list[tuple[Any, ...]]:
    """Each input's key in the store's input fingerprint (`store.creation`): (video_id, source, and
    everything else that decides its row: its file as the list names it, where in the file (a tar
    member, a synthetic seed), captions, segment bounds, file id and the duration filters, which apply to
    real videos only)."""
    filters = [config.min_duration, config.max_duration]
    return [(it.video_id, it.source, it.kind, it.relpath, list(it.locator), list(it.captions), it.start, it.end,
             it.file_id, None if it.kind == "synthetic" else filters) for it in inputs]


@dataclass
class _Plan:
    todo: list[tuple[int, VideoInput]]  # (slot, input) still to write
    keep_existing: dict[int, bool]  # shard -> start from its stored rows
    skipped: np.ndarray  # committed or failed slots
    retried: set[int] = field(default_factory=set)  # shards whose failed slots are recomputed (--retry-failed)
    transient_before: collections.Counter = field(default_factory=collections.Counter)  # skipped failures'


def _plan(store: FeatureStore, config: PrecomputeConfig, inputs: list[VideoInput]) -> _Plan:
    """This process's shards (I, I+K, ...): what is done, what to redo. Committed shards are checked
    (object ends, in batches; with `--verify data`, the default, also every byte against its checksums);
    a damaged one is recomputed from scratch. With `--retry-failed` the failed slots are redone too (their
    shards keep their committed rows and are published whole again)."""
    size = store.shard_videos
    owned = list(range(config.shard_index, -(-len(inputs) // size), config.num_shards))
    states = {}
    for i in range(0, len(owned), 1024):
        states.update(shard_states(store, owned[i : i + 1024], verify_data=config.verify == "data"))
    plan = _Plan(todo=[], keep_existing={}, skipped=np.zeros(0, dtype=np.int64))
    done_slots, failed_slots = [plan.skipped], [plan.skipped]
    for shard in owned:
        lo, hi = shard * size, min(shard * size + size, len(inputs))
        state = states[shard]
        if state.problem:
            tqdm.write(f"recomputing shard {shard}: {state.problem}", file=sys.stderr)
        done, failed = state.done[: hi - lo], state.failed[: hi - lo]
        if config.retry_failed and failed.any():
            done = done & ~failed
            plan.retried.add(shard)
        else:
            failed_slots.append(np.flatnonzero(failed) + lo)
        done_slots.append(np.flatnonzero(done) + lo)
        if done.all():
            continue
        # A committed shard that grew (more inputs) keeps its rows; a broken or unpublished one starts empty.
        plan.keep_existing[shard] = state.kept
        plan.todo += [(slot, inputs[slot]) for slot in range(lo, hi) if not done[slot - lo]]
    plan.skipped = np.concatenate(done_slots)
    plan.transient_before = transient_kinds(store.read_strings("failure", np.concatenate(failed_slots)))
    for slot, stored_id in zip(plan.skipped.tolist(), store.read_strings("video_id", plan.skipped), strict=True):
        if stored_id != inputs[slot].video_id:
            raise StoreError(f"{config.out} slot {slot} holds video {stored_id!r} but this run's input {slot} is "
                             f"{inputs[slot].video_id!r}: the input list changed; use a new --out")
    return plan


def _batches(results: Iterable, batch_videos: int, on_failure: Callable) -> Iterator[list]:
    """Decoded videos in batches of `batch_videos`; a failed decode goes to `on_failure` at once."""
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


def _encode(encoders: FrozenEncoders, transfers: DeviceTransfers, videos: list[DecodedVideo],
            config: PrecomputeConfig) -> dict[str, torch.Tensor]:
    """A batch's features on the device, in their stored dtypes, shaped [B, T, ...] (see writeback.py)."""
    frames = [video.frames for video in videos]
    if encoders.compiled:  # a short last batch is padded: one compiled shape, no second compilation
        frames += [np.zeros_like(frames[0])] * (config.batch_videos - len(videos))
    encoded = encoders.encode(transfers.frames_to_device(frames), float32=False)
    n = len(videos) * config.num_frames
    per_video = {name: t[:n].view(len(videos), config.num_frames, *t.shape[1:]) for name, t in encoded.items()}
    return stored_features(per_video, config.feature_dtype)


class _ShardsInProgress:
    """This process's shards being filled: each buffered from its first row on, and handed to the
    publisher thread (written whole, then dropped) once every slot of it is written or recorded as
    failed. `close` waits for the last ones to be written; `abandon` drops those not yet begun."""

    def __init__(self, store: FeatureStore, num_inputs: int, keep_existing: dict[int, bool], retried: set[int],
                 summary: PrecomputeSummary, bar: tqdm) -> None:
        self.store, self.num_inputs, self.keep_existing, self.retried = store, num_inputs, keep_existing, retried
        self.summary, self.bar = summary, bar
        self.buffers: dict[int, ShardBuffer] = {}
        self.publisher = BackgroundWriter(PUBLISH_QUEUE, name="store-publisher")

    def close(self) -> None:
        self.publisher.close()

    def abandon(self) -> None:
        self.publisher.abandon()

    def _buffer(self, slot: int) -> ShardBuffer:
        shard = slot // self.store.shard_videos
        if shard not in self.buffers:
            self.buffers[shard] = self.store.shard_buffer(shard, keep_existing=self.keep_existing[shard],
                                                          keep_failures=shard not in self.retried)
        return self.buffers[shard]

    def _publish_if_complete(self, slot: int) -> None:
        if self._buffer(slot).complete(until=self.num_inputs):
            self.publisher.submit(self.buffers.pop(slot // self.store.shard_videos).publish)

    def add_failure(self, slot: int, item: VideoInput, reason: str) -> None:
        self._buffer(slot).add_failure(slot, video_id=item.video_id, source=item.source, reason=reason,
                                       file_id=item.file_id)
        self._publish_if_complete(slot)
        self.summary.failed += 1
        self.summary.failure_reasons[reason.split(":")[0]] += 1
        self.summary.transient.update(transient_kinds([reason]))
        self.bar.update(1)

    def add_rows(self, batch: list[tuple[int, VideoInput, DecodedVideo]], features: HostCopy) -> None:
        """On the writer thread: the batch's rows, from its features copied to the host."""
        arrays = features.arrays()  # waits for the device-to-host copy (int8 ones quantized on the device)
        for k, (slot, item, video) in enumerate(batch):
            self._buffer(slot).add_row(slot, caption=item.caption or "", video_id=item.video_id, source=item.source,
                                       timestamps=video.timestamps, duration=video.duration,
                                       captions=item.captions, file_id=item.file_id,
                                       **{name: values[k] for name, values in arrays.items()})
            self._publish_if_complete(slot)
            self.summary.written += 1
        features.release()
        self.bar.update(len(batch))

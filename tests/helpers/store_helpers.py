"""Test-only ways to write and inspect single rows of a store (writers of many rows use `shard_buffer`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fvlm_data.store import FeatureStore, shard_states


def write_row(store: FeatureStore, slot: int, **row: Any) -> None:
    """Write one video: read-modify-write of its whole shard."""
    buf = store.shard_buffer(slot // store.shard_videos, keep_existing=True)
    buf.add_row(slot, **row)
    buf.publish()


def write_rows(store: FeatureStore, rows: Iterable[tuple[int, dict[str, Any]]]) -> None:
    """Write many videos, (slot, row) each: every shard buffered from its first row and published whole
    after the last, as precompute does."""
    buffers = {}
    for slot, row in rows:
        shard = slot // store.shard_videos
        if shard not in buffers:
            buffers[shard] = store.shard_buffer(shard)
        buffers[shard].add_row(slot, **row)
    for buf in buffers.values():
        buf.publish()


def write_failure(store: FeatureStore, slot: int, *, video_id: str, source: str, reason: str) -> None:
    buf = store.shard_buffer(slot // store.shard_videos, keep_existing=True)
    buf.add_failure(slot, video_id=video_id, source=source, reason=reason)
    buf.publish()


def slot_state(store: FeatureStore, slot: int) -> str:
    """'committed', 'failed' or 'empty' (never written, or its shard not yet published)."""
    shard, j = divmod(slot, store.shard_videos)
    return shard_states(store, [shard])[shard].slot(j)


def shard_problem(store: FeatureStore, shard: int) -> str | None:
    """Why shard `shard` cannot be trusted, or None."""
    return shard_states(store, [shard])[shard].problem


def duration(store: FeatureStore, i: int) -> float:
    """Seconds of the i-th committed video, as its shard's `duration` object holds it."""
    shard, j = divmod(int(store.committed_slots()[i]), store.shard_videos)
    return float(store.shard_values(("duration",), [shard])["duration"][shard][j])

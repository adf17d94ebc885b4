"""`python -m fvlm_data.inspect S [--json] [--num-shards K] [--verify]`: one screen on a store, local or remote.

How it was made, how far along it is (slots committed / failed / pending, shards complete and those
a rerun would compute, and with ``--num-shards K`` what each ``--shard-index`` still owes), its
failures grouped by reason, bytes on disk and captions per video. Reads a listing of each array (a
committed shard lacking an array's object is damaged) and whole shards of the small arrays in a few
batches (``committed``, ``failure`` and, if present, ``captions``) and never a row, so a store of a
million videos opens in seconds; ``--verify`` also checks every shard's objects the way a rerun does
by default (``--verify data``: each object's index, and every byte against its checksums).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any

import numpy as np

from fvlm_data.errors import StoreError
from fvlm_data.file_ids import file_ids
from fvlm_data.store import FeatureStore, shard_states
from fvlm_data.store.format import SCALE_SUFFIX, table_entry
from fvlm_data.store.objects import LocalObjects

__all__ = ["inspect_store", "render", "main"]

EXAMPLES = 3  # failures shown per reason
BATCH_SHARDS = 1024  # shards checked per batch by --verify


def inspect_store(path: str, num_shards: int | None = None, verify: bool = False,
                  examples: int = EXAMPLES) -> dict[str, Any]:
    """What `python -m fvlm_data.inspect` shows, as a dict (the `--json` output)."""
    store = FeatureStore.open(path)
    size, capacity = store.shard_videos, store.capacity
    published = store._listed_shards("committed")
    damaged: dict[int, str] = {}
    committed = store.shard_values(("committed",), published, errors=damaged)["committed"]
    failure = store.shard_values(("failure",), sorted(committed), errors=damaged)["failure"]
    for name in [n for n in store.arrays if n != "committed"]:  # a listing per array: its objects exist
        for shard in store.shards_lacking(name, sorted(set(committed) - set(damaged))):
            damaged[shard] = str(store.missing(name, shard))
    if verify:  # what a rerun checks by default (--verify data): every object's index, every byte's checksum
        for i in range(0, len(published), BATCH_SHARDS):
            states = shard_states(store, published[i : i + BATCH_SHARDS], verify_data=True)
            damaged.update({shard: state.problem for shard, state in states.items() if state.problem})

    committed_slots, failed, incomplete = [], [], []  # a damaged shard's slots count as pending
    for shard in range(store.num_shard_objects):
        n = min(size, capacity - shard * size)
        if shard in damaged or shard not in committed or shard not in failure:
            incomplete.append(shard)
            continue
        done, reasons = committed[shard][:n] == 1, failure[shard][:n]
        failed += [(shard * size + j, r) for j, r in enumerate(reasons) if r]
        committed_slots.append(shard * size + np.flatnonzero(done))
        if (done | np.array([bool(r) for r in reasons], dtype=bool)).sum() < n:
            incomplete.append(shard)  # grown since it was published: its new slots are still to do
    n_committed = int(sum(len(c) for c in committed_slots))
    slots = np.concatenate(committed_slots) if committed_slots else np.zeros(0, np.int64)

    report: dict[str, Any] = {
        "store": str(path),
        "made": _how_made(store),
        "slots": {"total": capacity, "committed": n_committed, "failed": len(failed),
                  "pending": capacity - n_committed - len(failed)},
        "shards": {"total": store.num_shard_objects, "videos_per_shard": size,
                   "complete": store.num_shard_objects - len(incomplete), "to_compute": incomplete,
                   "damaged": {str(k): v for k, v in sorted(damaged.items())}},
        # A grow begun and not ended (its writer killed): the store reads as before it until a writer ends it.
        "grow_unfinished": store.grow_unfinished,
        "failures": _failures(store, failed, examples),
        "captions_per_video": _captions_per_video(store, slots),
        "bytes_on_disk": _bytes_on_disk(store),
    }
    note = file_ids(store, slots)[1]  # reads file ids and sources of stores made before they were per file
    if note:
        report["file_ids"] = note
    if num_shards is not None:
        report["owed_by_shard_index"] = {str(i): [s for s in incomplete if s % num_shards == i]
                                         for i in range(num_shards)}
    return report


def _bytes_on_disk(store: FeatureStore) -> int:
    """`nbytes_on_disk`, for a local store walked with os.scandir: a third of pathlib's time on 110K objects."""
    if not isinstance(store.objects, LocalObjects):
        return store.nbytes_on_disk()
    total, folders = 0, [str(store.objects.root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _how_made(store: FeatureStore) -> dict[str, Any]:
    attrs = store.attrs
    keys = ("format", "format_version", "store_id", "dino", "vae", "preset", "num_frames", "image_size",
            "feature_dtype", "latent_dtype", "frame_sampling", "dino_layers", "dino_blocks")
    # Per video, from the arrays themselves: each encoded feature of the table, e.g. dino [T, N, D].
    arrays = {n: store.arrays[n] for n in store.frame_arrays()
              if table_entry(n).encoded and not n.endswith(SCALE_SUFFIX)}
    made_features = {name: {"dtype": str(np.dtype(arr.dtype)), "shape": list(arr.shape[1:])}
                     for name, arr in arrays.items()}
    return {**{k: attrs.get(k) for k in keys}, "shard_videos": store.shard_videos, "features": made_features,
            "checksums": store.has_checksums, "precompute_args": attrs.get("precompute_args")}


def _failures(store: FeatureStore, failed: list[tuple[int, str]], examples: int) -> list[dict[str, Any]]:
    """Failed slots grouped by reason (the part before any ':'), most frequent first, a few examples each."""
    groups: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for slot, reason in failed:
        groups[reason.split(":")[0]].append((slot, reason))
    shown = [(kind, items[:examples]) for kind, items in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))]
    example_slots = np.array([slot for _, items in shown for slot, _ in items], dtype=np.int64)
    ids = iter(store.read_strings("video_id", example_slots))
    sources = iter(store.read_strings("source", example_slots))
    return [{"reason": kind, "count": len(groups[kind]),
             "examples": [{"slot": slot, "video_id": next(ids), "source": next(sources), "reason": reason}
                          for slot, reason in items]} for kind, items in shown]


def _captions_per_video(store: FeatureStore, slots: np.ndarray) -> dict[str, int]:
    """{number of captions: videos}; one each in a store without a `captions` array."""
    if "captions" not in store.arrays:
        return {"1": len(slots)} if len(slots) else {}
    counts = collections.Counter(1 if not c else len(json.loads(c)) for c in store.read_strings("captions", slots))
    return {str(k): counts[k] for k in sorted(counts)}


def _ranges(shards: list[int], limit: int = 12) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; long lists cut after `limit` ranges."""
    runs: list[list[int]] = []
    for s in shards:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (f", ... ({len(runs) - limit} more ranges)" if len(runs) > limit else "")


def render(report: dict[str, Any]) -> str:
    """The one screen."""
    m, slots, shards = report["made"], report["slots"], report["shards"]
    lines = [
        f"store       {report['store']}",
        f"format      {m['format']} {m['format_version']}, store_id {m['store_id'] or '-'}, "
        f"checksums {'yes' if m['checksums'] else 'no'}",
        f"encoders    dino={m['dino']} vae={m['vae']} preset={m['preset']}",
        f"frames      {m['num_frames']} per video at {m['image_size']} px; "
        + ", ".join(f"{name} {f['dtype']} {f['shape']}" for name, f in m["features"].items()) + " per video",
        f"sampling    {m['frame_sampling']}",
        f"slots       {slots['total']}: {slots['committed']} committed, {slots['failed']} failed, "
        f"{slots['pending']} pending",
        f"shards      {shards['total']} of {shards['videos_per_shard']} videos: {shards['complete']} complete, "
        f"{len(shards['to_compute'])} a rerun would compute" + (f" ({_ranges(shards['to_compute'])})"
                                                                if shards["to_compute"] else ""),
    ]
    if report.get("grow_unfinished"):
        lines.append("  a grow was begun and not ended (its writer was killed?): the store is its "
                     f"{slots['total']} slots until the next precompute run ends it")
    lines += [f"  damaged shard {shard}: {problem}" for shard, problem in shards["damaged"].items()]
    for index, owed in report.get("owed_by_shard_index", {}).items():
        owes = f"{len(owed)} shard{'s' if len(owed) > 1 else ''}: {_ranges(owed)}" if owed else "nothing"
        lines.append(f"  --shard-index {index} of {len(report['owed_by_shard_index'])} owes {owes}")
    lines.append(f"failures    {slots['failed']}" + ("" if slots["failed"] else " (none)"))
    for group in report["failures"]:
        lines.append(f"  x{group['count']} {group['reason']}")
        lines += [f"      slot {e['slot']} {e['video_id']} ({e['source']}): {e['reason']}" for e in group["examples"]]
    per_video = ", ".join(f"{n}: {videos}" for n, videos in report["captions_per_video"].items())
    lines.append(f"captions    per video (captions: videos) {per_video or '-'}")
    lines.append(f"on disk     {report['bytes_on_disk'] / 1e6:.1f} MB")
    if "file_ids" in report:
        lines.append(f"note        {report['file_ids']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvlm_data.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a store folder or URL (s3://bucket/prefix/store.zarr)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="also list the shards each --shard-index of K processes still owes")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard's objects as a rerun does (slower: reads the whole store)")
    args = parser.parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1, got {args.num_shards}")
    try:
        report = inspect_store(args.store, num_shards=args.num_shards, verify=args.verify)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

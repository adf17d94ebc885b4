"""The file of each row, as the held-out split and the evaluation group rows by it.

Stores whose input fingerprint has version 2 or later record one file id per file: every row of
a file shares it, whatever the rows' video ids and segments. Older format-3 stores gave a
manifest's whole-file rows their own video ids as file ids, so one file with several whole-file
rows (one per caption, say) had several; for them the rows of each `source` are brought under one
id here (the smallest), and a one-line note says so.
"""

from __future__ import annotations

import numpy as np

from fvlm_data.store.reader import FeatureStore

__all__ = ["file_ids", "PER_FILE_VERSION"]

PER_FILE_VERSION = 2  # the input fingerprint version from which a store's file ids are per file


def file_ids(store: FeatureStore, slots: np.ndarray,
             video_ids: list[str] | None = None) -> tuple[list[str], str | None]:
    """(the file id of each of `slots`, a note when the store's own file ids put one file under
    several ids, or None). A store without file ids (format 2: whole videos) gives its video ids."""
    if "file_id" not in store.arrays:
        return (video_ids if video_ids is not None else store.read_strings("video_id", slots)), None
    ids = store.file_ids(slots)
    if int((store.attrs.get("inputs") or {}).get("version", 1)) >= PER_FILE_VERSION:
        return ids, None
    sources = store.read_strings("source", slots)
    first: dict[str, str] = {}
    for source, file_id in zip(sources, ids, strict=True):
        first[source] = min(first.get(source, file_id), file_id)
    split = sorted({source for source, file_id in zip(sources, ids, strict=True) if first[source] != file_id})
    if not split:
        return ids, None
    note = (f"{store.path}: {len(split)} file(s) have rows under several file ids (a store made before file ids "
            f"were per file, e.g. {split[0]}): the split keeps each file's rows together, so it differs from the "
            "one earlier runs on this store used; retrain (a new run folder), and recompute the store with a new "
            "--out to record per-file ids")
    return [first[source] for source in sources], note

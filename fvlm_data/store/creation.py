"""Creating a store exactly once: its identity, the fingerprint of its input list, exclusive creation.

A format-3 store records `store_id` (a uuid4, written once at creation) and `inputs`, the
fingerprint of the input list it is filled from: {"version": 2, "count": n, "sha256": ...} over
the key of each input in slot order: its video_id and everything else that decides its row (its
file as the list names it, captions, segment bounds, the duration filters; `source`, the path as
spelled on the command line, does not count). Stores made before record version 1 (no "version"):
(video_id, source) only, and keep being checked that way. A writer whose inputs differ is refused
before it writes anything; a longer list whose first `count` inputs agree grows the store (and the
fingerprint, in the store's own version).

Creation is exclusive, so two writers started at once cannot both create (and then mix) a store:
locally the store is built in a hidden folder beside the target and renamed into place, and
rename(2) refuses a target that exists (the directory form of O_EXCL); on object storage a claim
object holding the creator's identity and fingerprint is written with a conditional PUT
(If-None-Match: *) before anything else, and a writer that loses the race reads the claim: other
inputs are refused at once, the same inputs wait for the winner's metadata.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fvlm_data.errors import StoreError
from fvlm_data.store.objects import LocalObjects, RemoteObjects

# Remote stores only: who created the store, as the metadata of an empty Zarr group (so that zarr,
# listing the store's members, sees a node it knows).
CLAIM_KEY = "creation/zarr.json"
CLAIM_WAIT_S = 120.0  # how long a writer of the same inputs waits for the creator's metadata
FINGERPRINT_VERSION = 2  # what new stores record (see above)


def new_store_id() -> str:
    return uuid.uuid4().hex


def inputs_fingerprint(inputs: Sequence[Sequence[Any]], version: int = FINGERPRINT_VERSION) -> dict[str, Any]:
    """{"version": 2, "count": n, "sha256": hex} over the key of each input, in slot order: a tuple
    (video_id, source, *what else decides its row), JSON values. Version 1 hashes (video_id, source)
    (and records no "version"); version 2 the video_id and the rest, not `source`."""
    digest = hashlib.sha256()
    for key in inputs:
        if version == 1:
            digest.update(json.dumps([key[0], key[1]], ensure_ascii=False).encode() + b"\n")
        else:  # ASCII: a lone surrogate in a caption is escaped, not an encoding error
            digest.update(json.dumps([key[0], *key[2:]]).encode() + b"\n")
    counted = {"count": len(inputs), "sha256": digest.hexdigest()}
    return counted if version == 1 else {"version": version, **counted}


def fingerprint_version(recorded: Mapping[str, Any] | None) -> int:
    """The version of a store's recorded fingerprint (1: made before versions were recorded)."""
    return int((recorded or {}).get("version", 1))


def check_inputs(path: str | os.PathLike, recorded: Mapping[str, Any] | None,
                 inputs: Sequence[Sequence[Any]] | None) -> None:
    """Refuse inputs that are not the store's (a format-2 store has no fingerprint: nothing to check)."""
    if recorded is None or inputs is None:
        return
    count, version = int(recorded["count"]), fingerprint_version(recorded)
    if version > FINGERPRINT_VERSION:
        raise StoreError(f"{path} has an input fingerprint of version {version}, newer than this fvlm's "
                         f"{FINGERPRINT_VERSION}: update fvlm to add to it")
    if len(inputs) < count:
        raise StoreError(f"{path} was made from {count} inputs and this run lists {len(inputs)}: a shorter list "
                         "cannot be checked against the store's fingerprint; give all of them, or use a new --out")
    mine = inputs_fingerprint(inputs[:count], version)["sha256"]
    if mine != recorded["sha256"]:
        what = ("video ids and paths" if version == 1 else
                "video ids, files, captions, segment bounds, --min/--max-duration")
        raise StoreError(f"{path} was made from another input list (its {count} inputs have fingerprint "
                         f"{recorded['sha256'][:12]}, this run's first {count} {mine[:12]}): the input list changed; "
                         f"use a new --out (compared: {what})")


def create_exclusive(path: str | os.PathLike, objects: LocalObjects | RemoteObjects, objs: dict[str, bytes],
                     claim: dict[str, Any]) -> None:
    """Create the store from its metadata objects `objs` unless it exists or another writer creates it
    first; in that case return once it is there (the caller then checks it)."""
    if isinstance(objects, LocalObjects):
        _create_local(objects, objs)
        return
    body = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": claim}).encode()
    if objects.put_if_absent(CLAIM_KEY, body):
        _put_metadata(objects, objs)
        return
    theirs = objects.get_many([CLAIM_KEY])[0]
    other = json.loads(theirs).get("attributes", {}) if theirs else {}
    if other.get("store_id") == claim.get("store_id"):  # our own claim: a retried PUT whose first try landed
        _put_metadata(objects, objs)
        return
    mine, recorded = claim.get("inputs"), other.get("inputs")
    if mine and recorded and mine["count"] == recorded["count"] and mine["sha256"] != recorded["sha256"]:
        raise StoreError(f"{path} is being created by another writer from another input list (fingerprint "
                         f"{recorded['sha256'][:12]}, this run's {mine['sha256'][:12]}): use a new --out")
    # The same inputs (or another count, checked once the store is there): wait for the creator's metadata.
    _wait_for_creator(path, objects, f"since {other.get('created', '?')} ({CLAIM_KEY} exists)")


def _wait_for_creator(path: str | os.PathLike, objects: LocalObjects | RemoteObjects, claimed: str) -> None:
    deadline = time.monotonic() + CLAIM_WAIT_S
    while not objects.exists():
        if time.monotonic() > deadline:
            claim = f"{path}/{CLAIM_KEY}" if isinstance(objects, RemoteObjects) else f"{path}/{CLAIM_KEY.split('/')[0]}"
            raise StoreError(f"{path} is being created by another writer {claimed} and its zarr.json does not exist "
                             f"after {CLAIM_WAIT_S:.0f} s: if no writer is running, delete {claim} and run again")
        time.sleep(0.2)


def _put_metadata(objects: RemoteObjects, objs: dict[str, bytes]) -> None:
    for key in sorted(objs, key=lambda k: k == "zarr.json"):  # group metadata last: then readers see it
        objects.put(key, objs[key])


def _create_local(objects: LocalObjects, objs: dict[str, bytes]) -> None:
    path = objects.root
    if (path / CLAIM_KEY.split("/")[0]).is_dir():  # another writer creates it in place (or was killed doing so)
        _create_in_place(objects, objs)
        return
    if objects.foreign_files():
        raise StoreError(f"{path} holds files but no store (no zarr.json): give a new or empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError:  # a folder we may write in but not its parent: build the store in it
        _create_in_place(objects, objs)
        return
    try:
        for key, data in objs.items():
            (tmp / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp / key).write_bytes(data)
        try:
            # Fails if `path` exists and is not empty: exactly one creator wins. An empty folder is replaced.
            os.rename(tmp, path)
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES) and path.is_dir():
                _create_in_place(objects, objs)  # a mount point (or a folder we cannot replace)
            elif not path.exists():
                raise
            # Else another writer created it first: the caller checks that its inputs are ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _create_in_place(objects: LocalObjects, objs: dict[str, bytes]) -> None:
    """Create the store inside its (empty) folder: whoever makes the claim folder first writes the metadata,
    the group's zarr.json last; the others wait for it, as on object storage."""
    claim = objects.root / CLAIM_KEY.split("/")[0]
    try:
        claim.mkdir()
    except FileExistsError:
        _wait_for_creator(objects.root, objects, f"({claim} exists)")
        return
    for key in sorted(objs, key=lambda k: k == "zarr.json"):  # group metadata last: then readers see it
        objects.put(key, objs[key])
    claim.rmdir()

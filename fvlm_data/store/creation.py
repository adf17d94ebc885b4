"""Creating a store exactly once: its identity, the fingerprint of its input list, exclusive creation.

A format-3 store records `store_id` (a uuid4, written once at creation) and `inputs`, the
fingerprint of the input list it is filled from: {"count": n, "sha256": ...} over (video_id,
source) of each input in slot order. A writer whose inputs differ is refused before it writes
anything; a longer list whose first `count` inputs agree grows the store (and the fingerprint).

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


def new_store_id() -> str:
    return uuid.uuid4().hex


def inputs_fingerprint(inputs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """{"count": n, "sha256": hex} over the (video_id, source) of each input, in slot order."""
    digest = hashlib.sha256()
    for video_id, source in inputs:
        digest.update(json.dumps([video_id, source], ensure_ascii=False).encode() + b"\n")
    return {"count": len(inputs), "sha256": digest.hexdigest()}


def check_inputs(path: str | os.PathLike, recorded: Mapping[str, Any] | None,
                 inputs: Sequence[tuple[str, str]] | None) -> None:
    """Refuse inputs that are not the store's (a format-2 store has no fingerprint: nothing to check)."""
    if recorded is None or inputs is None:
        return
    count = int(recorded["count"])
    if len(inputs) < count:
        raise StoreError(f"{path} was made from {count} inputs and this run lists {len(inputs)}: a shorter list "
                         "cannot be checked against the store's fingerprint; give all of them, or use a new --out")
    mine = inputs_fingerprint(inputs[:count])["sha256"]
    if mine != recorded["sha256"]:
        raise StoreError(f"{path} was made from another input list (its {count} inputs have fingerprint "
                         f"{recorded['sha256'][:12]}, this run's first {count} {mine[:12]}): the input list "
                         "changed; use a new --out")


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

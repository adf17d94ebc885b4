"""Byte access to a store's objects (Zarr keys such as `dino/c/3/0/0/0`), on a local disk or remote.

The reader needs three things zarr's array API does not give cheaply: the end of a shard (its
index), byte ranges of many shards at once, and an atomic whole-object write. `LocalObjects`
does them with `pread` and temp file + rename; `RemoteObjects` goes through zarr's own
`FsspecStore` (s3://, gs://, ... with credentials and endpoint from the usual environment
variables) and issues a batch's requests concurrently, so a batch costs a few round trips.

Object stores fail transiently as a matter of course (503 SlowDown, 500, reset connections,
timeouts): every remote request goes through `fvlm_data.store.retries.RetryingStore`, one retry
policy (bounded, jittered exponential backoff; the client libraries' own retries are turned off so that attempts do not
multiply), which logs the first failure of each kind and ends a failure that persists with one
line naming the store and the object.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
from pathlib import Path

import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from fvlm_data.environment import is_remote, process_alive
from fvlm_data.errors import StoreError
from fvlm_data.store.retries import S3_OPTIONS, RetryingStore

# (key, offset, buffer to fill): one ranged read.
ReadRequest = tuple[str, int, memoryview]


TEMP_DIR = ".tmp"  # a local store's temp files (each renamed into place whole)
HOST = socket.gethostname().replace("-", "_")


class LocalObjects:
    """Objects as files under a folder; reads by `pread` on a small per-process cache of open files."""

    MAX_OPEN_FILES = 64

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(str(root).removeprefix("file://"))
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return str(self.root)

    def zarr_store(self, read_only: bool) -> zarr.storage.LocalStore:
        return zarr.storage.LocalStore(self.root, read_only=read_only)

    def exists(self) -> bool:
        """A store is here (its group's metadata): an empty folder (or a mount point) is not one yet."""
        return (self.root / "zarr.json").exists()

    def foreign_files(self) -> bool:
        """The folder holds something although it is no store (then a store is not created in it)."""
        try:
            return not self.exists() and any(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return self.root.exists()  # a file

    def _fd(self, key: str) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker: its own descriptors
            self._fds, self._pid = collections.OrderedDict(), os.getpid()
        fd = self._fds.pop(key, None)
        if fd is None:
            fd = os.open(self.root / key, os.O_RDONLY)
            if len(self._fds) >= self.MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[key] = fd
        return fd

    def forget(self, key: str) -> None:
        """Drop a cached descriptor (after the object was replaced)."""
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        # os.open/os.read on string paths: a third of the cost of Path.read_bytes for small objects,
        # which is what opening a 1M-video store reads (2 x V / S of them).
        root = str(self.root)
        out: list[bytes | None] = []
        for key in keys:
            try:
                fd = os.open(os.path.join(root, key), os.O_RDONLY)
            except FileNotFoundError:
                out.append(None)
                continue
            try:
                parts = [os.read(fd, 1 << 20)]
                while len(parts[-1]) == 1 << 20:
                    parts.append(os.read(fd, 1 << 20))
            finally:
                os.close(fd)
            out.append(b"".join(parts) if len(parts) > 1 else parts[0])
        return out

    def tails(self, keys: list[str], nbytes: int) -> list[tuple[bytes, int] | None]:
        """The last `nbytes` of each object and its size; None for a missing object."""
        out: list[tuple[bytes, int] | None] = []
        for key in keys:
            try:
                fd = self._fd(key)
            except FileNotFoundError:
                out.append(None)
                continue
            size = os.fstat(fd).st_size
            out.append((os.pread(fd, nbytes, max(size - nbytes, 0)), size))
        return out

    def read_into(self, requests: list[ReadRequest]) -> list[int]:
        """Fill each buffer from its object at its offset; returns the byte counts read."""
        counts = [0] * len(requests)
        keys = list(dict.fromkeys(key for key, _, _ in requests))
        # At most MAX_OPEN_FILES objects at a time: a batch can touch more shard objects than the
        # descriptor cache holds (32 samples x 3 arrays), and a descriptor must not be closed while
        # its reads are still to come.
        for start in range(0, len(keys), self.MAX_OPEN_FILES):
            fds = {key: self._fd(key) for key in keys[start : start + self.MAX_OPEN_FILES]}
            todo = [j for j, (key, _, _) in enumerate(requests) if key in fds]
            if len(todo) > 1 and hasattr(os, "posix_fadvise"):
                # On a cold page cache, announcing every range first lets the kernel queue all the I/O
                # at once (bench/data_path.py: 1.5x faster cold, ~6% slower warm).
                for j in todo:
                    key, offset, view = requests[j]
                    os.posix_fadvise(fds[key], offset, len(view), os.POSIX_FADV_WILLNEED)
            for j in todo:
                key, offset, view = requests[j]
                counts[j] = os.preadv(fds[key], [view], offset)
        return counts

    def list_names(self, prefix: str) -> list[str]:
        try:
            return [e.name for e in os.scandir(self.root / prefix)]
        except FileNotFoundError:
            return []

    def put(self, key: str, data: bytes) -> None:
        """Atomic: a reader sees the old object or the whole new one, never a part."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temp file of this process and thread: two identical runs started at once write the same objects
        # (each whole, the last rename wins); a name per object let one rename the other's file away. In one
        # folder, so that a writer finds those of killed processes at once (`remove_stale_temps`).
        (self.root / TEMP_DIR).mkdir(exist_ok=True)
        tmp = self.root / TEMP_DIR / f"{HOST}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the rename must not become visible before the bytes (power loss)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.forget(key)

    def remove_stale_temps(self) -> None:
        """Remove the temp files that processes of this machine killed while writing (kill -9) left."""
        try:
            entries = list(os.scandir(self.root / TEMP_DIR))
        except FileNotFoundError:
            return
        for entry in entries:
            parts = entry.name.split("-")  # HOST-pid-thread
            if len(parts) == 3 and parts[0] == HOST and parts[1].isdigit() and not process_alive(int(parts[1])):
                Path(entry.path).unlink(missing_ok=True)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class RemoteObjects:
    """Objects in an fsspec-backed zarr store (s3://bucket/prefix/store.zarr and friends)."""

    # Requests in flight at once: enough to hide latency, few enough for the connection pool.
    CONCURRENCY = 64

    def __init__(self, url: str, read_only: bool) -> None:

        self.url = url.rstrip("/")
        protocol = self.url.split("://")[0]
        options = {}
        if protocol in ("s3", "s3a"):
            # The endpoint explicitly: fsspec caches filesystems by their options, not by the environment.
            options = {**S3_OPTIONS, "endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or None}
        try:
            self.fsspec = zarr.storage.FsspecStore.from_url(self.url, read_only=read_only, storage_options=options)
        except (ImportError, ValueError) as e:  # fsspec names the package a protocol needs
            raise StoreError(f"cannot open {self.url}: {str(e).splitlines()[0]} (for s3:// install fvlm's "
                             f"'remote' extra; other {protocol}:// stores need their fsspec package)") from None
        if hasattr(self.fsspec.fs, "retries"):
            self.fsspec.fs.retries = 1  # s3fs's own retry loop: one attempt
        self.store = RetryingStore(self.fsspec, self.url)

    def __repr__(self) -> str:
        return self.url

    def __getstate__(self) -> dict:
        return {"url": self.url, "read_only": self.fsspec.read_only}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["read_only"])

    def zarr_store(self, read_only: bool) -> zarr.abc.store.Store:
        return self.store if read_only == self.store.read_only else self.store.with_read_only(read_only)

    def _forget_listings(self, prefix: str = "") -> None:
        # fsspec caches listings per filesystem instance (s3fs: per folder, forgotten with its parents, not its
        # children); other processes add objects meanwhile.
        self.fsspec.fs.invalidate_cache(f"{self.fsspec.path}/{prefix}".rstrip("/"))

    def exists(self) -> bool:
        self._forget_listings()
        return bool(sync(self.store.exists("zarr.json")))

    async def _gather(self, coros: list) -> list:
        limit = asyncio.Semaphore(self.CONCURRENCY)

        async def one(coro):
            async with limit:
                return await coro

        return await asyncio.gather(*(one(c) for c in coros))

    async def _get(self, key: str, byte_range=None) -> bytes | None:
        buf = await self.store.get(key, default_buffer_prototype(), byte_range=byte_range)
        return None if buf is None else buf.to_bytes()

    async def _size(self, key: str) -> int | None:
        try:
            return await self.store.getsize(key)
        except FileNotFoundError:
            return None

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return sync(self._gather([self._get(k) for k in keys]))

    def tails(self, keys: list[str], nbytes: int) -> list[tuple[bytes, int] | None]:
        async def tail(key: str) -> tuple[bytes, int] | None:
            data, size = await asyncio.gather(self._get(key, SuffixByteRequest(nbytes)), self._size(key))
            return None if data is None or size is None else (data, size)

        return sync(self._gather([tail(k) for k in keys]))

    # Ranges of one object closer than this are fetched as one request: a round trip costs more
    # than a few hundred kB of transfer.
    MERGE_GAP = 1 << 20

    def read_into(self, requests: list[ReadRequest]) -> list[int]:
        """All ranges at once, neighbours in one object merged, then scattered into the buffers."""
        order = sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][1]))
        spans: list[tuple[str, int, int, list[int]]] = []  # key, start, stop, member requests
        for i in order:
            key, offset, view = requests[i]
            if spans and spans[-1][0] == key and offset - spans[-1][2] <= self.MERGE_GAP:
                last = spans[-1]
                spans[-1] = (key, last[1], max(last[2], offset + len(view)), [*last[3], i])
            else:
                spans.append((key, offset, offset + len(view), [i]))
        datas = sync(self._gather([self._get(key, RangeByteRequest(a, b)) for key, a, b, _ in spans]))
        counts = [0] * len(requests)
        for (_, start, _, members), data in zip(spans, datas, strict=True):
            data = data or b""
            for i in members:
                _, offset, view = requests[i]
                piece = data[offset - start : offset - start + len(view)]
                view[: len(piece)] = piece
                counts[i] = len(piece)
        return counts

    def list_names(self, prefix: str) -> list[str]:
        self._forget_listings(prefix)

        async def names() -> list[str]:
            return [n async for n in self.store.list_dir(prefix)]

        return sync(names())

    def put(self, key: str, data: bytes) -> None:
        """One PUT: object stores make a whole object visible at once."""
        try:
            sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))
        except FileNotFoundError:  # a PUT finds nothing missing but its bucket
            raise self._no_bucket(key) from None

    def _no_bucket(self, key: str) -> StoreError:
        bucket = self.url.split("://", 1)[-1].split("/", 1)[0]
        return StoreError(f"cannot write {self.url}/{key}: the bucket {bucket!r} does not exist (create it, or "
                          "correct the URL)")

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object has that name (a conditional PUT, If-None-Match: *); False if one
        exists. A filesystem without conditional writes gets the closest it has: a check, then a PUT."""
        path = f"{self.store.path}/{key}"
        try:  # through the store's retries: a retry whose first try did land answers "exists" (see creation.py)
            sync(self.store._retry("PUT", key, lambda: self.store.fs._pipe_file(path, data, mode="create")))
        except FileExistsError:
            return False
        except FileNotFoundError:
            raise self._no_bucket(key) from None
        except (TypeError, NotImplementedError):  # an fsspec filesystem without mode="create"
            if sync(self.store.exists(key)):
                return False
            self.put(key, data)
        return True

    def nbytes(self) -> int:
        self.fsspec.fs.invalidate_cache()  # a walk of every folder: all of their listings

        async def total() -> int:
            keys = [k async for k in self.store.list()]
            return sum(await self._gather([self.store.getsize(k) for k in keys]))

        return sync(total())

    def close(self) -> None:
        pass


def objects_at(path: str | os.PathLike, read_only: bool = True) -> LocalObjects | RemoteObjects:
    return RemoteObjects(str(path), read_only) if is_remote(path) else LocalObjects(path)

"""Retries of remote object-store requests: which failures are transient, and the one retry policy.

At scale, object stores answer `503 SlowDown` and `500`, reset connections and time out as a matter of
course; a run must ride them out, and end with one line naming the store and the object when one
persists. `RetryingStore` wraps the zarr store that `fvlm_data.store.objects.RemoteObjects` reads and writes
through, so every request (zarr's metadata reads too) gets the same policy.
"""

from __future__ import annotations

import asyncio
import logging
import random

import zarr
from zarr.storage import WrapperStore

from fvlm_data.errors import StoreError

log = logging.getLogger(__name__)


def transient_kind(error: BaseException) -> str | None:
    """The kind of a transient object-store failure ("HTTP 503 SlowDown", "ConnectionResetError", ...), worth
    retrying; None for one that is not (a missing object, refused access, no credentials)."""
    seen = error
    while seen is not None:
        response = getattr(seen, "response", None)  # botocore's ClientError, under fsspec's OSError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code", "")
            if (status or 0) >= 500 or code in THROTTLING_CODES:
                return f"HTTP {status}" if code in ("", str(status)) else f"HTTP {status} {code}"
            return None
        name = type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError, asyncio.TimeoutError)) or name in TRANSIENT_ERRORS:
            return name
        seen = seen.__cause__ or seen.__context__
    return None


THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
                    "TooManyRequests", "TooManyRequestsException", "ServiceUnavailable", "InternalError"}
# Client library errors (botocore, aiohttp, urllib3, fsspec) of a connection or a response cut short.
TRANSIENT_ERRORS = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "IncompleteRead",
                    "ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "ClientConnectionError",
                    "FSTimeoutError", "ResponseParserError"}
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


class RetryingStore(WrapperStore):
    """A zarr store whose every request is retried on transient failures: `ATTEMPTS` tries in all, waiting
    a jittered BACKOFF_S x 2^k (at most MAX_BACKOFF_S) between them: 36-72 s of waiting before giving up.

    The first failure of each kind is logged (once per process); a failure that persists, or one that is
    not transient, is a one-line StoreError naming the store and the object.
    """

    ATTEMPTS = 10
    BACKOFF_S = 0.25
    MAX_BACKOFF_S = 20.0
    logged: set[str] = set()  # kinds already logged by this process

    def __init__(self, store: zarr.abc.store.Store, url: str) -> None:
        super().__init__(store)
        self.url = url

    def _with_store(self, store: zarr.abc.store.Store) -> RetryingStore:
        return type(self)(store, self.url)

    @property
    def fs(self):  # the wrapped FsspecStore's filesystem and path, for code that needs them directly
        return self._store.fs

    @property
    def path(self) -> str:
        return self._store.path

    async def _retry(self, op: str, key: str, call):
        for attempt in range(self.ATTEMPTS):
            try:
                return await call()
            except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
                raise  # a missing (or, for a conditional PUT, an existing) object is an answer, not a failure
            except Exception as e:
                kind = transient_kind(e)
                if type(e).__name__ in CREDENTIAL_ERRORS:
                    raise StoreError(f"cannot {op} {self.url}/{key}: no credentials for the object store: set "
                                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; and "
                                     "AWS_ENDPOINT_URL for a server other than AWS)") from None
                if kind is None:
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise StoreError(f"cannot {op} {self.url}/{key}: {reason}") from None
                if attempt == self.ATTEMPTS - 1:
                    raise StoreError(f"{op} {self.url}/{key} failed {self.ATTEMPTS} times ({kind}): the object "
                                     "store keeps failing; run the same command again once it answers (what is "
                                     "finished is kept)") from None
                if kind not in self.logged:
                    self.logged.add(kind)
                    log.warning("%s: %s on %s %s; retrying with backoff (further failures of this kind are "
                                "retried without a word)", self.url, kind, op, key)
                delay = min(self.MAX_BACKOFF_S, self.BACKOFF_S * 2**attempt)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def get(self, key, prototype, byte_range=None):
        return await self._retry("GET", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return await self._retry("GET", key_ranges[0][0] if key_ranges else "",
                                 lambda: self._store.get_partial_values(prototype, key_ranges))

    async def getsize(self, key: str) -> int:
        return await self._retry("HEAD", key, lambda: self._store.getsize(key))

    async def exists(self, key: str) -> bool:
        return await self._retry("HEAD", key, lambda: self._store.exists(key))

    async def set(self, key, value) -> None:
        return await self._retry("PUT", key, lambda: self._store.set(key, value))

    async def delete(self, key: str) -> None:
        return await self._retry("DELETE", key, lambda: self._store.delete(key))

    async def _listed(self, method: str, prefix: str) -> list[str]:
        async def names() -> list[str]:
            return [n async for n in getattr(self._store, method)(*([prefix] if method != "list" else []))]

        return await self._retry("LIST", prefix, names)

    async def list(self):
        for name in await self._listed("list", ""):
            yield name

    async def list_prefix(self, prefix: str):
        for name in await self._listed("list_prefix", prefix):
            yield name

    async def list_dir(self, prefix: str):
        for name in await self._listed("list_dir", prefix):
            yield name


# The client libraries' own retries off: RetryingStore is the one policy (else attempts multiply, 5 x 5 x ...).
S3_OPTIONS = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}

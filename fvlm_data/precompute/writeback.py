"""Encoded batches leave the device in their stored dtypes and are written by a thread of their own.

The main thread of a precompute only feeds the encoders: it converts each batch's features on the
device to the dtypes the store keeps (float16, or int8 with a float16 scale per token: half or a
quarter of float32's device-to-host bytes), starts their copy into pinned host buffers on a side
stream without waiting for it (CUDA), and hands the batch to the `BackgroundWriter`, whose thread
waits for the copy, adds the rows to their shard buffers and publishes finished shards.

Memory bound: at most `WRITE_QUEUE` jobs (a batch of encoded features or a failed input) wait for
the writer, one is being written, and one is being encoded, so at most `WRITE_QUEUE + 2` batches of
features (and of their decoded frames) are alive; the writer buffers the shards in progress (one,
two where a batch spans a shard's end) and at most `PUBLISH_QUEUE + 1` finished shards wait for or
are being written by the publisher. A failed write stops the writer; its exception is raised on the main thread
at the next hand-over (or at `close`), so precompute ends with the same one line as before.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fvlm_data.store.format import SCALE_SUFFIX, table_entry

WRITE_QUEUE = 2  # jobs waiting for the writer thread (the memory bound above)
PUBLISH_QUEUE = 1  # finished shards waiting for the publisher thread
_POLL_S = 0.1  # how often a blocked hand-over checks whether the writer failed


@torch.inference_mode()
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fvlm_data.store.format.quantize_int8` on a tensor (any device), giving the same bytes:
    symmetric int8 with one float16 scale per token (last axis), a scale floor of float16's tiny."""
    x = x.float()
    # A tensor divisor, not the number: CUDA turns division by a CPU scalar into a multiplication by its
    # reciprocal, which can differ from numpy's division in the last bit.
    scale = (x.abs().amax(dim=-1) / torch.tensor(127.0, device=x.device)).clamp_min(torch.finfo(torch.float16).tiny)
    scale = scale.half()
    q = torch.round(x / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


@torch.inference_mode()
def stored_features(encoded: dict[str, torch.Tensor], feature_dtype: str) -> dict[str, torch.Tensor]:
    """The arrays rows store, converted on the device to their dtypes in the store's table
    (`fvlm_data.store.format.FRAME_TABLE`): e.g. `dino` float16 (or int8 and `dino_scale` float16 with
    `feature_dtype="int8"`), `latents` float16."""
    out = {}
    for name, x in encoded.items():
        feature = table_entry(name)
        if feature is None:
            raise ValueError(f"the encoders returned {name!r}, which the store's table does not declare")
        if feature.quantizable and feature_dtype == "int8":
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(x)
        else:
            out[name] = x.to(getattr(torch, feature.dtype))
    return out


class HostCopy:
    """One batch's features on their way to the host; `arrays()` waits for the copy."""

    def __init__(self, arrays: dict[str, torch.Tensor], event: Any = None, release: Callable[[], None] | None = None):
        self._arrays, self._event, self._release = arrays, event, release

    def arrays(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {name: t.numpy() for name, t in self._arrays.items()}

    def release(self) -> None:
        """The host buffers may be reused (their contents were copied into the shard buffers)."""
        if self._release is not None:
            self._release()


class DeviceTransfers:
    """Host <-> device copies that do not block the main thread.

    On CUDA, frames go up from a pinned buffer and features come down into pinned buffers on a
    side stream (the encoders go on with the next batch meanwhile); a buffer returns to the pool
    once the writer has copied it out (no more than `WRITE_QUEUE + 2` are ever in use). On the
    CPU there is nothing to copy: the tensors are the arrays.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # pinned buffer sets no one uses
        self._frames: list = []  # (pinned uint8 buffer, event of its last upload), reused in turn
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def frames_to_device(self, frames: list[np.ndarray]) -> torch.Tensor:
        """The batch's uint8 frames [B, H, W, 3], concatenated, on the device."""
        if not self.cuda:
            return torch.from_numpy(np.concatenate(frames))
        n = sum(len(f) for f in frames)
        shape = (n, *frames[0].shape[1:])
        if len(self._frames) == 2 and tuple(self._frames[0][0].shape) == shape:
            buf, event = self._frames.pop(0)
            event.synchronize()  # its upload two batches ago is done before it is overwritten
        else:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        np.concatenate(frames, out=buf.numpy())
        on_device = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._frames = [*self._frames, (buf, event)][-2:]
        return on_device

    def to_host(self, arrays: dict[str, torch.Tensor]) -> HostCopy:
        """Start copying `arrays` (device tensors) to the host; returns at once."""
        if not self.cuda:
            return HostCopy(arrays)
        shapes = {name: (t.shape, t.dtype) for name, t in arrays.items()}
        try:
            host = self._free.get_nowait()
            if {name: (t.shape, t.dtype) for name, t in host.items()} != shapes:
                host = None  # the last, smaller batch: buffers of its own
        except queue.Empty:
            host = None
        if host is None:
            host = {name: torch.empty(s, dtype=d, pin_memory=True) for name, (s, d) in shapes.items()}
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after the encoders wrote them
        with torch.cuda.stream(stream):
            for name, t in arrays.items():
                host[name].copy_(t, non_blocking=True)
                t.record_stream(stream)  # not reused by the encode stream before the copy is done
            event = torch.cuda.Event()
            event.record(stream)
        return HostCopy(host, event, release=lambda: self._free.put(host))


class BackgroundWriter:
    """Runs jobs (store writes) on one thread, in the order given, at most `WRITE_QUEUE` waiting.

    The first job that raises stops the writer (later jobs are dropped) and its exception is
    re-raised on the caller's thread by the next `submit` or by `close`. `busy_s`: the thread's time
    in jobs; `waited_s`: the callers' time blocked in `submit` (stages.py)."""

    def __init__(self, max_waiting: int = WRITE_QUEUE, name: str = "store-writer") -> None:
        self.busy_s = self.waited_s = 0.0
        self._jobs: queue.Queue = queue.Queue(max_waiting)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is not None or self._abort:
                continue
            t0 = time.perf_counter()
            try:
                job()
            except BaseException as e:  # re-raised on the main thread
                self._error = e
            finally:
                self.busy_s += time.perf_counter() - t0

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Queue `fn(*args)`; blocks while `max_waiting` jobs wait (the memory bound)."""
        t0 = time.perf_counter()
        try:
            while True:
                self._check()
                try:
                    self._jobs.put(lambda: fn(*args), timeout=_POLL_S)
                    return
                except queue.Full:
                    continue
        finally:
            self.waited_s += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for every queued job; raise the first failure."""
        self.submit(lambda: None)  # raises a failure that happened while queueing
        while True:
            try:
                self._jobs.put(None, timeout=_POLL_S)
                break
            except queue.Full:
                self._check()
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        """On the way out of a failed or stopped run: drop the queued jobs, let the one running
        finish, and end the thread (unpublished shards are redone by the next run, as after a kill)."""
        self._abort = True
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        self._thread.join(timeout=60)

"""Decode worker processes that never outlive the run that started them.

A `ProcessPoolExecutor` worker blocks on its task queue forever once its parent is gone (the
queue's other end stays open in its siblings), so a precompute stopped by SIGTERM or `kill -9`
used to leave its workers running for as long as anyone let them. Here every worker:

- asks Linux to SIGKILL it when its parent dies (`prctl(PR_SET_PDEATHSIG)`),
- polls its parent pid once a second (portable fallback, and the case prctl misses: a parent
  that died before the worker got to set it up),
- ignores SIGINT from its start, so Ctrl-C in a terminal stops the parent, which then stops its
  workers (and no worker prints a KeyboardInterrupt traceback).

`stop_decode_workers` ends the pool on every way out of a run (normal end, error, Ctrl-C,
SIGTERM turned into `Stopped` by `stop_on_sigterm`). This module imports no torch, and workers
do not re-run the main script, so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib.machinery
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from fvlm_data.errors import InputError
from fvlm_data.precompute.stages import StageTimes
from fvlm_data.records import DecodedVideo, Decoding, VideoInput
from fvlm_data.sources import load_file_frames, load_frames
from fvlm_data.video.segments import file_key

PARENT_POLL_S = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Stopped(BaseException):
    """The run was asked to stop (SIGTERM). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up mistakes it for a failure to handle."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_sigterm() -> None:
    """Turn SIGTERM into `Stopped` in the main thread, so `finally` blocks stop the workers."""

    def handler(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, handler)


def decode_one(item: VideoInput, decoding: Decoding) -> DecodedVideo | str:
    """Decode one input in a worker; a bad input comes back as its one-line reason, never raises."""
    try:
        return load_frames(item, decoding.num_frames, decoding.image_size, decoding.min_duration,
                           decoding.max_duration, seek=decoding.seek)
    except InputError as e:
        return str(e)
    except Exception as e:  # a decoder crash on one odd file must not end a long run
        return _unexpected(e)


def decode_group(items: list[VideoInput], decoding: Decoding) -> list[DecodedVideo | str]:
    """`decode_one` for several inputs of one file (segments): one open, one pass over the file."""
    if len(items) == 1:
        return [decode_one(items[0], decoding)]
    try:
        results = load_file_frames(items, decoding)
    except Exception as e:
        return [_unexpected(e)] * len(items)
    return [str(r) if isinstance(r, InputError) else r for r in results]


def timed_decode_group(items: list[VideoInput], decoding: Decoding) -> tuple[list[DecodedVideo | str], float]:
    """`decode_group` and its wall time in the worker (how busy the decode workers were: stages.py)."""
    t0 = time.perf_counter()
    results = decode_group(items, decoding)
    return results, time.perf_counter() - t0


def _unexpected(e: Exception) -> str:
    return f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def file_groups(items: list[tuple[int, VideoInput]], window: int) -> list[list[int]]:
    """Positions in `items` decoded together: those of one file within `window` positions of the
    group's first (a manifest that lists a file's segments together always shares one open), in
    order of their first position. The window bounds the decoded frames held back for later slots."""
    groups: list[list[int]] = []
    latest: dict[Any, int] = {}  # file -> its latest group
    for pos, (_, item) in enumerate(items):
        key = file_key(item)
        g = latest.get(key)
        if key is None or g is None or pos - groups[g][0] >= window:
            latest[key] = len(groups)
            groups.append([pos])
        else:
            groups[g].append(pos)
    return groups


def decoded_in_order(executor: Executor, items: list[tuple[int, VideoInput]], window: int, decoding: Decoding,
                     stages: StageTimes | None = None) -> Iterator[tuple[int, VideoInput, DecodedVideo | str]]:
    """Keep about `window` inputs in flight and yield (slot, input, frames or reason) in input order;
    the inputs of one file among them go to one worker together (`decode_group`). The workers' decode
    time is added to `stages.decode_s`."""
    groups = collections.deque(file_groups(items, window))
    result_of: dict[int, tuple[Future, int]] = {}  # position -> (its group's future, index in the group)
    for pos, (slot, item) in enumerate(items):
        while groups and groups[0][0] < pos + window:
            group = groups.popleft()
            fut = executor.submit(timed_decode_group, [items[p][1] for p in group], decoding)
            result_of.update((p, (fut, k)) for k, p in enumerate(group))
        fut, k = result_of.pop(pos)
        results, seconds = fut.result()
        if stages is not None and k == 0:  # once per group (its first input comes first)
            stages.decode_s += seconds
        yield slot, item, results[k]


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: die with the parent, leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked since birth (see _inherited_by_new_workers)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class InlineExecutor(Executor):
    """Runs tasks in the calling process (workers=0): for debugging and tiny runs."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


@contextlib.contextmanager
def _inherited_by_new_workers() -> Iterator[None]:
    """What a spawn worker inherits from this thread while `submit` starts it (ProcessPoolExecutor
    starts workers on demand, in the submitting thread):

    - SIGINT blocked, so that Ctrl-C cannot interrupt a worker still importing, before its
      initializer ignores it. Blocked rather than ignored: a Ctrl-C in this window stays pending
      here and is delivered when the block ends.
    - The main module named "__main__", which spawn does not re-run in the worker. Otherwise every
      worker re-runs the main script, for precompute.py importing torch and transformers: 535 MB
      per worker instead of 47 MB and seconds more to start (bench/decode_workers.py); the workers
      need nothing from it.
    """
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    can_mask = hasattr(signal, "pthread_sigmask")
    if can_mask:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        main.__spec__ = spec
        if can_mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _DecodePool(ProcessPoolExecutor):
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        with _inherited_by_new_workers():
            return super().submit(fn, *args, **kwargs)


def decode_executor(workers: int) -> Executor:
    """`workers` spawn processes that exit with this one, or the calling process itself for 0."""
    if workers == 0:
        return InlineExecutor()
    # spawn, not fork: the parent holds torch's thread pools, which fork does not copy safely.
    return _DecodePool(workers, mp_context=multiprocessing.get_context("spawn"),
                       initializer=_exit_with_parent, initargs=(os.getpid(),))


def stop_decode_workers(executor: Executor, grace_s: float = 1.0) -> None:
    """Cancel queued decodes, let idle workers exit, kill any still busy after `grace_s`."""
    processes = list((getattr(executor, "_processes", None) or {}).values())  # gone after shutdown
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    executor.shutdown(wait=True)  # joins the pool's manager thread, so nothing is left behind

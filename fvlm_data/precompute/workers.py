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

A worker killed from outside (the kernel's OOM killer) breaks the whole `ProcessPoolExecutor`. The run
goes on: each worker notes in shared memory which task it runs, so the inputs the dead worker held are
recorded as failed (`KILLED`, which `--retry-failed` redoes), a new pool takes over, and every other
input in flight is decoded again there (`DecodeWorkers.restart`, `decoded_in_order`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib.machinery
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fvlm_data.errors import InputError
from fvlm_data.precompute.stages import StageTimes
from fvlm_data.records import DecodedVideo, Decoding, VideoInput
from fvlm_data.sources import load_file_frames, load_frames
from fvlm_data.video.segments import file_key

PARENT_POLL_S = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
KILLED = "decoder process was killed (out of memory?)"  # the failure of the inputs a SIGKILLed worker held
_RESTARTS_WITHOUT_CULPRIT = 3  # then every input in flight is recorded as failed: the run always advances


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
    the inputs of one file among them go to one worker together (`decode_group`). A killed worker's
    inputs come back as its reason, the others in flight are decoded again by a new pool. The workers'
    decode time is added to `stages.decode_s`."""
    groups = collections.deque(file_groups(items, window))
    result_of: dict[int, tuple[Future, int]] = {}  # position -> (its group's future, index in the group)
    in_flight: dict[Future, list[int]] = {}  # each future's group of positions, until its last is yielded

    def submit(group: list[int]) -> None:
        fut = executor.submit(timed_decode_group, [items[p][1] for p in group], decoding)
        in_flight[fut] = group
        result_of.update((p, (fut, k)) for k, p in enumerate(group))

    for pos, (slot, item) in enumerate(items):
        while True:
            try:
                while groups and groups[0][0] < pos + window:
                    submit(groups[0])
                    groups.popleft()
                fut, k = result_of[pos]
                results, seconds = fut.result()
                break
            except BrokenProcessPool:  # a worker died: its inputs fail, a new pool decodes the rest again
                lost = executor.restart(list(in_flight))  # type: ignore[attr-defined]  # only DecodeWorkers breaks
                again = []
                for broken, group in list(in_flight.items()):
                    if broken.cancelled() or broken.exception() is not None:  # none of its inputs was yielded
                        del in_flight[broken]
                        if broken in lost:
                            failed: Future = Future()
                            failed.set_result(([lost[broken]] * len(group), 0.0))
                            in_flight[failed] = group
                            result_of.update((p, (failed, k)) for k, p in enumerate(group))
                        else:
                            again.append(group)
                groups.extendleft(reversed(again))  # submitted first, to the new pool
        del result_of[pos]
        if in_flight[fut][-1] == pos:
            del in_flight[fut]
        if stages is not None and k == 0:  # once per group (its first input comes first)
            stages.decode_s += seconds
        yield slot, item, results[k]


_held: tuple[Any, int] | None = None  # in a worker: the pool's shared (pid, task) array and this worker's entry


def _start_worker(parent_pid: int, held: Any, claimed: Any) -> None:
    """Worker initializer: claim an entry of the pool's `held` array, then `_exit_with_parent`."""
    global _held
    with claimed.get_lock():
        entry = claimed.value
        claimed.value += 1
    held[2 * entry], held[2 * entry + 1] = os.getpid(), -1
    _held = (held, entry)
    _exit_with_parent(parent_pid)


def _run_task(task: int, fn: Callable, args: tuple) -> Any:
    """In a worker: `fn(*args)`, with `task` noted as held while it runs (what a killed worker held)."""
    held, entry = _held  # type: ignore[misc]
    held[2 * entry + 1] = task  # one aligned 8-byte store: no lock, so a kill cannot leave one taken
    try:
        return fn(*args)
    finally:
        held[2 * entry + 1] = -1


def _exit_with_parent(parent_pid: int) -> None:
    """Die with the parent, leave Ctrl-C to the parent."""
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


class DecodeWorkers(Executor):
    """`workers` spawn processes that exit with this one; after one was killed (the pool is broken),
    `restart` says which tasks it held and starts a new pool."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._tasks = itertools.count()
        self._task_of: weakref.WeakKeyDictionary[Future, int] = weakref.WeakKeyDictionary()
        self._restarts_without_culprit = 0
        self._start()

    def _start(self) -> None:
        # spawn, not fork: the parent holds torch's thread pools, which fork does not copy safely.
        ctx = multiprocessing.get_context("spawn")
        self._held = ctx.RawArray("q", [-1] * (2 * self.workers))  # per worker: its pid, the task it runs (-1: none)
        self.pool = _DecodePool(self.workers, mp_context=ctx, initializer=_start_worker,
                                initargs=(os.getpid(), self._held, ctx.Value("i", 0)))

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        task = next(self._tasks)
        fut = self.pool.submit(_run_task, task, functools.partial(fn, **kwargs) if kwargs else fn, args)
        self._task_of[fut] = task
        return fut

    def restart(self, futures: list[Future]) -> dict[Future, str]:
        """The pool broke (a worker died): those of `futures` that the dead worker held, each with why it
        died, and a new pool for the rest. When the pool broke it stopped its other workers with SIGTERM."""
        processes = {p.pid: p for p in (getattr(self.pool, "_processes", None) or {}).values()}
        self.pool.shutdown(wait=True)  # joins the broken pool's processes: their exit codes are known
        fut_of = {self._task_of.get(fut): fut for fut in futures}
        held = {self._held[2 * i]: self._held[2 * i + 1] for i in range(self.workers)}
        lost = {fut_of[task]: _died(processes[pid].exitcode) for pid, task in held.items()
                if task in fut_of and pid in processes and processes[pid].exitcode not in (None, -signal.SIGTERM)}
        if not lost:  # it died idle, or of a SIGTERM from outside: decode them all again, a few times at most
            self._restarts_without_culprit += 1
            if self._restarts_without_culprit >= _RESTARTS_WITHOUT_CULPRIT:
                lost = {fut: "decoder processes keep dying (killed from outside?)" for fut in futures}
        if lost:
            self._restarts_without_culprit = 0
        self._start()
        return lost

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _died(exitcode: int) -> str:
    """Why a worker's inputs failed, from its exit code (-N: killed by signal N)."""
    if exitcode == -signal.SIGKILL:
        return KILLED
    if exitcode < 0:
        return f"decoder process died of {signal.Signals(-exitcode).name}"
    return f"decoder process exited with code {exitcode}"


def decode_executor(workers: int) -> Executor:
    """`workers` spawn processes that exit with this one (`DecodeWorkers`), or the calling process itself for 0."""
    if workers == 0:
        return InlineExecutor()
    return DecodeWorkers(workers)


def stop_decode_workers(executor: Executor, grace_s: float = 1.0) -> None:
    """Cancel queued decodes, let idle workers exit, kill any still busy after `grace_s`."""
    if isinstance(executor, DecodeWorkers):
        executor = executor.pool
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

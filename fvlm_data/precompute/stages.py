"""What bounded a precompute run: how busy each stage was, and how long the main loop waited for the others.

A run is a pipeline of three stages: decode workers (processes) -> encoders (the main thread feeding
the device) -> the writer (a thread adding rows and publishing shards). The slowest one is busy all
the time and the others wait for it, so the busy shares of wall time name it:

- decode workers: the wall time of their decodes (measured in the worker), over workers x run time
  (with --workers 0 the main process decodes: over the run time);
- encoders: the main thread's time in the encoders (launching them and, on CUDA, waiting for them);
- writer: the writer thread's time in its jobs;
- waits: the main loop's time waiting for decoded videos and for room in the writer's queue.

Wall time, not CPU time: a stage descheduled on a busy machine is still the one the others wait for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")

BOUND_SHARE = 0.5  # a stage busy less than half the run bounds nothing (start-up, a short run)


@dataclass
class StageTimes:
    """Seconds each stage was busy, and the main loop's waits, over `wall_s` of one process's run."""

    workers: int  # decode worker processes (0: the main process decodes)
    wall_s: float = 0.0
    decode_s: float = 0.0  # summed over the workers
    encode_s: float = 0.0
    write_s: float = 0.0
    wait_decode_s: float = 0.0  # the main loop waiting for decoded videos
    wait_writer_s: float = 0.0  # the main loop waiting for room in the writer's queue
    processes: int = 1  # summaries merged over several processes (ranks)
    seek: str = "exact"  # the run's --seek (the advice for a decode-bound run depends on it)

    def shares(self) -> dict[str, float]:
        """Busy share of the wall time of each stage: 'decode', 'encoders', 'writer'."""
        wall = max(self.wall_s, 1e-9)
        return {"decode": self.decode_s / (max(self.workers, 1) * wall),
                "encoders": self.encode_s / wall, "writer": self.write_s / wall}

    def bound(self) -> str | None:
        """The stage that bounded the run: the busiest one, if it was busy at least half the time."""
        stage, share = max(self.shares().items(), key=lambda kv: kv[1])
        return stage if share >= BOUND_SHARE else None

    def advice(self) -> str:
        """One line: which stage bounded the run, with its figures and what to change."""
        s = self.shares()
        pct = {k: f"{100 * v:.0f}%" for k, v in s.items()}
        workers = "decoding (in this process)" if self.workers == 0 else "decode workers"
        bound = self.bound()
        if bound == "decode":
            more = "add --workers" + (f" (this machine has {os.cpu_count()} cores)" if self.workers else "")
            keyframe = " or use --seek keyframe" if self.seek == "exact" else ""
            return (f"{workers} busy {pct['decode']}, encoders {pct['encoders']}: decoding bounded this run; "
                    f"{more}{keyframe}")
        if bound == "writer":
            return (f"writer busy {pct['writer']}, encoders {pct['encoders']}: writing the store bounded this run; "
                    "put --out on a faster disk (or a store closer to this machine)")
        if bound == "encoders":
            return (f"encoders busy {pct['encoders']}, {workers} {pct['decode']}, writer {pct['writer']}: the "
                    "encoders bounded this run, as they should (a faster device, or --compile, speeds it up)")
        return (f"no stage was busy half the run ({workers} {pct['decode']}, encoders {pct['encoders']}, writer "
                f"{pct['writer']}): start-up, shard checks or the main loop's own work took the rest")

    def lines(self) -> list[str]:
        s = self.shares()
        wall = max(self.wall_s, 1e-9)
        ranks = f" (over {self.processes} processes)" if self.processes > 1 else ""
        workers = f"{self.workers} decode worker{'s' * (self.workers > 1)}" if self.workers else "decoding here"
        return [f"stages{ranks}: {workers} busy {100 * s['decode']:.0f}%, encoders {100 * s['encoders']:.0f}%, "
                f"writer {100 * s['writer']:.0f}% of {self.wall_s / self.processes:.1f} s; the main loop waited "
                f"{100 * self.wait_decode_s / wall:.0f}% for decoded videos, "
                f"{100 * self.wait_writer_s / wall:.0f}% for the writer",
                self.advice()]

    def postfix(self) -> str:
        """Short figures for the progress bar."""
        s = self.shares()
        return f"decode {100 * s['decode']:.0f}% enc {100 * s['encoders']:.0f}% write {100 * s['writer']:.0f}%"

    @classmethod
    def merge(cls, parts: Iterable[StageTimes]) -> StageTimes:
        """Several processes' times as one (shares averaged over the processes)."""
        parts = list(parts)
        total = cls(workers=parts[0].workers, processes=0, seek=parts[0].seek)
        for part in parts:
            for f in fields(cls):
                if f.name.endswith("_s") or f.name == "processes":
                    setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
        return total

    def waited_for(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, adding the time spent waiting for each to `wait_decode_s`."""
        it = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.wait_decode_s += time.perf_counter() - t0
            yield item

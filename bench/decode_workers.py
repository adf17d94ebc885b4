"""Decode worker start-up: seconds until a new pool's spawn workers return their first results,
and the resident memory of a worker, for two pools in alternating rounds:

- plain: `ProcessPoolExecutor` with the spawn context, as precompute used before. Spawn re-runs
  the parent's main script in every worker; this script imports what precompute.py imports
  (torch, the encoders), so its workers do too.
- fvlm: `fvlm_data.precompute.workers.decode_executor`, whose workers skip the main script and import only
  the decode code (and exit with their parent).

    python -m bench.decode_workers [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import fvlm_data.precompute.encoders  # noqa: F401  (what precompute.py imports: torch, transformers, diffusers)
import fvlm_data.precompute.pipeline  # noqa: F401
from fvlm_data.precompute.workers import decode_executor, stop_decode_workers


def plain_pool(workers: int) -> Executor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def rss_mb(pid: int) -> float:
    """Resident memory of a live process (Linux /proc; ru_maxrss would report the parent's peak,
    which a spawned child inherits at fork)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def one_round(make_pool, workers: int) -> tuple[float, float]:
    """(seconds until every worker's first result, median resident memory of the workers in MB)."""
    start = time.perf_counter()
    pool = make_pool(workers)
    try:
        # os.getpid is picklable by reference, so the plain pool's workers need nothing of this
        # script to run it: the difference is what each pool makes its workers import.
        pids = {f.result() for f in [pool.submit(os.getpid) for _ in range(workers)]}
        seconds = time.perf_counter() - start
        memory = statistics.median(rss_mb(pid) for pid in pids)
    finally:
        stop_decode_workers(pool)
    return seconds, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    pools = {"plain spawn ProcessPoolExecutor (re-runs the main script)": plain_pool,
             "fvlm_data.precompute.workers.decode_executor": decode_executor}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in pools}
    for _ in range(args.rounds):
        for name, make_pool in pools.items():  # alternate, so both see the same machine load
            results[name].append(one_round(make_pool, args.workers))
    print(f"### Decode worker start-up ({args.workers} workers, median of {args.rounds} rounds)\n")
    print("| pool | start to first results, s | resident memory per worker, MB |")
    print("|---|---|---|")
    medians = {}
    for name, rows in results.items():
        medians[name] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
        print(f"| {name} | {medians[name][0]:.2f} | {medians[name][1]:.0f} |")
    (plain_s, plain_mb), (ours_s, ours_mb) = medians.values()
    print(f"\nfvlm / plain: start {ours_s / plain_s:.2f}x, memory {ours_mb / plain_mb:.2f}x")


if __name__ == "__main__":
    main()

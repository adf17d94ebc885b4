"""precompute.py as processes: torchrun ranks, decode workers that die with their parent, a full disk.

Real processes throughout: torchrun (gloo, CPU) with two ranks, spawn decode workers found with
psutil, a real tmpfs too small for the store (where it can be mounted; else writes that fail
with ENOSPC past the same size).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from fvlm_data import FeatureStore
from fvlm_data.precompute.pipeline import PrecomputeSummary
from fvlm_data.precompute.workers import KILLED
from tests.helpers.in_process import invoke
from tests.helpers.small_disk import SmallDisk
from tests.helpers.videos import draw_counter, write_video

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--preset", "tiny", "--image-size", "64", "--num-frames", "8", "--quiet"]
PRECOMPUTE = [sys.executable, str(ROOT / "precompute.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def summary_lines(stdout: str, out: str) -> list[str]:
    """The summary between its "store: OUT" and size lines, for comparing runs (the size and the stages'
    timings after it differ from run to run)."""
    lines = stdout.splitlines()
    assert lines.count(f"store: {out}") == 1, stdout  # exactly one summary
    start = lines.index(f"store: {out}") + 1
    return lines[start : next(i for i in range(start, len(lines)) if lines[i].startswith("store size"))]


def assert_same_arrays(a: str | Path, b: str | Path) -> None:
    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    rows_a = {sa.read(i)["video_id"]: sa.read(i) for i in range(len(sa))}
    rows_b = {sb.read(i)["video_id"]: sb.read(i) for i in range(len(sb))}
    assert sorted(rows_a) == sorted(rows_b)
    for vid, row in rows_a.items():
        for key in ("dino", "latents", "timestamps"):
            np.testing.assert_array_equal(row[key], rows_b[vid][key], err_msg=f"{vid} {key}")
        assert row["caption"] == rows_b[vid]["caption"]
    assert sorted((f["video_id"], f["reason"]) for f in sa.failures) == \
        sorted((f["video_id"], f["reason"]) for f in sb.failures)


@pytest.fixture(scope="module")
def videos(video_folder, tmp_path_factory) -> Path:
    """Three real clips and two broken files, so that both ranks meet a failure."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(video_folder, root, dirs_exist_ok=True)
    (root / "empty.mp4").write_bytes(b"")
    (root / "empty.txt").write_text("nothing here")
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "noise.txt").write_text("random bytes")
    return root


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> tuple[Path, list[str]]:
    """One process, no decode workers: the store and summary every other way of running must match."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    proc = run([*PRECOMPUTE, "--out", str(out), "--videos", str(videos), "--workers", "0", *SMALL])
    lines = summary_lines(proc.stdout, str(out))
    assert lines[0] == "written 3 videos, skipped 0 already in the store, 2 failed"
    return out, lines


@pytest.fixture
def out_url(tmp_path) -> str:
    """Where the torchrun test writes its store (a local path here; add URLs of other stores here)."""
    return str(tmp_path / "torchrun.zarr")


def test_summaries_of_ranks_merge_into_one():
    a = PrecomputeSummary(written=3, already_done=1, failed=1, failure_reasons=Counter({"truncated": 1}),
                          store_bytes=500, transient=Counter({"missing file": 1}))
    b = PrecomputeSummary(written=2, failed=2, failure_reasons=Counter({"truncated": 1, "no caption": 1}),
                          store_bytes=700)
    total = PrecomputeSummary.merge([a, b, PrecomputeSummary()])  # a rank with nothing to do
    assert (total.written, total.already_done, total.failed) == (5, 1, 3)
    assert total.failure_reasons == Counter({"truncated": 2, "no caption": 1})
    assert total.store_bytes == 700  # the last rank to finish measured the whole store
    assert total.transient == Counter({"missing file": 1})


@pytest.mark.slow  # precompute.py in new processes (torchrun, signals, a full disk)
def test_torchrun_two_ranks_fill_one_store_like_one_process(videos, reference, out_url):
    # With one video per store shard, 'empty' (slot 2) is rank 0's and 'noise' (slot 3) rank 1's,
    # so the one summary must hold failures from both ranks.
    ref_store, ref_lines = reference
    proc = run([*TORCHRUN, str(ROOT / "precompute.py"), "--out", out_url, "--videos", str(videos),
                "--workers", "1", "--batch-videos", "2", "--shard-videos", "1", *SMALL])
    # One summary, printed by rank 0, with every rank's rows and failures.
    assert summary_lines(proc.stdout, out_url) == ref_lines
    assert proc.stdout.count("stages (over 2 processes): 1 decode worker busy ") == 1  # both ranks' timings
    assert "rank 0 of 2:" in proc.stderr and "rank 1 of 2:" in proc.stderr
    assert_same_arrays(ref_store, out_url)
    assert FeatureStore.open(out_url).attrs["precompute_args"]["num_shards"] == 2
    # The same command on two "machines" (two launchers meeting at a rendezvous) continues the store.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
                               str(ROOT / "precompute.py"), "--out", out_url, "--videos", str(videos), "--workers", "0",
                               *SMALL], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    printed = [o for o, _ in outs if f"store: {out_url}" in o]
    assert len(printed) == 1  # one summary, from the machine that has rank 0
    assert summary_lines(printed[0], out_url)[0] == "written 0 videos, skipped 5 already in the store, 0 failed"


@pytest.mark.slow  # precompute.py in new processes (torchrun, signals, a full disk)
def test_torchrun_refuses_contradicting_shard_flags(tmp_path):
    # The variables torchrun sets; the flags are checked before any process group or model.
    env = {**ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    cmd = [*PRECOMPUTE, "--out", str(tmp_path / "x.zarr"), "--synthetic", "2", "--num-shards", "2", "--shard-index=0"]
    proc = subprocess.run([*cmd, *SMALL], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--shard-index 0 contradicts torchrun's rank layout (rank 1 of 2)" in proc.stderr
    assert not (tmp_path / "x.zarr").exists()


# ---------------------------------------------------------------------------- decode workers


def start_with_workers(out: Path, stderr: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start a precompute with two decode workers and far more inputs than it gets through in the
    test; return it once its progress bar shows decoded videos, with every process it has started."""
    cmd = [*PRECOMPUTE, "--out", str(out), "--synthetic", "2000", "--workers", "2", "--batch-videos", "2",
           *[a for a in SMALL if a != "--quiet"]]
    # Its own session (so Ctrl-C can go to its process group) and the default SIGINT action.
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [int(n) for n in re.findall(r"(\d+)/2000 ", stderr.read_text())]
        if done and done[-1] >= 4:  # the workers have started and decoded
            kids = parent.children(recursive=True)
            workers = [k for k in kids if "spawn_main" in " ".join(k.cmdline())]
            assert len(workers) == 2
            # Workers do not re-run precompute.py, so they never load torch (~0.5 GB each).
            assert not [m.path for w in workers for m in w.memory_maps() if "libtorch" in m.path]
            return proc, kids
        assert proc.poll() is None, "precompute ended early:\n" + stderr.read_text()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no video was decoded within 120 s")


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited; only its parent, possibly pid 1, has yet to reap it)."""
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def wait_all_gone(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while still_running(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return still_running(procs)


STOPS = {"SIGTERM": signal.SIGTERM, "kill-9": signal.SIGKILL, "Ctrl-C": signal.SIGINT}


@pytest.mark.slow  # precompute.py in new processes (torchrun, signals, a full disk)
@pytest.mark.parametrize("how", list(STOPS))
def test_decode_workers_end_with_the_run(tmp_path, how):
    err = tmp_path / "stderr.txt"
    proc, descendants = start_with_workers(tmp_path / "s.zarr", err)
    if how == "Ctrl-C":  # a terminal sends it to the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, STOPS[how])
    try:
        code = proc.wait(timeout=60)
    finally:
        left = wait_all_gone(descendants, 60)
        for p in left:  # do not leave them to the next test
            p.kill()
    assert not left, f"left running 60 s after {how}: {[p.cmdline() for p in left]}"
    if how != "kill-9":  # a clean stop: one line, no traceback (none from the workers either)
        text = err.read_text()
        assert code == 128 + STOPS[how], text
        assert "Traceback" not in text
        assert text.strip().splitlines()[-1].startswith(f"stopped by {how}: "), text


def blocked_on_a_fifo(parent: psutil.Process) -> psutil.Process | None:
    """The process among `parent`'s descendants that waits in open() for a named pipe's writer (Linux's wchan)."""
    for p in parent.children(recursive=True):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p.pid}/wchan").read_text() == "wait_for_partner":
                return p
    return None


@pytest.mark.slow  # precompute.py in new processes (torchrun, signals, a full disk)
@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="finds the held worker by Linux's /proc/PID/wchan")
def test_a_decode_worker_killed_mid_run_fails_only_the_videos_it_held(tmp_path):
    """The OOM killer's SIGKILL, for real, on the worker held by a named pipe (nothing ever writes it) while its
    sibling decodes: the run goes on with a new pool, records the held input as killed (it used to end in a
    BrokenProcessPool traceback), and --retry-failed decodes it once a video is there."""
    for name in ("v0", "v1", "v2", "v3"):
        write_video(tmp_path / f"{name}.mp4", draw_counter(), 20)
    held = tmp_path / "held.mp4"
    os.mkfifo(held)
    rows = [{"path": f"{name}.mp4", "caption": name} for name in ("v0", "v1", "held", "v2", "v3")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "s.zarr"
    args = ["--out", str(out), "--videos", str(manifest), "--shard-videos", "2", "--batch-videos", "1",
            *[a for a in SMALL if a != "--quiet"]]
    proc = subprocess.Popen([*PRECOMPUTE, *args, "--workers", "2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a generous bound for a loaded machine, not a timing
        while (worker := blocked_on_a_fifo(psutil.Process(proc.pid))) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no worker opened the named pipe"
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "written 4 videos, skipped 0 already in the store, 1 failed" in stdout
    assert "  1 failure looks transient (1 killed decoder): the same command with --retry-failed" in stdout
    assert [(f["video_id"], f["reason"]) for f in FeatureStore.open(out).failures] == [("held", KILLED)]
    held.unlink()
    shutil.copy(tmp_path / "v0.mp4", held)
    rerun = invoke("precompute", [*args, "--workers", "0", "--retry-failed"])
    assert "written 1 videos, skipped 4 already in the store, 0 failed" in rerun.stdout, rerun.stdout + rerun.stderr
    store = FeatureStore.open(out)
    assert len(store) == 5 and store.failures == []


# ---------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "small", 256 * 1024, ENV)  # room for about two rows
    try:
        yield disk
    finally:
        disk.close()


@pytest.mark.slow  # precompute.py in new processes (torchrun, signals, a full disk)
def test_full_disk_ends_with_one_line_and_a_rerun_with_space_completes(videos, small_disk, tmp_path):
    # One video per store shard, so that some shards are published before the disk is full.
    args = ["--videos", str(videos), "--workers", "0", "--batch-videos", "1", "--shard-videos", "1", *SMALL]
    # The same command on a disk with room: on some CPUs a convolution's last float16 bit depends on the
    # encoder batch's size, so the rerun is compared with a run of the same batches.
    uninterrupted = tmp_path / "uninterrupted.zarr"
    run([*PRECOMPUTE, "--out", str(uninterrupted), *args])
    out = small_disk.folder / "s.zarr"
    cmd = [*PRECOMPUTE, "--out", str(out), *args]
    full = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=small_disk.env, timeout=300)
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: cannot write to the store {out}: No space left on device; it holds "), last
    store = FeatureStore.open(out)
    held, failed = len(store), len(store.failures)
    assert 0 < held < 3 and f"it holds {held} finished video{'' if held == 1 else 's'}, " in last, last
    small_disk.make_room()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=small_disk.env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"written {3 - held} videos, skipped {held + failed} already in the store" in rerun.stdout
    assert_same_arrays(uninterrupted, out)

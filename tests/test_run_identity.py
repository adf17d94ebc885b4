"""Runs are tied to their store (issue 18 pt 1) and bad input is one line (pt 7): real stores, real train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm_data.dataset import FeatureDataset
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.store import FeatureShapes, FeatureStore
from fvlm_data.store.writer import StoreWriter
from fvlm_train import TrainError
from fvlm_train.config import (
    RunConfig,
    check_store,
    check_store_identity,
    store_identity,
    store_location,
    store_provenance,
)
from fvlm_train.data import open_store
from tests.helpers.in_process import invoke
from tests.helpers.store_helpers import write_failure

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SHAPES = FeatureShapes(4, {"dino": (17, 384), "latents": (4, 7, 7)})
EXACT = "uniform over the whole duration (segment centres); short side resized, centre crop"
KEYFRAME = "keyframe nearest to each uniform target over the whole duration (segment centres)"


def make_store(path: Path, frame_sampling: str = EXACT, n: int = 12) -> Path:
    """A small real store of random features (what precompute --preset tiny --num-frames 4 --image-size 56 gives)."""
    attrs = dict(dino="tiny", vae="tiny", preset="tiny", num_frames=4, image_size=56, feature_dtype="float16",
                 dino_tokens=17, dino_dim=384, latent_shape=[4, 7, 7], frame_sampling=frame_sampling)
    store = StoreWriter.create_or_open(path, attrs, SHAPES, capacity=n, shard_videos=n)
    rng = np.random.default_rng(0)
    buf = store.shard_buffer(0)
    for i in range(n):
        buf.add_row(i, dino=rng.standard_normal((4, 17, 384)), latents=rng.standard_normal((4, 4, 7, 7)),
                    caption="a red circle moves left", video_id=f"clip{i:02d}", source=f"/v/clip{i:02d}.mp4",
                    timestamps=np.arange(4),
                    duration=4.0)
    buf.publish()
    return path


def train_args(store: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--preset", "tiny", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "1",
            "--num-frames", "4", "--workers", "0", "--val-fraction", "0.25", "--visual-videos", "0", *extra]


def train(cwd: Path, store: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *train_args(store, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)


def train_here(cwd: Path, store: Path, *extra: str) -> subprocess.CompletedProcess:
    """`train(...)` in this process (tests/helpers/in_process.py), for a command that stops before it trains: refused,
    or with nothing left to do."""
    return invoke("train", train_args(store, *extra), cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and text in lines[-1], proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """exact/clips.zarr and keyframe/clips.zarr (one file name, two stores), and other/clips.zarr (a third store
    with exact's settings)."""
    root = tmp_path_factory.mktemp("identity")
    make_store(root / "exact" / "clips.zarr")
    make_store(root / "keyframe" / "clips.zarr", KEYFRAME)
    make_store(root / "other" / "clips.zarr")
    return root


@pytest.mark.slow  # train.py / precompute.py in new processes
def test_two_stores_of_one_file_name_never_share_a_run_folder(stores):
    first = train(stores, Path("exact/clips.zarr"))
    assert first.returncode == 0, first.stderr[-2000:]
    second = train(stores, Path("keyframe/clips.zarr"), "--val-fraction", "0")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed" not in second.stderr and "nothing to do" not in second.stderr, second.stderr
    # An empty held-out split is said, not skipped silently.
    assert ("no held-out videos at --val-fraction 0.0 (of 12 in keyframe/clips.zarr): validation is skipped"
            in second.stderr)
    folders = sorted((stores / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("clips-") for f in folders)
    # The default folder is named before the first step, so that TensorBoard can be pointed at it.
    named = [f for f in folders if f"run folder (TensorBoard events, checkpoints): runs/{f.name}\n"
             in first.stderr.split("%|")[0]]
    assert len(named) == 1, first.stderr
    recorded = [json.loads((f / "run_config.json").read_text())["store"] for f in folders]
    assert {r["store_path"] for r in recorded} == {str((stores / d / "clips.zarr").resolve())
                                                   for d in ("exact", "keyframe")}
    assert len({r["store_id"] for r in recorded}) == 2 and {r["frame_sampling"] for r in recorded} == {EXACT,
                                                                                                       KEYFRAME}
    # The same command again resumes its own run.
    again = train_here(stores, Path("exact/clips.zarr"))
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr


def run_of(stores: Path, store: str) -> Path:
    for folder in (stores / "runs").iterdir():
        if json.loads((folder / "run_config.json").read_text())["store"]["store_path"].endswith(f"{store}/clips.zarr"):
            return folder / "checkpoint_latest.pt"
    raise AssertionError(f"no run of {store}")


@pytest.mark.slow  # train.py / precompute.py in new processes
def test_resuming_or_evaluating_on_another_store_is_refused(stores, tmp_path):
    if not (stores / "runs").exists():
        test_two_stores_of_one_file_name_never_share_a_run_folder(stores)
    ckpt = run_of(stores, "exact")
    # Another seek mode: its frame_sampling differs.
    line = one_line_error(train_here(stores, Path("keyframe/clips.zarr"), "--resume", str(ckpt), "--max-steps", "4",
                                  "--out", str(tmp_path / "a")), "frame_sampling: checkpoint's store")
    assert "keyframe nearest" in line
    # The same settings, another store: named both ways, --other-store lets it through.
    other = stores / "other" / "clips.zarr"
    line = one_line_error(train_here(stores, other, "--resume", str(ckpt), "--max-steps", "4", "--out",
                                  str(tmp_path / "b")), "the checkpoint was trained on another store")
    assert str((stores / "exact" / "clips.zarr").resolve()) in line and str(other.resolve()) in line
    assert "--other-store" in line
    line = one_line_error(train_here(stores, other, "--resume", str(ckpt), "--eval-only"), "trained on another store")
    allowed = train(stores, other, "--resume", str(ckpt), "--max-steps", "4", "--out", str(tmp_path / "b"),
                    "--other-store")
    assert allowed.returncode == 0 and "resumed from" in allowed.stderr, allowed.stderr[-2000:]
    saved = torch.load(tmp_path / "b" / "checkpoint_latest.pt", weights_only=True)["config"]["store"]
    assert saved["store_path"] == str(other.resolve())  # the run now records the store it continued on


@pytest.mark.slow  # train.py / precompute.py in new processes
def test_eval_json_into_a_missing_folder_and_an_unknown_device(stores, tmp_path):
    if not (stores / "runs").exists():
        test_two_stores_of_one_file_name_never_share_a_run_folder(stores)
    ckpt = run_of(stores, "exact")
    report = tmp_path / "new" / "folder" / "e.json"
    proc = train(stores, Path("exact/clips.zarr"), "--resume", str(ckpt), "--eval-only", "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(report.read_text())["checkpoint_step"] == 3
    one_line_error(train_here(stores, Path("exact/clips.zarr"), "--resume", str(ckpt), "--eval-only", "--json",
                           str(tmp_path)), "is a folder")
    one_line_error(train_here(stores, Path("exact/clips.zarr"), "--device", "tpu", "--out", str(tmp_path / "t")),
                   "--device tpu: not a device type torch knows")


def test_identity_is_the_store_id_else_the_resolved_location(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    (tmp_path / "link.zarr").symlink_to(store)
    attrs = FeatureStore.open(store).attrs
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ids = {store_identity(attrs, p) for p in (str(store), "s.zarr", "./s.zarr/", "link.zarr")}
    finally:
        os.chdir(cwd)
    assert ids == {attrs.get("store_id") or f"path:{store.resolve()}"}
    assert store_identity({"store_id": "0123abcd"}, "anywhere") == "0123abcd"
    assert store_location("s3://bucket/a/s.zarr/") == "s3://bucket/a/s.zarr"
    assert store_identity({}, "s3://bucket/a/s.zarr") == "path:s3://bucket/a/s.zarr"


def test_old_checkpoints_without_identity_or_frame_sampling_keep_loading(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    attrs = FeatureStore.open(store).attrs
    old = RunConfig(store={k: v for k, v in store_provenance(attrs).items() if k != "frame_sampling"})
    assert check_store(old, attrs, str(store)) == [] and check_store_identity(old, attrs, str(store)) == []
    new = RunConfig(store=store_provenance(attrs, str(store)))
    assert check_store(new, attrs, str(store)) == [] and check_store_identity(new, attrs, str(store)) == []
    moved = {**attrs, "frame_sampling": KEYFRAME}
    with pytest.raises(TrainError, match="frame_sampling: checkpoint's store"):
        check_store(new, moved, "k.zarr")
    assert len(check_store(new, moved, "k.zarr", allow_other=True)) == 1
    other = RunConfig(store={**new.store, "store_id": "feedbeef"})
    with pytest.raises(TrainError, match=r"trained on another store: .* \(store_id feedbeef\), not "):
        check_store_identity(other, attrs, str(store))
    assert check_store_identity(other, attrs, str(store), allow_other=True)[0].startswith("store_id: ")


def test_a_store_where_every_input_failed_points_to_inspect(tmp_path):
    attrs = dict(dino="tiny", vae="tiny", num_frames=4, image_size=56, feature_dtype="float16")
    failed = StoreWriter.create_or_open(tmp_path / "f.zarr", attrs, SHAPES, capacity=2, shard_videos=2)
    for slot in range(2):
        write_failure(failed, slot, video_id=f"v{slot}", source=f"/v/{slot}.mp4", reason="truncated")
    with pytest.raises(TrainError, match=r"no committed videos: every input failed: see `python -m fvlm_data.inspect "):
        open_store(str(tmp_path / "f.zarr"))
    StoreWriter.create_or_open(tmp_path / "e.zarr", attrs, SHAPES, capacity=2, shard_videos=2)
    with pytest.raises(TrainError, match="no committed videos: run precompute.py first"):
        open_store(str(tmp_path / "e.zarr"))


@pytest.mark.parametrize("fraction", [2, -1, float("nan")])
def test_val_fraction_out_of_range_is_refused(tmp_path, fraction):
    store = tmp_path / "s.zarr"
    if not store.exists():
        make_store(store)
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        FeatureDataset(store, num_frames=4, val_fraction=fraction)


def test_duration_range_is_checked():
    with pytest.raises(ValueError, match="--max-duration 4 is not above --min-duration 5"):
        PrecomputeConfig(out="x", min_duration=5, max_duration=4).check()
    with pytest.raises(ValueError, match="--min-duration must be at least 0"):
        PrecomputeConfig(out="x", min_duration=float("nan")).check()
    PrecomputeConfig(out="x", min_duration=5, max_duration=6).check()


def precompute(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "precompute.py"), "--out", str(tmp_path / "p.zarr"), "--synthetic", "2",
           "--workers", "0", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env or ENV, timeout=300)


@pytest.mark.slow  # train.py / precompute.py in new processes
def test_precompute_bad_options_are_one_line(tmp_path):
    one_line_error(precompute(tmp_path, "--preset", "tiny", "--device", "tpu"), "--device tpu: not a device type")
    args = ["--out", str(tmp_path / "p.zarr"), "--synthetic", "2", "--workers", "0", "--quiet", "--preset", "tiny"]
    one_line_error(invoke("precompute", [*args, "--min-duration", "5", "--max-duration", "4"]),
                   "--max-duration 4.0 is not above --min-duration 5.0")
    assert not (tmp_path / "p.zarr").exists()  # refused before anything was written


@pytest.mark.slow  # train.py / precompute.py in new processes
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_precompute_default_preset_offline_says_what_to_do_fast(tmp_path, offline):
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}  # an empty cache, whatever this machine has cached
    if offline == "no network":
        env.pop("HF_HUB_OFFLINE")
        env["HF_ENDPOINT"] = "https://127.0.0.1:1"  # nothing listens: like a machine without network
    line = one_line_error(precompute(tmp_path, env=env), "cannot load encoder 'facebook/dinov2-small'")
    assert "--preset tiny" in line and "--dino PATH" in line
    assert (offline == "HF_HUB_OFFLINE") == ("HF_HUB_OFFLINE is set" in line)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_precompute_default_preset_offline_probes_the_hub_at_most_once_and_loads_nothing(tmp_path, monkeypatch,
                                                                                       offline):
    """Why the line above comes at once (the hub client alone retries for ~35 s): with HF_HUB_OFFLINE set the hub
    is not probed, without it one probe (one TCP connection) that fails decides; no encoder is ever loaded."""
    from huggingface_hub import constants

    import precompute as cli

    probes = []
    monkeypatch.setattr(cli, "hub_reachable", lambda *a, **k: probes.append(1) or False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline == "HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(cli, "FrozenEncoders", lambda *a, **k: pytest.fail("an encoder was loaded"))
    args = ["--out", str(tmp_path / "p.zarr"), "--synthetic", "2", "--workers", "0", "--quiet"]
    line = one_line_error(invoke("precompute", args), "cannot load encoder 'facebook/dinov2-small'")
    assert (offline == "HF_HUB_OFFLINE") == ("HF_HUB_OFFLINE is set" in line)
    assert len(probes) == (0 if offline == "HF_HUB_OFFLINE" else 1)
    assert not (tmp_path / "p.zarr").exists()


def test_an_error_raised_in_a_dataloader_worker_is_printed_as_its_own_line():
    """PyTorch re-raises a worker's StoreError with the worker's traceback in its message; train.py prints the
    error's own line."""
    from torch._utils import ExceptionWrapper

    from fvlm_data.errors import StoreError
    from fvlm_train.config import one_line

    try:
        raise StoreError("GET s3://b/s.zarr/dino/c/0/0/0/0 failed 10 times (HTTP 503 SlowDown): ...")
    except StoreError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(StoreError) as e:
        wrapped.reraise()
    assert "\n" in str(e.value)
    assert one_line(e.value) == "GET s3://b/s.zarr/dino/c/0/0/0/0 failed 10 times (HTTP 503 SlowDown): ..."
    assert one_line(TrainError("a plain one")) == "a plain one"

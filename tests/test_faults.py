"""Remote stores through faults (issue 18 pt 6): the real test S3 server behind a proxy that fails a share of the
requests with 503 SlowDown and 500, resets connections (before and after the server handled them) and delays
answers. Precompute and training through it give what a healthy server gives; a failure that persists, or no
credentials, is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fvlm_data import FeatureStore
from fvlm_data.errors import StoreError
from fvlm_data.store.retries import RetryingStore
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.s3 import SMALL, remote_objects
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow  # the S3 server, the fault proxy, precompute.py / train.py in new processes

ROOT = Path(__file__).resolve().parents[1]

TRANSIENT_LINE = "retrying with backoff"


@pytest.fixture(scope="module")
def proxy(s3):
    with FaultProxy(s3["AWS_ENDPOINT_URL"], share=0.0, seed=1, delay_s=0.2) as p:
        yield p


def through(env: dict, proxy: FaultProxy) -> dict:
    return {**env, "AWS_ENDPOINT_URL": proxy.endpoint}


def run(env: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def logged_once_per_kind(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if TRANSIENT_LINE in line]
    kinds = [line.split(": ", 1)[1].split(" on ")[0] for line in lines]
    assert len(kinds) == len(set(kinds)), lines  # (one process: workers 0)
    return kinds


@pytest.fixture(scope="module")
def clean_store(s3, tmp_path_factory) -> str:
    url = "s3://fvlm/faults/clean.zarr"
    proc = run(s3, str(ROOT / "precompute.py"), "--out", url, *SMALL)
    assert proc.returncode == 0, proc.stderr
    return url


def test_precompute_through_faults_writes_the_arrays_of_a_clean_run(s3, proxy, clean_store):
    url = "s3://fvlm/faults/faulty.zarr"
    proxy.share = 0.25
    try:
        proc = run(through(s3, proxy), str(ROOT / "precompute.py"), "--out", url, *SMALL)
    finally:
        proxy.share = 0.0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written 6 videos" in proc.stdout
    assert min(proxy.counts[f] for f in ("503", "500", "reset", "reset_after", "delay")) > 0, proxy.counts
    kinds = logged_once_per_kind(proc.stderr)
    assert any("503" in k for k in kinds) and any("500" in k for k in kinds), proc.stderr
    assert remote_objects(url) == remote_objects(clean_store)


def test_training_with_workers_through_faults_has_the_losses_of_a_clean_server(s3, proxy, clean_store, tmp_path):
    def train(env: dict, out: str) -> dict[int, float]:
        proc = run(env, str(ROOT / "train.py"), "--store", clean_store, "--preset", "tiny", "--batch-size", "2",
                   "--grad-accum", "1", "--num-frames", "4", "--workers", "2", "--val-fraction", "0.34",
                   "--max-steps", "4", "--log-every", "1", "--val-every", "2", "--visual-videos", "0",
                   "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, scalars(tmp_path / out)

    _, clean = train(s3, "clean")
    proxy.share, before = 0.25, sum(proxy.counts.values())
    try:
        faulty_proc, faulty = train(through(s3, proxy), "faulty")
    finally:
        proxy.share = 0.0
    assert sum(proxy.counts.values()) - before > 5, proxy.counts  # the run did meet faults
    assert TRANSIENT_LINE in faulty_proc.stderr
    assert faulty["loss"] == clean["loss"] and faulty["val/loss"] == clean["val/loss"]
    assert len(clean["loss"]) == 4


def test_a_persisting_failure_is_one_line_naming_the_store_and_the_object(s3, proxy, clean_store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setattr(RetryingStore, "ATTEMPTS", 3)
    monkeypatch.setattr(RetryingStore, "BACKOFF_S", 0.01)
    store = FeatureStore.open(clean_store)
    assert len(store) == 6  # the committed rows are known: the read below asks for shard objects
    proxy.share, proxy.faults = 1.0, ("503",)
    try:
        with pytest.raises(StoreError) as e:
            store.read(0, frames=np.arange(2))
    finally:
        proxy.share, proxy.faults = 0.0, ("503", "500", "reset", "reset_after", "delay")
    message = str(e.value)
    assert "\n" not in message and f"{clean_store}/" in message and "failed 3 times (HTTP 503" in message
    key = message.split(f"{clean_store}/")[1].split(" ")[0]
    assert key.split("/c/")[0] in ("dino", "latents", "timestamps", "caption", "video_id", "source"), message
    np.testing.assert_array_equal(store.read(0, frames=np.arange(2))["dino"],  # healthy again: reads again
                                  FeatureStore.open(clean_store).read(0, frames=np.arange(2))["dino"])


def test_no_credentials_is_one_line_naming_the_variables(s3, clean_store, tmp_path):
    env = {k: v for k, v in s3.items() if not k.startswith("AWS_") or k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    proc = run(env, str(ROOT / "train.py"), "--store", clean_store, "--preset", "tiny", "--out", str(tmp_path / "r"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "no credentials" in last and "AWS_ACCESS_KEY_ID" in last, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

"""`python -m fvlm_data.inspect`: the right counts on real stores with failures and missing shards,
on disk and on the test S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fvlm_data import FeatureStore
from fvlm_data.inspect import inspect_store, main, render
from tests.helpers.small_stores import small_store

ROOT = Path(__file__).resolve().parents[1]
IDS = [f"video-{i:02d}" for i in range(22)]  # 6 shards of 4 slots (the last one 2)
FAILURES = {1: "too short: 1.0 s < 2 s", 6: "too short: 3.2 s < 4 s", 9: "no caption", 13: "too short: 0.5 s < 2 s",
            14: "truncated: frames end at 3.0 s of 9.0 s", 20: "no caption", 21: "not a video: no video stream"}
UNPUBLISHED = (2, 4)  # killed before these were published: slots 8-11 and 16-19


def expected_failures() -> dict[int, str]:
    return {slot: reason for slot, reason in FAILURES.items() if slot // 4 not in UNPUBLISHED}


def check_report(report: dict, url: str) -> None:
    failures = expected_failures()  # slots 1, 6, 13, 14, 20, 21
    assert report["store"] == url
    assert report["slots"] == {"total": 22, "committed": 22 - 8 - len(failures), "failed": len(failures),
                               "pending": 8}
    assert report["shards"]["total"] == 6 and report["shards"]["complete"] == 4
    assert report["shards"]["to_compute"] == [2, 4]
    groups = {g["reason"]: g for g in report["failures"]}
    assert {k: g["count"] for k, g in groups.items()} == {"too short": 3, "no caption": 1, "truncated": 1,
                                                          "not a video": 1}
    assert [g["reason"] for g in report["failures"]][0] == "too short"  # most frequent first
    assert [e["slot"] for e in groups["too short"]["examples"]] == [1, 6, 13]
    example = groups["truncated"]["examples"][0]
    assert example == {"slot": 14, "video_id": "video-14", "source": "/v/video-14.mp4", "reason": FAILURES[14]}
    assert report["captions_per_video"] == {"1": 22 - 8 - len(failures)}
    assert report["owed_by_shard_index"] == {"0": [], "1": [4], "2": [2]}  # process I owns I, I+K, ...
    assert report["made"]["dino"] == "tiny" and report["made"]["num_frames"] == 4
    assert report["made"]["features"]["dino"] == {"dtype": "float16", "shape": [4, 3, 8]}
    assert report["made"]["shard_videos"] == 4
    assert report["bytes_on_disk"] > 0
    assert len(FeatureStore.open(url)) == report["slots"]["committed"]  # the count the reader gives


@pytest.mark.slow  # python -m fvlm_data.inspect in a new process
def test_inspect_counts_a_local_store_with_failures_and_missing_shards(tmp_path):
    path = tmp_path / "s.zarr"
    small_store(path, IDS, failures=FAILURES, unpublished=UNPUBLISHED)
    check_report(inspect_store(str(path), num_shards=3), str(path))
    proc = subprocess.run([sys.executable, "-m", "fvlm_data.inspect", str(path), "--json", "--num-shards", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    check_report(json.loads(proc.stdout), str(path))
    text = render(inspect_store(str(path), num_shards=3))
    assert "slots       22: 8 committed, 6 failed, 8 pending" in text
    assert "4 complete, 2 a rerun would compute (2, 4)" in text
    assert "--shard-index 0 of 3 owes nothing" in text and "--shard-index 2 of 3 owes 1 shard: 2" in text
    assert "x3 too short" in text and "slot 14 video-14 (/v/video-14.mp4): truncated" in text


def test_inspect_verify_reports_a_damaged_shard_as_to_compute(tmp_path):
    path = tmp_path / "s.zarr"
    small_store(path, IDS, failures=FAILURES, unpublished=UNPUBLISHED)
    dino = path / "dino" / "c" / "3" / "0" / "0" / "0"
    dino.write_bytes(dino.read_bytes()[:-7])  # the shard index is cut: a rerun recomputes shard 3
    assert inspect_store(str(path))["shards"]["to_compute"] == [2, 4]  # without --verify: objects' ends unread
    report = inspect_store(str(path), verify=True)
    assert report["shards"]["to_compute"] == [2, 3, 4] and list(report["shards"]["damaged"]) == ["3"]
    assert report["slots"]["pending"] == 12  # its slots are to do again


@pytest.mark.slow  # the S3 server
def test_inspect_counts_a_store_on_s3(s3, capsys):
    url = "s3://fvlm/inspect/s.zarr"
    small_store(url, IDS, failures=FAILURES, unpublished=UNPUBLISHED)
    check_report(inspect_store(url, num_shards=3), url)
    assert main([url, "--num-shards", "3", "--json"]) == 0
    check_report(json.loads(capsys.readouterr().out), url)


def test_inspect_of_no_store_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.zarr")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no store at {tmp_path / 'missing.zarr'}"


@pytest.mark.parametrize("shards", [1, 2])
def test_inspect_of_a_complete_store_owes_nothing(tmp_path, shards):
    path = tmp_path / "s.zarr"
    small_store(path, IDS[:8])
    report = inspect_store(str(path), num_shards=shards)
    assert report["slots"] == {"total": 8, "committed": 8, "failed": 0, "pending": 0}
    assert report["shards"]["to_compute"] == [] and report["failures"] == []
    assert all(owed == [] for owed in report["owed_by_shard_index"].values())

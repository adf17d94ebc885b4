"""The bench/ scripts run end to end at their smallest settings and print their tables.

They run as separate processes, `python -m bench.X` (they pin themselves to one core and set
torch's thread count), all at once to stay within a few seconds; the figures they print are not checked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the bench scripts in new processes

REPO = Path(__file__).resolve().parents[1]

LITDATA = importlib.util.find_spec("litdata") is not None  # optional: `pip install litdata` adds its row

RUNS = {
    "reads": (["data_path", "--videos", "2", "--rounds", "1", "--samples", "2", "--batch-size", "2"],
              ["### Warm page cache", "### Page-cache cold", "| seed .pt", "| fvlm store float16: FeatureDataset[i]",
               "| fvlm store float16: FeatureDataset.__getitems__ of 2", "| fvlm store int8",
               "seed 0.0%, ", "target ours_batch: ", ">= 6x seed: "]
              + (["| LitData: StreamingDataset[i]", ">= 2x LitData: "] if LITDATA else [])),
    "dataloader": (["data_path", "--dataloader", "--videos", "2", "--rounds", "1", "--seconds", "0.1",
                    "--warmup", "1", "--workers", "1", "--batch-size", "2"],
                   ["### DataLoader", "| fvlm store float16 (FeatureDataset.__getitems__ + CaptionCollator) | 1 |",
                    "| seed .pt", "projection"]),
    "layouts": (["store_layouts", "--videos", "2", "--rounds", "1", "--samples", "2", "--sources", "synthetic"],
                ["### Features: synthetic", "| a. ours: raw", "| b. same raw chunks",
                 "| c. zstd-3, one chunk per video; zarr `arr[slot]`", "| d. one shard per video"]),
    "decode workers": (["decode_workers", "--rounds", "1", "--workers", "1"],
                       ["### Decode worker start-up", "| plain spawn ProcessPoolExecutor", "fvlm / plain: start "]),
    "pipeline": (["precompute_speed", "--part", "pipeline", "--pipeline-videos", "16", "--rounds", "1", "--gpu-ms", "5",
                  "--dino-tokens", "17", "--frames-per-video", "4"],
                 ["| today | 1 |", "| writer thread | 1 |", "main thread outside the encoders per batch: CPU "]),
    "int8": (["int8_quality", "--no-train", "--sources", "random-normal,synthetic", "--videos", "1"],
             ["### int8 reconstruction error", "| random-normal", "| synthetic", "int8 + fp16 scale per token"]),
}


def test_bench_scripts_print_their_tables(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, (argv, _) in RUNS.items():
        writes_files = argv[0] not in ("int8_quality", "decode_workers")
        workdir = ["--workdir", str(tmp_path / name)] if writes_files else []
        procs[name] = subprocess.Popen([sys.executable, "-m", f"bench.{argv[0]}", *argv[1:], *workdir],
                                       cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    outputs = {name: proc.communicate(timeout=120)[0] for name, proc in procs.items()}
    for name, (_, expected) in RUNS.items():
        out = outputs[name]
        assert procs[name].returncode == 0, f"{name}:\n{out[-3000:]}"
        for text in expected:
            assert text in out, f"{name}: {text!r} not in output:\n{out[-3000:]}"

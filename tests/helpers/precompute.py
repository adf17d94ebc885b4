"""precompute.py in a new process, offline, with the small settings its tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a hub lookup fails at once instead of retrying
SMALL = ["--preset", "tiny", "--image-size", "56", "--num-frames", "6", "--shard-videos", "3", "--quiet"]


def precompute(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "precompute.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=OFFLINE_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"precompute failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc

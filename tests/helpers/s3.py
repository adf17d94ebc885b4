"""A real S3-compatible server (moto in server mode) on 127.0.0.1 for the remote-store tests, and what they
compare: the shard objects of a store on it and of a local one. conftest.py's `s3` fixture starts one per module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# An encoder batch is one whole shard (--batch-videos = --shard-videos), so every way of splitting the work
# encodes the same batches: CPU convolutions can differ in the last bit with the batch's composition.
SMALL = ["--synthetic", "6", "--preset", "tiny", "--image-size", "56", "--num-frames", "6", "--shard-videos", "2",
         "--batch-videos", "2", "--workers", "0", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(log_dir: Path) -> Iterator[dict[str, str]]:
    """Start moto's S3 server, point the standard AWS variables at it, make a bucket `fvlm`; yield the
    environment for child processes; stop it after."""
    port = free_port()
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("fvlm")
        yield {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server.terminate()
    server.wait(timeout=30)
    log.close()


def remote_objects(url: str) -> dict[str, bytes]:
    """Every array's shard objects in a remote store, keyed by their path in it."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://")
    keys = [k for k in fs.find(root) if "/c/" in k]
    return {k[len(root) + 1 :]: fs.cat_file(k) for k in keys}


def local_objects(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in path.glob("*/c/**/*") if f.is_file()}

"""What both command lines and the trainer need to know of the environment: how torchrun launched
this process, whether the model hub can be reached, whether a path is a URL. Imports nothing heavy
(no torch), so it costs a CLI nothing to ask first."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_launch(env: Mapping[str, str] = os.environ) -> Launch | None:
    """The rank layout when started by torchrun (or any launcher that sets its variables), else None."""
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        return None
    world = int(env["WORLD_SIZE"])
    return Launch(rank=int(env["RANK"]), world_size=world, local_rank=int(env["LOCAL_RANK"]),
                  local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))


def is_remote(path: str | os.PathLike) -> bool:
    """A URL of an fsspec protocol (s3://, gs://, ...), not a local path (file:// is local)."""
    return "://" in str(path) and not str(path).startswith("file://")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the model hub can be reached, so a run offline fails in one line at once instead of
    after the hub client's retries (~35-45 s): one TCP connection to the hub's host (HF_ENDPOINT,
    default huggingface.co) on port 443."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with that pid runs (the owner of a temp file, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True

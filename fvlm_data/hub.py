"""Whether the model hub can be reached: one TCP connection, so a run offline fails in one line at
once instead of after the hub client's retries (~35-45 s). Both CLIs use it; it imports nothing heavy."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub's host (HF_ENDPOINT, default huggingface.co) on port 443."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False

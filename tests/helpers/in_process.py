"""train.py's and precompute.py's command lines run in the test's own process (click's CliRunner).

For errors raised before any work starts this is the code path of the real command (the same click
command, the same one-line error and exit status) without a new interpreter's ~5 s of imports. The tests
that need the real process (an exit code seen by the shell, environment read at import, kill -9) keep it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def invoke(script: str, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `script`'s (train / precompute) click command with `args`, in `cwd` if given; the result as
    subprocess.run gives it (returncode, stdout, stderr)."""
    from click.testing import CliRunner

    main = __import__(script).main
    # Left as found: the working folder, and the SIGTERM handler precompute.py installs for its workers.
    before, on_sigterm = os.getcwd(), signal.getsignal(signal.SIGTERM)
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        os.chdir(before)
        signal.signal(signal.SIGTERM, on_sigterm)
    return subprocess.CompletedProcess([script, *args], result.exit_code, result.stdout, result.stderr)

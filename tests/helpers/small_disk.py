"""A folder on a disk that fills up: a real small tmpfs where one can be mounted (root), else a folder
whose writes fail with ENOSPC past the same number of bytes (tests/full_disk/sitecustomize.py, for the
processes started with `env`)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class SmallDisk:
    """`folder` with room for `size` bytes, for processes started with `env` (a real tmpfs needs none)."""

    def __init__(self, folder: Path, size: int, env: dict[str, str]) -> None:
        self.folder, self.size, self.base_env = folder, size, env
        folder.mkdir()
        self.tmpfs = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode == 0
        self.env = env if self.tmpfs else self._filling(size)

    def _filling(self, size: int) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT / "tests" / "full_disk"), str(ROOT),
                                           self.base_env.get("PYTHONPATH")) if p)
        return {**self.base_env, "PYTHONPATH": path, "FVLM_TEST_DISK_DIR": str(self.folder),
                "FVLM_TEST_DISK_BYTES": str(size)}

    def fill(self, rewritten: list[Path]) -> None:
        """No room left, except for rewriting the files `rewritten` with contents of their present size."""
        if not self.tmpfs:
            self.env = self._filling(sum(p.stat().st_size for p in rewritten))
            return
        try:
            with open(self.folder / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e

    def make_room(self) -> None:
        if self.tmpfs:
            (self.folder / "filler").unlink(missing_ok=True)
            subprocess.run(["mount", "-o", f"remount,size={32 * self.size}", str(self.folder)], check=True)
        else:
            self.env = self.base_env

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)

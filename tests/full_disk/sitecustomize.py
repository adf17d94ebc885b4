"""A disk that fills up, for tests run where no small filesystem can be mounted (not root).

Put this folder on PYTHONPATH and set FVLM_TEST_DISK_DIR and FVLM_TEST_DISK_BYTES: files opened
for writing under that folder (by `open`, `io.open` or `pathlib`, as zarr's stores do) raise
ENOSPC once this process has written that many bytes there, as a full disk does.
"""

import builtins
import errno
import io
import os

_DIR = os.environ.get("FVLM_TEST_DISK_DIR")


class _FillingFile:
    left = int(os.environ.get("FVLM_TEST_DISK_BYTES", "0"))

    def __init__(self, f):
        self._f = f

    def write(self, data):
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if n > _FillingFile.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FillingFile.left -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


if _DIR:
    _open = io.open

    def _open_filling(file, mode="r", *args, **kwargs):
        f = _open(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax+")
        if writes and isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(_DIR):
            return _FillingFile(f)
        return f

    io.open = builtins.open = _open_filling

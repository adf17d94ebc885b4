"""A kill -9 at an exact metadata write, for tests of a grow killed part-way.

Put this folder on PYTHONPATH and set FVLM_TEST_KILL_AT_METADATA_WRITE=N: this process sends itself SIGKILL
instead of making its N-th write (0-based) of a `zarr.json` object through the store's object layer, local
or remote. A precompute run on an existing store writes metadata only when it grows the store.
"""

import os
import signal

_AT = os.environ.get("FVLM_TEST_KILL_AT_METADATA_WRITE")

if _AT is not None:
    from fvlm_data.store import objects

    _written = [0]

    def _dying(put):
        def put_or_die(self, key, data):
            if key.endswith("zarr.json"):
                if _written[0] == int(_AT):
                    os.kill(os.getpid(), signal.SIGKILL)
                _written[0] += 1
            return put(self, key, data)

        return put_or_die

    objects.LocalObjects.put = _dying(objects.LocalObjects.put)
    objects.RemoteObjects.put = _dying(objects.RemoteObjects.put)

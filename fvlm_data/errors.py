"""The errors fvlm_data raises for the user: each message is one line, and says what to do.

This module imports nothing, so every layer (video, sources, store, precompute) can raise them
without importing another.
"""


class InputError(Exception):
    """A bad input video; ``str(e)`` is a short one-line reason, recorded in the store."""


class StoreError(Exception):
    """A store that cannot be used as asked; the message is one line for the user."""


class EncoderLoadError(Exception):
    """An encoder id that cannot be loaded; one line for the user."""

"""fvlm_data: videos -> frozen encoders -> a Zarr feature store -> a lazy Dataset.

Imports are lazy so that decode worker processes (which only need `sources`) start without torch.
"""

from typing import Any

__all__ = ["FeatureStore", "StoreError", "FeatureDataset", "CaptionCollator"]


def __getattr__(name: str) -> Any:
    if name in ("FeatureStore", "StoreError"):
        from fvlm_data import store

        return getattr(store, name)
    if name in ("FeatureDataset", "CaptionCollator"):
        from fvlm_data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'fvlm_data' has no attribute {name!r}")

"""The trainer's parts, one job per module; `train.py` is the loop that composes them.

config (the run configuration and its checks), checkpoint (the saved record), distributed,
optim (parameter groups, schedule), data (the store and its splits, sampler, loaders), step (the
one training step), progress (the training log), evaluation (validation and --eval-only),
visuals (TensorBoard attention maps and captions), build (model + LM loading).
"""


class TrainError(Exception):
    """A problem the user can fix; printed as one line."""

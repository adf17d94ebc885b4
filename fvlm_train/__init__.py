"""The trainer's parts, one job per module; `train.py` is the loop that composes them.

config (the run configuration, its checks, what the command line settles first), checkpoint (the
model a configuration describes, the saved record), data (the store and its splits, sampler,
loaders), step (optimizer, schedule, the one training step, compiled), progress (the training
log), evaluation (validation, --eval-only, TensorBoard attention maps and captions), distributed.
"""


class TrainError(Exception):
    """A problem the user can fix; printed as one line."""

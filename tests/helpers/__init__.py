"""What several test modules share: video and clip writers, small stores, the moto S3 server, the tiny model's
batches, in-process command lines. Test modules import from here (or use conftest.py's fixtures by name), never
from one another; nothing here imports pytest's conftest, bench/ or experiments/."""

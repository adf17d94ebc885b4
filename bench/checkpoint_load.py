"""What verifying a checkpoint's bytes costs on load: `Checkpoint.load` (zip CRC-32 check, then
`torch.load(weights_only=True)`, then the field checks) against `torch.load` alone.

    python -m bench.checkpoint_load                   # SmolLM2-135M's size: 135M parameters + AdamW's two moments

Writes one checkpoint of `--params` float32 parameters in 64 tensors with AdamW-shaped state through
`Checkpoint.save`, then loads it alternately both ways, `--rounds` times each (page cache warm after
the first read), and prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import work_folder
from fvlm_train.checkpoint import Checkpoint, damage, rng_state
from fvlm_train.config import RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=135e6, help="float32 parameters of the model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="keep the checkpoint here (else a temp folder)")
    args = parser.parse_args()
    n = int(args.params) // 64
    model = {f"layer{i}.weight": torch.randn(n) for i in range(64)}
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)} for i in range(64)}
    optimizer = {"state": state, "param_groups": [{"params": list(range(64)), "lr": 1e-4}]}
    with work_folder(args.workdir, "fvlm_ckpt_") as root:
        path = Checkpoint(RunConfig(), model, optimizer, 1, 0, 0, 0, rng_state(torch.device("cpu"))).save(root, 1)
        size = path.stat().st_size
        times: dict[str, list[float]] = {"torch.load alone": [], "Checkpoint.load": [], "of which the CRC check": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            torch.load(path, map_location="cpu", weights_only=True)
            times["torch.load alone"].append(time.perf_counter() - start)
            start = time.perf_counter()
            Checkpoint.load(path)
            times["Checkpoint.load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert damage(path) is None
            times["of which the CRC check"].append(time.perf_counter() - start)
    print(f"### Loading a checkpoint of {size / 1e9:.2f} GB (median of {args.rounds})\n")
    print("| load | seconds | GB/s |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {size / 1e9 / median:.2f} |")


if __name__ == "__main__":
    main()

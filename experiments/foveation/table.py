"""One markdown table of the foveation rows under a folder (written by experiments/foveation/joint.sh).

    python -m experiments.foveation.table OUT_DIR

Per row folder: run/run_config.json (next-frame head, lambda_caption, lambda_recon, fine passes, training
seed, query depth), eval.json
(train.py --eval-only), log.txt (demo.sh's output: the attention shares of
experiments/foveation/attention.py and the wall time). Rows are sorted by task, head, lambda_caption
(descending), lambda_recon, passes, query depth, seed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def attention_shares(log: str) -> dict[str, tuple[float, float]]:
    """Pass name -> shares of its attention on the target object (the mover / the cued shape) and
    on the other objects (experiments/foveation/attention.py's first two columns)."""
    shares: dict[str, tuple[float, float]] = {}
    for m in re.finditer(r"^(coarse|fine_\d+)\s+([0-9.]+)\s+([0-9.]+)(?:\s+[0-9.]+)*$", log, re.M):
        shares.setdefault(m[1], (float(m[2]), float(m[3])))  # the first table; per-frame rows follow it
    return shares


def ci(values: list[float], digits: int = 3) -> str:
    return f"[{values[0]:.{digits}f}, {values[1]:.{digits}f}]"


def row(folder: Path) -> tuple[tuple, str]:
    """(sort key, markdown row) of one finished row folder."""
    task = re.match(r"(.+)_lambda", folder.name)[1]
    run = json.loads((folder / "run" / "run_config.json").read_text())  # what the row really ran
    lam, passes, seed = run["lambda_recon"], run["fine_iterations"], run["seed"]
    head, lcap = run.get("recon_head", "film"), run.get("lambda_caption", 1.0)  # runs before them: the defaults
    depth = run.get("query_depth", 0)
    ev = json.loads((folder / "eval.json").read_text())
    log = (folder / "log.txt").read_text()
    shares = attention_shares(log)
    last_fine = max((k for k in shares if k.startswith("fine")), default=None)
    attention = " | ".join(f"{shares['coarse'][i]:.3f} / {shares[last_fine][i]:.3f}" if last_fine else "-"
                           for i in (0, 1))
    # Four digits: rec_ratio's intervals are a few 1e-4 wide.
    rec = f"{ev['rec_ratio']:.4f}" + (f" {ci(ev['rec_ratio_ci'], 4)}" if "rec_ratio_ci" in ev else "")
    wall = re.search(r"wall time: (.*)$", log, re.M)
    control = [re.search(rf"on the cued object, {label}: (\S+ \[\S+ \S+\])", log)
               for label in (r"frame 2 \([^)]*\)", r"frames 3\+ minus frame 2")]
    control = " / ".join(c[1] if c else "-" for c in control)
    return (task, head, -lcap, lam, passes, depth, seed), (
        f"| `{task}` | {head} | {lcap:g} | {lam:g} | {passes} | {depth} | {seed} "
        f"| {ev['cap_ratio']:.3f} {ci(ev['cap_ratio_ci'])} "
        f"| {ev['shuffled_ratio']:.3f} {ci(ev['shuffled_ratio_ci'])} | {rec} | {attention} "
        f"| {control} | {wall.group(1) if wall else '-'} |")


def main(out_dir: str) -> None:
    print("| task | next-frame head | lambda_caption | lambda_recon | fine passes | query depth | seed "
          "| cap_ratio [95% CI] "
          "| shuffled_ratio [95% CI] | rec_ratio [95% CI] | attention on target: coarse / last fine "
          "| on the other objects: coarse / last fine "
          "| last fine - coarse on target: frame 2 / frames 3+ minus frame 2 | wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    finished = [f for f in Path(out_dir).glob("*_lambda*_passes*")
                if (f / "eval.json").exists() and (f / "log.txt").exists()]
    for _, line in sorted(map(row, finished)):
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="demo_joint", help="joint.sh's OUT_DIR (default demo_joint)")
    main(parser.parse_args().out_dir)

"""One markdown table of the foveation rows under a folder (written by bench/foveation_joint.sh).

    python bench/foveation_table.py OUT_DIR

Per row folder: eval.json (train.py --eval-only), log.txt (foveation_demo.sh's output: the
attention shares of bench/foveation_attention.py and the wall time).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def attention_shares(log: str) -> dict[str, float]:
    """Pass name -> share of its attention on the target object (the mover / the cued shape)."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^(coarse|fine_\d+)\s+([0-9.]+)\s+[0-9.]+$", log, re.M)}


def ci(values: list[float]) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]"


def main(out_dir: str) -> None:
    print("| task | lambda_recon | fine passes | cap_ratio [95% CI] | shuffled_ratio [95% CI] | rec_ratio "
          "| attention on target: coarse / last fine | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in sorted(Path(out_dir).glob("*_lambda*_passes*")):
        if not (folder / "eval.json").exists() or not (folder / "log.txt").exists():
            continue
        task, lam, passes = re.match(r"(.+)_lambda(.+)_passes(\d+)$", folder.name).groups()
        ev = json.loads((folder / "eval.json").read_text())
        log = (folder / "log.txt").read_text()
        shares = attention_shares(log)
        last_fine = max((k for k in shares if k.startswith("fine")), default=None)
        attention = f"{shares['coarse']:.3f} / {shares[last_fine]:.3f}" if last_fine else "-"
        rec = ev["rec_coarse"] / ev["rec_fine"] if ev.get("rec_fine") else float("nan")
        wall = re.search(r"wall time: (.*)$", log, re.M)
        print(f"| `{task}` | {lam} | {passes} | {ev['cap_ratio']:.3f} {ci(ev['cap_ratio_ci'])} "
              f"| {ev['shuffled_ratio']:.3f} {ci(ev['shuffled_ratio_ci'])} | {rec:.3f} | {attention} "
              f"| {wall.group(1) if wall else '-'} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_joint")

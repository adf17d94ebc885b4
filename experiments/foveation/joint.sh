#!/usr/bin/env bash
# Does next-frame reconstruction (the joint loss) make the fine queries follow what moves?
# Each row is experiments/foveation/demo.sh (precompute -> train -> held-out evaluation -> attention share)
# with its own task, lambda_recon and fine passes; rows of one task share one store, and every row
# uses the same videos and training seed (0, or the row's fourth field). Prints one markdown table at the end
# (experiments/foveation/table.py) and keeps each row's eval.json, log and attention picture.
#
#   bash experiments/foveation/joint.sh [OUT_DIR] [TASK:LAMBDA_RECON:FINE_ITERATIONS[:SEED[:HEAD[:LAMBDA_CAPTION]]] ...]
#
# HEAD is train.py's --recon-head (default film, the seed's), LAMBDA_CAPTION its --lambda-caption (default 1;
# 0 trains reconstruction alone), e.g. `foveation_nocue:0.1:1:0:delta` or `foveation_nocue:1.0:1:2:film:0`.
# Default rows: the moving-object task without a cue (foveation_nocue) with caption loss only, and
# joint with lambda_recon 0.1 and 1.0 (one fine pass each). Give rows to run others, e.g.
# `foveation_nocue:1.0:2` (two fine passes), `foveation:1.0:1` (the cue task, joint) or
# `foveation_nocue:0.1:1:1` (training seed 1; the videos stay the same).
# A row takes ~6 (caption only), ~11 (joint) or ~20 (joint, two fine passes) minutes on 2 quiet CPU
# cores, plus ~4 minutes for a task's store the first time; a finished row is not re-run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # for python -m experiments.foveation.X
OUT_DIR=${1:-demo_joint}
shift || true
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(foveation_nocue:0:1 foveation_nocue:0.1:1 foveation_nocue:1.0:1)

mkdir -p "$OUT_DIR"
for row in "${ROWS[@]}"; do
  IFS=: read -r task lambda passes seed head caption <<< "$row"
  seed=${seed:-0} head=${head:-film} caption=${caption:-1}
  dir=$OUT_DIR/${task}_lambda${lambda}_passes${passes}
  [ "$seed" = 0 ] || dir=${dir}_seed${seed}
  [ "$head" = film ] || dir=${dir}_head${head}
  [ "$caption" = 1 ] || dir=${dir}_caption${caption}
  if [ -f "$dir/eval.json" ] && [ -f "$dir/log.txt" ]; then
    echo "== $row: done before, kept ($dir)" >&2
    continue
  fi
  mkdir -p "$dir"
  echo "== $row -> $dir ($(date +%H:%M:%S))" >&2
  FOVEATION_TASK=$task FOVEATION_STORE=$OUT_DIR/$task.zarr FOVEATION_LAMBDA_RECON=$lambda \
    FOVEATION_FINE_ITERATIONS=$passes FOVEATION_SEED=$seed FOVEATION_RECON_HEAD=$head \
    FOVEATION_LAMBDA_CAPTION=$caption bash "$ROOT/experiments/foveation/demo.sh" "$dir" > "$dir/log.tmp" 2>&1
  mv "$dir/log.tmp" "$dir/log.txt"
done
"${PYTHON:-python}" -m experiments.foveation.table "$OUT_DIR"

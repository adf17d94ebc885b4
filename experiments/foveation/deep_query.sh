#!/usr/bin/env bash
# Does the deep query (train.py --query-depth) make foveation work? The README's recipe (experiments/foveation/
# demo.sh: caption loss, one fine pass, 1500 steps) on a tiny DINO of 6 random blocks (tiny:6; the preset's has 2),
# query depth 0 (one attention over the final tokens) against 6 (every block), on the cue task and on
# foveation_nocue, training seeds 0, 1, 2: 12 rows. Both depths of a task share one store (--dino-layers 6), so
# the rows differ only in the query. First the reference's diagnostic on each store
# (experiments/foveation/query_diagnostic.py), then one markdown table (experiments/foveation/table.py).
# The rule that decides the README's recommendation is written in experiments/foveation/RESULTS.md.
#
#   bash experiments/foveation/deep_query.sh [OUT_DIR] [TASK:DEPTH:SEED ...]   # default OUT_DIR: demo_deep_query
#
# A finished row is not re-run. Time: a depth-0 row is demo.sh's (~6 min on 2 quiet CPU cores); a depth-6 row
# adds the 6 blocks' keys and values of every sample (6 x 3.1 GFLOP per 16-frame 325-token sample at real
# shapes, bench/deep_query.py), which a GPU does in milliseconds and 2 CPU cores do not.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${1:-demo_deep_query}
shift || true
ROWS=("$@")
if [ ${#ROWS[@]} -eq 0 ]; then
  for task in foveation foveation_nocue; do for seed in 0 1 2; do for depth in 0 6; do
    ROWS+=("$task:$depth:$seed"); done; done; done
fi

mkdir -p "$OUT_DIR"
for task in $(printf '%s\n' "${ROWS[@]}" | cut -d: -f1 | sort -u); do
  store=$OUT_DIR/$task.zarr
  "${PYTHON:-python}" "$ROOT/precompute.py" --out "$store" --preset tiny --dino tiny:6 --dino-layers 6 \
    --synthetic "${FOVEATION_VIDEOS:-3000}" --synthetic-task "$task" --image-size 112 --num-frames 8 --workers 0 \
    --batch-videos 16 --quiet
  "${PYTHON:-python}" -m experiments.foveation.query_diagnostic --store "$store" --videos 256 \
    | tee "$OUT_DIR/$task.diagnostic.txt"
done
for row in "${ROWS[@]}"; do
  IFS=: read -r task depth seed <<< "$row"
  dir=$OUT_DIR/${task}_lambda0_passes1_seed${seed}_depth${depth}
  if [ -f "$dir/eval.json" ] && [ -f "$dir/log.txt" ]; then
    echo "== $row: done before, kept ($dir)" >&2
    continue
  fi
  mkdir -p "$dir"
  echo "== $row -> $dir ($(date +%H:%M:%S))" >&2
  FOVEATION_TASK=$task FOVEATION_STORE=$OUT_DIR/$task.zarr FOVEATION_SEED=$seed FOVEATION_DINO=tiny:6 \
    FOVEATION_DINO_LAYERS=6 FOVEATION_QUERY_DEPTH=$depth bash "$ROOT/experiments/foveation/demo.sh" "$dir" \
    > "$dir/log.tmp" 2>&1
  mv "$dir/log.tmp" "$dir/log.txt"
done
"${PYTHON:-python}" -m experiments.foveation.table "$OUT_DIR"

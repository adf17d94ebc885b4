#!/usr/bin/env bash
# Does foveation help? The `foveation` synthetic task end to end with the offline tiny preset:
# precompute -> train (caption loss only) -> evaluate on the held-out split, printing the
# evaluation JSON last (cap_ratio = cap_coarse / cap_fine with its bootstrap 95% interval).
#
#   bash bench/foveation_demo.sh [OUT_DIR]                # default OUT_DIR: demo_foveation/
#   FOVEATION_TASK=foveation_late bash bench/foveation_demo.sh demo_foveation_late   # the control
#
# About 9 minutes on 2 quiet CPU cores (precompute ~3 min, training ~5.5 min, evaluation
# ~15 s); no GPU, no network. Re-running continues: precompute skips written videos, training
# resumes from OUT_DIR/run (or does nothing once at the last step), evaluation runs again.
#
# Read the result with its control. On `foveation` the fine pass's edge can come from its
# first-frame query q_init alone (a second learned static query the coarse pass does not have),
# not from information about earlier frames. `foveation_late` is the same clips with an empty
# first frame, which takes that edge away: only a gain that survives there is foveation.
# FOVEATION_VIDEOS / FOVEATION_STEPS override the recipe's size (e.g. for a quick smoke run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-demo_foveation}
TASK=${FOVEATION_TASK:-foveation}
VIDEOS=${FOVEATION_VIDEOS:-3000}
STEPS=${FOVEATION_STEPS:-1500}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

mkdir -p "$OUT_DIR"
STORE=$OUT_DIR/store.zarr
RUN=$OUT_DIR/run
EVAL=$OUT_DIR/eval.json
# Settings that must agree between training and evaluation (the split, the frames, the model).
COMMON=(--store "$STORE" --preset tiny --num-frames 8 --fine-iterations 1 --lambda-recon 0
        --val-fraction 0.1 --batch-size 32 --workers 0)

stage() { echo "== $1 ($(date +%H:%M:%S))" >&2; }
timings=()
t0=$SECONDS

stage "precompute: $VIDEOS $TASK videos, 8 frames at 112 px, tiny encoders"
t=$SECONDS
"$PY" "$ROOT/precompute.py" --out "$STORE" --preset tiny --synthetic "$VIDEOS" --synthetic-task "$TASK" \
  --image-size 112 --num-frames 8 --workers 0 --batch-videos 16 --quiet
timings+=("precompute $((SECONDS - t)) s")

stage "train: $STEPS steps, batch 32, lr 1e-3, one fine pass, caption loss only"
t=$SECONDS
"$PY" "$ROOT/train.py" "${COMMON[@]}" --out "$RUN" --max-steps "$STEPS" --lr 1e-3 --warmup 50 \
  --grad-accum 1 --val-every 250 --save-every "$STEPS" --log-every 50
timings+=("train $((SECONDS - t)) s")

stage "evaluate the last checkpoint on the held-out videos"
t=$SECONDS
"$PY" "$ROOT/train.py" "${COMMON[@]}" --resume "$RUN/checkpoint_latest.pt" --eval-only --json "$EVAL"
timings+=("evaluate $((SECONDS - t)) s")

echo "wall time: ${timings[*]}; total $((SECONDS - t0)) s" >&2
cat "$EVAL"

#!/usr/bin/env bash
# All GPU measurements of the performance issue in one run (< 5 minutes on one H100/H200), one table last.
#
#   bash bench/gpu.sh [OUT_DIR]                 # default OUT_DIR: $OUT if set, else /tmp/fvlm_bench
#   FVLM_BENCH_BUDGET_S=600 bash bench/gpu.sh   # more time: nothing is skipped for lack of it
#   FVLM_BENCH_SMOKE=1 bash bench/gpu.sh        # tiny shapes on the CPU: checks the script itself
#
# Needs torch, transformers and diffusers (the project's dependencies); installs nothing, downloads
# nothing (every model is random-initialised from its config). Stages, most important first, each under `timeout` within the overall budget;
# every benchmark writes its JSON after each row, so a stage cut short keeps what it measured:
#   1. training step, batch 32 (the issue's reference: 83 samples/s, 16.8 GB): eager, compiled + CUDA graphs
#   1b. the training loop (train.py, synthetic store of real shapes): samples/s, validation's share of wall time
#   2. frozen encoders (reference: 14.4 videos/s; VAE ~550 frames/s, DINO ~12,000): DINOv2-small and
#      SD-VAE eager/compiled, NCHW/channels-last, and FrozenEncoders.encode end to end
#   3. precompute end to end (goal: 60 videos/s): synthetic videos, decode workers, the real-size encoders
#      compiled, the writer thread (bench/precompute_e2e.py)
#   4. training step, batch 64 (reference: 153 samples/s): eager, compiled + CUDA graphs
#   5. training step, batch 32, compiled without CUDA graphs (if time is left)
# Decoding is CPU work: measure it with `python -m bench.precompute_speed --part decode` on a CPU machine.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/fvlm_bench}}
mkdir -p "$OUT_DIR"
BUDGET=${FVLM_BENCH_BUDGET_S:-280}
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fvlm_inductor_cache}
PY=${PYTHON:-python}

if [[ -n "${FVLM_BENCH_SMOKE:-}" ]]; then
  DEV=(--device cpu)
  TRAIN=(--lm tiny --frames 4 --tokens 17 --dim 32 --caption-tokens 8 --steps 2 --warmup 1)
  ENC=(--frames-per-batch 1 --image-size 28 --iters 1 --warmup 1)
  B32=2; B64=4
  E2E=(--tiny --videos 8 --workers 1 --num-frames 4 --image-size 56 --batch-videos 4)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu.sh: no CUDA device visible to torch (use FVLM_BENCH_SMOKE=1 to test the script on a CPU)"; exit 1; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  DEV=()
  TRAIN=(--steps 20 --warmup 3)
  ENC=(--iters 5 --warmup 2)
  B32=32; B64=64
  E2E=(--videos 256)
fi
"$PY" -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| diffusers', 'yes' if u.find_spec('diffusers') else 'MISSING (pip install diffusers)')"

left() { echo $(( BUDGET - (SECONDS - START) )); }
# stage NAME MAX_SECONDS CMD...: run under the smaller of MAX_SECONDS and the budget left; log to OUT_DIR.
stage() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if (( remaining < 25 )); then
    echo "== $name: skipped, ${remaining}s of the ${BUDGET}s budget left" | tee "$OUT_DIR/$name.skipped"
    return
  fi
  (( limit > remaining )) && limit=$remaining
  echo "== $name (at most ${limit}s; $(( SECONDS - START ))s elapsed)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log" | grep -v -e '^W[0-9]' -e 'cpp_extension'
  local rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && echo "== $name: stopped at its ${limit}s limit (rows measured so far are kept)"
  (( rc != 0 )) && echo "$rc" > "$OUT_DIR/$name.rc"
  return 0
}

stage train_b32 140 "$PY" -m bench.train_step "${DEV[@]}" "${TRAIN[@]}" --batch-size "$B32" \
  --variants eager,compiled-cg --json "$OUT_DIR/train_b32.json"
# The whole loop: train.py on a synthetic store of real shapes (random SmolLM2-shaped LM saved to a folder),
# with and without its validations: samples/s and validation's share of the wall time.
if [[ -n "${FVLM_BENCH_SMOKE:-}" ]]; then
  LOOP=(--videos 64 --max-steps 4 --val-every 2)
else
  "$PY" - "$OUT_DIR/lm" <<'EOF_LM' || echo "gpu.sh: could not save the random LM"
import sys
from transformers import LlamaForCausalLM
from fvlm_model.lm import build_tokenizer_tiny, smollm2_135m_config
LlamaForCausalLM(smollm2_135m_config()).save_pretrained(sys.argv[1])
build_tokenizer_tiny().save_pretrained(sys.argv[1])
EOF_LM
  LOOP=(--real-shapes --videos 1024 --max-steps 300 --val-every 100 -- --lm "$OUT_DIR/lm" --val-fraction 0.25)
fi
stage loop 150 "$PY" -m bench.val_share --workdir "$OUT_DIR/loop" "${LOOP[@]}"
stage encoders 75 "$PY" -m bench.precompute_speed --part encoders "${DEV[@]}" "${ENC[@]}" \
  --variants dino-eager,dino-compiled,vae-eager-nchw,vae-eager-cl,vae-compiled-cl,pipeline-eager,pipeline-compiled \
  --json "$OUT_DIR/encoders.json"
stage precompute_e2e 120 "$PY" -m bench.precompute_e2e "${DEV[@]}" "${E2E[@]}" --json "$OUT_DIR/precompute_e2e.json"
stage train_b64 120 "$PY" -m bench.train_step "${DEV[@]}" "${TRAIN[@]}" --batch-size "$B64" \
  --variants eager,compiled-cg --json "$OUT_DIR/train_b64.json"
# Least important last: compiled without CUDA graphs (the inductor graph is cached from stage 1).
stage train_b32_nocg 90 "$PY" -m bench.train_step "${DEV[@]}" "${TRAIN[@]}" --batch-size "$B32" --no-flops \
  --variants compiled --json "$OUT_DIR/train_b32_nocg.json"

echo "== total $(( SECONDS - START ))s"
"$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
REF_TRAIN = {32: 83.0, 64: 153.0}  # samples/s on one H200, the issue's reference
REF_VIDEOS = 14.4                  # videos/s, the issue's reference precompute
rows = []
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else []
for name in ("train_b32", "train_b64", "train_b32_nocg"):
    got = load(name)
    for r in got:
        what = f"train step b{r.get('batch')} {r['variant']}"
        if "error" in r:
            rows.append((what, f"failed: {r['error'][:90]}", "", "", "", "", ""))
            continue
        ref = REF_TRAIN.get(r["batch"])
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        flops = f"{r['flops_per_sample'] / 1e9:.0f} GFLOP/sample" if r.get("flops_per_sample") else ""
        if r["variant"] != "eager":
            flops += f" (graphs {r['graphs']}, breaks {r['graph_breaks']}, cudagraph skips {r['cudagraph_skips']})"
        rows.append((what, f"{r['samples_per_s']:.1f} samples/s", f"x{r['samples_per_s'] / ref:.2f}" if ref else "",
                     f"{r['peak_memory_gb']:.1f} GB", flops, mfu, f"{r['first_step_s']:.0f} s"))
    if not got:
        rows.append((name.replace("_", " "), "not measured (see log / budget)", "", "", "", "", ""))
enc = load("encoders")
for r in enc:
    what = f"encoders {r['variant']}"
    if "error" in r:
        rows.append((what, f"failed: {r['error'][:90]}", "", "", "", "", ""))
        continue
    speed = f"{r['frames_per_s']:.0f} frames/s"
    if r.get("videos_per_s"):
        speed += f" = {r['videos_per_s']:.1f} videos/s"
    vs = f"x{r['videos_per_s'] / REF_VIDEOS:.2f}" if r.get("videos_per_s") else ""
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    g = f"{r['gflop_per_frame']:.1f} GFLOP/frame" if r.get("gflop_per_frame") else ""
    first = f"{r['first_call_s']:.0f} s" if r.get("first_call_s") is not None else ""
    rows.append((what, speed, vs, "", g, mfu, first))
if not enc:
    rows.append(("encoders", "not measured (see log / budget)", "", "", "", "", ""))
for r in load("precompute_e2e"):
    what = "precompute end to end" + (" (tiny)" if r["tiny"] else "")
    rows.append((what, f"{r['videos_per_s']:.1f} videos/s", f"x{r['of_goal']:.2f} of the 60 videos/s goal", "",
                 f"{r['decode_workers']} decode workers, compile {'on' if r['compile'] else 'off'}", "",
                 f"{r['warmup_s']:.0f} s warm-up"))
if not load("precompute_e2e"):
    rows.append(("precompute end to end", "not measured (see log / budget)", "", "", "", "", ""))
head = ("measurement", "throughput", "vs reference", "peak memory", "work", "of bf16 peak", "first step/call")
print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF

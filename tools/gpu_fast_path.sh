#!/usr/bin/env bash
# The device check of issue 16, prepared as one script (a lent H100/H200, ~6 minutes):
# templar-1b and sparseloco-512m, bf16, one GPU: megatron's plain local spec against SDPA
# attention and the fusions that need no apex/TE, one change at a time, then native FP8
# (models/fp8.py, tensorwise) on top. Needs torch + megatron-core only (no covenant install).
#   bash tools/gpu_fast_path.sh OUT_DIR
set -u
out=${1:-${OUT:-runs/gpu_fast_path}}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
run() {  # name, args...
  local name=$1; shift
  timeout 240 "$py" tools/bench_gpu.py --json --steps 10 --warmup 3 "$@" \
    > "$out/$name.json" 2> "$out/$name.err" || echo "{\"failed\": \"$name\"}" >> "$out/$name.json"
  tail -n 1 "$out/$name.json"
}
for preset in templar-1b sparseloco-512m; do
  mb=4; [ "$preset" = sparseloco-512m ] && mb=8
  common=(--preset "$preset" --micro-batch "$mb" --seq 2048 --backend local)
  run "$preset-plain" "${common[@]}" --attention unfused
  run "$preset-sdpa" "${common[@]}" --attention sdpa
  run "$preset-sdpa-swiglu" "${common[@]}" --attention sdpa --fusions swiglu
  run "$preset-sdpa-swiglu-ce" "${common[@]}" --attention sdpa --fusions swiglu cross_entropy
  run "$preset-fp8" "${common[@]}" --attention sdpa --fusions swiglu cross_entropy \
    --precision fp8 --fp8-recipe tensorwise
done
# the memory plan's prediction for each (bf16; FP8 keeps bf16 weights, so the same plan)
for preset in templar-1b sparseloco-512m; do
  mb=4; [ "$preset" = sparseloco-512m ] && mb=8
  covenant model-info --preset "$preset" --micro-batch "$mb" --seq 2048 --backend local \
    --no-outer-state --json > "$out/$preset-plan.json" 2>&1 || true
done

#!/usr/bin/env bash
# GPU checks for duoserve.kernels in one session (the device machine has torch + triton, no vLLM,
# no internet). Writes everything under $OUT (default /tmp/duoserve-gpu-out):
#   nvidia-smi.txt, check.txt (correctness of every CUDA path), bar.md (bf16 bar shapes, batch 1),
#   decode.md (CUDA-graph Llama-2-7B-shape decode step), cutover.md, sweep-*.md (full sweep).
# Usage: scripts/gpu_check.sh [quick|sweep|all]   (quick: check + bar + decode + cutover)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
OUT=${OUT:-/tmp/duoserve-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DUOSERVE_SKIP_CPU_KERNEL=1
# Import duoserve from the working tree without installing: an overlay package whose members are
# links to duoserve/* plus kernels/ (setup.py maps kernels/ to duoserve.kernels the same way).
PKG=$(mktemp -d)/pkg
mkdir -p "$PKG/duoserve"
for f in duoserve/*; do ln -s "$PWD/$f" "$PKG/duoserve/"; done
ln -s "$PWD/kernels" "$PKG/duoserve/kernels"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/steps.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
if [ "$MODE" = quick ] || [ "$MODE" = all ]; then
  step bar 90 $PY -m duoserve.kernels.bench --device cuda --bar --markdown "$OUT/bar.md"
  step decode 90 $PY -m duoserve.kernels.bench_decode --device cuda --markdown "$OUT/decode.md"
  step check 120 $PY -m duoserve.kernels.check --device cuda
  step cutover 90 $PY -m duoserve.kernels.bench --device cuda --cutover \
    --shapes 4096x4096,11008x4096,4096x11008 --batch 1,2,4,8,16,32 --markdown "$OUT/cutover.md"
fi
if [ "$MODE" = sweep ] || [ "$MODE" = all ]; then
  step sweep-bf16 200 $PY -m duoserve.kernels.bench --device cuda --markdown "$OUT/sweep-bf16.md"
  step bar-fp16 60 $PY -m duoserve.kernels.bench --device cuda --bar --dtype fp16 --markdown "$OUT/bar-fp16.md"
fi

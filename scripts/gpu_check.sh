#!/usr/bin/env bash
# GPU checks for duoserve.kernels in one session (the device machine has torch + triton, no vLLM,
# no internet). Writes everything under $OUT (default /tmp/duoserve-gpu-out):
#   steps.log (nvidia-smi, versions, every step's output), bar.md (bf16 bar shapes, batch 1),
#   decode.md (CUDA-graph Llama-2-7B-shape decode step), variants.md, cutover.md, prefill.md,
#   sweep-*.md.
# Usage: scripts/gpu_check.sh [quick|short|sweep|all]   (quick: bar + decode + cutover + check;
#   short: what fits one ~7-minute call: every decode variant at the Llama MLP shapes, bar bf16,
#   prefill paths, decode step, quick check, cutover, bar fp16)
# Steps run in order of importance, each under its own time limit; results are written as they
# are measured, so a session cut short still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
OUT=${OUT:-/tmp/duoserve-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DUOSERVE_SKIP_CPU_KERNEL=1
# Import duoserve from the working tree without installing it (scripts/source_overlay.sh)
source scripts/source_overlay.sh
PKG=$(mktemp -d)/pkg
duoserve_overlay "$PKG"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
cd "$PKG"  # python -m puts the cwd first on sys.path: the repository's own duoserve/ would win
PY=${PYTHON:-python3}
step() {  # step NAME TIMEOUT CMD...: run with a time limit; output appended to $OUT/steps.log
  local name=$1 limit=$2; shift 2
  local log
  log=$(mktemp)
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  cat "$log" >> "$OUT/steps.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
  tail -n 25 "$log"
}
nvidia-smi >> "$OUT/steps.log" 2>&1 || true
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/steps.log"
B="$PY -m duoserve.kernels.bench --device cuda"
if [ "$MODE" = quick ] || [ "$MODE" = all ]; then
  step bar 70 $B --bar --markdown "$OUT/bar.md"
  step decode 40 $PY -m duoserve.kernels.bench_decode --device cuda --markdown "$OUT/decode.md"
  step cutover 50 $B --cutover --shapes 4096x4096,11008x4096 --batch 1,2,4,8,16,256 --markdown "$OUT/cutover.md"
  step check 70 $PY -m duoserve.kernels.check --device cuda
fi
if [ "$MODE" = short ]; then
  # the device tool returns at most 8 files: keep to the .md tables and the step log
  step variants 90 $B --variants --shapes 11008x4096,4096x11008 --batch 1 --markdown "$OUT/variants.md"
  step bar 60 $B --bar --markdown "$OUT/bar.md"
  # prefill sizes: the GEMM path (tiles decompressed per token block) against the tiled path
  # (W^T chunks decompressed once, then cuBLAS); neither has been timed above 32 tokens
  step prefill 60 $B --cutover --shapes 11008x4096,4096x11008 --batch 16,64,256,1024 --markdown "$OUT/prefill.md"
  step decode 45 $PY -m duoserve.kernels.bench_decode --device cuda --markdown "$OUT/decode.md"
  step check-quick 90 $PY -m duoserve.kernels.check --device cuda --quick
  step cutover 60 $B --cutover --shapes 4096x4096,11008x4096 --batch 1,2,4,8 --markdown "$OUT/cutover.md"
  step bar-fp16 45 $B --bar --dtype fp16 --markdown "$OUT/bar-fp16.md"
fi
if [ "$MODE" = sweep ] || [ "$MODE" = all ]; then
  step sweep-b1 40 $B --batch 1 --markdown "$OUT/sweep-bf16-b1.md"
  step bar-fp16 30 $B --bar --dtype fp16 --markdown "$OUT/bar-fp16.md"
  step sweep-rest 200 $B --batch 2,4,8,16 --markdown "$OUT/sweep-bf16-b2-16.md"
fi

#!/usr/bin/env bash
# CPU kernel benchmarks for docs/kernels.md in one run, on an otherwise idle machine (the numbers
# are only meaningful when nothing else runs: check the load averages each table prints).
# Writes under $OUT (default docs/reports/cpu-<date>): machine.txt (/proc/cpuinfo model, flags the
# kernels use, lscpu caches), and one markdown file per step:
#   bar-<decoder>.md   the bar shapes, bf16, p_w = p_x = 0.5, batch 1, weights from DRAM, with each
#                      SIMD decoder forced in turn (the default measures both and keeps the faster)
#   bar-fp32.md        the bar shapes in fp32 (weights and inputs), with each decoder forced in turn
#                      (the scalar loop is what CPUs without AVX-512 ran for fp32 until 2026-11-29)
#   bar-warm.md        the same with one weight reused (small matrices then sit in cache)
#   bar-vllm.md        against vLLM's own CPU GEMM (pre-packed oneDNN), when vLLM is installed
#                      (batch-cold-vllm.md: the same at 1..384 tokens)
#   bar-walk-all.md    the bar shapes walking every column (inactive ones with zero inputs) instead
#                      of skipping the inactive ones (which one the default does at p_w 0.5 in bf16
#                      is measured per machine: machine.txt's walk-all line)
#   bar-no-prefetch.md the bar shapes without the software prefetch (DUOSERVE_CPU_PREFETCH=0,0)
#   bar-columns.md / bar-stream.md   the bar shapes with each kind of prefetch forced
#                      (DUOSERVE_CPU_PREFETCH=48,3 / stream,4096; the default streams only in the
#                      AVX2 walk), dense and dual-sparse in 9 alternated rounds (--rounds 9: medians)
#   px-cold.md         batch 1 at p_x 0 / 0.3 / 0.5 / 0.7 / 0.9 (p_w 0.5), weights from DRAM
#   skip-always.md, skip-walk-all.md   p_w 0..0.5 x p_x 0..0.7, batch 1, from DRAM, always skipping
#                      inactive columns / always walking all: where each wins set the walk-all
#                      policies' constants (kernels/csrc: walk_all_columns, calibrate_walk_all)
#   simd.txt           scripts/simd_throughput.c: the decoders' instructions against an FMA
#   skip.txt           scripts/skip_bandwidth.c: reading a random half of contiguous spans vs all
#   walk-memory.txt    scripts/avx2_walk_memory.cpp (where the CPU has AVX2): the AVX2 walk against
#                      merely touching its lines, and over a superblock order (walk-super*)
#   cutover.md         the spMspV walk (the panel walk from 5 tokens) vs the decompress + matmul
#                      path, batch 1..384 (warm)
#   batch-cold.md      the op at batch 1..64 from DRAM (the walk up to 4 tokens, the panel walk at
#                      5..64 here; to 256 where the CPU has AVX512-BF16); batch-cold-passes3.md the walk at 4..5
#                      tokens in passes of 3 instead of one pass over row slices
#                      (DUOSERVE_CPU_SLICES_MAX_TOKENS=0, panel off); batch-cold-fma.md 4..64 tokens without the
#                      panel walk (DUOSERVE_CPU_BF16_DOT_MIN_TOKENS=0: the fp32 FMA walk up to 12, tiled above);
#                      batch-cold-panel4.md the panel walk at 4 tokens (against the FMA walk in
#                      batch-cold.md: whether the panel's start, 5, should be 4 on this CPU)
#   batch-cold-vllm-amx.md, batch-cold-vllm-amx-off.md   (AMX hosts) the op against vLLM's GEMM at 1..512
#                      tokens with the AMX panel path, and with it off (DUOSERVE_CPU_AMX=off)
#   decode.md          a 2-layer Llama-2-7B-shape decode step, eager, one thread
# The *.txt files but machine.txt are console output: .gitignore keeps them out of a committed report
# (quote what a claim needs in the report's README).
# Usage: scripts/cpu_check.sh   (about 7 minutes on the 2-core VM)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/reports/cpu-$(date -u +%Y-%m-%d)}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
# before anything under $OUT is rewritten (it may be tracked): which code is measured
STATE="commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ":(exclude)$OUT" || echo ' (with uncommitted changes)')"
{
  grep -m1 "model name" /proc/cpuinfo; grep -m1 "cpu family" /proc/cpuinfo; grep -m1 "^model\s" /proc/cpuinfo
  echo "AVX-512 flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E 'avx512' | sort | tr '\n' ' ')"
  lscpu | grep -E "^(L1d|L2|L3)" || true
  echo "decoders: $($PY -c 'from duoserve.kernels import cpu; import torch; print(cpu.available_decoders(), "chosen:", cpu.decoder(torch.bfloat16), cpu.decoder(torch.float32))')"
  echo "AMX: $($PY -c 'from duoserve.kernels import cpu; what, why = cpu.amx(); print(what, "-", why + (f" - from {cpu.amx_min_tokens()} tokens" if what == "tiles" else ""))')"
  echo "walk-all policy: $($PY -c 'from duoserve.kernels import cpu; print(cpu.walk_all(), "measured:", cpu.walk_all_calibration())')"
  echo "date: $(date -u +%FT%TZ); $STATE"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"
B="$PY -m duoserve.kernels.bench"
BV="$PY -m duoserve.loaders.kernel_bench"  # the same benchmark with --baseline vllm (vLLM's CPU GEMM)
SHAPES4=576x1536,1536x576,4096x11008,11008x4096  # the SmolLM2 MLP and Llama-7B MLP shapes
for decoder in $($PY -c 'from duoserve.kernels import cpu; print(" ".join(d for d in cpu.available_decoders() if d != "scalar"))'); do
  rm -f "$OUT/bar-$decoder.md"
  DUOSERVE_CPU_DECODER=$decoder $B --bar --cold-mib 512 --markdown "$OUT/bar-$decoder.md"
done
rm -f "$OUT/bar-fp32.md"
for decoder in $($PY -c 'from duoserve.kernels import cpu; print(" ".join(cpu.available_decoders()))'); do
  DUOSERVE_CPU_DECODER=$decoder $B --bar --dtype fp32 --cold-mib 512 --markdown "$OUT/bar-fp32.md"
done
rm -f "$OUT/bar-warm.md" "$OUT/bar-vllm.md" "$OUT/bar-walk-all.md" "$OUT/bar-no-prefetch.md" "$OUT/px-cold.md" \
  "$OUT/cutover.md" "$OUT/decode.md" "$OUT/batch-cold.md" "$OUT/batch-cold-passes3.md" \
  "$OUT/skip-always.md" "$OUT/skip-walk-all.md" "$OUT/batch-cold-vllm.md" "$OUT/batch-cold-fma.md" \
  "$OUT/batch-cold-panel4.md"
$B --bar --markdown "$OUT/bar-warm.md"
if $PY -c "import vllm" 2> /dev/null; then
  $BV --bar --cold-mib 512 --baseline vllm --markdown "$OUT/bar-vllm.md"
fi
DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE=2 DUOSERVE_CPU_WALK_ALL_MIN_SPAN=0 $B --bar --cold-mib 512 --markdown "$OUT/bar-walk-all.md"
DUOSERVE_CPU_PREFETCH=0,0 $B --bar --cold-mib 512 --markdown "$OUT/bar-no-prefetch.md"
rm -f "$OUT/bar-columns.md" "$OUT/bar-stream.md"
DUOSERVE_CPU_PREFETCH=48,3 $B --bar --cold-mib 512 --rounds 9 --markdown "$OUT/bar-columns.md"
DUOSERVE_CPU_PREFETCH=stream,4096 $B --bar --cold-mib 512 --rounds 9 --markdown "$OUT/bar-stream.md"
$B --shapes $SHAPES4 --pw 0.5 --px 0,0.3,0.5,0.7,0.9 --batch 1 --cold-mib 512 \
  --markdown "$OUT/px-cold.md"
# the walk-all policy's two constants (max inactive fraction, min span bytes): both policies forced
DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE=0 $B --shapes $SHAPES4 --pw 0,0.3,0.4,0.5 --px 0,0.3,0.5,0.7 --batch 1 \
  --cold-mib 512 --markdown "$OUT/skip-always.md"
DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE=2 DUOSERVE_CPU_WALK_ALL_MIN_SPAN=0 $B --shapes $SHAPES4 --pw 0,0.3,0.4,0.5 \
  --px 0,0.3,0.5,0.7 --batch 1 --cold-mib 512 --markdown "$OUT/skip-walk-all.md"
$B --cutover --shapes $SHAPES4 --batch 1,2,3,4,6,7,8,12,16,24,32,48,64,96,128,192,256,384 --markdown "$OUT/cutover.md"
$B --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 1,2,3,4,5,6,7,8,10,12,16,24,32,64 --cold-mib 512 --markdown "$OUT/batch-cold.md"
if $PY -c "import vllm" 2> /dev/null; then
  $BV --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 1,2,3,4,5,6,7,8,12,16,24,32,64,128,256,384 --cold-mib 512 --baseline vllm \
    --markdown "$OUT/batch-cold-vllm.md"
fi
DUOSERVE_CPU_BF16_DOT_MIN_TOKENS=0 $B --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 4,5,6,7,8,12,16,32,64 --cold-mib 512 \
  --markdown "$OUT/batch-cold-fma.md"
DUOSERVE_CPU_BF16_DOT_MIN_TOKENS=4 $B --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 4 --cold-mib 512 \
  --markdown "$OUT/batch-cold-panel4.md"
DUOSERVE_CPU_BF16_DOT_MIN_TOKENS=0 DUOSERVE_CPU_SLICES_MAX_TOKENS=0 $B --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 4,5 --cold-mib 512 \
  --markdown "$OUT/batch-cold-passes3.md"
# AMX hosts (issue 28's bars): the AMX panel path against vLLM's GEMM from 1 token to prefill chunks, and
# the same calls with AMX off (the walks and the panel walk) for the gain; the tests of the instructions first
rm -f "$OUT/batch-cold-vllm-amx.md" "$OUT/batch-cold-vllm-amx-off.md"
if [ "$($PY -c 'from duoserve.kernels import cpu; print(cpu.amx()[0])')" = tiles ] && $PY -c "import vllm" 2> /dev/null; then
  $PY -m pytest -q tests/kernels/test_cpu_amx.py
  $BV --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 1,2,3,4,8,16,32,64,128,256,512 --cold-mib 512 --baseline vllm --rounds 3 \
    --markdown "$OUT/batch-cold-vllm-amx.md"
  DUOSERVE_CPU_AMX=off $BV --shapes $SHAPES4 --pw 0.5 --px 0.5 --batch 2,3,4,8,16,64,256,512 --cold-mib 512 --baseline vllm \
    --rounds 3 --markdown "$OUT/batch-cold-vllm-amx-off.md"
fi
$PY -m duoserve.kernels.bench_decode --device cpu --layers 2 --markdown "$OUT/decode.md"
if gcc -O2 -o /tmp/duoserve_simd_throughput scripts/simd_throughput.c 2> /dev/null; then
  /tmp/duoserve_simd_throughput | tee "$OUT/simd.txt"
fi
VEC=$(grep -qw avx512f /proc/cpuinfo && echo -mavx512f || echo -mavx2)
if gcc -O2 $VEC -o /tmp/duoserve_skip_bandwidth scripts/skip_bandwidth.c 2> /dev/null; then
  /tmp/duoserve_skip_bandwidth | tee "$OUT/skip.txt"
fi
if grep -qw avx2 /proc/cpuinfo && g++ -O2 -std=c++17 -o /tmp/duoserve_avx2_walk_memory scripts/avx2_walk_memory.cpp 2> /dev/null; then
  for px in 0.5 0.9; do PX=$px /tmp/duoserve_avx2_walk_memory 11008 4096 8 24; done | tee "$OUT/walk-memory.txt"
fi
echo "results in $OUT"

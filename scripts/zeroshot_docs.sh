#!/usr/bin/env bash
# Regenerate the zero-shot numbers (docs/evaluation.md, docs/reports/zeroshot-*): each configuration in-process and through a served
# endpoint (duoserve serve, bf16, on 127.0.0.1), then the markdown tables.
#
#   scripts/zeroshot_docs.sh OUTDIR [LABEL=MODEL_OR_CKPT ...]
#   LIMIT=100 scripts/zeroshot_docs.sh runs dense=default sparsegpt=ckpts/smol-sparsegpt duogpt=ckpts/smol-duogpt
#
# LIMIT (default 100) is the number of items per task (the first N of each split); LIMIT=0 runs the
# full sets. STAGES="inproc endpoint" chooses which paths to run. DTYPE (default bfloat16) is the
# in-process dtype (the server computes in bfloat16); DTYPE=float32 STAGES=inproc gave the noise
# reference of docs/evaluation.md. Pruned checkpoints come from
#   duoserve prune --method sparsegpt|duogpt --sparsity 0.5 --activation-sparsity 0.5 -o DIR
set -euo pipefail
OUT=${1:?usage: zeroshot_docs.sh OUTDIR [LABEL=MODEL_OR_CKPT ...]}
shift
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(dense=default)
LIMIT=${LIMIT:-100}
STAGES=${STAGES:-"inproc endpoint"}
MAX_LEN=${MAX_LEN:-2048}
PORT=${PORT:-8777}
mkdir -p "$OUT"
LIMIT_ARGS=()
[ "$LIMIT" != 0 ] && LIMIT_ARGS=(--limit "$LIMIT")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

load() { cut -d' ' -f1-3 /proc/loadavg; }
TABLE_ARGS=()
COMPARE_ARGS=()
for cfg in "${CONFIGS[@]}"; do
  label=${cfg%%=*}; model=${cfg#*=}
  if [ "$model" = default ]; then
    model=$(python -c "from duoserve.prune.model_sources import default_model_dir; print(default_model_dir())")
  fi
  for stage in $STAGES; do
    json="$OUT/$label-$stage.json"
    echo "== $label $stage: start $(date +%T), load $(load)"
    if [ "$stage" = inproc ]; then
      duoserve eval zeroshot "$model" --tasks all "${LIMIT_ARGS[@]}" --data offline --max-length "$MAX_LEN" \
        --dtype "${DTYPE:-bfloat16}" --save-loglikelihoods --json "$json"
    else
      key=$(python -c "import secrets; print(secrets.token_urlsafe(16))")
      duoserve serve "$model" --host 127.0.0.1 --port "$PORT" --api-key "$key" --max-model-len "$MAX_LEN" \
        --enforce-eager --log-file "$OUT/$label-server.log" &
      server=$!
      trap 'kill $server 2>/dev/null || true' EXIT
      for _ in $(seq 1 180); do
        curl -sf -H "Authorization: Bearer $key" "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
        kill -0 $server 2>/dev/null || { echo "server for $label exited; see $OUT/$label-server.log"; exit 1; }
        sleep 5
      done
      duoserve eval zeroshot "$model" --endpoint "http://127.0.0.1:$PORT" --api-key "$key" --tasks all \
        "${LIMIT_ARGS[@]}" --data offline --save-loglikelihoods --json "$json"
      kill $server; wait $server 2>/dev/null || true
      trap - EXIT
    fi
    echo "== $label $stage: end $(date +%T), load $(load)"
    TABLE_ARGS+=("$label, $stage=$json")
  done
  [[ "$STAGES" == *inproc* && "$STAGES" == *endpoint* ]] && COMPARE_ARGS+=(--compare "$label, inproc" "$label, endpoint")
done
python "$(dirname "$0")/zeroshot_table.py" "${TABLE_ARGS[@]}" "${COMPARE_ARGS[@]}" | tee "$OUT/tables.md"

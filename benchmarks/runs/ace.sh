#!/usr/bin/env bash
# ACE on one H200: accuracy with and without the playbook, tokens and seconds per loop, parse rates of the
# Reflector and the Curator (benchmarks/ace_eval.py), four processes side by side (the 135M model leaves the
# GPU mostly idle): novel facts (12 documents, 3 loops) and Banking77 card intents (3 training and 10 held-out
# messages per intent, 3 loops), each with the paper's ACE and with the fallback feedback memory.
# Run after `benchmarks/device.sh ready`:
#   bash benchmarks/runs/ace.sh [SECONDS] [--quick]   (each process is stopped after SECONDS; default 330)
# Results land under $OUT/ace-*/ (results.json, results.md, log.txt), written as each task finishes.
# Tested on the CPU with a tiny model: MODEL=DIR DATA=../shared/data DEVICE=cpu bash benchmarks/runs/ace.sh 120 --quick
set -uo pipefail
limit=${1:-330}
quick=${2:-}
export PYTHONPATH=${PYTHONPATH_EXTRA:-/root/site}:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CTT_CACHE=${CTT_CACHE:-/root/ctt-cache} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
fallback=ace:curate_correct=true:fallback_insight=true
nodedupe=dedupe_similarity=null  # intent questions share the label list: MiniLM finds them all alike
run() {  # run NAME ARGS...: one ace_eval process, logged, stopped at the limit
  local name=$1; shift
  mkdir -p "$OUT/$name"
  timeout "$limit" $PY benchmarks/ace_eval.py --model "$MODEL" --data-dir "$DATA" --device "$DEVICE" \
    --threads "$OMP_NUM_THREADS" --batch-size 64 --docs 12 --loops 3 --intent-train 3 --intent-test 10 \
    --role-max-tokens 128 $quick "$@" --out "$OUT/$name" > "$OUT/$name/log.txt" 2>&1 &
}
run ace-facts --tasks facts --facts-strategies ace:curate_correct=true
run ace-facts-fallback --tasks facts --facts-strategies $fallback
run ace-intents --tasks intents --intent-strategies ace:curate_correct=true:$nodedupe
run ace-intents-fallback --tasks intents --intent-strategies $fallback:$nodedupe
wait
for d in "$OUT"/ace-*; do echo "== $d"; cat "$d/results.md" 2>/dev/null || tail -5 "$d/log.txt"; done

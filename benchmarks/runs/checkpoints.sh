#!/usr/bin/env bash
# Checkpoint size and write cost on the packaged model (benchmarks/checkpoint_sizes.py): finetune, ttt, lora and
# memory_layer, each in its own process, learning a two-sentence document, saving, learning one more, saving.
#   bash benchmarks/runs/checkpoints.sh SECONDS     (each process is stopped after SECONDS; default 420)
#   bash benchmarks/runs/checkpoints.sh --quick     (the tiny random model on the CPU: checks the script)
# Results land under $OUT/checkpoints-STRATEGY/ (results.json, results.md).
set -uo pipefail
limit=${1:-420}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "$limit" = "--quick" ]; then
  timeout 300 $PY benchmarks/checkpoint_sizes.py --tiny --strategies finetune,lora --out "$OUT/checkpoints-quick"
  exit $?
fi
for strategy in finetune ttt lora memory_layer; do
  mkdir -p "$OUT/checkpoints-$strategy"
  timeout "$limit" $PY benchmarks/checkpoint_sizes.py --model "$MODEL" --strategies $strategy \
    --out "$OUT/checkpoints-$strategy" > "$OUT/checkpoints-$strategy/log.txt" 2>&1 &
done
wait

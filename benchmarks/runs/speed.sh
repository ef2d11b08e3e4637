#!/usr/bin/env bash
# Speed of answering and learning on one GPU machine, each figure beside the eager Hugging Face path
# (benchmarks/speed.py). Run after the device.sh stages setup and model (benchmarks/device.sh explains the
# transfer):
#   bash benchmarks/runs/speed.sh [SECONDS]      (the whole script stays under SECONDS; default 480)
#   QUICK=1 BACKEND=static MODEL=smollm2-135m-instruct DATA=../shared/data PYTHON=python \
#     CTT_CACHE=~/.cache/continual_transformer bash benchmarks/runs/speed.sh 900    (the CPU test)
# Timing runs are sequential (a second process on the GPU would disturb them): streams first, then the
# strategy latencies in one process, then learning and task training in another, each with its share of the
# time.
# Results land under $OUT/<section>/ (results.json, results.md, speed.png, log.txt).
set -uo pipefail
limit=${1:-480}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
QUICK=${QUICK:-}
BACKEND=${BACKEND:-compiled}
mkdir -p "$OUT"
start=$(date +%s)
speed() {  # speed NAME SHARE ARGS...: one section in its own process, stopped after SHARE % of the limit
  local name=$1 share=$2; shift 2
  local left=$(( limit - ($(date +%s) - start) ))
  local t=$(( limit * share / 100 )); (( t > left )) && t=$left
  (( t < 20 )) && { echo "$name: no time left" | tee -a "$OUT/summary.txt"; return; }
  mkdir -p "$OUT/$name"
  timeout "$t" "${PYTHON:-python3}" benchmarks/speed.py --model "$MODEL" --set data_dir="$DATA" \
    ${QUICK:+--quick} --backend "$BACKEND" "$@" --out "$OUT/$name" > "$OUT/$name/log.txt" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name/results.md" 2>/dev/null
}
if [ -n "$QUICK" ]; then
  speed answering 60 --sections streams,strategies --threads 1 --strategies none,retrieval,knowledge_store,ttt \
    --set strategies.ttt.optim.epochs=2
  speed learning 40 --sections learn1,learn_many,tasks --threads 1 --set strategies.ttt.optim.epochs=2 \
    --many 4 --sequential 2 --task-examples 32
else
  # bf16 (the GPU default) and the compiled backend (static KV cache + CUDA graphs). Streams and strategies
  # share one process: the decoding graphs compiled for one stream serve the strategies too.
  # Strategies in order of interest (those that change the forward pass first): each row is written as it
  # finishes. retrieval and memory_bank need the MiniLM embedder (device.sh embedder); without it they are
  # skipped with a log line.
  speed answering 55 --sections streams,strategies --streams 1,64,256 --new-tokens 64 --strategy-docs 10 \
    --batched-learning --probes 4 \
    --strategies none,knowledge_store,ttt,memory_layer,memory_bank,retrieval,in_context,finetune,lora
  speed learning 45 --sections learn1,learn_many,tasks --many 1000 --sequential 5 \
    --learn-specs ttt,ttt:objective=context_distill --task-examples 1024 --task-batch 128
fi
"${PYTHON:-python3}" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {}
for name in ("answering", "learning"):
    path = out / name / "results.json"
    if path.exists():
        merged[name] = json.loads(path.read_text()).get("summary", {})
(out / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
print(json.dumps(merged, indent=2))
EOF

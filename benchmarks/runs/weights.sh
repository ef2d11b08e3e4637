#!/usr/bin/env bash
# Learning into weights, measured side by side on one GPU machine: every row of the knowledge benchmark in its
# own process (the 135M model leaves the GPU mostly idle), novel facts and real news articles, the retrieval
# diagnostic, and the refactoring check (the quick knowledge and task profiles on the code before and after).
# Run after `benchmarks/device.sh ready` (benchmarks/device.sh explains the transfer):
#   bash benchmarks/runs/weights.sh SECONDS     (each process is stopped after SECONDS; default 520)
# Results land under $OUT (one folder per process; results are written as each row finishes). Merge the
# knowledge rows of one benchmark with benchmarks/merge_knowledge.py FIRST OTHERS...
set -uo pipefail
limit=${1:-520}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=/root/ctt-cache TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=/root/models
DATA=/root/data
mkdir -p "$OUT"
ctt() {  # ctt OUT_NAME ARGS...: one benchmark process, logged, stopped at the limit
  local name=$1; shift
  mkdir -p "$OUT/$name"
  timeout "$limit" python3 -m continual_transformer --model $MODEL --set data_dir=$DATA \
    --set generation.batch_size=64 --set model.dtype=float32 \
    --set strategies.ttt.distill.teacher_batch_size=32 --set strategies.lora.distill.teacher_batch_size=32 \
    --set strategies.finetune.distill.teacher_batch_size=32 \
    --set strategies.memory_layer.distill.teacher_batch_size=32 \
    "$@" --out "$OUT/$name" > "$OUT/$name/log.txt" 2>&1 &
}
knowledge() {  # knowledge NAME BENCHMARK STRATEGIES
  ctt "$1" bench knowledge --benchmark "$2" --docs 50 --no-baselines --strategies "$3"
}
cd_=objective=context_distill
knowledge nf-base novel_facts none,oracle,in_context
knowledge nf-retrieval novel_facts retrieval,retrieval:top_k=1,retrieval:top_k=1:bias_strength=0
knowledge nf-stores novel_facts knowledge_store,memory_bank
knowledge nf-finetune novel_facts finetune
knowledge nf-lora novel_facts lora
knowledge nf-ttt novel_facts ttt
knowledge nf-ttt-cd novel_facts ttt:$cd_
knowledge nf-lora-cd novel_facts lora:$cd_
knowledge nf-finetune-cd novel_facts finetune:$cd_
knowledge nf-ml novel_facts memory_layer
knowledge nf-ml-cd novel_facts memory_layer:$cd_
knowledge news-base news none,oracle,in_context,retrieval,retrieval:top_k=1
knowledge news-ttt-cd news ttt:$cd_
knowledge news-ml-cd news memory_layer:$cd_
knowledge news-lora-cd news lora:$cd_
mkdir -p "$OUT/diag"
timeout "$limit" python3 benchmarks/retrieval_diagnostics.py --benchmark novel_facts --docs 50 \
  --set model.name=$MODEL --set data_dir=$DATA --set model.dtype=float32 --out "$OUT/diag" \
  > "$OUT/diag/log.txt" 2>&1 &
# The refactoring check: the quick profiles on the code before and after, same machine, same process shape.
for tree in before after; do
  src=$PWD/src; [ $tree = before ] && src=$PWD/.device/before/src
  mkdir -p "$OUT/$tree-quick" "$OUT/$tree-tasks"
  (cd /tmp && PYTHONPATH=/root/site:$src timeout "$limit" python3 -m continual_transformer --model $MODEL \
    --set data_dir=$DATA --set model.dtype=float32 bench knowledge --quick \
    --strategies retrieval,knowledge_store,memory_bank,ttt --out "$OUT/$tree-quick" \
    > "$OUT/$tree-quick/log.txt" 2>&1) &
  (cd /tmp && PYTHONPATH=/root/site:$src timeout "$limit" python3 -m continual_transformer --model $MODEL \
    --set data_dir=$DATA bench tasks --suite clinc150-10 --quick --out "$OUT/$tree-tasks" \
    > "$OUT/$tree-tasks/log.txt" 2>&1) &
done
wait

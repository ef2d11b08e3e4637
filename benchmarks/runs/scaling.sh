#!/usr/bin/env bash
# Learning into weights against the number of documents, and on real news articles: one process per group of
# rows (the 135M model leaves the GPU mostly idle). Run after `benchmarks/device.sh ready`:
#   bash benchmarks/runs/scaling.sh GROUP SECONDS
#     scale       the stores (oracle, retrieval, knowledge_store) at 200 and 1,000 novel-facts documents and gated
#                 ttt at 50 and 200, each stream batch learned in one run (--learn-together); gated ttt at 50
#                 one by one; retrieval, knowledge_store and gated ttt on 50 news articles; the diagnostic
#     gated       every weight-changing strategy behind the relevance gate (gate.enabled), 50 novel-facts
#                 documents, and gated ttt and memory_layer (context distillation) on 50 news articles
#     parametric  gated ttt at 200 and 1,000 and gated memory_layer at 50, 200 and 1,000 novel-facts documents,
#                 each stream batch learned in one run (--learn-together), and retrieval at 1,000 likewise
#     large       what parametric left unfinished when it shared a call (the 1,000-document rows), and
#                 memory_bank with context distillation at 50 (its next-token row: 0.003): four processes
#                 (not finished in a 440 s call of its own either: at 200 documents gated memory_layer alone
#                 took 381 s, so 1,000 documents need several calls' time, more than one call's 600 s)
#     chunks      retrieval with 128-token chunks (32 overlapping) on 50 news articles and 50 novel-facts
#                 documents, beside the committed rows of 512-token chunks
#     stores      oracle, retrieval and knowledge_store at 200 and 1,000 documents
#     news        ttt (context distillation), memory_layer, knowledge_store and retrieval on 50 news articles,
#                 and the retrieval diagnostic (benchmarks/retrieval_diagnostics.py) on novel facts and news
# Each process is stopped after SECONDS (default 520); results land under $OUT/scaling/NAME. Summarise with
#   python benchmarks/knowledge_scaling.py DIR... --out benchmarks/results/knowledge/scaling
set -uo pipefail
group=${1:?group: scale | gated | parametric | large | chunks | stores | news | quick}
limit=${2:-520}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache} TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
run() {  # run NAME BENCHMARK DOCS STRATEGIES [BENCH OPTIONS...]: one benchmark process, logged, stopped at the limit
  local name=$1 benchmark=$2 docs=$3 strategies=$4
  shift 4
  mkdir -p "$OUT/scaling/$name"
  timeout "$limit" python3 -m continual_transformer --model "$MODEL" --set data_dir="$DATA" \
    --set generation.batch_size=${BATCH:-64} --set model.dtype=float32 \
    --set strategies.ttt.distill.teacher_batch_size=32 --set strategies.memory_layer.distill.teacher_batch_size=32 \
    --set strategies.lora.distill.teacher_batch_size=32 --set strategies.memory_bank.distill.teacher_batch_size=32 \
    bench knowledge --benchmark "$benchmark" --docs "$docs" --no-baselines --strategies "$strategies" "$@" \
    --out "$OUT/scaling/$name" > "$OUT/scaling/$name/log.txt" 2>&1 &
}
diagnose() {  # where retrieval loses to the oracle, probe by probe, on each benchmark named
  mkdir -p "$OUT/scaling/diag"
  for benchmark in "$@"; do
    timeout "$limit" python3 benchmarks/retrieval_diagnostics.py --benchmark $benchmark --docs 50 \
      --set model.name="$MODEL" --set data_dir="$DATA" --set model.dtype=float32 --out "$OUT/scaling/diag" \
      > "$OUT/scaling/diag/log-$benchmark.txt" 2>&1 &
  done
}
cd_=objective=context_distill
g=gate.enabled=true
case "$group" in
  scale)  # one call: the stores at 200 and 1,000 documents, gated ttt at 50 and 200 with each batch learned
          # in one run (and at 50 one by one, with the stored 8-bit deltas), news rows and the diagnostic
    run nf-200-stores novel_facts 200 oracle,retrieval,knowledge_store --learn-together
    BATCH=256 run nf-1000-retrieval novel_facts 1000 oracle,retrieval --learn-together
    BATCH=256 run nf-1000-ks novel_facts 1000 knowledge_store --learn-together
    run nf-50-ttt-g-together novel_facts 50 "ttt:$g" --learn-together
    run nf-200-ttt-g-together novel_facts 200 "ttt:$g" --learn-together
    run nf-50-ttt-g novel_facts 50 "ttt:$g"
    run news-50 news 50 "retrieval,knowledge_store,ttt:$g"
    diagnose novel_facts news ;;
  stores)  # the stores at 200 and 1,000 documents, each batch learned in one run
    run nf-200-stores novel_facts 200 oracle,retrieval,knowledge_store --learn-together
    BATCH=256 run nf-1000-retrieval novel_facts 1000 oracle,retrieval --learn-together ;;
  gated)
    run nf-50-ttt-g novel_facts 50 "ttt:$g"
    run nf-50-ttt-cd-g novel_facts 50 "ttt:$cd_:$g,lora:$cd_:$g"
    run nf-50-ml-g novel_facts 50 "memory_layer:$cd_:$g,memory_layer:$g"
    run nf-50-ft-g novel_facts 50 "finetune:$g,lora:$g"
    run news-50-ttt-g news 50 "ttt:$cd_:$g,memory_layer:$cd_:$g" ;;
  parametric)
    run nf-200-ttt-g-together novel_facts 200 "ttt:$g" --learn-together
    run nf-1000-ttt-g-together novel_facts 1000 "ttt:$g" --learn-together
    run nf-50-ml-g-together novel_facts 50 "memory_layer:$g" --learn-together
    run nf-200-ml-g-together novel_facts 200 "memory_layer:$g" --learn-together
    run nf-1000-ml-g-together novel_facts 1000 "memory_layer:$g" --learn-together
    BATCH=256 run nf-1000-retrieval novel_facts 1000 retrieval --learn-together ;;
  large)
    run nf-1000-ttt-g-together novel_facts 1000 "ttt:$g" --learn-together
    run nf-1000-ml-g-together novel_facts 1000 "memory_layer:$g" --learn-together
    BATCH=256 run nf-1000-retrieval novel_facts 1000 retrieval --learn-together
    run nf-50-mb-cd novel_facts 50 "memory_bank:$cd_" ;;
  chunks)
    run news-50-retrieval-c128 news 50 "retrieval:chunk_tokens=128:chunk_overlap=32"
    run nf-50-retrieval-c128 novel_facts 50 "retrieval:chunk_tokens=128:chunk_overlap=32" ;;
  news)
    run news-ttt-cd news 50 "ttt:$cd_"
    run news-ml-ks news 50 memory_layer,knowledge_store
    run news-retrieval news 50 retrieval,retrieval:top_k=1
    diagnose novel_facts news ;;
  quick)  # the CPU check of this script, 4 documents on the packaged model: PATH=.venv/bin:$PATH \
          # MODEL=smollm2-135m-instruct DATA=../shared/data CTT_CACHE=~/.cache/continual_transformer
    run quick-stores novel_facts 4 oracle,retrieval --learn-together --batches 2 --quick
    run quick-ttt novel_facts 4 "ttt:$g" --learn-together --batches 2 --quick
    run quick-ml novel_facts 4 "memory_layer:$g" --learn-together --batches 2 --quick ;;
  *) echo "unknown group $group" >&2; exit 2 ;;
esac
wait

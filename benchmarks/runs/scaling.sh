#!/usr/bin/env bash
# Learning into weights against the number of documents, and on real news articles: one process per group of
# rows (the 135M model leaves the GPU mostly idle). Run after `benchmarks/device.sh ready`:
#   bash benchmarks/runs/scaling.sh GROUP SECONDS
#     scale       the stores (oracle, retrieval, knowledge_store) at 200 and 1,000 novel-facts documents and gated
#                 ttt at 50 and 200, each stream batch learned in one run (--learn-together); gated ttt at 50
#                 one by one; retrieval, knowledge_store and gated ttt on 50 news articles; the diagnostic
#     gated       every weight-changing strategy behind the relevance gate (gate.enabled), 50 novel-facts
#                 documents, and gated ttt and memory_layer (context distillation) on 50 news articles
#     parametric  gated ttt at 200 and gated memory_layer at 50 and 200 novel-facts documents, each stream batch
#                 learned in one run (--learn-together); their 1,000-document rows are the group large
#     large       the 1,000-document rows: gated ttt, gated memory_layer and retrieval on novel facts (ROWS: any
#                 of "ttt ml retrieval"), each stream batch learned in one run (--learn-together), answers 256
#                 at a time on the static decoding path (the lean loop uncompiled: eager's greedy tokens, no
#                 compile per batch shape). Longer than one call, so they run detached and resumable: each
#                 process in its own session (setsid) under $WORK (default /root/scaling, kept while the machine
#                 stays lent), saving its state after every stream batch (--resume) and running on between
#                 calls. Each call starts every row neither done nor running (a saved stream continues where it
#                 stopped), waits up to SECONDS, prints each row's state and packs results, logs and the
#                 figures saved so far (progress.json) into $OUT/scaling-large.tgz (not the saved state: gated
#                 ttt's is 80 MB, gated memory_layer's 64 MB at 200 documents and growing, over what a call
#                 carries). Repeat the call back to back (the machine goes back 30 s after a call) until it
#                 prints "all done"; a fresh machine starts over (`benchmarks/device.sh ready` first).
#                 Expected on one H200, the three side by side: gated ttt 900-2,100 s (3,750 learning steps at
#                 most, at 0.12 s each alone -- 50 documents on the H100 -- to 0.49 s beside five other processes --
#                 200 documents on the H200 -- plus 24,000 probe answers), gated memory_layer 700-1,700 s,
#                 retrieval 600-950 s (answers with retrieved text: 0.019-0.04 s per probe): 2-4 calls of 520 s.
#     mbcd        memory_bank with context distillation at 50 documents (its next-token row: 0.003)
#     chunks      retrieval with 128-token chunks (32 overlapping) on 50 news articles and 50 novel-facts
#                 documents, beside the committed rows of 512-token chunks
#     stores      oracle, retrieval and knowledge_store at 200 and 1,000 documents
#     news        ttt (context distillation), memory_layer, knowledge_store and retrieval on 50 news articles,
#                 and the retrieval diagnostic (benchmarks/retrieval_diagnostics.py) on novel facts and news
# Each process is stopped after SECONDS (default 520); results land under $OUT/scaling/NAME (large: see above).
# Where the machine has several GPUs, the processes of a group are spread over them. Summarise with
#   python benchmarks/knowledge_scaling.py DIR... --out benchmarks/results/knowledge/scaling
set -uo pipefail
if [ "${1:-}" = _worker ]; then  # _worker DIR COMMAND...: one detached row; "done" marks a finished run
  dir=$2; shift 2
  echo $$ > "$dir/pid"
  "$@" >> "$dir/log.txt" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] && touch "$dir/done"
  echo "exit $rc at $(date -u +%FT%TZ)" >> "$dir/log.txt"
  exit "$rc"
fi
group=${1:?group: scale | gated | parametric | large | mbcd | chunks | stores | news | quick | quick-large}
limit=${2:-520}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache} TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
WORK=${WORK:-/root/scaling}
PY=${PYTHON:-python3}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
started=0
gpu() {  # the GPU of the next process (round robin), where there are several
  if [ "${GPUS:-0}" -gt 1 ]; then export CUDA_VISIBLE_DEVICES=$(( started % GPUS )); fi
  started=$(( started + 1 ))
}
ctt() {  # ctt ARGS...: the command line of one benchmark process, in the array cmd
  cmd=("$PY" -m continual_transformer --model "$MODEL" --set data_dir="$DATA"
    --set generation.batch_size=${BATCH:-64} --set model.dtype=float32
    --set strategies.ttt.distill.teacher_batch_size=32 --set strategies.memory_layer.distill.teacher_batch_size=32
    --set strategies.lora.distill.teacher_batch_size=32 --set strategies.memory_bank.distill.teacher_batch_size=32
    "$@")
}
run() {  # run NAME BENCHMARK DOCS STRATEGIES [BENCH OPTIONS...]: one benchmark process, logged, stopped at the limit
  local name=$1 benchmark=$2 docs=$3 strategies=$4
  shift 4
  mkdir -p "$OUT/scaling/$name"
  gpu
  ctt bench knowledge --benchmark "$benchmark" --docs "$docs" --no-baselines --strategies "$strategies" "$@" \
    --out "$OUT/scaling/$name"
  timeout "$limit" "${cmd[@]}" > "$OUT/scaling/$name/log.txt" 2>&1 &
}
detached() {  # detached NAME BENCHMARK DOCS STRATEGIES [BENCH OPTIONS...]: a resumable row in its own session
  local name=$1 benchmark=$2 docs=$3 strategies=$4 dir=$WORK/$1
  shift 4
  mkdir -p "$dir"
  rows+=("$name")
  [ -f "$dir/done" ] && return
  running "$name" && return
  echo "$name: starting$([ -d "$dir/resume" ] && echo ', continuing its saved stream')"
  gpu
  ctt --set generation.backend="${BACKEND:-static}" bench knowledge --benchmark "$benchmark" --docs "$docs" \
    --no-baselines --strategies "$strategies" "$@" --resume --out "$dir"
  setsid nohup bash "$0" _worker "$dir" "${cmd[@]}" > /dev/null 2>&1 < /dev/null &
  echo $! > "$dir/pid"  # at once (the worker writes its own as it starts)
}
row_state() {  # done, or running / stopped with the stream batches saved so far
  local dir=$WORK/$1 state=stopped saved
  [ -f "$dir/done" ] && { echo done; return; }
  running "$1" && state=running
  # the saved stream's figures so far beside the results (packed; the saved state itself stays)
  saved=$(cat "$dir"/resume/*/manifest.json 2>/dev/null | "$PY" -c 'import json, sys
d = json.load(sys.stdin); p = d["parts"]["progress"]; keep = ("accuracy_rows", "learn_seconds", "learn_tokens",
    "stream_answer_seconds", "seconds", "peak_memory_mb", "resumed_at", "batches_done")
json.dump({"strategy": d["run"]["strategy"], "bench": d["run"]["bench"], **{k: p.get(k) for k in keep}},
    open(sys.argv[1], "w"), indent=1)
print(p["batches_done"], "of", len(d["run"]["documents"]))' "$dir/progress.json" 2>/dev/null)
  echo "$state, stream batches saved: ${saved:-none}"
}
running() {  # is row NAME's detached process alive?
  [ -f "$WORK/$1/pid" ] && kill -0 "$(cat "$WORK/$1/pid")" 2>/dev/null
}
follow() {  # wait until no detached row runs any more or SECONDS have passed, then report and pack
  local deadline=$(( SECONDS + limit )) name pending alive
  while :; do
    pending=0 alive=0
    for name in "${rows[@]}"; do
      [ -f "$WORK/$name/done" ] || pending=$(( pending + 1 ))
      running "$name" && alive=$(( alive + 1 ))
    done
    [ "$alive" -eq 0 ] || [ "$SECONDS" -ge "$deadline" ] && break
    sleep 5
  done
  for name in "${rows[@]}"; do echo "$name: $(row_state "$name")"; done
  [ "$pending" -eq 0 ] && echo "all done" || echo "$pending row(s) not done: call again (a stopped row's log.txt says why)"
  mkdir -p "$OUT"
  tar czf "$OUT/scaling-$group.tgz" -C "$WORK" --exclude=resume --exclude=pid "${rows[@]}"
}
rows=()
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
    run nf-50-ml-g-together novel_facts 50 "memory_layer:$g" --learn-together
    run nf-200-ml-g-together novel_facts 200 "memory_layer:$g" --learn-together ;;
  large)  # detached and resumable (see the header); the call itself ends after SECONDS
    D=${DOCS:-1000}
    for row in ${ROWS:-ttt ml retrieval}; do  # ROWS: which of the three, longest first
      case $row in
        ttt) BATCH=256 detached nf-$D-ttt-g-together novel_facts "$D" "ttt:$g" --learn-together ${EXTRA:-} ;;
        ml) BATCH=256 detached nf-$D-ml-g-together novel_facts "$D" "memory_layer:$g" --learn-together ${EXTRA:-} ;;
        retrieval) BATCH=256 detached nf-$D-retrieval novel_facts "$D" retrieval --learn-together ${EXTRA:-} ;;
        *) echo "unknown row $row (ttt, ml, retrieval)" >&2; exit 2 ;;
      esac
    done
    follow
    exit ;;
  mbcd)
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
  quick-large)  # the CPU check of the detached rows: as quick, with WORK=/tmp/scaling-quick (2 documents)
    DOCS=2 EXTRA="--batches 2 --quick" bash "$0" large "$limit"
    exit ;;
  *) echo "unknown group $group" >&2; exit 2 ;;
esac
wait

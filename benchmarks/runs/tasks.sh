#!/usr/bin/env bash
# Tasks in sequence on one GPU machine: every suite with adapter_distill (balanced merges), the references
# (joint trained on every example, isolation = one adapter per task), the unseen intents15 stream (and the
# original merge on it), the 115-task stream, unknown-task detection and training cost, in 4 parallel lanes.
# After benchmarks/device.sh setup, model, data and embedder (see there):
#   bash benchmarks/runs/tasks.sh [SECONDS]        each lane stopped after SECONDS (default 400)
#   bash benchmarks/runs/tasks.sh 170 --quick      CPU check: quick profiles, a few tiny tasks per suite
# Results land under $OUT/tasks/<run>/ (results.json, results.md, plots; written as each method finishes) and
# $OUT/tasks/SUMMARY.md (benchmarks/summarize_tasks.py). Commit them under benchmarks/results/tasks/.
set -uo pipefail
limit=${1:-400}
quick=${2:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}
if [ "$quick" = --quick ]; then
  PY=${PY:-/work/main/.venv/bin/python}
  MODEL=${MODEL:-smollm2-135m-instruct}
  DATA=${DATA:-../shared/data}
  export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
  # a few tiny tasks per suite: enough to run every code path
  extra=(--quick --set num_tasks=3 --set max_labels_per_task=2 --set max_train_per_label=3
         --set max_test_per_label=1 --set learner.epochs=1 --set learner.distill_epochs=1
         --set learner.router=backbone)
  stream_tasks=(--set num_tasks=4 --set eval_every=2)
else
  PY=python3
  MODEL=/root/models
  DATA=/root/data
  export PYTHONPATH=/root/site:$PWD/src CTT_CACHE=/root/ctt-cache
  mkdir -p $DATA && for d in .device/d1 .device/d2; do [ -d $d ] && cp -r $d/. $DATA/; done
  extra=()
  stream_tasks=()
fi
mkdir -p "$OUT/tasks"
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
bench() {  # bench RUN SUITE METHODS [options]: one run, stopped when the lane's time is up
  local run=$1 suite=$2 methods=$3; shift 3
  local t; t=$(left); [ "$t" -gt 5 ] || { echo "no time left for $run" >> "$OUT/tasks/skipped.txt"; return; }
  mkdir -p "$OUT/tasks/$run"
  timeout "$t" $PY -m continual_transformer.tasks bench --model "$MODEL" --data-dir "$DATA" --suite "$suite" \
    --methods "$methods" --set joint_at_end=true "${extra[@]}" "$@" --out "$OUT/tasks/$run" \
    > "$OUT/tasks/$run/log.txt" 2>&1
  echo "$run: exit $? after $(( $(date +%s) - start )) s" >> "$OUT/tasks/lanes.txt"
}
ALL=adapter_distill,joint,isolation
ORIGINAL=(--set learner.merge_data=new --set learner.buffer_policy=reservoir --set learner.buffer_size=500)
( bench clinc150-10 clinc150-10 $ALL; bench banking77 banking77 $ALL ) &
# the cost lever: one distillation pass over as many rows as the new task has, split over the slot's tasks
( bench clinc150-50 clinc150-50 $ALL
  bench intents15-lowcost intents15 adapter_distill --set learner.distill_epochs=1 \
    --set learner.distill_budget=1.0
  bench intents15-balanced-slots intents15 adapter_distill --set learner.slot_choice=balanced ) &
( bench intents15 intents15 $ALL; bench intents15-original intents15 adapter_distill "${ORIGINAL[@]}" ) &
( bench stream115 stream115 adapter_distill "${stream_tasks[@]}"; bench long15-order0 long15 $ALL ) &
wait
$PY benchmarks/summarize_tasks.py "$OUT/tasks" $quick > /dev/null
echo "all lanes done after $(( $(date +%s) - start )) s" >> "$OUT/tasks/lanes.txt"

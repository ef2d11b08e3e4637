#!/usr/bin/env bash
# The remaining task suites in one call on one H200 (16 cores, 1 GPU): banking77, long15 (order 0), clinc150-50
# with adapter_distill and the references (joint trained once at the end on every example: the uncapped bound;
# isolation: one adapter per task, the plain-adapter cost), and the 115-task stream with adapter_distill; long15
# orders 1 and 2 with adapter_distill when time is left.
# Every (suite, method) is a process of its own writing into parts/<suite>--<method>/ as it finishes; six lanes
# run side by side (the 135M model leaves the GPU mostly idle: each process is bound by launching kernels), each
# lane runs its parts one after another. At the end the parts of a suite are merged into <run>/ (results.json,
# results.md, plots: `python -m continual_transformer.tasks merge`) and SUMMARY.md is written
# (benchmarks/summarize_tasks.py). A part that would not finish before the deadline is not started
# (skipped.txt); one still running at the deadline is stopped: its parts/<run>--<method>/partial-<method>.json
# keeps the accuracy matrix up to its last full evaluation (the stream: every 10 tasks).
#
# Estimated H200 seconds per part (from benchmarks/results/tasks/h200-issue18, 4 lanes: learning + evaluation
# after each task, model load, zero-shot and routed evaluation, unknown-task detection):
#   stream115 adapter_distill  470   97 tasks took 347 s; 4 banking77 + 14 long15 tasks, routed eval left
#   clinc150-50 adapter_distill 380  49 tasks took 349 s (276 learning, 73 evaluation)
#   clinc150-50 isolation       225  50 x 2.4 s per unmerged task, 73 s evaluation
#   clinc150-50 joint           110  10,800 rows / 32 = 338 steps x 0.25 s, one evaluation
#   banking77 adapter_distill   175  H100 7 workers: 21.3 s/task + 6.5 s evaluation, x 0.8 (H200, 4 lanes)
#   banking77 isolation         125  as sequential on H100 (13.2 s/task) x 0.8, evaluation
#   banking77 joint              70  5,544 rows / 32 = 173 steps x 0.3 s, one evaluation
#   long15 adapter_distill      150  H100 7 workers: 10.0 s/task + 2.5 s evaluation, x 0.8
#   long15 isolation             90  as sequential on H100 (4.4 s/task) x 0.8, evaluation
#   long15 joint                 75  4,800 rows / 32 = 150 steps x 0.4 s (256-token texts), one evaluation
# Lanes (estimated seconds): stream115 470 | clinc150-50 adapter_distill 380 | clinc150-50 isolation + long15
# joint + training throughput at batch sizes 32, 128, 512 (benchmarks/task_train_speed.py, beside the other
# lanes) 340 | clinc150-50 joint + banking77 isolation + long15 isolation 325 | banking77 adapter_distill +
# joint, then long15 order 2 adapter_distill 395 | long15 order 0 then order 1 adapter_distill 300 (orders 1
# and 2 are extras: skipped when they would not fit). The stream (the critical path) may run to the deadline
# (default 528 s of the 540 s call); the other lanes stop 20 s earlier and their suites are merged while the
# stream runs; then the stream's merge and the summary (about 6 s). The estimates predate the sync-free
# training loop and the batched routed evaluation, which can only lower them.
#
# After benchmarks/device.sh ready (the data: .device/d1 and .device/d2x/cl.txz carried, or
# already copied by those stages):
#   bash benchmarks/runs/tasks.sh [SECONDS]           deadline of the stream (default 528; other lanes 20 s less)
#   bash benchmarks/runs/tasks.sh 900 --quick         CPU check: quick profiles, a few tiny tasks per suite
#   PLAN=refs bash benchmarks/runs/tasks.sh [SECONDS]  the joint / isolation references instead (below)
#   PLAN=baselines bash benchmarks/runs/tasks.sh [SECONDS]  sequential, ewc, lwf and replay on the same suites
#     (run after refs with the same OUT: each suite merges every part found)
#   PLAN=replay bash benchmarks/runs/tasks.sh [SECONDS]  replay (the default method) on the 115-task stream,
#     clinc150-50 and long15's three orders with their references; banking77's ewc and lwf (estimates: replay
#     trains about as fast as one plain adapter per task, 1.1x isolation on the H200)
# Results land under $OUT/tasks/ (commit them under benchmarks/results/tasks/h200-issue18b/).
set -uo pipefail
limit=${1:-528}
quick=${2:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
R=$OUT/tasks
start=$(date +%s)
if [ "$quick" = --quick ]; then
  PY=${PY:-/work/main/.venv/bin/python}
  MODEL=${MODEL:-smollm2-135m-instruct}
  DATA=${DATA:-../shared/data}
  export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
  # a few tiny tasks per suite: enough to run every code path (merges included: the quick pool has 2 slots)
  extra=(--quick --set num_tasks=3 --set max_labels_per_task=2 --set max_train_per_label=3
         --set max_test_per_label=1 --set learner.epochs=1 --set learner.distill_epochs=1
         --set learner.router=backbone)
  stream=(--set num_tasks=4 --set eval_every=2)
  speed_args=(--quick --batch-sizes 4 8 --steps 1)
  scale=0  # estimates are H200 seconds: not checked on the CPU
else
  PY=python3
  MODEL=/root/models
  DATA=/root/data
  export PYTHONPATH=/root/site:$PWD/src CTT_CACHE=/root/ctt-cache
  mkdir -p $DATA && for d in .device/d1 .device/d2; do [ -d $d ] && cp -r $d/. $DATA/; done
  [ -d $DATA/cl_benchmark ] || { [ -f .device/d2x/cl.txz ] \
    && python3 -c "import tarfile; tarfile.open('.device/d2x/cl.txz').extractall('$DATA')"; }
  extra=()
  stream=()
  speed_args=(--batch-sizes 32 128 512)
  scale=1
fi
mkdir -p "$R/parts"
: > "$R/lanes.txt"
: > "$R/skipped.txt"
left() { echo $(( $1 - ($(date +%s) - start) )); }
part() {  # part ESTIMATE RUN SUITE METHOD [options]: one method on one suite, if it can finish before the deadline
  local estimate=$1 run=$2 suite=$3 method=$4; shift 4
  local name=$run--$method t
  t=$(left "$deadline")
  if [ "$t" -lt $(( estimate * scale + 5 )) ]; then
    echo "$name: not started, $t s left of an estimated $estimate s" >> "$R/skipped.txt"
    return
  fi
  mkdir -p "$R/parts/$name"
  timeout "$t" $PY -m continual_transformer.tasks bench --model "$MODEL" --data-dir "$DATA" --suite "$suite" \
    --methods "$method" --set joint_at_end=true "${extra[@]}" "$@" --out "$R/parts/$name" \
    > "$R/parts/$name/log.txt" 2>&1
  echo "$name: exit $? at $(( $(date +%s) - start )) s (estimate $estimate s)" >> "$R/lanes.txt"
}
speed() {  # training examples/s of one adapter at several batch sizes (benchmarks/task_train_speed.py)
  local t; t=$(left "$deadline")
  if [ "$t" -lt $(( 40 * scale + 5 )) ]; then
    echo "train_speed: not started, $t s left of an estimated 40 s" >> "$R/skipped.txt"
    return
  fi
  timeout "$t" $PY benchmarks/task_train_speed.py --model "$MODEL" --data-dir "$DATA" "${speed_args[@]}" \
    --out "$R/train_speed" > "$R/train_speed.log" 2>&1
  echo "train_speed: exit $? at $(( $(date +%s) - start )) s (estimate 40 s)" >> "$R/lanes.txt"
}
merge() {  # merge RUN: the parts of one suite into $R/RUN
  local parts=("$R/parts/$1--"*)
  [ -e "${parts[0]}" ] || return 0
  $PY -m continual_transformer.tasks merge --out "$R/$1" "${parts[@]}" >> "$R/lanes.txt" 2>&1 \
    || echo "$1: nothing to merge" >> "$R/lanes.txt"
}
if [ "$scale" = 1 ] && command -v nvidia-smi > /dev/null; then  # how busy the GPU is, every 20 s
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 > "$R/gpu.csv" 2>&1 &
  smi=$!
fi
if [ "${PLAN:-suites}" = refs ]; then
  # The references at the width of adapter_distill's pool (joint_adapter_dim): each suite whose "× joint" the
  # targets read, with adapter_distill and isolation side by side in the same run where the committed run lacks
  # them (clinc150-10, intents15, banking77); joint alone for clinc150-50 and long15 order 0.
  deadline=$(( limit - 10 ))
  lanes=()
  ( part 230 intents15 intents15 adapter_distill; part 60 intents15 intents15 joint ) & lanes+=($!)
  ( part 175 banking77 banking77 adapter_distill; part 70 banking77 banking77 joint
    part 40 clinc150-10 clinc150-10 joint ) & lanes+=($!)
  ( part 140 clinc150-10 clinc150-10 adapter_distill; part 125 banking77 banking77 isolation ) & lanes+=($!)
  ( part 110 clinc150-50-joint clinc150-50 joint; part 75 long15-order0-joint long15 joint ) & lanes+=($!)
  ( part 90 intents15 intents15 isolation; part 60 clinc150-10 clinc150-10 isolation ) & lanes+=($!)
  wait "${lanes[@]}"
  echo "reference lanes done at $(( $(date +%s) - start )) s" >> "$R/lanes.txt"
  merges=()
  for run in intents15 banking77 clinc150-10 clinc150-50-joint long15-order0-joint; do merge $run & merges+=($!); done
  wait "${merges[@]}"
elif [ "${PLAN:-suites}" = replay ]; then
  # replay (the default method) where only adapter_distill was measured: the 115-task stream, clinc150-50 and
  # long15's three orders, beside the references of those suites; banking77's ewc and lwf.
  ( deadline=$limit; part 330 stream115 stream115 replay "${stream[@]}" ) &
  stream_lane=$!
  deadline=$(( limit - 20 ))
  lanes=()
  ( part 200 clinc150-50 clinc150-50 replay; part 110 clinc150-50 clinc150-50 joint ) & lanes+=($!)
  ( part 225 clinc150-50 clinc150-50 isolation; part 75 long15-order0 long15 joint ) & lanes+=($!)
  ( part 100 long15-order0 long15 replay; part 100 long15-order1 long15 replay --order 1
    part 90 long15-order0 long15 isolation ) & lanes+=($!)
  ( part 100 long15-order2 long15 replay --order 2; part 130 banking77 banking77 ewc
    part 100 banking77 banking77 lwf ) & lanes+=($!)
  wait "${lanes[@]}"
  echo "replay lanes done at $(( $(date +%s) - start )) s" >> "$R/lanes.txt"
  merges=()
  for run in clinc150-50 banking77 long15-order0 long15-order1 long15-order2; do merge $run & merges+=($!); done
  wait "${merges[@]}"
  wait "$stream_lane"
  merge stream115
elif [ "${PLAN:-suites}" = baselines ]; then
  # The shared-adapter methods on the suites the references measured, in parts that merge with them
  # (joint_at_end only concerns joint): five lanes of two parts.
  deadline=$(( limit - 10 ))
  lanes=()
  ( part 150 clinc150-10 clinc150-10 sequential; part 140 clinc150-10 clinc150-10 replay ) & lanes+=($!)
  ( part 200 clinc150-10 clinc150-10 ewc; part 150 clinc150-10 clinc150-10 lwf ) & lanes+=($!)
  ( part 140 intents15 intents15 sequential; part 135 intents15 intents15 replay ) & lanes+=($!)
  ( part 205 intents15 intents15 ewc; part 150 intents15 intents15 lwf ) & lanes+=($!)
  ( part 90 banking77 banking77 sequential; part 95 banking77 banking77 replay ) & lanes+=($!)
  wait "${lanes[@]}"
  echo "baseline lanes done at $(( $(date +%s) - start )) s" >> "$R/lanes.txt"
  merges=()
  for run in intents15 banking77 clinc150-10; do merge $run & merges+=($!); done
  wait "${merges[@]}"
else
  ( deadline=$limit; part 470 stream115 stream115 adapter_distill "${stream[@]}" ) &
  stream_lane=$!
  deadline=$(( limit - 20 ))
  lanes=()
  ( part 380 clinc150-50 clinc150-50 adapter_distill ) & lanes+=($!)
  ( part 225 clinc150-50 clinc150-50 isolation; part 75 long15-order0 long15 joint; speed ) & lanes+=($!)
  ( part 110 clinc150-50 clinc150-50 joint; part 125 banking77 banking77 isolation
    part 90 long15-order0 long15 isolation ) & lanes+=($!)
  ( part 175 banking77 banking77 adapter_distill; part 70 banking77 banking77 joint
    part 150 long15-order2 long15 adapter_distill --order 2 ) & lanes+=($!)
  ( part 150 long15-order0 long15 adapter_distill; part 150 long15-order1 long15 adapter_distill --order 1 ) &
  lanes+=($!)
  wait "${lanes[@]}"
  echo "suite lanes done at $(( $(date +%s) - start )) s" >> "$R/lanes.txt"
  merges=()
  for run in clinc150-50 banking77 long15-order0 long15-order1 long15-order2; do merge $run & merges+=($!); done
  wait "${merges[@]}"
  wait "$stream_lane"
  echo "stream lane done at $(( $(date +%s) - start )) s" >> "$R/lanes.txt"
  merge stream115
fi
$PY benchmarks/summarize_tasks.py "$R" $quick > /dev/null
[ -n "${smi:-}" ] && kill "$smi"
echo "all done at $(( $(date +%s) - start )) s" >> "$R/lanes.txt"

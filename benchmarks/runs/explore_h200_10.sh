#!/usr/bin/env bash
# The exploration run of benchmarks/results/speed/h200-10 (after `benchmarks/device.sh gather` of the model
# pieces): one and 64 streams alone, each profiled (kernels, GPU idle gaps, host functions), with the
# memory-efficient attention kernel at 64 rows beside the configured one; then side by side, 1,000 documents
# learned at once (`finetune`, profiled: the phases and the scoring) and task training at batch 512 with and
# without the prompts' shared prefix run once per batch.
#   OUT=/tmp/x bash benchmarks/runs/explore_h200_10.sh
set -uo pipefail
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/x}
mkdir -p "$OUT"
run() {  # run NAME SECONDS ARGS...: one speed.py process, logged, stopped after SECONDS
  local name=$1 t=$2; shift 2
  mkdir -p "$OUT/$name"
  timeout -k 5 "$t" python3 benchmarks/speed.py --model /root/models --set data_dir=/root/data \
    --backend compiled "$@" --out "$OUT/$name" > "$OUT/$name/log.txt" 2>&1
  echo "$name: exit $? at $SECONDS s" | tee -a "$OUT/summary.txt"
}
run streams "${STREAMS_S:-170}" --sections streams --streams 1,64 --eager-streams none --host-check none \
  --new-tokens 64 --profile --efficient-attention 64
run learn "${LEARN_S:-110}" --sections learn_many --learn-specs finetune --many 1000 --sequential 1 \
  --many-epochs 3 --profile \
  --fast-optim pack_tokens=512:autocast=true:batch_size=16:compile=true:compile_mode=reduce-overhead &
(
  run tasks "${TASKS_S:-60}" --sections tasks --task-examples 2048 --task-batch 512 --profile
  run tasks-shared "${TASKS_S:-60}" --sections tasks --task-examples 2048 --task-batch 512 \
    --set tasks.share_prefix=true
) &
wait

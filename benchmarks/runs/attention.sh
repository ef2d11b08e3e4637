#!/usr/bin/env bash
# The decoding attention's kernels on one GPU machine, after `benchmarks/device.sh ready`:
#   OUT=/tmp/out bash benchmarks/runs/attention.sh [SECONDS]
# 1. the attention alone (benchmarks/attention_kernels.py): each kernel at 1, 64 and 256 rows and two cache
#    lengths, timed as a CUDA graph of 30 calls, each one's error against float32 (~1 minute);
# 2. then streams alone: 1, 64 and 256 prompts as configured (eager at 1; on a GPU the Triton kernel), each
#    again with PyTorch's choice of kernel (generation.decode_attention_kernel=library; h200-12/ ran this
#    script before the Triton kernel was the default, with --triton-attention in its place), and one stream
#    as configured once more after the other rows (speed.py --again). Results under $OUT/kernels/ and $OUT/streams/. KERNELS=0 skips the
#    first part.
set -uo pipefail
limit=${1:-560}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$OUT/kernels" "$OUT/streams"
if [ "${KERNELS:-1}" = 1 ]; then
  timeout -k 5 100 "$PY" benchmarks/attention_kernels.py --out "$OUT/kernels" > "$OUT/kernels/log.txt" 2>&1
  echo "kernels: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
fi
timeout -k 5 $(( limit - ($(date +%s) - start) - 10 )) "$PY" benchmarks/speed.py --model "${MODEL:-/root/models}" \
  --set data_dir="${DATA:-/root/data}" --backend compiled --sections streams --streams "${STREAMS:-1,64,256}" \
  --eager-streams 1 --host-check none --new-tokens 64 --library-kernel "${LIBRARY:-1,64,256}" \
  --again "${AGAIN:-1}" --out "$OUT/streams" > "$OUT/streams/log.txt" 2>&1
echo "streams: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"

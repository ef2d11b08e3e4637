#!/usr/bin/env bash
# Doc-to-LoRA on a GPU machine, in two phases that can run in separate calls (after `benchmarks/device.sh ready`,
# with the accelerate wheel in .device/whl):
#   bash benchmarks/runs/doc2lora.sh train SECONDS [RESUME]
#       meta-train the hypernetwork on the packaged SmolLM2 for SECONDS of training steps (teacher signals
#       first, cached in $CACHE across calls on the same machine) into $OUT/gpu1/, continuing RESUME (an
#       earlier run's hypernetwork.safetensors, its optimizer moments beside it) when given; when `nvidia-smi -L`
#       lists two GPUs, then 2 processes (accelerate launch, DDP) for a tenth of SECONDS into $OUT/gpu2/ and the
#       1-vs-2 throughput ($OUT/throughput.json)
#   bash benchmarks/runs/doc2lora.sh rows SECONDS WEIGHTS
#       the knowledge-benchmark rows of `doc2lora` with WEIGHTS beside the committed rows and the oracle
#       (50 novel-facts documents): gated at the threshold calibrated on held-out queries, and every adapter on
#       every query (the gate's ablation), side by side ($OUT/knowledge/1, 2)
# CPU check of the script itself (a tiny setting, the packaged model from the local cache):
#   QUICK=1 MODEL=smollm2-135m-instruct DATA=../shared/data OUT=/tmp/d2l-out bash benchmarks/runs/doc2lora.sh train 20
#   QUICK=1 ... bash benchmarks/runs/doc2lora.sh rows 200 /tmp/d2l-out/gpu1/hypernetwork.safetensors
set -uo pipefail
phase=${1:?phase: train | rows}
budget=${2:?seconds}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
CACHE=${CACHE:-$OUT/teacher-cache}
PY=${PYTHON:-python3}
KNOWLEDGE=benchmarks/results/knowledge/h200-novel_facts-50-weights
mkdir -p "$OUT"
start=$(date +%s)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${QUICK:-0}" = 1 ]; then
  device=cpu
  settings=(--set documents=8 --set 'sources=[facts,records,agnews]' --set max_chars=300 --set max_eval_documents=2
            --set eval_every=2 --set docs_per_step=2 --set queries_per_doc=2 --set architecture.hidden=64
            --set architecture.heads=2 --set architecture.rank=4 --set architecture.chunk_tokens=96
            --set distill.max_prefix_queries=2 --set distill.max_entity_queries=1 --set distill.teacher_max_new_tokens=8)
  bench=(--docs 2 --quick)
else
  device=auto
  settings=(--set documents=1200 --set max_eval_documents=48 --set eval_every=50 --set docs_per_step=16
            --set queries_per_doc=8 --set model=$MODEL --set dtype=float32 --set distill.teacher_batch_size=128
            --set architecture.hidden=384 --set architecture.heads=6 --set architecture.rank=8
            --set architecture.chunk_tokens=256 --set max_chars=1100 --set learning_rate=5e-4)
  bench=(--docs 50)
fi
common=(--model "$MODEL" --device $device --set data_dir=$DATA --set cache_dir=$CACHE --set steps=100000 -v
        "${settings[@]}")

case "$phase" in
  train)
    resume=${3:-}
    [ -n "$resume" ] && common+=(--set "resume=$resume")
    # 1. one process (one GPU): the weights that ship. The time limit counts training steps only: the
    # teacher signals (first call on a machine) and the final evaluation come on top.
    mkdir -p "$OUT/gpu1"
    $PY -m continual_transformer.hypernetwork.cli "${common[@]}" --set time_limit=$budget --out "$OUT/gpu1" \
      > "$OUT/gpu1/log.txt" 2>&1
    echo "gpu1: exit $? after $(( $(date +%s) - start )) s"; tail -n 1 "$OUT/gpu1/log.txt"
    # 2. two processes (two GPUs), the same documents (teacher signals from the cache): throughput 1 vs 2
    if [ "${gpus:-0}" -ge 2 ] && $PY -c "import accelerate" 2>/dev/null; then
      mkdir -p "$OUT/gpu2"
      $PY -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m continual_transformer.hypernetwork.cli "${common[@]}" \
        --set time_limit=$(( budget / 10 )) --out "$OUT/gpu2" > "$OUT/gpu2/log.txt" 2>&1
      echo "gpu2: exit $? after $(( $(date +%s) - start )) s"; tail -n 1 "$OUT/gpu2/log.txt"
    else
      echo "gpu2: not run (GPUs: ${gpus:-0}; accelerate: $($PY -c 'import accelerate; print(accelerate.__version__)' 2>&1 | tail -n 1))"
    fi
    $PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for name in ("gpu1", "gpu2"):
    path = out / name / "report.json"
    if path.is_file():
        r = json.loads(path.read_text())
        keys = ("world_size", "steps", "train_seconds", "teacher_seconds", "documents_per_second",
                "tokens_per_second", "held_out_kl_base", "held_out_kl_final", "device", "rank_checksums")
        rows[name] = {k: r[k] for k in keys}
if len(rows) == 2:
    rows["speedup_documents_per_second"] = rows["gpu2"]["documents_per_second"] / rows["gpu1"]["documents_per_second"]
(out / "throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows))
PY
    ;;
  rows)
    weights=${3:?weights}
    report=$(dirname "$weights")/report.json
    threshold=$($PY -c "import json; g=json.load(open('$report'))['gate']; \
print(round((g['other_p95'] + g['own_p25']) / 2, 3) if g else 0.5)")
    echo "gate threshold: $threshold"
    n=0
    for spec in "doc2lora:gate_threshold=$threshold" "doc2lora:gate_threshold=-1"; do
      n=$((n + 1)); mkdir -p "$OUT/knowledge/$n"
      [ -f $KNOWLEDGE/results.json ] && [ "${QUICK:-0}" != 1 ] && cp $KNOWLEDGE/results.json "$OUT/knowledge/$n/"
      timeout "$budget" $PY -m continual_transformer --model "$MODEL" --set data_dir=$DATA \
        --set generation.batch_size=64 --set model.dtype=float32 --set strategies.doc2lora.hypernetwork=$weights \
        bench knowledge --no-baselines --strategies "$spec" "${bench[@]}" --out "$OUT/knowledge/$n" \
        > "$OUT/knowledge/$n/log.txt" 2>&1 &
    done
    wait
    echo "knowledge: done after $(( $(date +%s) - start )) s" ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac

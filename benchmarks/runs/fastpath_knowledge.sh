#!/usr/bin/env bash
# Knowledge acquisition on the fast decoding path against the eager one: the knowledge benchmark's quick
# profile (8 novel-facts documents) for retrieval, ttt and knowledge_store, once with
# generation.backend=eager and once with the fast backend, side by side; then every figure other than
# timings compared row by row ($OUT/fastpath_knowledge/compare.md). Not timing-sensitive: it can run beside
# other work. Run after `benchmarks/device.sh ready` (retrieval needs the MiniLM embedder):
#   bash benchmarks/runs/fastpath_knowledge.sh [SECONDS]      (each process stopped after SECONDS; default 480)
#   QUICK=1 BACKEND=static MODEL=smollm2-135m-instruct DATA=../shared/data PYTHON=python \
#     CTT_CACHE=~/.cache/continual_transformer bash benchmarks/runs/fastpath_knowledge.sh 170   (the CPU test:
#     two documents, knowledge_store only -- or STRATEGIES=a,b,... -- and 6 tokens for text a strategy writes
#     itself, as ttt's anchors; probes are answered in the profile's 16 tokens)
#   BACKEND=recorded MODEL=... DATA=... PYTHON=... bash benchmarks/runs/fastpath_knowledge.sh 3000   (the GPU's
#     recorded chunks, compiled prompt pass and token pick run on the CPU without graphs:
#     benchmarks/recorded_on_cpu.py, generation.backend=compiled; QUICK=1 for two documents)
#   VERBOSE=1 ...   (each process logs what the library does: -v; the recorded backend names each recording)
#   COMPARE_ONLY=1 OUT=DIR bash benchmarks/runs/fastpath_knowledge.sh    (compare what DIR already holds)
#   SET=generation.decode_attention=grouped bash benchmarks/runs/fastpath_knowledge.sh   (one more setting on
#     both backends; grouped attention only acts on the fast one)
#   PROCESSES="finetune lora,in_context ..." bash benchmarks/runs/fastpath_knowledge.sh   (the strategies, one
#     process per word on each backend; default "retrieval,knowledge_store ttt")
set -uo pipefail
limit=${1:-480}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
QUICK=${QUICK:-}
BACKEND=${BACKEND:-compiled}
PY=${PYTHON:-python3}
dir=$OUT/fastpath_knowledge
start=$(date +%s)
run() {  # run BACKEND NAME STRATEGIES [OPTIONS...]: one benchmark process, logged, stopped at the limit
  local backend=$1 name=$2 strategies=$3; shift 3
  mkdir -p "$dir/$backend/$name"
  local program=(-m continual_transformer) setting=$backend
  [ "$backend" = recorded ] && program=("$PWD/benchmarks/recorded_on_cpu.py") setting=compiled
  timeout -k 5 "$(( limit - 10 ))" "$PY" "${program[@]}" --model "$MODEL" --set data_dir="$DATA" \
    --set generation.batch_size=64 --set model.dtype=float32 --set generation.backend="$setting" \
    ${SET:+--set "$SET"} ${VERBOSE:+-v} "$@" \
    bench knowledge --quick ${QUICK:+--docs 2 --batches 1} --no-baselines --strategies "$strategies" \
    --out "$dir/$backend/$name" \
    > "$dir/$backend/$name/log.txt" 2>&1
  echo "$backend/$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$dir/summary.txt"
}
mkdir -p "$dir"
[ -n "${COMPARE_ONLY:-}" ] || for backend in eager "$BACKEND"; do
  if [ -n "$QUICK" ]; then
    run "$backend" stores "${STRATEGIES:-knowledge_store}" --set generation.max_new_tokens=6 \
      --set generation.threads=1 &
  else
    for group in ${PROCESSES:-retrieval,knowledge_store ttt}; do
      run "$backend" "${group//,/-}" "$group" &
    done
  fi
done
wait
"$PY" - "$dir" eager "$BACKEND" <<'EOF'
import json, sys
from pathlib import Path
root, slow, fast = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
TIMING = ("seconds", "latency", "tokens_per_s", "peak_memory", "learn_s", "answer_s")
def rows(backend):
    out = {}
    for path in sorted((root / backend).glob("*/results.json")):
        out.update(json.loads(path.read_text()).get("strategies", {}))
    return out
a, b = rows(slow), rows(fast)
lines = [f"# Knowledge figures, `{slow}` against `{fast}` decoding (quick profile; timings left out)", "",
         "| strategy | figure | " + slow + " | " + fast + " | same |", "|---|---|---:|---:|---|"]
summary = {}
for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
        lines.append(f"| `{name}` | (measured on one backend only) | | | |")
        continue
    same_all = True
    for key, value in a[name].items():
        if any(t in key for t in TIMING) or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        other = b[name].get(key)
        same = other is not None and abs(value - other) <= 1e-9 * max(1.0, abs(value))
        same_all &= same
        lines.append(f"| `{name}` | {key} | {value:.4g} | {other if other is None else format(other, '.4g')} | "
                     f"{'yes' if same else 'NO'} |")
    predictions = [(x.get("prediction"), y.get("prediction"))
                   for x, y in zip(a[name].get("examples", []), b[name].get("examples", []))]
    equal = sum(x == y for x, y in predictions)
    lines.append(f"| `{name}` | example answers equal | | | {equal}/{len(predictions)} |")
    summary[name] = {"figures_equal": same_all, "examples_equal": f"{equal}/{len(predictions)}"}
(root / "compare.md").write_text("\n".join(lines) + "\n")
(root / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n".join(lines))
EOF

#!/usr/bin/env bash
# Speed of answering and learning on one GPU machine, each figure beside the eager Hugging Face path
# (benchmarks/speed.py). Run after `benchmarks/device.sh ready` (the embedder serves memory_bank and
# retrieval):
#   bash benchmarks/runs/speed.sh [SECONDS]      (every section ends inside SECONDS; default 540)
#   QUICK=1 BACKEND=static MODEL=smollm2-135m-instruct DATA=../shared/data PYTHON=python \
#     CTT_CACHE=~/.cache/continual_transformer bash benchmarks/runs/speed.sh 400    (the CPU test)
# Two phases, each process stopped at its share of the time and writing its results as each figure finishes
# (a process cut off still leaves the figures it measured):
#   1. streams alone (STREAMS_SHARE, default 55%): first the headline figures, 1, 64 and 256 prompts at once
#      on the compiled backend as configured (fused q/k/v and gate/up products on a GPU), with the eager
#      baseline at 1 only (64 eager streams: 2,099 new tokens/s in h200-3/; 256 ran past the section's
#      time there), one more compiled call per count under the profiler (kernels and GPU busy time per
#      new token, the longest kernels: where a step's time goes at 1, 64 and 256 rows) and one with the
#      prompt pass uncaptured (its answers must equal the recorded prompt pass's); then the same
#      compiled path with fused_projections=never at 1 and 64 (a compile each, ~40 s: the fused/unfused
#      ratio); then the compiled step run from the host at 1 stream, which must give the recorded chunks'
#      answers. Nothing else on the GPU or the CPU while they are timed. Expected on an H200 (one compile per shape
#      ~40-45 s, the first call of each shape): headlines done by ~165 s, the unfused pair by ~250 s;
#   2. side by side, until the end: the strategy latencies in two processes (each with its own base row,
#      so each ratio is taken under the same load), learning (one ~200-token document with the default
#      strategy `finetune` and with `ttt`; 1,000 documents at once with a fixed number of epochs against
#      a few learned one at a time), task training and then the service section (continuous batching off
#      and on, ~1-2 minutes in the tasks process, which ended early before: speed.sh's time is unchanged).
#      Compiling is CPU work (16 cores) and the 135M model
#      leaves the GPU mostly idle, so these overlap well; their absolute times include that load (noted in
#      the results), the ratios are taken within one process.
# Where the time went before (one 540 s run, everything in sequence): one compile per batch shape (~35 s for
# 1 stream, ~75 s for 64), a retrace for every new prompt length (the static cache's length followed the
# prompt; now prompts are padded to 64-token buckets), knowledge_store decoding uncompiled (a new capture
# hook per call; now the backbone's taps stand in), a compile per strategy that changes the model, and
# 1,000 documents learned for up to 30 epochs (now --many-epochs 3). Decoding on the compiled backend is now
# the backbone's lean loop (one CUDA-graph step per token; if capturing fails it falls back to the compiled
# step, then the plain one, with a log line: grep the logs for "lean decoding").
# LEARNING=1 runs only the learning targets, one process after another with the machine to themselves:
# learn1 and learn_many with `ttt` (the default strategy) on the default speed options, again with
# FAST_OPTIM (default: the same plus compile=true; the first call, which compiles, is reported apart from
# the steady-state figure), learn_many with `finetune`, the context-distillation teacher (32 documents one at
# a time on eager against together on the fast backend), then task training (also with the prompts' shared
# prefix computed once per batch):
#   LEARNING=1 bash benchmarks/runs/speed.sh 560
# TARGETS=answer and TARGETS=learn run the issue's target figures in two calls, TARGETS=all in one (each
# described at its branch below; `benchmarks/results/speed/h200-7/NOTES.md` and `h200-8/NOTES.md` have what
# they measured).
# FAST_OPTIM=... sets the speed options of the learning part in the full run too (speed.py --fast-optim).
# Results land under $OUT/<part>/ (results.json, results.md, speed.png, log.txt); $OUT/summary.json merges
# the headline figures.
set -uo pipefail
limit=${1:-540}
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=${CTT_CACHE:-/root/ctt-cache}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/root/models}
DATA=${DATA:-/root/data}
QUICK=${QUICK:-}
BACKEND=${BACKEND:-compiled}
PY=${PYTHON:-python3}
margin=12  # seconds kept for the merge at the end
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( limit - margin - ($(date +%s) - start) )); }
part() {  # part NAME SECONDS ARGS...: one speed.py process, logged, stopped after SECONDS
  local name=$1 t=$2; shift 2
  (( t < 15 )) && { echo "$name: no time left" | tee -a "$OUT/summary.txt"; return; }
  mkdir -p "$OUT/$name"
  timeout -k 5 "$t" "$PY" benchmarks/speed.py --model "$MODEL" --set data_dir="$DATA" \
    ${QUICK:+--quick} --backend "$BACKEND" "$@" --out "$OUT/$name" > "$OUT/$name/log.txt" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
}
FAST_OPTIM=${FAST_OPTIM:-}
compiled=${FAST_OPTIM:-pack_tokens=512:autocast=true:batch_size=16:compile=true}
if [ "${TARGETS:-}" = answer ]; then
  # The issue's answering figures alone (1, 64 and 256 streams; prompt-lookup decoding), then beside each
  # other: one ~230-token news article learned by `ttt` with the compiled step (default compile mode) and
  # with the step recorded as CUDA graphs (compile_mode=reduce-overhead), and task training at batch 128,
  # 512, and 512 with the prompts' shared prefix run once per batch, one after another:
  #   TARGETS=answer bash benchmarks/runs/speed.sh 580
  part streams $(( limit * 62 / 100 )) --sections streams,speculative --streams 1,64,256 --eager-streams 1 \
    --host-check none --new-tokens 64
  part learning-ttt-graphs "$(left)" --sections learn1 --learn-specs ttt --learn1-benchmark news \
    --fast-optim "$compiled:compile_mode=reduce-overhead" &
  part learning-ttt-compiled "$(left)" --sections learn1 --learn-specs ttt --learn1-benchmark news \
    --fast-optim "$compiled" &
  (
    part tasks-128 "$(left)" --sections tasks --task-examples 1024 --task-batch 128
    part tasks-512 "$(left)" --sections tasks --task-examples 2048 --task-batch 512
    part tasks-512-shared-prefix "$(left)" --sections tasks --task-examples 2048 --task-batch 512 \
      --set tasks.share_prefix=true
  ) &
  wait
elif [ "${TARGETS:-}" = all ]; then
  # Every target figure in one call, on the model alone (no embedder), each part with the machine to itself
  # (beside each other, the parts' host work competed for the CPU: the `lora` ratio of h200-9/b-final/ was
  # taken while task training started): 1, 64 and 256 streams with the eager baseline at 1 and the chunks
  # read before the next is queued at 1 (no compile); 1,000 documents at once with `finetune` (steps
  # recorded as CUDA graphs); the latency of `lora` against the base model; task training at batch 512,
  # then 128 while time is left; with KNOWLEDGE=1 (wikitext2 under $DATA), the knowledge of `ttt` and
  # `finetune` on the fast path against eager beside task training. The knowledge check's compiled
  # processes compile first: give it a call of its own (fastpath_knowledge.sh) where the check matters:
  #   TARGETS=all bash benchmarks/runs/speed.sh 570
  # STREAMS_EXTRA adds speed.py options to the streams part (comparisons such as --unpaired 1,64), and
  # STREAMS_SHARE, LEARN_SHARE and LORA_SHARE set those parts' shares of the time (default 42%, 17%, 20%;
  # task training takes what is left). PARTS picks some of the parts, in this order (default all four):
  # where the compiled task steps and scoring compile first, the target figures take two calls:
  #   TARGETS=all PARTS="learn tasks" LEARN_SHARE=45 bash benchmarks/runs/speed.sh 590
  #   TARGETS=all PARTS="streams lora" STREAMS_SHARE=60 LORA_SHARE=35 bash benchmarks/runs/speed.sh 590
  parts=" ${PARTS:-streams learn lora tasks} "
  if [[ $parts == *" streams "* ]]; then
    part streams $(( limit * ${STREAMS_SHARE:-42} / 100 )) --sections streams --streams 1,64,256 \
      --eager-streams 1 --host-check none --new-tokens 64 --not-ahead 1 ${STREAMS_EXTRA:-}
  fi
  if [[ $parts == *" learn "* ]]; then
    part learning-finetune-graphs $(( limit * ${LEARN_SHARE:-17} / 100 )) --sections learn_many \
      --learn-specs finetune --many 1000 --sequential 1 --many-epochs 3 \
      --fast-optim "$compiled:compile_mode=reduce-overhead"
  fi
  if [[ $parts == *" lora "* ]]; then
    part strategies-lora $(( limit * ${LORA_SHARE:-20} / 100 )) --sections strategies --new-tokens 32 \
      --strategy-docs 5 --batched-learning --probes 3 --strategies none,lora
  fi
  t=$(left)
  if [[ $parts == *" tasks "* ]]; then
    (
      part tasks-512 "$t" --sections tasks --task-examples 2048 --task-batch 512
      part tasks-128 "$(left)" --sections tasks --task-examples 1024 --task-batch 128
    ) &
  fi
  [ -n "${KNOWLEDGE:-}" ] && OUT=$OUT PROCESSES="ttt finetune" bash benchmarks/runs/fastpath_knowledge.sh "$t" \
    > "$OUT/fastpath_knowledge.log" 2>&1 &
  wait
elif [ "${TARGETS:-}" = learn ]; then
  # 1,000 documents at once with `finetune` (the fast options, then also compiled, then recorded as CUDA
  # graphs with the objects made so far frozen out of the garbage collector), and the context-distillation
  # teacher, side by side (fastpath_knowledge.sh can run beside them):
  #   TARGETS=learn bash benchmarks/runs/speed.sh 560
  part learning-finetune "$(left)" --sections learn_many --learn-specs finetune --profile --many 1000 \
    --sequential 1 --many-epochs 3 &
  part learning-finetune-compiled "$(left)" --sections learn_many --learn-specs finetune --many 1000 \
    --sequential 1 --many-epochs 3 --fast-optim "$compiled" &
  part teacher "$(left)" --sections teacher --teacher-docs 32 &
  # the same compiled run with the objects made before the timed call frozen out of the garbage collector
  part learning-finetune-graphs-frozen "$(left)" --sections learn_many --learn-specs finetune --many 1000 \
    --sequential 1 --many-epochs 3 --fast-optim "$compiled:compile_mode=reduce-overhead" --gc-freeze &
  wait
elif [ -n "${LEARNING:-}" ]; then
  part learning-ttt $(( limit * 18 / 100 )) --sections learn1,learn_many --learn-specs ttt --profile \
    --many 1000 --sequential 3 --many-epochs 3
  # learn1 here on the news article closest to the target's 200 tokens (230; novel-facts documents are ~90)
  part learning-ttt-compiled $(( limit * 38 / 100 )) --sections learn1,learn_many --learn-specs ttt --profile \
    --learn1-benchmark news --many 1000 --sequential 1 --many-epochs 3 --fast-optim "$compiled"
  part learning-finetune $(( limit * 15 / 100 )) --sections learn_many --learn-specs finetune --profile \
    --many 1000 --sequential 1 --many-epochs 3
  part teacher $(( limit * 10 / 100 )) --sections teacher --teacher-docs 32
  part tasks $(( limit * 10 / 100 )) --sections tasks --task-examples 1024 --task-batch 128 --profile
  # the task prompts' shared prefix (system prompt, instruction, label list: most of each row) run once per
  # batch, off on a GPU by default (tasks.share_prefix): measured here at the large batch
  part tasks-shared-prefix "$(left)" --sections tasks --task-examples 1024 --task-batch 128 \
    --set tasks.share_prefix=true
elif [ -n "$QUICK" ]; then
  part streams $(( limit * 35 / 100 )) --sections streams --threads 1 --host-check none
  t=$(left)
  part strategies-a "$t" --sections strategies --threads 1 --strategies none,knowledge_store,retrieval &
  part strategies-b "$t" --sections strategies --threads 1 --strategies none,ttt \
    --set strategies.ttt.optim.epochs=2 &
  part learning "$t" --sections learn1,learn_many --threads 1 --learn-specs finetune,ttt \
    --set strategies.ttt.optim.epochs=2 --set strategies.finetune.optim.epochs=2 --many 4 --sequential 2 \
    --many-epochs 1 &
  part tasks "$t" --sections tasks,service --threads 1 --task-examples 32 --service-clients 2 \
    --service-requests 1 --service-tokens 4,8 &
  wait
else
  # bf16 (the GPU default) and the compiled backend (static KV cache + CUDA graphs).
  part streams $(( limit * ${STREAMS_SHARE:-55} / 100 )) --sections streams,speculative --streams 1,64,256 \
    --eager-streams 1 --unfused 1,64 --sdpa 1,64 --host-check 1 --profile --new-tokens 64
  t=$(left)
  # Strategies that change the forward pass first; retrieval and memory_bank need the MiniLM embedder
  # (device.sh ready): without it they are skipped with a log line.
  part strategies-a "$t" --sections strategies --new-tokens 32 --strategy-docs 5 --batched-learning \
    --probes 3 --strategies none,knowledge_store,memory_layer,memory_bank,retrieval &
  part strategies-b "$t" --sections strategies --new-tokens 32 --strategy-docs 5 --batched-learning \
    --probes 3 --strategies none,ttt,finetune,lora,in_context &
  part learning "$t" --sections learn1,learn_many,teacher --learn-specs finetune,ttt --many 1000 \
    --sequential 3 --many-epochs 3 --teacher-docs 32 ${FAST_OPTIM:+--fast-optim "$FAST_OPTIM"} &
  # then the service: 16 clients through the generation thread, continuous batching off and on (both on
  # the static backend, uncompiled: the batch path would compile a graph per batch size and cache length)
  part tasks "$t" --sections tasks,service --task-examples 1024 --task-batch 128 --service-clients 16 \
    --service-requests 4 --service-tokens 16,32,64,128 --service-batch 16 --service-length 512 &
  wait
fi
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {}
for path in sorted(out.glob("*/results.json")):
    merged[path.parent.name] = json.loads(path.read_text()).get("summary", {})
(out / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
print(json.dumps(merged, indent=2))
EOF
for f in "$OUT"/*/results.md; do echo "== $f"; tail -n 20 "$f"; done

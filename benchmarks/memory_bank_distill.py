"""Can ``memory_bank`` values carry facts? Context-distillation KL on training queries and held-out probes.

Learns the benchmark's documents one by one with ``memory_bank`` (``objective: context_distill`` unless
``--set`` says otherwise), then asks, for every probe of the benchmark:

* **teacher**: the base model with the probe's document in the prompt (cloze: document, blank line, the
  prompt as raw text; question: the distillation teacher template through the chat template) writes its
  greedy answer; its top-k at each answer token is the target;
* **KL**: KL(teacher || student) on those tokens for the base model without the document and for the bank
  as it answers (the probe's own key retrieves); and whether the probe retrieved a memory of its own
  document;
* **fit** (``--fit``): a ceiling of the design: for each document, fresh values for its memories are
  trained on the held-out probes themselves (the probes as the distillation queries), then the probes' KL
  is measured again. If even this leaves the KL high, one gated vector per sentence cannot carry the answer.

The training queries' KL before and after comes from each document's learn report. Writes
``diagnostics.json``:

    PYTHONPATH=src python benchmarks/memory_bank_distill.py --docs 6 --fit \\
        --out benchmarks/results/knowledge/cpu-quick-memory_bank
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="novel_facts")
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--fit", action="store_true", help="also train values on the probes themselves")
    parser.add_argument("--set", dest="set_items", action="append", default=[], help="config key=value")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from continual_transformer import ContinualTransformer, distillation
    from continual_transformer.config import load_config
    from continual_transformer.evaluation import metrics
    from continual_transformer.evaluation.datasets import load_benchmark

    config = load_config(
        None,
        {
            "model": {"name": args.model},
            "data_dir": args.data_dir,
            "strategy": "memory_bank",
            "strategies": {"memory_bank": {"objective": "context_distill"}},
        },
        args.set_items,
    )
    ct = ContinualTransformer(config=config)
    strategy, backbone = ct.strategy, ct.backbone
    cfg = strategy.config
    bench = load_benchmark(args.benchmark, n_docs=args.docs, seed=args.seed, data_dir=args.data_dir)
    texts = {d.id: d.text for d in bench.documents}

    started = time.perf_counter()
    owner: list[str] = []  # document of each stored slot (no eviction at these sizes)
    learned = []
    for document in bench.documents:
        report = strategy.learn(document)
        owner += [document.id] * (strategy.store.size - len(owner))
        learned.append({"doc_id": document.id, "seconds": report.seconds, **report.extra})
    learn_seconds = time.perf_counter() - started

    def queries(probes):
        out = []
        for p in probes:
            doc = texts[p.doc_id]
            if p.kind == "cloze":
                out.append(distillation.DistillQuery("prefix", p.prompt, p.prompt, f"{doc}\n\n{p.prompt}"))
            else:
                teacher = cfg.distill.teacher_template.format(document=doc, query=p.prompt)
                out.append(
                    distillation.DistillQuery(
                        "question",
                        p.prompt,
                        backbone.format_prompt(p.prompt, chat=True),
                        backbone.format_prompt(teacher, chat=True),
                    )
                )
        return out

    probes = list(bench.probes)
    with strategy.disabled():
        examples = distillation.teacher_signals(backbone, queries(probes), cfg.distill)
    kl_base = strategy.query_kl(examples, fused=False)
    kl_bank = strategy.query_kl(examples)
    slots, _, valid = strategy.store.retrieve(
        strategy.keys([p.prompt for p in probes]), cfg.top_k, strategy.min_similarity
    )
    retrieved = valid.any(-1).tolist()
    own = [
        any(bool(v) and owner[int(s)] == p.doc_id for s, v in zip(row, ok))
        for p, row, ok in zip(probes, slots.tolist(), valid.tolist())
    ]
    teacher_right = [metrics.contains(e.continuation, p.answers) > 0 for e, p in zip(examples, probes)]

    def mean(values, mask=None):
        picked = [float(v) for v, m in zip(values, mask or [True] * len(values)) if m]
        return sum(picked) / len(picked) if picked else None

    result = {
        "benchmark": args.benchmark,
        "documents": len(bench.documents),
        "probes": len(probes),
        "config": {k: v for k, v in vars(cfg).items() if k != "distill"},
        "learn_seconds": learn_seconds,
        "memories": strategy.store.size,
        "training_queries": {
            "count": sum(r.get("distill_queries", 0) for r in learned),
            "fused": sum(r.get("distill_queries_fused", 0) for r in learned),
            "kl_before": mean(
                [r["distill_kl_before"] for r in learned if r.get("distill_kl_before") is not None]
            ),
            "kl_after": mean(
                [r["distill_kl_after"] for r in learned if r.get("distill_kl_after") is not None]
            ),
        },
        "held_out_probes": {
            "retrieved_any": mean(retrieved),
            "retrieved_own_document": mean(own),
            "teacher_answer_contains": mean(teacher_right),
            "kl_base": mean(kl_base.tolist()),
            "kl_bank": mean(kl_bank.tolist()),
            "kl_base_own_retrieved": mean(kl_base.tolist(), own),
            "kl_bank_own_retrieved": mean(kl_bank.tolist(), own),
        },
        "per_document": learned,
    }
    if args.fit:
        # the design's ceiling: values trained on the held-out probes themselves, one document at a time
        fit_after = torch.zeros(len(probes))
        fit_before = torch.zeros(len(probes))
        strategy.reset()
        for document in bench.documents:
            index = [i for i, p in enumerate(probes) if p.doc_id == document.id]
            keys = strategy.keys(strategy.examples(document.text))
            trained = strategy.distill_values(keys, [examples[i] for i in index])
            fit_before[index] = trained["kl_before"].cpu()
            fit_after[index] = trained["kl_after"].cpu()
        result["fit_on_probes"] = {
            "kl_before": mean(fit_before.tolist()),
            "kl_after": mean(fit_after.tolist()),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnostics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_document"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

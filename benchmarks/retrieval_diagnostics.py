"""Where does retrieval lose to the oracle? Ranking, gate and prompt of every probe, against its own document.

    python benchmarks/retrieval_diagnostics.py --benchmark novel_facts --docs 50
    python benchmarks/retrieval_diagnostics.py --benchmark boolq --set strategies.retrieval.retriever=bm25
    python benchmarks/retrieval_diagnostics.py --benchmark news --docs 6 --set model.device=cpu  # a check
    python benchmarks/retrieval_diagnostics.py --docs 1000 --ranking-only   # ranking and gate only (CPU)

The ``retrieval`` strategy (as configured: ``--set strategies.retrieval.KEY=VALUE``) indexes the benchmark's
documents. For every probe, through the strategy's public API (``search``, ``augment``, ``chunk_doc``,
``doc_ids``, state save/load):

* ranking: the rank of the best chunk of the probe's own document among all chunks, hit@k for k = 1..5;
* gate: whether the chunks retrieved for the probe pass the relevance gate, whether the own document's best
  chunk would pass it, whether the own document ends up in the prompt, and how many distinct documents do;
* accuracy (``contains``, as in the knowledge benchmark) with the backbone when the prompt holds: nothing
  (``none``), what the strategy as configured puts there (``retrieval``), exactly the top-k chunks for
  k = 1..4 with the gate open (``top-k``; top-1 is the "only the best chunk" case), and only the probe's own
  document in in_context's prompt format (``oracle``, the knowledge benchmark's ceiling row).

Each probe the oracle answers and retrieval does not is put down to one cause: its document was not among
the ``top_k`` chunks (``not retrieved``), it was but the gate closed (``gated out``), or it was in the prompt
and the answer was still wrong (``in the prompt``: other documents beside it, a chunk instead of the whole
document, retrieval's prompt and token bias). Writes ``results.json`` (settings, machine, summary and every
probe) and ``results.md`` to ``--out/--name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from continual_transformer.backbone import Backbone
from continual_transformer.config import load_config, to_dict
from continual_transformer.evaluation import system
from continual_transformer.evaluation.datasets import Probe, load_benchmark
from continual_transformer.evaluation.knowledge import OracleReader, answer_probes, score
from continual_transformer.evaluation.report import fmt, write_json
from continual_transformer.strategies import registry, strategy_config

logger = logging.getLogger("retrieval_diagnostics")

HIT_AT = (1, 2, 3, 4, 5)
CAUSES = ("not retrieved", "gated out", "in the prompt")


def _with_index(strategy, config, section) -> Any:
    """A retrieval strategy with settings ``section`` holding ``strategy``'s index (no re-learning)."""
    copy = registry.get("retrieval")(strategy.backbone, section, settings=config)
    copy.load_trainable_state(strategy.trainable_state())
    copy.load_extra_state(strategy.extra_state())
    return copy


def ranking(strategy, probes: list[Probe]) -> list[dict[str, Any]]:
    """Rank, hit@k and gate figures of each probe's own document, and what the configured prompt holds."""
    gate_open = (
        strategy.config.min_similarity
        if strategy.config.retriever == "dense"
        else strategy.config.min_relevance
    )
    prompts = [p.prompt for p in probes]
    every = strategy.search(prompts, len(strategy.chunk_ids))  # the full ranking of all chunks
    plans = strategy.augment(prompts)
    rows = []
    for probe, hits, plan in zip(probes, every, plans):
        docs = [strategy.doc_ids[strategy.chunk_doc[h.index]] for h in hits]
        rank = docs.index(probe.doc_id) + 1 if probe.doc_id in docs else None
        own_relevance = hits[rank - 1].relevance if rank is not None else None
        in_prompt = [strategy.doc_ids[strategy.chunk_doc[h.index]] for h in plan.hits]
        rows.append(
            {
                "doc_id": probe.doc_id,
                "kind": probe.kind,
                "prompt": probe.prompt,
                "answers": list(probe.answers),
                "rank": rank,
                **{f"hit@{k}": rank is not None and rank <= k for k in HIT_AT},
                "top1_doc": docs[0] if docs else None,
                "top1_relevance": hits[0].relevance if hits else None,
                "own_relevance": own_relevance,
                "own_passes_gate": own_relevance is not None and own_relevance >= gate_open,
                "gate_passed": bool(plan.hits),
                "own_in_prompt": probe.doc_id in in_prompt,
                "chunks_in_prompt": len(in_prompt),
                "docs_in_prompt": len(set(in_prompt)),
            }
        )
    return rows


def cause(row: dict[str, Any], top_k: int) -> str:
    """Why retrieval missed a probe the oracle got right (see the module docstring)."""
    if row["own_in_prompt"]:
        return "in the prompt"
    if row["rank"] is not None and row["rank"] <= top_k:
        return "gated out"
    return "not retrieved"


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(set_items=args.set)
    backbone = Backbone.load(config.model, config.generation)
    bench = load_benchmark(args.benchmark, n_docs=args.docs, seed=args.seed, data_dir=config.data_dir)
    probes = _sample(list(bench.probes), args.probes, args.seed)
    section = strategy_config(config, "retrieval")
    strategy = registry.get("retrieval")(backbone, section, settings=config)
    conditions: dict[str, list[str]] = {}
    try:
        strategy.index(bench.documents)  # what learning does, without the loss before and after
        logger.info("indexed %d documents", len(bench.documents))
        rows = ranking(strategy, probes)
        logger.info("ranked %d probes over %d chunks", len(probes), len(strategy.chunk_ids))
        chunks = len(strategy.chunk_ids)
        chunking = {"chunk_tokens": strategy.chunk_tokens, "chunk_overlap": strategy.chunk_overlap}
        margins = {}  # what the prompt would hold with each margin
        for margin in args.margins:
            variant = _with_index(
                strategy, config, dataclasses.replace(section, other_documents_margin=margin)
            )
            try:
                held = ranking(variant, probes)
            finally:
                variant.close()
            margins[f"{margin:g}"] = {
                "own_in_prompt": _share(row["own_in_prompt"] for row in held),
                "docs_in_prompt_mean": float(np.mean([row["docs_in_prompt"] for row in held])),
            }
        if args.ranking_only:
            return _results(args, backbone, bench, section, config, rows, chunks, chunking, margins, None, [])

        floor = registry.get("none")(backbone, strategy_config(config, "none"), settings=config)
        conditions["none"] = answer_probes(floor, probes, args.max_new_tokens).predictions
        floor.close()
        conditions["retrieval"] = answer_probes(strategy, probes, args.max_new_tokens).predictions
        logger.info("answered with nothing and with retrieval as configured")
        # The gate opened wide: every query takes exactly its top-k chunks.
        wide = {"min_similarity": -1.0, "min_relevance": 0.0}
        for margin in args.margins:  # as configured, other documents' chunks only near the best chunk
            changed = dataclasses.replace(section, other_documents_margin=margin)
            variant = _with_index(strategy, config, changed)
            try:
                conditions[f"margin-{margin:g}"] = answer_probes(
                    variant, probes, args.max_new_tokens
                ).predictions
            finally:
                variant.close()
            logger.info("answered with other documents within %g of the best chunk", margin)
        for k in args.top_k:
            variant = _with_index(strategy, config, dataclasses.replace(section, top_k=k, **wide))
            try:
                conditions[f"top-{k}"] = answer_probes(variant, probes, args.max_new_tokens).predictions
            finally:
                variant.close()
            logger.info("answered with the top-%d chunks", k)
        oracle = OracleReader(backbone, config, bench)
        try:
            conditions["oracle"] = oracle.answer(probes, args.max_new_tokens).predictions
            over_budget = sorted(oracle.over_budget)
        finally:
            oracle.close()
    finally:
        strategy.close()
    return _results(
        args, backbone, bench, section, config, rows, chunks, chunking, margins, conditions, over_budget
    )


def _results(
    args, backbone, bench, section, config, rows, chunks, chunking, margins, conditions, over_budget
) -> dict:
    """The summary and settings of a run; ``margins``: what the prompt holds with each margin;
    ``conditions`` (answers per prompt kind) is ``None`` for a ranking-only run."""
    probes = _sample(list(bench.probes), args.probes, args.seed)

    for name, predictions in (conditions or {}).items():
        scored = score(probes, predictions)
        for row, prediction, correct in zip(rows, predictions, scored["correct"]):
            row.setdefault("predictions", {})[name] = prediction
            row.setdefault("correct", {})[name] = bool(correct)
    accuracy = {}
    for name, predictions in (conditions or {}).items():
        scored = score(probes, predictions)
        accuracy[name] = {k: scored.get(k) for k in ("contains", "em", "cloze_contains", "qa_contains")}
    lost = Counter(
        cause(row, section.top_k)
        for row in rows
        if conditions and row["correct"]["oracle"] and not row["correct"]["retrieval"]
    )
    ranks = [row["rank"] for row in rows]
    summary = {
        "probes": len(rows),
        "chunks": chunks,
        **{f"hit@{k}": _share(row[f"hit@{k}"] for row in rows) for k in HIT_AT},
        "mrr": float(np.mean([1 / r if r else 0.0 for r in ranks])),
        "gate_passed": _share(row["gate_passed"] for row in rows),
        "own_passes_gate": _share(row["own_passes_gate"] for row in rows),
        "own_in_prompt": _share(row["own_in_prompt"] for row in rows),
        "docs_in_prompt_mean": float(np.mean([row["docs_in_prompt"] for row in rows])),
        "docs_in_prompt_histogram": dict(sorted(Counter(row["docs_in_prompt"] for row in rows).items())),
        "margins": margins,
    }
    if conditions:
        summary.update(
            {
                "accuracy": accuracy,
                "oracle_right_retrieval_wrong": {c: lost.get(c, 0) for c in CAUSES},
                "oracle_documents_over_budget": over_budget,
                "retrieval_right_oracle_wrong": sum(
                    row["correct"]["retrieval"] and not row["correct"]["oracle"] for row in rows
                ),
            }
        )
    settings = {
        "benchmark": args.benchmark,
        "docs": len(bench.documents),
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "probes_sampled": args.probes,
        "ranking_only": bool(args.ranking_only),
        "overrides": list(args.set),
        "retrieval": to_dict(section),
        "in_context": to_dict(strategy_config(config, "in_context")),
        **chunking,
        "command": " ".join(["python", *sys.argv]),
    }
    return {
        "meta": system.meta(backbone.name, backbone.device, settings),
        "summary": summary,
        "probes": rows,
    }


def _sample(probes: list[Probe], n: int | None, seed: int) -> list[Probe]:
    """``n`` probes drawn at random (``seed``), in their order; all of them without ``n``."""
    if not n or n >= len(probes):
        return probes
    keep = sorted(np.random.default_rng(seed).choice(len(probes), size=n, replace=False).tolist())
    return [probes[i] for i in keep]


def _share(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def markdown(results: dict[str, Any]) -> str:
    meta, summary = results["meta"], results["summary"]
    settings, machine = meta["settings"], meta["machine"]
    retrieval = settings["retrieval"]
    gate = (
        f"similarity >= {retrieval['min_similarity']}"
        if retrieval["retriever"] == "dense"
        else f"relevance >= {retrieval['min_relevance']}"
    )
    lines = [
        f"# Retrieval diagnostics: {settings['benchmark']}",
        "",
        f"- model `{meta['model']}` on `{meta['device']}`"
        + (f" ({machine['gpu']})" if machine.get("gpu") else f" ({machine['cpu_count']} CPU cores)")
        + f"; library {meta['version']}, torch {machine['torch']}, {meta['date']}",
        f"- {settings['docs']} documents (seed {settings['seed']}), {summary['probes']} probes, "
        f"{summary['chunks']} chunks of {settings['chunk_tokens']} tokens "
        f"(overlap {settings['chunk_overlap']})",
        f"- retriever `{retrieval['retriever']}`, top_k {retrieval['top_k']}, gate {gate}, "
        f"bias {retrieval['bias_strength']}; overrides: {', '.join(settings['overrides']) or 'none'}",
        f"- command: `{settings['command']}`",
        "",
        "## Ranking and gate",
        "",
        "| " + " | ".join(f"hit@{k}" for k in HIT_AT) + " | MRR | gate passed | own doc passes gate "
        "| own doc in prompt | docs in prompt (mean) |",
        "|" + "---:|" * (len(HIT_AT) + 5),
        "| "
        + " | ".join(fmt(summary[f"hit@{k}"]) for k in HIT_AT)
        + f" | {fmt(summary['mrr'])} | {fmt(summary['gate_passed'])} | {fmt(summary['own_passes_gate'])} "
        f"| {fmt(summary['own_in_prompt'])} | {fmt(summary['docs_in_prompt_mean'], '.2f')} |",
        "",
        "Documents in the prompt: "
        + ", ".join(f"{n}: {c} probes" for n, c in summary["docs_in_prompt_histogram"].items())
        + ".",
    ]
    if summary.get("margins"):
        lines += [
            "",
            "With `other_documents_margin` (other documents' chunks only that near the best chunk):",
            "",
            "| margin | own doc in prompt | docs in prompt (mean) |",
            "|---:|---:|---:|",
            *(
                f"| {m} | {fmt(v['own_in_prompt'])} | {fmt(v['docs_in_prompt_mean'], '.2f')} |"
                for m, v in summary["margins"].items()
            ),
        ]
    if "accuracy" not in summary:  # a ranking-only run
        return "\n".join([*lines, "", "Ranking only (`--ranking-only`): no probe was answered."]) + "\n"
    oracle = summary["accuracy"]["oracle"]["contains"]
    lines += [
        "",
        "## Accuracy by what the prompt holds",
        "",
        "| prompt | contains | × oracle | EM | cloze | QA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, acc in summary["accuracy"].items():
        ratio = "–" if not oracle else f"{acc['contains'] / oracle:.2f}"
        lines.append(
            f"| `{name}` | {fmt(acc['contains'])} | {ratio} | {fmt(acc['em'])} | "
            f"{fmt(acc['cloze_contains'])} | {fmt(acc['qa_contains'])} |"
        )
    lost = summary["oracle_right_retrieval_wrong"]
    lines += [
        "",
        "`none`: nothing in the prompt; `retrieval`: the strategy as configured; `top-k`: exactly the k best "
        "chunks, gate open (same prompt template and bias); `oracle`: only the probe's own document, in "
        "in_context's prompt format.",
        "",
        "## Where retrieval loses to the oracle",
        "",
        f"Probes the oracle answers and retrieval does not: {sum(lost.values())} "
        f"({', '.join(f'{c}: {n}' for c, n in lost.items())}); the reverse: "
        f"{summary['retrieval_right_oracle_wrong']}.",
        *(
            [
                f"Documents longer than in_context's budget (the oracle saw nothing of them): "
                f"{', '.join(summary['oracle_documents_over_budget'])}."
            ]
            if summary["oracle_documents_over_budget"]
            else []
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="novel_facts", help="novel_facts, news, boolq or a JSONL path")
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--probes", type=int, default=None, help="a random sample of this many probes")
    parser.add_argument("--top-k", default="1,2,3,4", help="the top-k conditions (gate open) to answer")
    parser.add_argument(
        "--margins", default="", help="other_documents_margin values to answer with, beside as configured"
    )
    parser.add_argument(
        "--ranking-only", action="store_true", help="rank and gate every probe; answer none (fast on a CPU)"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="config override key.path=value (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval_diagnostics"))
    parser.add_argument("--name", help="results folder under --out (default: BENCHMARK-DOCS)")
    args = parser.parse_args()
    args.top_k = [int(k) for k in args.top_k.split(",") if k]
    args.margins = [float(m) for m in args.margins.split(",") if m]
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results = run(args)
    out = args.out / (args.name or f"{Path(args.benchmark).stem}-{args.docs}")
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

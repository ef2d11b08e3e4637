"""ACE (``strategy: ace``) measured: accuracy on held-out questions with and without the playbook, tokens and
seconds per Generate-Reflect-Curate loop, and how much of the roles' output parsed.

Two tasks, every row on one backbone, in one process:

(a) **novel facts with feedback**: the knowledge benchmark's generated documents. The facts of each
    document are split: the questions of every other fact (by fact id) are the training QA pairs
    (``learn_with_feedback`` with that document), the probes (cloze and question) of the remaining facts are
    held out. Rows: ``none``
    (the base model), ``retrieval`` (the documents, no feedback), ``oracle`` (each probe with only its own
    document in the prompt, as the knowledge benchmark's oracle), and each ACE setting evaluated without its
    playbook (documents only) and with it. Also scored: the cloze probes of the *trained* facts (their
    question was asked in training; the cloze form was not).
(b) **intent labels** (Banking77, a few confusable card intents): the document is the label list; training
    QA pairs are (message, label) from the train split, held-out messages from the test split. The question
    lists the labels and asks for one; the playbook can hold rules such as "X means card_arrival". These rows
    fold exact duplicate bullets only (``dedupe_similarity=null``): every question carries the same label
    list, so MiniLM finds any two of them more than 0.9 similar.

    python benchmarks/ace_eval.py --out benchmarks/results/ace/cpu-smollm2      # CPU, small size
    python benchmarks/ace_eval.py --quick --model tiny ...                       # seconds: checks the script

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.config import load_config
from continual_transformer.documents import make_document
from continual_transformer.evaluation import system
from continual_transformer.evaluation.datasets import Probe, load_benchmark
from continual_transformer.evaluation.knowledge import OracleReader, answer_probes, score, spec_config
from continual_transformer.evaluation.metrics import contains
from continual_transformer.strategies import registry
from continual_transformer.strategies.ace import LOOP_COUNTS

logger = logging.getLogger("ace_eval")

INTENTS = (
    "card_arrival",
    "card_delivery_estimate",
    "lost_or_stolen_card",
    "card_not_working",
    "activate_my_card",
    "card_swallowed",
)
INTENT_QUESTION = (
    "Classify the bank customer's message into exactly one of these intents: {labels}.\n"
    "Message: {text}\nReply with the intent name only."
)


# -- data ----------------------------------------------------------------------------------------------------
def novel_facts_split(docs: int, seed: int, data_dir: str):
    """Documents, training QA pairs per document, held-out probes and the trained facts' cloze probes."""
    bench = load_benchmark("novel_facts", n_docs=docs, seed=seed, data_dir=data_dir)
    train: dict[str, list[tuple[str, str]]] = {}
    held_out: list[Probe] = []
    trained_cloze: list[Probe] = []
    for doc in bench.documents:
        probes = bench.probes_for(doc.id)
        facts = list(dict.fromkeys(p.fact_id for p in probes))
        trained = set(facts[0::2])
        train[doc.id] = [(p.prompt, p.answer) for p in probes if p.fact_id in trained and p.kind == "qa"]
        held_out += [p for p in probes if p.fact_id not in trained]
        trained_cloze += [p for p in probes if p.fact_id in trained and p.kind == "cloze"]
    return bench, train, held_out, trained_cloze


def intent_split(data_dir: str, per_intent_train: int, per_intent_test: int, seed: int):
    """(document, training pairs, held-out (question, label) pairs) for the Banking77 card intents."""
    rows: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        with open(Path(data_dir) / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["category"] in INTENTS:
                    rows.setdefault(split, {}).setdefault(row["category"], []).append(row["text"])
    rng = random.Random(seed)
    labels = ", ".join(INTENTS)

    def pairs(split: str, n: int) -> list[tuple[str, str]]:
        out = []
        for label in INTENTS:
            texts = sorted(rows[split][label])
            out += [(INTENT_QUESTION.format(labels=labels, text=t), label) for t in rng.sample(texts, n)]
        rng.shuffle(out)
        return out

    document = make_document(
        "Bank card intents and what they mean: "
        "card_arrival: a new card has not arrived yet. "
        "card_delivery_estimate: how long card delivery takes. "
        "lost_or_stolen_card: the card was lost or stolen. "
        "card_not_working: the card is declined or does not work. "
        "activate_my_card: how to activate a card. "
        "card_swallowed: an ATM kept the card.",
        "banking-card-intents",
    )
    return document, pairs("train", per_intent_train), pairs("test", per_intent_test)


# -- rows ----------------------------------------------------------------------------------------------------
def accuracy(predictions: list[str], answers: list[tuple[str, ...]]) -> float:
    return sum(contains(p, a) for p, a in zip(predictions, answers)) / max(len(answers), 1)


def build(backbone: Backbone, config, spec: str):
    name, section = spec_config(config, spec)
    return registry.get(name)(backbone, section, settings=config)


def loop_summary(reports) -> dict[str, Any]:
    loops = [loop for r in reports for loop in r.extra.get("loops", [])]
    n = max(len(loops), 1)
    totals = {key: sum(loop[key] for loop in loops) for key in LOOP_COUNTS}
    return {
        "loops": len(loops),
        "seconds_per_loop": sum(loop["seconds"] for loop in loops) / n,
        "tokens_per_loop": sum(loop["tokens"] for loop in loops) / n,
        "generate_seconds_per_loop": sum(loop["generate_seconds"] for loop in loops) / n,
        "reflect_seconds_per_loop": sum(loop["reflect_seconds"] for loop in loops) / n,
        "train_accuracy_by_loop": _by_loop(reports),
        "reflector_parse_rate": totals["reflector_parsed"] / max(totals["reflector_replies"], 1),
        "curator_parse_rate": totals["curator_parsed"] / max(totals["curator_replies"], 1),
        **totals,
    }


def _by_loop(reports) -> list[float]:
    """Mean training accuracy of the first, second, ... loop over the documents."""
    by: dict[int, list[float]] = {}
    for report in reports:
        for i, loop in enumerate(report.extra.get("loops", [])):
            by.setdefault(i, []).append(loop["accuracy"])
    return [sum(v) / len(v) for _, v in sorted(by.items())]


def facts_rows(backbone, config, args, specs) -> dict[str, Any]:
    bench, train, held_out, trained_cloze = novel_facts_split(args.docs, args.seed, config.data_dir)
    rows: dict[str, Any] = {}

    def evaluate(strategy, label: str, extra: dict[str, Any]) -> None:
        start = time.perf_counter()
        held = answer_probes(strategy, held_out, args.max_new_tokens).predictions
        cloze = answer_probes(strategy, trained_cloze, args.max_new_tokens).predictions
        rows[label] = {
            "held_out": score(held_out, held)["contains"],
            "trained_facts_cloze": score(trained_cloze, cloze)["contains"],
            "answer_seconds": time.perf_counter() - start,
            "examples": [
                {"prompt": p.prompt, "answers": list(p.answers), "prediction": x}
                for p, x in list(zip(held_out, held))[:4]
            ],
            **extra,
        }
        logger.info("facts %s: held-out %.3f", label, rows[label]["held_out"])

    for spec in ("none", "retrieval"):
        strategy = build(backbone, config, spec)
        try:
            start = time.perf_counter()
            for doc in bench.documents:
                strategy.learn(doc)
            evaluate(strategy, spec, {"learn_seconds": time.perf_counter() - start})
        finally:
            strategy.close()
    oracle = OracleReader(backbone, config, bench)
    try:
        rows["oracle"] = {
            "held_out": score(held_out, oracle.answer(held_out, args.max_new_tokens).predictions)["contains"],
            "trained_facts_cloze": score(
                trained_cloze, oracle.answer(trained_cloze, args.max_new_tokens).predictions
            )["contains"],
        }
    finally:
        oracle.close()
    for spec in specs:
        strategy = build(backbone, config, spec)
        try:
            start = time.perf_counter()
            reports = [
                strategy.learn_with_feedback(doc, train[doc.id], loops=args.loops) for doc in bench.documents
            ]
            learn = {"learn_seconds": time.perf_counter() - start, **loop_summary(reports)}
            with strategy.without_playbook():
                evaluate(strategy, f"{spec} (documents only)", {})
            evaluate(strategy, f"{spec} (with playbook)", {**learn, "bullets": len(strategy.playbook)})
            rows[f"{spec} (with playbook)"]["playbook"] = strategy.playbook.to_dict()["bullets"][:12]
            rows[f"{spec} (with playbook)"]["sample_replies"] = [
                loop["sample_replies"] for r in reports for loop in r.extra["loops"]
            ][:4]
        finally:
            strategy.close()
    return {
        "documents": len(bench.documents),
        "training_questions": sum(len(v) for v in train.values()),
        "held_out_probes": len(held_out),
        "trained_facts_cloze_probes": len(trained_cloze),
        "rows": rows,
    }


def intent_rows(backbone, config, args, specs) -> dict[str, Any]:
    document, train, test = intent_split(config.data_dir, args.intent_train, args.intent_test, args.seed)
    questions, labels = [q for q, _ in test], [(a,) for _, a in test]
    rows: dict[str, Any] = {}

    def evaluate(strategy, label: str, extra: dict[str, Any]) -> None:
        start = time.perf_counter()
        predictions = strategy.generate(questions, chat=True, max_new_tokens=args.max_new_tokens)
        rows[label] = {
            "held_out": accuracy(predictions, labels),
            "answer_seconds": time.perf_counter() - start,
            "examples": [
                {"message": q.split("Message: ")[1].split("\n")[0], "label": a[0], "prediction": p}
                for q, a, p in list(zip(questions, labels, predictions))[:4]
            ],
            **extra,
        }
        logger.info("intents %s: held-out %.3f", label, rows[label]["held_out"])

    for spec in ("none", "retrieval"):
        strategy = build(backbone, config, spec)
        try:
            strategy.learn(document)
            evaluate(strategy, spec, {})
        finally:
            strategy.close()
    for spec in specs:
        strategy = build(backbone, config, spec)
        try:
            start = time.perf_counter()
            report = strategy.learn_with_feedback(document, train, loops=args.intent_loops or args.loops)
            reports = [report]
            learn = {"learn_seconds": time.perf_counter() - start, **loop_summary(reports)}
            with strategy.without_playbook():
                evaluate(strategy, f"{spec} (documents only)", {})
            evaluate(strategy, f"{spec} (with playbook)", {**learn, "bullets": len(strategy.playbook)})
            rows[f"{spec} (with playbook)"]["playbook"] = strategy.playbook.to_dict()["bullets"][:12]
            rows[f"{spec} (with playbook)"]["sample_replies"] = [
                loop["sample_replies"] for r in reports for loop in r.extra["loops"]
            ][:4]
        finally:
            strategy.close()
    return {"intents": list(INTENTS), "training_pairs": len(train), "held_out": len(test), "rows": rows}


# -- report --------------------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# ACE: accuracy with and without the playbook",
        "",
        f"Model `{meta['model']}` on `{meta['device']}`; settings: `{json.dumps(results['settings'])}`.",
        "",
    ]
    for task, title in (
        ("facts", "(a) Novel facts with feedback"),
        ("intents", "(b) Banking77 card intents"),
    ):
        if task not in results:
            continue
        block = results[task]
        lines += [
            f"## {title}",
            "",
            "```",
            json.dumps({k: v for k, v in block.items() if k != "rows"}),
            "```",
            "",
        ]
        extra = " | trained facts (cloze)" if task == "facts" else ""
        lines += [
            f"| row | held-out accuracy{extra} | loops | s / loop | tokens / loop | reflector parsed | "
            "curator parsed | valid ops | rejected ops | fallback adds | bullets |",
            "|---|---:|" + ("---:|" if extra else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in block["rows"].items():
            trained = f" {row['trained_facts_cloze']:.3f} |" if extra else ""
            if "loops" in row:
                tail = (
                    f"{row['loops']} | {row['seconds_per_loop']:.1f} | {row['tokens_per_loop']:.0f} | "
                    f"{row['reflector_parse_rate']:.2f} | {row['curator_parse_rate']:.2f} | "
                    f"{row['operations_valid']} | {row['operations_rejected']} | {row['fallback_adds']} | "
                    f"{row['bullets']} |"
                )
            else:
                tail = "– | – | – | – | – | – | – | – | – |"
            lines.append(f"| `{name}` | {row['held_out']:.3f} |{trained} {tail}")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    items = [f"model.name={args.model}", f"model.device={args.device}", f"data_dir={args.data_dir}"]
    items += [f"model.dtype={args.dtype}", f"generation.batch_size={args.batch_size}", *args.set]
    items += [f"strategies.ace.role_max_tokens={args.role_max_tokens}"]
    config = load_config(set_items=items)
    backbone = Backbone.load(config.model, config.generation)

    def specs(text: str) -> list[str]:
        return [s.strip() for s in text.split(",") if s.strip()]

    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": system.meta(backbone.name, backbone.device, {"args": vars(args)}),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "set")},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "results.md").write_text(markdown(results))

    if "facts" in args.tasks:
        results["facts"] = facts_rows(backbone, config, args, specs(args.facts_strategies))
        write()
    if "intents" in args.tasks:
        results["intents"] = intent_rows(backbone, config, args, specs(args.intent_strategies))
    results["wall_seconds"] = time.perf_counter() - started
    write()
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--docs", type=int, default=4, help="novel-fact documents")
    parser.add_argument("--loops", type=int, default=2, help="Generate-Reflect-Curate loops per document")
    parser.add_argument("--intent-loops", type=int, default=None, help="loops of (b) (default --loops)")
    parser.add_argument("--intent-train", type=int, default=2, help="training messages per intent")
    parser.add_argument("--intent-test", type=int, default=5, help="held-out messages per intent")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--role-max-tokens", type=int, default=64)
    parser.add_argument("--tasks", default="facts,intents")
    parser.add_argument(
        "--facts-strategies", default="ace:curate_correct=true", help="ACE rows of (a), comma-separated specs"
    )
    parser.add_argument(
        "--intent-strategies",
        default="ace:curate_correct=true:dedupe_similarity=null,"
        "ace:curate_correct=true:fallback_insight=true:dedupe_similarity=null",
        help="ACE rows of (b)",
    )
    parser.add_argument("--set", action="append", default=[], help="config override key.path=value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 documents, 1 loop, 1 + 2 intent messages")
    parser.add_argument("--out", default="benchmarks/results/ace/run")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.loops, args.intent_train, args.intent_test = 2, 1, 1, 2
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(parse_args(sys.argv[1:]))

"""The knowledge benchmark harness: every strategy on identical documents and probes, in one process.

For each strategy, on one shared backbone (restored and checked by fingerprint between strategies):

1. general ability before: perplexity on held-out text and the known-fact probes the base model gets right;
2. a stream: documents learned in ``stream_batches`` batches; after each batch every probe of the batches seen
   so far is asked closed-book, giving the accuracy matrix ``R[t, k]``;
3. general ability after, and costs: learn seconds per 1k tokens, answer latency and tokens/s, peak memory,
   parameters added and bytes of state.

Beside the strategies runs the ``oracle`` row (:func:`run_oracle`): every probe answered with only its own
document in the prompt, the ceiling any retrieval strategy can reach with this model and prompt format.

A run longer than one process may last saves each strategy's stream after every batch and continues it in the
next process (``resume``, :mod:`continual_transformer.evaluation.resume`), with the results of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone, model_fingerprint
from continual_transformer.config import (
    Config,
    ConfigError,
    deep_merge,
    from_dict,
    nest_legacy_keys,
    parse_override,
    to_dict,
)
from continual_transformer.evaluation import metrics, system
from continual_transformer.evaluation import resume as resume_
from continual_transformer.evaluation.datasets import KNOWN_FACTS, KnowledgeBenchmark, Probe, load_benchmark
from continual_transformer.evaluation.general import general_text
from continual_transformer.evaluation.report import ORACLE
from continual_transformer.strategies import Strategy, registry, strategy_config
from continual_transformer.strategies.base import pack_texts, tensor_bytes

logger = logging.getLogger(__name__)

BASELINES = ("none", ORACLE, "in_context", "finetune", "lora")
"""Rows every run has: the floor, the ceiling (:func:`run_oracle`, not a strategy) and three baselines."""


@dataclass(frozen=True, kw_only=True)
class KnowledgeBenchConfig:
    benchmark: str = "novel_facts"
    """``novel_facts``, ``boolq``, ``news``, or a path to a custom JSONL benchmark."""
    docs: int = 50
    """Documents learned per strategy."""
    seed: int = 0
    """Seed of the generated benchmark and of the sampling of real ones."""
    stream_batches: int = 5
    """The documents are learned in this many batches; retention is measured after each."""
    learn_together: bool = False
    """Learn each batch's documents in one run (:meth:`Strategy.learn_documents`: one optimisation over all
    their examples, shuffled together) instead of one document after another. For many documents: a
    different, cheaper stream, reported as such."""
    ppl_tokens: int = 30_000
    """Tokens of held-out general text (WikiText-2 valid) scored for perplexity."""
    known_facts: int = 80
    """Known-fact probes asked (only those the base model answers correctly are kept)."""
    max_new_tokens: int = 24
    """Tokens generated per answer."""
    latency_prompts: int = 8
    """Prompts answered one at a time to measure single-answer latency."""

    def __post_init__(self) -> None:
        if self.docs < 1 or not 1 <= self.stream_batches <= self.docs:
            raise ValueError("docs must be >= 1 and stream_batches in [1, docs]")


QUICK = KnowledgeBenchConfig(
    docs=6, stream_batches=2, ppl_tokens=4096, known_facts=24, max_new_tokens=16, latency_prompts=3
)
"""``--quick``: the four baselines finish in under 10 minutes on 2 CPU cores (measured before the oracle row,
which adds one answering pass over the probes: see README)."""


def with_strategies(strategies: Sequence[str]) -> list[str]:
    """The requested strategies with the baselines always beside them, baselines first, no duplicates."""
    ordered = list(BASELINES) + [s for s in strategies if s not in BASELINES]
    for name in ordered:
        parse_strategy_spec(name)  # fail early on an unknown name or setting
    return ordered


def parse_strategy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ttt:sparse=true:layers=25%"`` -> ``("ttt", {"sparse": True, "layers": "25%"})``.

    A strategy name may carry settings of its config section after colons (values parsed as YAML), so that
    ablations run as separate rows of one benchmark; the whole spec is the row's name. Unknown strategies and
    settings are rejected here, before any model work. ``oracle`` is the harness's ceiling row and takes no
    settings.
    """
    name, *items = [part.strip() for part in spec.split(":")]
    if name == ORACLE:
        if items:
            raise ConfigError(f"{ORACLE!r} is the harness's ceiling row and takes no settings, got {spec!r}")
        return ORACLE, {}
    cls = registry.get(name).config_cls
    changes: dict[str, Any] = {}
    for item in items:
        changes.update(parse_override(item))
    from_dict(cls, changes, prefix=f"strategies.{name}")
    return name, changes


def spec_config(config: Config, spec: str) -> tuple[str, Any]:
    """The strategy name and its config section for a spec, the spec's settings applied over ``config``'s."""
    name, changes = parse_strategy_spec(spec)
    section = strategy_config(config, name)
    if changes:
        # flat spec keys (``learning_rate``) go to their nested section first, then merge key by key
        changes = nest_legacy_keys(type(section), changes)
        section = from_dict(type(section), deep_merge(to_dict(section), changes), prefix=f"strategies.{name}")
    return name, section


# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Answers:
    predictions: list[str]
    seconds: float


def answer_probes(strategy: Strategy, probes: Sequence[Probe], max_new_tokens: int) -> _Answers:
    """Closed-book answers: cloze prompts are continued as raw text, questions go through the chat
    template."""
    predictions: list[str | None] = [None] * len(probes)
    start = time.perf_counter()
    for kind, chat in (("cloze", False), ("qa", True)):
        index = [i for i, p in enumerate(probes) if p.kind == kind]
        if index:
            outputs = strategy.generate(
                [probes[i].prompt for i in index], chat=chat, max_new_tokens=max_new_tokens
            )
            for i, out in zip(index, outputs):
                predictions[i] = out
    return _Answers([p or "" for p in predictions], time.perf_counter() - start)


def score(probes: Sequence[Probe], predictions: Sequence[str]) -> dict[str, Any]:
    em = [metrics.exact_match(pred, p.answers) for p, pred in zip(probes, predictions)]
    has = [metrics.contains(pred, p.answers) for p, pred in zip(probes, predictions)]
    f1 = [metrics.token_f1(pred, p.answers) for p, pred in zip(probes, predictions)]
    result: dict[str, Any] = {"em": _mean(em), "contains": _mean(has), "f1": _mean(f1), "n": len(probes)}
    for kind in ("cloze", "qa"):
        idx = [i for i, p in enumerate(probes) if p.kind == kind]
        if idx:
            result[f"{kind}_em"] = _mean([em[i] for i in idx])
            result[f"{kind}_contains"] = _mean([has[i] for i in idx])
    result["correct"] = has
    return result


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def measure_latency(strategy: Strategy, probes: Sequence[Probe], max_new_tokens: int) -> dict[str, float]:
    """Single-prompt answer latency and generated tokens per second."""
    if not probes:
        return {"answer_latency_s": float("nan"), "answer_tokens_per_s": float("nan")}
    tokenizer = strategy.backbone.tokenizer
    seconds, tokens = [], 0
    for probe in probes:
        start = time.perf_counter()
        out = strategy.generate([probe.prompt], chat=probe.kind == "qa", max_new_tokens=max_new_tokens)[0]
        seconds.append(time.perf_counter() - start)
        tokens += max(1, len(tokenizer(out, add_special_tokens=False)["input_ids"]))
    return {"answer_latency_s": float(np.median(seconds)), "answer_tokens_per_s": tokens / sum(seconds)}


def stream_batches(benchmark: KnowledgeBenchmark, n_batches: int) -> list[list[int]]:
    return [list(map(int, b)) for b in np.array_split(np.arange(len(benchmark.documents)), n_batches)]


def run_strategy(
    name: str,
    backbone: Backbone,
    config: Config,
    benchmark: KnowledgeBenchmark,
    bench: KnowledgeBenchConfig,
    *,
    general: str,
    known: Sequence[Probe],
    ppl_base: float,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Measure one strategy; the backbone is restored (and checked) afterwards.

    ``resume``: a directory where the strategy's state and the stream's progress are saved after every
    learned batch (:mod:`continual_transformer.evaluation.resume`); a stream saved there by an earlier
    process of the same run is continued, giving the results of an uninterrupted run.
    """
    start = time.perf_counter()
    device = backbone.device
    fingerprint = model_fingerprint(backbone.model)  # as it is (a quantized model differs from its float one)
    system.reset_peak_memory(device)
    base_name, section = spec_config(config, name)
    strategy = registry.get(base_name)(backbone, section, settings=config)
    try:
        batches = stream_batches(benchmark, bench.stream_batches)
        probes_by_batch = [benchmark.probes_for([benchmark.documents[i].id for i in b]) for b in batches]
        T = len(batches)
        all_probes = [p for group in probes_by_batch for p in group]
        bounds = np.cumsum([0] + [len(group) for group in probes_by_batch])
        progress = resume_.StreamProgress()
        identity: dict[str, Any] = {}
        if resume is not None:
            identity = resume_.run_identity(
                name,
                backbone,
                config,
                dataclasses.asdict(bench),
                [[benchmark.documents[i].id for i in b] for b in batches],
            )
            saved = resume_.load_stream(resume, identity, strategy)
            if saved is not None:
                progress = saved
                progress.resumed_at.append(progress.batches_done)
        earlier_seconds = progress.seconds
        for t in tqdm(range(progress.batches_done, T), desc=f"{name}: stream", leave=False, disable=None):
            documents = [benchmark.documents[i] for i in batches[t]]
            learned = (
                strategy.learn_documents(documents)
                if bench.learn_together
                else [strategy.learn(document) for document in documents]
            )
            for report in learned:
                progress.learn_seconds += report.seconds
                progress.learn_tokens += report.tokens
                if report.loss_before is not None:
                    progress.doc_losses.append([report.loss_before, report.loss_after])
            # Every batch seen so far is asked in one call; after the last batch these are the final answers.
            seen = answer_probes(strategy, all_probes[: bounds[t + 1]], bench.max_new_tokens)
            row: list[float | None] = [None] * T
            for k in range(t + 1):
                predictions = seen.predictions[bounds[k] : bounds[k + 1]]
                row[k] = score(probes_by_batch[k], predictions)["contains"]
                if k == t:
                    progress.acquired.append(predictions)
            progress.accuracy_rows.append(row)
            progress.last_answers, progress.last_answer_seconds = seen.predictions, seen.seconds
            progress.stream_answer_seconds += seen.seconds
            progress.batches_done = t + 1
            if resume is not None:
                progress.seconds = earlier_seconds + time.perf_counter() - start
                progress.peak_memory_mb = max(progress.peak_memory_mb, system.peak_memory_mb(device))
                resume_.save_stream(resume, identity, config, strategy, progress)
        R = np.array(
            [[np.nan if v is None else v for v in row] for row in progress.accuracy_rows], dtype=float
        )
        final = _Answers(progress.last_answers, progress.last_answer_seconds)
        final_scored = score(all_probes, final.predictions)
        acquisition = score(all_probes, [p for batch in progress.acquired for p in batch])
        known_after = answer_probes(strategy, known, bench.max_new_tokens)
        known_scored = score(known, known_after.predictions) if known else {"contains": float("nan")}
        started = time.perf_counter()
        ppl_after = strategy.perplexity(general, max_tokens=bench.ppl_tokens)
        ppl_seconds, started = time.perf_counter() - started, time.perf_counter()
        latency = measure_latency(strategy, all_probes[: bench.latency_prompts], bench.max_new_tokens)
        latency_seconds = time.perf_counter() - started
        stats = strategy.stats()
        peak = max(progress.peak_memory_mb, system.peak_memory_mb(device))
        losses = progress.doc_losses
        learn_seconds, learn_tokens = progress.learn_seconds, progress.learn_tokens
        n_docs = len(benchmark.documents)
        result = {
            "strategy": base_name,
            "strategy_config": to_dict(section),
            "acquisition_em": acquisition["em"],
            "acquisition_contains": acquisition["contains"],
            "acquisition_f1": acquisition["f1"],
            "acquisition_cloze_contains": acquisition.get("cloze_contains"),
            "acquisition_qa_contains": acquisition.get("qa_contains"),
            "final_em": final_scored["em"],
            "final_contains": final_scored["contains"],
            "ppl_before": ppl_base,
            "ppl_after": ppl_after,
            "ppl_change": ppl_after / ppl_base - 1,
            "known_facts": len(known),
            "known_fact_accuracy_after": known_scored["contains"],
            "known_fact_forgetting_ratio": metrics.forgetting_ratio(1.0, known_scored["contains"])
            if known
            else float("nan"),
            "stream_avg_accuracy": metrics.average_accuracy(np.nan_to_num(R)),
            "stream_bwt": metrics.backward_transfer(np.nan_to_num(R)),
            "stream_forgetting": metrics.forgetting(np.nan_to_num(R)),
            "first_batch_retention": float(R[-1, 0] / R[0, 0]) if R[0, 0] > 0 else float("nan"),
            "accuracy_matrix": [[None if math.isnan(v) else float(v) for v in row] for row in R],
            "learn_seconds": learn_seconds,
            "seconds_by_phase": {  # where the time went (learning, the accuracy matrix's answers, the rest)
                "learn": learn_seconds,
                "stream_answers": progress.stream_answer_seconds,
                "known_facts": known_after.seconds,
                "perplexity": ppl_seconds,
                "latency": latency_seconds,
            },
            "learn_tokens": learn_tokens,
            "learn_s_per_1k_tokens": 1000 * learn_seconds / max(learn_tokens, 1),
            "doc_loss_before": _mean([a for a, _ in losses]) if losses else None,
            "doc_loss_after": _mean([b for _, b in losses]) if losses else None,
            "answer_s_per_probe_batched": final.seconds / max(len(all_probes), 1),
            **latency,
            "peak_memory_mb": peak,
            "params_added": stats.params_added,
            "params_trainable": stats.params_trainable,
            "state_bytes": stats.state_bytes,
            "state_bytes_per_doc": stats.state_bytes / n_docs,
            "examples": [
                {"prompt": p.prompt, "answers": list(p.answers), "kind": p.kind, "prediction": pred}
                for p, pred in list(zip(all_probes, final.predictions))[:6]
            ],
        }
        if progress.resumed_at:
            result["resumed"] = {"after_batches": progress.resumed_at, "earlier_seconds": earlier_seconds}
    finally:
        strategy.close()
    if model_fingerprint(backbone.model) != fingerprint:
        raise RuntimeError(
            f"strategy {name!r} did not restore the backbone on close(); results after it would be wrong"
        )
    return result


class OracleReader:
    """Answers each probe with only its own document in the prompt, nothing learned.

    The prompt is built by the ``in_context`` strategy (its configured instruction, chat template and budget)
    as it would be holding exactly that one document: the oracle reads the same prompt format as
    ``in_context``, with the right document and no other. Probes of all documents are answered together, in
    the backbone's generation batches. A document longer than ``in_context``'s budget would leave the prompt
    empty; such documents are counted in :attr:`over_budget` (and logged).
    """

    def __init__(self, backbone: Backbone, config: Config, benchmark: KnowledgeBenchmark) -> None:
        self.reader = registry.get("in_context")(
            backbone, strategy_config(config, "in_context"), settings=config
        )
        self.texts = {doc.id: doc.text for doc in benchmark.documents}
        self.over_budget: set[str] = set()
        self._contexts: dict[str, str] = {}

    def context(self, doc_id: str) -> str:
        """What the prompt holds for document ``doc_id``: the document, or nothing when it is over budget."""
        if doc_id not in self._contexts:
            context = self.reader.fitting([self.texts[doc_id]])
            if context != self.texts[doc_id]:
                logger.warning(
                    "oracle: document %s does not fit in_context's budget; its probes see none", doc_id
                )
                self.over_budget.add(doc_id)
            self._contexts[doc_id] = context
        return self._contexts[doc_id]

    def answer(self, probes: Sequence[Probe], max_new_tokens: int) -> _Answers:
        """Answers in probe order: cloze prompts continued as raw text, questions through the chat template,
        each with its own document in front."""
        predictions: list[str] = [""] * len(probes)
        start = time.perf_counter()
        for kind, chat in (("cloze", False), ("qa", True)):
            index = [i for i, p in enumerate(probes) if p.kind == kind]
            prompts = [
                self.reader.with_context(self.context(probes[i].doc_id), [probes[i].prompt], chat)[0]
                for i in index
            ]
            outputs = self.reader.backbone.generate(prompts, formatted=True, max_new_tokens=max_new_tokens)
            for i, out in zip(index, outputs):
                predictions[i] = out
        return _Answers(predictions, time.perf_counter() - start)

    def latency(self, probes: Sequence[Probe], max_new_tokens: int) -> dict[str, float]:
        """As :func:`measure_latency`, each probe with its own document in the prompt."""
        if not probes:
            return {"answer_latency_s": float("nan"), "answer_tokens_per_s": float("nan")}
        tokenizer = self.reader.backbone.tokenizer
        seconds, tokens = [], 0
        for probe in probes:
            start = time.perf_counter()
            out = self.answer([probe], max_new_tokens).predictions[0]
            seconds.append(time.perf_counter() - start)
            tokens += max(1, len(tokenizer(out, add_special_tokens=False)["input_ids"]))
        return {"answer_latency_s": float(np.median(seconds)), "answer_tokens_per_s": tokens / sum(seconds)}

    def close(self) -> None:
        self.reader.close()


def run_oracle(
    backbone: Backbone,
    config: Config,
    benchmark: KnowledgeBenchmark,
    bench: KnowledgeBenchConfig,
    *,
    known: Sequence[Probe],
    ppl_base: float,
) -> dict[str, Any]:
    """The ``oracle`` row: every probe answered with only its own document in the prompt
    (:class:`OracleReader`).

    It has the keys of :func:`run_strategy`'s rows. The oracle learns nothing, so two parts hold by
    construction rather than by measurement: its prompt for a probe does not depend on what was learned
    before, so every probe is answered once and the accuracy matrix repeats that accuracy down each column
    (BWT and forgetting 0, acquisition = final accuracy); and general text and known-fact probes belong to no
    document, so they are read with nothing in the prompt, as the base model reads them (perplexity change 0,
    known facts kept: the base model's figures are the reference). Latency is measured (a document in every
    prompt).
    """
    device = backbone.device
    fingerprint = model_fingerprint(backbone.model)  # as it is (a quantized model differs from its float one)
    system.reset_peak_memory(device)
    oracle = OracleReader(backbone, config, benchmark)
    try:
        batches = stream_batches(benchmark, bench.stream_batches)
        probes_by_batch = [benchmark.probes_for([benchmark.documents[i].id for i in b]) for b in batches]
        all_probes = [p for group in probes_by_batch for p in group]
        bounds = np.cumsum([0] + [len(group) for group in probes_by_batch])
        answers = oracle.answer(all_probes, bench.max_new_tokens)
        scored = score(all_probes, answers.predictions)
        T = len(batches)
        R = np.full((T, T), np.nan)
        for k in range(T):
            R[k:, k] = score(probes_by_batch[k], answers.predictions[bounds[k] : bounds[k + 1]])["contains"]
        latency = oracle.latency(all_probes[: bench.latency_prompts], bench.max_new_tokens)
        peak = system.peak_memory_mb(device)
        state_bytes = tensor_bytes(pack_texts([doc.text for doc in benchmark.documents], "documents"))
        result = {
            "strategy": ORACLE,
            "strategy_config": {"in_context": to_dict(strategy_config(config, "in_context"))},
            "acquisition_em": scored["em"],
            "acquisition_contains": scored["contains"],
            "acquisition_f1": scored["f1"],
            "acquisition_cloze_contains": scored.get("cloze_contains"),
            "acquisition_qa_contains": scored.get("qa_contains"),
            "final_em": scored["em"],
            "final_contains": scored["contains"],
            "ppl_before": ppl_base,
            "ppl_after": ppl_base,
            "ppl_change": 0.0,
            "known_facts": len(known),
            "known_fact_accuracy_after": 1.0 if known else float("nan"),
            "known_fact_forgetting_ratio": 0.0 if known else float("nan"),
            "stream_avg_accuracy": metrics.average_accuracy(np.nan_to_num(R)),
            "stream_bwt": metrics.backward_transfer(np.nan_to_num(R)),
            "stream_forgetting": metrics.forgetting(np.nan_to_num(R)),
            "first_batch_retention": float(R[-1, 0] / R[0, 0]) if R[0, 0] > 0 else float("nan"),
            "accuracy_matrix": [[None if math.isnan(v) else float(v) for v in row] for row in R],
            "learn_seconds": 0.0,
            "learn_tokens": 0,
            "learn_s_per_1k_tokens": 0.0,
            "doc_loss_before": None,
            "doc_loss_after": None,
            "answer_s_per_probe_batched": answers.seconds / max(len(all_probes), 1),
            **latency,
            "peak_memory_mb": peak,
            "params_added": 0,
            "params_trainable": 0,
            "state_bytes": state_bytes,
            "state_bytes_per_doc": state_bytes / len(benchmark.documents),
            "oracle_documents_over_budget": len(oracle.over_budget),
            "by_construction": ["accuracy_matrix", "ppl_after", "known_fact_accuracy_after"],
            "examples": [
                {"prompt": p.prompt, "answers": list(p.answers), "kind": p.kind, "prediction": pred}
                for p, pred in list(zip(all_probes, answers.predictions))[:6]
            ],
        }
    finally:
        oracle.close()
    if model_fingerprint(backbone.model) != fingerprint:
        raise RuntimeError("the oracle changed the backbone; results after it would be wrong")
    return result


def run_knowledge_bench(
    backbone: Backbone,
    config: Config,
    strategies: Sequence[str],
    bench: KnowledgeBenchConfig = KnowledgeBenchConfig(),
    *,
    on_result: Callable[[str, dict[str, Any], dict[str, Any]], None] | None = None,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Run the strategies (pass them through :func:`with_strategies` to have the baselines beside them) and
    return the results document (see ``results.json``).

    ``resume``: a directory under which each strategy's stream is saved after every batch and continued when
    an earlier process saved it (:func:`run_strategy`; one sub-directory per strategy,
    :func:`~continual_transformer.evaluation.resume.state_directory`). The saves stay there: remove one once
    its row is written (the ``oracle`` row learns nothing and saves nothing).
    """
    names = list(strategies)
    benchmark = load_benchmark(bench.benchmark, n_docs=bench.docs, seed=bench.seed, data_dir=config.data_dir)
    general, general_source = general_text(config.data_dir)
    floor = registry.get("none")(backbone, strategy_config(config, "none"), settings=config)
    ppl_base = floor.perplexity(general, max_tokens=bench.ppl_tokens)
    candidates = list(KNOWN_FACTS[: bench.known_facts])
    base_answers = answer_probes(floor, candidates, bench.max_new_tokens).predictions
    known = [p for p, a in zip(candidates, base_answers) if metrics.contains(a, p.answers)]
    logger.info(
        "base model: perplexity %.2f, knows %d/%d general facts", ppl_base, len(known), len(candidates)
    )

    results: dict[str, Any] = {
        "meta": system.meta(
            backbone.name,
            backbone.device,
            {
                "bench": dataclasses.asdict(bench),
                "config": to_dict(config),
                "general_text": general_source,
            },
        ),
        "benchmark": {
            "name": benchmark.name,
            "documents": len(benchmark.documents),
            "probes": len(benchmark.probes),
            "cloze": sum(p.kind == "cloze" for p in benchmark.probes),
            "qa": sum(p.kind == "qa" for p in benchmark.probes),
            "known_facts_asked": len(candidates),
            "known_facts_kept": len(known),
        },
        "strategies": {},
    }
    for name in names:
        logger.info("strategy %s", name)
        start = time.perf_counter()
        if name == ORACLE:
            row = run_oracle(backbone, config, benchmark, bench, known=known, ppl_base=ppl_base)
        else:
            row = run_strategy(
                name,
                backbone,
                config,
                benchmark,
                bench,
                general=general,
                known=known,
                ppl_base=ppl_base,
                resume=None if resume is None else resume_.state_directory(resume, name),
            )
        results["strategies"][name] = row
        earlier = row.get("resumed", {}).get("earlier_seconds", 0.0)  # spent by processes before this one
        results["strategies"][name]["wall_seconds"] = earlier + time.perf_counter() - start
        if on_result is not None:
            on_result(name, results["strategies"][name], results)
    return results

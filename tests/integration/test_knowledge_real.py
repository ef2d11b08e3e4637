"""The knowledge harness on the real model: the floor scores ~0 on novel facts, the in-context ceiling well
above."""

from __future__ import annotations

import pytest
import torch

from continual_transformer import load_config
from continual_transformer.evaluation.datasets import novel_facts
from continual_transformer.evaluation.knowledge import KnowledgeBenchConfig, answer_probes, score
from continual_transformer.strategies import strategy_config

from .test_smollm2 import load_backbone

pytestmark = pytest.mark.real_model


def test_none_scores_near_zero_and_in_context_well_above():
    from continual_transformer.strategies import registry

    backbone = load_backbone()
    config = load_config(set_items=["model.device=cpu"])
    benchmark = novel_facts(3, seed=0)
    bench = KnowledgeBenchConfig(docs=3, stream_batches=1, max_new_tokens=16)
    accuracy = {}
    for name in ("none", "in_context"):
        strategy = registry.get(name)(backbone, strategy_config(config, name), settings=config)
        for doc in benchmark.documents:
            strategy.learn(doc)
        answers = answer_probes(strategy, benchmark.probes, bench.max_new_tokens)
        accuracy[name] = score(benchmark.probes, answers.predictions)["contains"]
        strategy.close()
    assert accuracy["none"] <= 0.1
    assert accuracy["in_context"] >= accuracy["none"] + 0.3


def test_memory_bank_leaves_unrelated_general_text_alone():
    """Unrelated long text (perplexity windows) and unrelated questions retrieve no memory: base outputs
    exactly."""
    from continual_transformer.evaluation.datasets import KNOWN_FACTS
    from continual_transformer.evaluation.general import general_text
    from continual_transformer.strategies import registry

    backbone = load_backbone()
    config = load_config(set_items=["model.device=cpu"])
    text, _ = general_text(config.data_dir)
    base_ppl = backbone.perplexity(text, max_tokens=4096)
    strategy = registry.get("memory_bank")(backbone, strategy_config(config, "memory_bank"), settings=config)
    try:
        for doc in novel_facts(4, seed=0).documents:
            strategy.learn(doc)
        assert strategy.store.size > 0
        assert strategy.perplexity(text, max_tokens=4096) == pytest.approx(base_ppl, rel=1e-6)
        assert strategy.deltas([p.prompt for p in KNOWN_FACTS[:8]]) is None
    finally:
        strategy.close()


def test_default_retrieval_puts_the_right_chunk_in_and_gates_general_questions_out():
    """Dense MiniLM retrieval (the default): probes of learned facts get their document, general questions
    nothing."""
    from continual_transformer.evaluation.datasets import KNOWN_FACTS
    from continual_transformer.strategies import registry

    backbone = load_backbone()
    config = load_config(set_items=["model.device=cpu"])
    assert strategy_config(config, "retrieval").retriever == "dense"
    benchmark = novel_facts(3, seed=0)
    strategy = registry.get("retrieval")(backbone, strategy_config(config, "retrieval"), settings=config)
    try:
        for doc in benchmark.documents:
            strategy.learn(doc)
        hits = strategy.search([p.prompt for p in benchmark.probes], 1)
        own = [
            bool(h) and strategy.doc_ids[strategy.chunk_doc[h[0].index]] == p.doc_id
            for h, p in zip(hits, benchmark.probes)
        ]
        assert sum(own) >= 0.9 * len(own)
        used = [a.context is not None for a in strategy.augment([p.prompt for p in benchmark.probes])]
        assert sum(used) >= 0.8 * len(used)
        general = [p.prompt for p in KNOWN_FACTS[:16]]
        assert all(a.context is None for a in strategy.augment(general))
        assert strategy.generate(general[:3]) == backbone.generate(
            general[:3]
        )  # gated out: the base model's answers
    finally:
        strategy.close()


def test_minilm_router_tells_clinc_domains_apart():
    """The default task router's embedder and prototypes on three CLINC150 domains, no adapter trained."""
    from continual_transformer.tasks.router import PrototypeRouter, SentenceRouterEmbedder
    from continual_transformer.tasks.suites import load_suite

    backbone = load_backbone()
    config = load_config(set_items=["model.device=cpu"])
    tasks = load_suite(
        "clinc150-10", config.data_dir, num_tasks=3, max_train_per_label=8, max_test_per_label=4
    )
    embed = SentenceRouterEmbedder("minilm", device=backbone.device, max_tokens=64, batch_size=64)
    router = PrototypeRouter(len(tasks), embed.dim, max(len(t.labels) for t in tasks))
    for k, task in enumerate(tasks):
        router.update(
            k,
            embed([e.text for e in task.train]),
            torch.tensor([task.labels.index(e.label) for e in task.train]),
        )
    truth = torch.tensor([k for k, t in enumerate(tasks) for _ in t.test])
    routed = router.route(embed([e.text for t in tasks for e in t.test]))
    assert float((routed == truth).float().mean()) >= 0.85

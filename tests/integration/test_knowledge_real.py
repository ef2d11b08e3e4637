"""The knowledge harness on the real model: the floor scores ~0 on novel facts, the in-context ceiling well above."""

from __future__ import annotations

import pytest

from continual_transformer import load_config
from continual_transformer.evaluation.datasets import novel_facts
from continual_transformer.evaluation.knowledge import KnowledgeBenchConfig, answer_probes, score

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
        strategy = registry.get(name)(backbone, config.strategy_config(name), settings=config)
        for doc in benchmark.documents:
            strategy.learn(doc)
        answers = answer_probes(strategy, benchmark.probes, bench.max_new_tokens)
        accuracy[name] = score(benchmark.probes, answers.predictions)["contains"]
        strategy.close()
    assert accuracy["none"] <= 0.1
    assert accuracy["in_context"] >= accuracy["none"] + 0.3


def test_memory_bank_leaves_unrelated_general_text_alone():
    """Unrelated long text (perplexity windows) and unrelated questions retrieve no memory: base outputs exactly."""
    from continual_transformer.evaluation.datasets import KNOWN_FACTS
    from continual_transformer.evaluation.general import general_text
    from continual_transformer.strategies import registry

    backbone = load_backbone()
    config = load_config(set_items=["model.device=cpu"])
    text, _ = general_text(config.data_dir)
    base_ppl = backbone.perplexity(text, max_tokens=4096)
    strategy = registry.get("memory_bank")(backbone, config.strategy_config("memory_bank"), settings=config)
    try:
        for doc in novel_facts(4, seed=0).documents:
            strategy.learn(doc)
        assert strategy.store.size > 0
        assert strategy.perplexity(text, max_tokens=4096) == pytest.approx(base_ppl, rel=1e-6)
        assert strategy.deltas([p.prompt for p in KNOWN_FACTS[:8]]) is None
    finally:
        strategy.close()

"""The knowledge harness on a tiny model: schema, matrix shape, baselines always present, honesty checks."""

from __future__ import annotations

import json
import math

import pytest
from conftest import fast_config, make_backbone

from continual_transformer.documents import Document
from continual_transformer.evaluation import knowledge
from continual_transformer.evaluation.datasets import KnowledgeBenchmark, Probe
from continual_transformer.evaluation.knowledge import (
    KnowledgeBenchConfig,
    run_knowledge_bench,
    score,
    with_strategies,
)
from continual_transformer.evaluation.report import write_knowledge_results

REQUIRED = {
    "acquisition_em",
    "acquisition_contains",
    "ppl_before",
    "ppl_after",
    "known_fact_forgetting_ratio",
    "stream_avg_accuracy",
    "stream_bwt",
    "learn_s_per_1k_tokens",
    "answer_latency_s",
    "peak_memory_mb",
    "params_added",
    "state_bytes",
}


def tiny_benchmark(n: int = 4) -> KnowledgeBenchmark:
    docs = [
        Document(f"d{i}", f"The capital of Veloria number {i} is Tarnhelm. The river is Orvalis.")
        for i in range(n)
    ]
    probes = []
    for i in range(n):
        probes.append(Probe(f"d{i}", f"The capital of Veloria number {i} is", ("Tarnhelm",), "cloze"))
        probes.append(Probe(f"d{i}", f"What is the capital of Veloria number {i}?", ("Tarnhelm",), "qa"))
    return KnowledgeBenchmark("tiny", docs, probes)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(knowledge, "load_benchmark", lambda *a, **k: tiny_benchmark())
    monkeypatch.setattr(knowledge, "KNOWN_FACTS", (Probe("general", "A quick brown", ("fox",), "cloze"),))
    return KnowledgeBenchConfig(
        docs=4, stream_batches=2, ppl_tokens=64, known_facts=1, max_new_tokens=4, latency_prompts=2
    )


def config():
    return fast_config(
        strategies={
            "finetune": {"learning_rate": 1e-2, "epochs": 3, "stop_loss": 0.0},
            "lora": {"learning_rate": 1e-2, "epochs": 3, "stop_loss": 0.0, "rank": 2},
        }
    )


def test_every_baseline_runs_with_the_documented_schema(tokenizer, bench, tmp_path):
    backbone = make_backbone(tokenizer, max_new_tokens=4)
    seen = []
    results = run_knowledge_bench(
        backbone, config(), with_strategies([]), bench, on_result=lambda name, row, partial: seen.append(name)
    )
    assert list(results["strategies"]) == ["none", "in_context", "finetune", "lora"] == seen
    assert {"model", "device", "settings", "version", "date"} <= set(results["meta"])
    for name, row in results["strategies"].items():
        assert REQUIRED <= set(row), name
        R = row["accuracy_matrix"]
        assert len(R) == 2 and R[0][1] is None and R[1][0] is not None  # lower-triangular
        assert 0.0 <= row["acquisition_contains"] <= 1.0
        assert row["ppl_before"] == results["strategies"]["none"]["ppl_before"]
    none, ft, lora = (results["strategies"][n] for n in ("none", "finetune", "lora"))
    assert none["ppl_after"] == pytest.approx(none["ppl_before"]) and none["state_bytes"] == 0
    assert ft["params_added"] == 0 and ft["state_bytes"] > 0
    assert lora["params_added"] > 0
    assert ft["doc_loss_after"] < ft["doc_loss_before"]

    paths = write_knowledge_results(results, tmp_path)
    assert {p.name for p in paths} == {
        "results.json",
        "results.md",
        "accuracy_matrix.png",
        "acquisition_vs_forgetting.png",
    }
    text = (tmp_path / "results.json").read_text()
    assert (
        "NaN" not in text and json.loads(text)["strategies"]["lora"]["params_added"] == lora["params_added"]
    )
    assert "| `finetune` |" in (tmp_path / "results.md").read_text()


def test_a_strategy_that_does_not_restore_the_backbone_is_caught(tokenizer, bench, monkeypatch):
    from continual_transformer.strategies.finetune import FinetuneStrategy

    monkeypatch.setattr(FinetuneStrategy, "close", lambda self: None)
    backbone = make_backbone(tokenizer, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="did not restore the backbone"):
        knowledge.run_strategy(
            "finetune",
            backbone,
            config(),
            tiny_benchmark(),
            bench,
            general="a quick brown fox " * 20,
            known=[],
            ppl_base=1.0,
        )


def test_baselines_always_run_and_unknown_names_fail_early():
    assert with_strategies(["lora", "finetune"]) == ["none", "in_context", "finetune", "lora"]
    with pytest.raises(Exception, match="unknown strategy 'nope'"):
        with_strategies(["nope"])


def test_score_by_kind_hand_computed():
    probes = [
        Probe("d", "p1", ("Tarnhelm",), "cloze"),
        Probe("d", "p2", ("Quenmark",), "qa"),
        Probe("d", "p3", ("1873",), "qa"),
    ]
    result = score(probes, ["Tarnhelm.", "It is Quenmark.", "1999"])
    assert result["em"] == pytest.approx(1 / 3)
    assert result["contains"] == pytest.approx(2 / 3)
    assert result["cloze_contains"] == 1.0 and result["qa_contains"] == 0.5
    assert math.isclose(result["qa_em"], 0.0)


def test_strategy_specs_carry_settings_for_ablation_rows():
    from continual_transformer.config import ConfigError, load_config
    from continual_transformer.evaluation.knowledge import parse_strategy_spec, spec_config

    assert parse_strategy_spec("ttt") == ("ttt", {})
    assert parse_strategy_spec("ttt:sparse=true:layers=25%") == ("ttt", {"sparse": True, "layers": "25%"})
    config = load_config(overrides={"strategies": {"ttt": {"learning_rate": 3e-4}}})
    name, section = spec_config(config, "ttt:alpha_initial=0.5:alpha_decay=0.9")
    assert name == "ttt" and section.alpha_initial == 0.5 and section.alpha_decay == 0.9
    assert section.learning_rate == 3e-4  # settings not named in the spec come from the config
    with pytest.raises(ConfigError, match="strategies.ttt.no_such_key"):
        parse_strategy_spec("ttt:no_such_key=1")
    with pytest.raises(ConfigError):
        parse_strategy_spec("ttt:alpha_decay=2")
    with pytest.raises(Exception, match="nope"):
        parse_strategy_spec("nope")

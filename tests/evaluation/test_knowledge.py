"""The knowledge harness on a tiny model: schema, matrix shape, baselines always present, honesty checks."""

from __future__ import annotations

import json
import math

import pytest
from conftest import fast_config, make_backbone, veloria_benchmark

from continual_transformer.evaluation import knowledge
from continual_transformer.evaluation.datasets import Probe
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


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(knowledge, "load_benchmark", lambda *a, **k: veloria_benchmark())
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
    assert list(results["strategies"]) == ["none", "oracle", "in_context", "finetune", "lora"] == seen
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
    markdown = (tmp_path / "results.md").read_text()
    assert "| `finetune` |" in markdown and "| × oracle |" in markdown

    oracle = results["strategies"]["oracle"]
    assert oracle["ppl_change"] == 0.0 and oracle["ppl_after"] == oracle["ppl_before"]
    assert oracle["known_facts"] == none["known_facts"]  # known facts: the base model's answers, kept
    assert oracle["learn_seconds"] == 0.0 and oracle["params_added"] == 0
    assert oracle["stream_bwt"] == 0.0 and oracle["oracle_documents_over_budget"] == 0
    assert oracle["accuracy_matrix"][1][0] == oracle["accuracy_matrix"][0][0]  # nothing learned or forgotten


def test_a_strategy_that_does_not_restore_the_backbone_is_caught(tokenizer, bench, monkeypatch):
    from continual_transformer.strategies.finetune import FinetuneStrategy

    monkeypatch.setattr(FinetuneStrategy, "close", lambda self: None)
    backbone = make_backbone(tokenizer, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="did not restore the backbone"):
        knowledge.run_strategy(
            "finetune",
            backbone,
            config(),
            veloria_benchmark(),
            bench,
            general="a quick brown fox " * 20,
            known=[],
            ppl_base=1.0,
        )


def test_baselines_always_run_and_unknown_names_fail_early():
    assert with_strategies(["lora", "finetune"]) == ["none", "oracle", "in_context", "finetune", "lora"]
    assert with_strategies(["oracle", "ttt"])[-1] == "ttt"
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
    from continual_transformer.strategies import strategy_config

    assert parse_strategy_spec("ttt") == ("ttt", {})
    assert parse_strategy_spec("ttt:sparse=true:layers=25%") == ("ttt", {"sparse": True, "layers": "25%"})
    config = load_config(overrides={"strategies": {"ttt": {"learning_rate": 3e-4}}})
    name, section = spec_config(config, "ttt:alpha_initial=0.5:alpha_decay=0.9")
    assert name == "ttt" and section.alpha_initial == 0.5 and section.alpha_decay == 0.9
    assert section.optim.learning_rate == 3e-4  # settings not named in the spec come from the config
    _, section = spec_config(config, "ttt:learning_rate=1e-3:epochs=2")  # flat keys of the optimiser
    assert section.optim.learning_rate == 1e-3 and section.optim.epochs == 2
    assert section.optim.batch_size == strategy_config(config, "ttt").optim.batch_size
    with pytest.raises(ConfigError, match="strategies.ttt.no_such_key"):
        parse_strategy_spec("ttt:no_such_key=1")
    with pytest.raises(ConfigError):
        parse_strategy_spec("ttt:alpha_decay=2")
    with pytest.raises(Exception, match="nope"):
        parse_strategy_spec("nope")


# ------------------------------------------------------------------------------------------------------------
# oracle


def _recording(backbone, monkeypatch) -> list[str]:
    """Record every model input the backbone generates from (chat template applied)."""
    seen: list[str] = []
    generate = backbone.generate

    def spy(prompts, *, chat=None, formatted=False, **kwargs):
        seen.extend(prompts if formatted else [backbone.format_prompt(p, chat=chat) for p in prompts])
        return generate(prompts, chat=chat, formatted=formatted, **kwargs)

    monkeypatch.setattr(backbone, "generate", spy)
    return seen


def test_oracle_prompt_holds_exactly_the_probes_own_document(tokenizer, monkeypatch):
    from continual_transformer.evaluation.knowledge import OracleReader

    backbone = make_backbone(tokenizer, max_new_tokens=2)
    benchmark = veloria_benchmark()
    seen = _recording(backbone, monkeypatch)
    oracle = OracleReader(backbone, config(), benchmark)
    try:
        answers = oracle.answer(benchmark.probes, max_new_tokens=2)
    finally:
        oracle.close()
    assert len(answers.predictions) == len(benchmark.probes) == len(seen)
    texts = {doc.id: doc.text for doc in benchmark.documents}
    for probe in benchmark.probes:
        (prompt,) = [s for s in seen if s.rstrip().endswith(probe.prompt) or f"{probe.prompt}<|im_end|>" in s]
        assert prompt.count(texts[probe.doc_id]) == 1
        assert not any(text in prompt for doc_id, text in texts.items() if doc_id != probe.doc_id)

    # The same model input in_context builds when it holds that one document (its prompt format, reused).
    from continual_transformer.strategies import registry, strategy_config

    seen.clear()
    reader = registry.get("in_context")(backbone, strategy_config(config(), "in_context"), settings=config())
    reader.learn(benchmark.documents[0])
    knowledge.answer_probes(reader, benchmark.probes_for("d0"), max_new_tokens=2)
    reader.close()
    in_context = list(seen)
    seen.clear()
    oracle = OracleReader(backbone, config(), benchmark)
    oracle.answer(benchmark.probes_for("d0"), max_new_tokens=2)
    oracle.close()
    assert seen == in_context and len(seen) == 2


def test_oracle_counts_documents_over_in_contexts_budget(tokenizer):
    from continual_transformer.evaluation.knowledge import OracleReader

    backbone = make_backbone(tokenizer, max_new_tokens=2)
    cfg = fast_config(strategies={"in_context": {"max_context_tokens": 1}})
    oracle = OracleReader(backbone, cfg, veloria_benchmark())
    try:
        oracle.answer(veloria_benchmark().probes, max_new_tokens=2)
    finally:
        oracle.close()
    assert oracle.over_budget == {"d0", "d1", "d2", "d3"}


def test_oracle_takes_no_settings():
    from continual_transformer.config import ConfigError
    from continual_transformer.evaluation.knowledge import parse_strategy_spec

    assert parse_strategy_spec("oracle") == ("oracle", {})
    with pytest.raises(ConfigError, match="takes no settings"):
        parse_strategy_spec("oracle:top_k=2")


def _results(rows: dict[str, dict]) -> dict:
    """A hand-made results document with the fields the report reads."""
    full = {}
    for name, row in rows.items():
        full[name] = {"accuracy_matrix": [[row.get("acquisition_contains")]], **row}
    return {
        "meta": {
            "model": "tiny",
            "device": "cpu",
            "settings": {
                "bench": {"stream_batches": 1, "seed": 0, "ppl_tokens": 64},
                "general_text": "built-in general text",
            },
            "version": "0",
            "date": "today",
            "machine": {"cpu_count": 2, "torch": "2"},
        },
        "benchmark": {
            "name": "tiny",
            "documents": 1,
            "probes": 2,
            "cloze": 1,
            "qa": 1,
            "known_facts_kept": 1,
            "known_facts_asked": 1,
        },
        "strategies": full,
    }


def test_times_oracle_is_acquisition_over_the_oracles():
    from continual_transformer.evaluation.report import knowledge_cells, knowledge_header, oracle_ratio

    results = _results(
        {
            "none": {"acquisition_contains": 0.0, "known_fact_forgetting_ratio": 0.0},
            "oracle": {"acquisition_contains": 0.8, "known_fact_forgetting_ratio": 0.0},
            "retrieval": {"acquisition_contains": 0.6, "known_fact_forgetting_ratio": 0.1},
            "broken": {"acquisition_contains": None},
        }
    )
    assert oracle_ratio(results, "retrieval") == pytest.approx(0.75)
    assert oracle_ratio(results, "oracle") == pytest.approx(1.0)
    assert oracle_ratio(results, "none") == 0.0
    assert oracle_ratio(results, "broken") is None
    header = knowledge_header()
    at = header.index("× oracle")
    assert header[at - 1] == "acq. contains"
    assert knowledge_cells(results, "retrieval")[at] == "0.75"
    assert knowledge_cells(results, "retrieval")[at - 1] == "0.600"
    results["strategies"]["oracle"]["acquisition_contains"] = 0.0
    assert oracle_ratio(results, "retrieval") is None  # no ceiling to compare with


def test_results_without_an_oracle_row_still_render(tmp_path):
    from continual_transformer.evaluation.report import knowledge_markdown

    results = _results(
        {
            "none": {"acquisition_contains": 0.0, "known_fact_forgetting_ratio": 0.0},
            "retrieval": {"acquisition_contains": 0.6, "known_fact_forgetting_ratio": 0.1},
        }
    )
    markdown = knowledge_markdown(results)
    table = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(table) == 2 and all(line.split(" | ")[3] == "–" for line in table)
    paths = write_knowledge_results(results, tmp_path)
    assert (tmp_path / "acquisition_vs_forgetting.png") in paths


def test_learn_together_learns_each_batch_in_one_run(tokenizer, bench, monkeypatch):
    import dataclasses

    from continual_transformer.strategies.finetune import FinetuneStrategy

    runs: list[list[str]] = []
    learn_documents = FinetuneStrategy.learn_documents

    def spy(self, documents):
        runs.append([d.id for d in documents])
        return learn_documents(self, documents)

    monkeypatch.setattr(FinetuneStrategy, "learn_documents", spy)
    monkeypatch.setattr(FinetuneStrategy, "learn", lambda self, d: pytest.fail("learned one by one"))
    together = dataclasses.replace(bench, learn_together=True)
    backbone = make_backbone(tokenizer, max_new_tokens=4)
    row = knowledge.run_strategy(
        "finetune",
        backbone,
        config(),
        veloria_benchmark(),
        together,
        general="a quick brown fox " * 20,
        known=[],
        ppl_base=1.0,
    )
    assert runs == [["d0", "d1"], ["d2", "d3"]]
    assert row["doc_loss_after"] < row["doc_loss_before"] and len(row["accuracy_matrix"]) == 2


def test_rows_are_added_only_to_a_run_of_the_same_profile(tmp_path):
    import dataclasses

    from continual_transformer.errors import ContinualTransformerError
    from continual_transformer.evaluation.report import read_knowledge_results

    profile = dataclasses.asdict(KnowledgeBenchConfig())
    older = {k: v for k, v in profile.items() if k != "learn_together"}  # written before the setting existed
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"model": "m", "settings": {"bench": older}}, "strategies": {}}))
    assert read_knowledge_results(path, "m", profile)["strategies"] == {}
    with pytest.raises(ContinualTransformerError, match="other settings"):
        read_knowledge_results(path, "m", {**profile, "learn_together": True})
    with pytest.raises(ContinualTransformerError, match="other settings"):
        read_knowledge_results(path, "other-model", profile)
    path.write_text("{}")
    with pytest.raises(ContinualTransformerError, match="not a knowledge benchmark result"):
        read_knowledge_results(path, "m", profile)


def test_a_setting_of_how_strategies_learn_can_be_set_aside_and_either_side_may_lack_new_settings(tmp_path):
    import dataclasses

    from continual_transformer.evaluation.report import LEARNING_SETTINGS, read_knowledge_results

    profile = dataclasses.asdict(KnowledgeBenchConfig())
    older = {k: v for k, v in profile.items() if k != "learn_together"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"model": "m", "settings": {"bench": profile}}, "strategies": {}}))
    assert read_knowledge_results(path, "m", older)["strategies"] == {}  # the target predates the setting
    together = {**profile, "learn_together": True}
    assert read_knowledge_results(path, "m", together, ignore=LEARNING_SETTINGS)["strategies"] == {}
    with pytest.raises(Exception, match="other settings"):
        read_knowledge_results(path, "m", {**together, "docs": 7}, ignore=LEARNING_SETTINGS)

"""Resumable knowledge runs on a tiny model: a stream stopped after two batches and continued by a fresh
process gives the results of an uninterrupted run; another run's saved stream is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import CORPUS, fast_config, make_backbone, save_tiny_embedder, veloria_benchmark

from continual_transformer.evaluation import knowledge
from continual_transformer.evaluation import resume as resume_
from continual_transformer.evaluation.datasets import KnowledgeBenchmark, Probe
from continual_transformer.evaluation.knowledge import KnowledgeBenchConfig, run_knowledge_bench

TIMINGS = ("seconds", "latency", "tokens_per_s", "peak_memory", "learn_s_", "answer_s_")


def benchmark(n: int = 6) -> KnowledgeBenchmark:
    return veloria_benchmark(n, tuple(CORPUS[:2]))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(knowledge, "load_benchmark", lambda *a, **k: benchmark())
    monkeypatch.setattr(knowledge, "KNOWN_FACTS", (Probe("general", "A quick brown", ("fox",), "cloze"),))
    return KnowledgeBenchConfig(
        docs=6,
        stream_batches=3,
        learn_together=True,
        ppl_tokens=64,
        known_facts=1,
        max_new_tokens=4,
        latency_prompts=2,
    )


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    return save_tiny_embedder(tmp_path_factory.mktemp("gate-bert"), CORPUS + [benchmark().documents[0].text])


def config(embedder_dir, **strategies):
    # a random gate encoder that opens for nearly everything: learned weights answer the probes
    gate = {"enabled": True, "embedder": str(embedder_dir), "min_similarity": -1.0}
    settings = {
        "finetune": {"learning_rate": 1e-2, "epochs": 3, "stop_loss": 0.0},
        "ttt": {"optim": {"epochs": 3, "stop_loss": 0.0}, "gate": gate},
        "memory_layer": {"optim": {"epochs": 3, "stop_loss": 0.0}, "gate": gate},
        **strategies,
    }
    return fast_config(strategies=settings)


def measured(row: dict) -> str:
    """Every figure but timings, as JSON (NaN equal to NaN)."""
    kept = {k: v for k, v in row.items() if k != "resumed" and not any(t in k for t in TIMINGS)}
    return json.dumps(kept, sort_keys=True)


def interrupt_at_batch(monkeypatch, batch: int) -> None:
    """The process dies while asking the probes of stream batch ``batch`` (1-based), after learning it (the
    first call asks the base model the known facts)."""
    calls = {"n": -1}
    answer = knowledge.answer_probes

    def dying(strategy, probes, max_new_tokens):
        calls["n"] += 1
        if calls["n"] == batch:
            raise KeyboardInterrupt("stopped")
        return answer(strategy, probes, max_new_tokens)

    monkeypatch.setattr(knowledge, "answer_probes", dying)


@pytest.mark.parametrize("spec", ["finetune", "ttt", "memory_layer"])
def test_a_stream_continued_after_two_batches_gives_the_uninterrupted_results(
    tokenizer, bench, embedder_dir, monkeypatch, tmp_path, spec
):
    cfg = config(embedder_dir)
    whole = run_knowledge_bench(make_backbone(tokenizer, max_new_tokens=4), cfg, [spec], bench)
    saved = resume_.state_directory(tmp_path, spec)
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            run_knowledge_bench(
                make_backbone(tokenizer, max_new_tokens=4), cfg, [spec], bench, resume=tmp_path
            )
    assert (saved / "manifest.json").is_file()
    learned = []
    original = knowledge.registry.get(spec).learn_documents
    monkeypatch.setattr(
        knowledge.registry.get(spec),
        "learn_documents",
        lambda self, docs: learned.append([d.id for d in docs]) or original(self, docs),
    )
    continued = run_knowledge_bench(
        make_backbone(tokenizer, max_new_tokens=4), cfg, [spec], bench, resume=tmp_path
    )
    assert learned == [["d4", "d5"]], "only the batch the first process did not finish is learned again"
    row, reference = continued["strategies"][spec], whole["strategies"][spec]
    assert row["resumed"]["after_batches"] == [2] and row["resumed"]["earlier_seconds"] > 0
    assert measured(row) == measured(reference)
    assert row["doc_loss_after"] < row["doc_loss_before"]
    phases = row["seconds_by_phase"]
    assert set(phases) == {"learn", "stream_answers", "known_facts", "perplexity", "latency"}
    assert phases["learn"] == row["learn_seconds"] and phases["stream_answers"] > 0
    assert (
        row["accuracy_matrix"][2][0] is not None and row["wall_seconds"] > row["resumed"]["earlier_seconds"]
    )


def test_a_saved_stream_of_another_run_is_refused_and_left_alone(
    tokenizer, bench, embedder_dir, monkeypatch, tmp_path
):
    cfg = config(embedder_dir)
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run_knowledge_bench(
                make_backbone(tokenizer, max_new_tokens=4), cfg, ["finetune"], bench, resume=tmp_path
            )
    manifest = (resume_.state_directory(tmp_path, "finetune") / "manifest.json").read_bytes()
    other_bench = dataclasses.replace(bench, max_new_tokens=5)
    with pytest.raises(resume_.ResumeError, match=r"bench\.max_new_tokens: 4 -> 5"):
        run_knowledge_bench(
            make_backbone(tokenizer, max_new_tokens=4), cfg, ["finetune"], other_bench, resume=tmp_path
        )
    other_config = config(embedder_dir, finetune={"learning_rate": 2e-2, "epochs": 3, "stop_loss": 0.0})
    with pytest.raises(
        resume_.ResumeError, match=r"config\.strategies\.finetune\.learning_rate: 0\.01 -> 0\.02"
    ):
        run_knowledge_bench(
            make_backbone(tokenizer, max_new_tokens=4), other_config, ["finetune"], bench, resume=tmp_path
        )
    monkeypatch.setattr(knowledge, "load_benchmark", lambda *a, **k: benchmark(7))
    with pytest.raises(resume_.ResumeError, match="another document order"):
        run_knowledge_bench(
            make_backbone(tokenizer, max_new_tokens=4),
            cfg,
            ["finetune"],
            dataclasses.replace(bench, docs=6),
            resume=tmp_path,
        )
    assert (resume_.state_directory(tmp_path, "finetune") / "manifest.json").read_bytes() == manifest


def test_state_directories_are_one_per_spec(tmp_path):
    a = resume_.state_directory(tmp_path, "ttt:gate.enabled=true")
    b = resume_.state_directory(tmp_path, "ttt:gate.enabled=false")
    assert a.parent == tmp_path and a != b and a.name.startswith("ttt_gate.enabled=true-")

"""The benchmark harness on a tiny model and a tiny CLINC-shaped data directory: schema, metrics, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import make_backbone
from task_helpers import WORD_GROUPS, single_thread, tiny_config  # noqa: F401

from continual_transformer.errors import ConfigError
from continual_transformer.evaluation import metrics
from continual_transformer.tasks import TaskBenchmarkSettings, benchmark
from continual_transformer.tasks.benchmark import run_task_benchmark
from continual_transformer.tasks.suites import load_suite


def write_clinc(root, domains: int = 3):
    folder = root / "clinc150"
    folder.mkdir(parents=True)
    intents = {f"domain{d}": [f"intent_{d}_{j}" for j in range(2)] for d in range(domains)}
    rows = {"train": [], "test": []}
    for d, (domain, names) in enumerate(intents.items()):
        for j, intent in enumerate(names):
            words = WORD_GROUPS[(2 * d + j) % len(WORD_GROUPS)]
            for n in range(4):
                rows["train" if n < 3 else "test"].append([f"{words[n % 3]} {words[(n + 1) % 3]}", intent])
    (folder / "domains.json").write_text(json.dumps(intents), encoding="utf-8")
    (folder / "data_full.json").write_text(json.dumps(rows), encoding="utf-8")


def test_benchmark_writes_results_with_the_schema_and_metrics_from_evaluation(tokenizer, tmp_path):
    write_clinc(tmp_path / "data")
    settings = TaskBenchmarkSettings(
        data_dir=str(tmp_path / "data"), learner=tiny_config(pool_size=2, epochs=1)
    )
    assert len(load_suite("clinc150-10", settings.data_dir)) == 3
    out = tmp_path / "out"
    report = run_task_benchmark(
        "clinc150-10", ["adapter_distill", "sequential"], make_backbone(tokenizer), settings, out
    )

    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(saved) == {"meta", "suite", "methods"} and saved["suite"] == "clinc150-10"
    assert {"model", "device", "settings", "version", "date", "machine"} <= set(saved["meta"])
    for name in ("adapter_distill", "sequential"):
        m = saved["methods"][name]
        for key in ("avg_accuracy", "bwt", "fwt", "forgetting", "routed_avg_accuracy", "train_s_per_task"):
            assert isinstance(m[key], float), key
        for key in (
            "params_after_first_task",
            "params_after_last_task",
            "state_bytes_after_first_task",
            "state_bytes_after_last_task",
        ):
            assert isinstance(m[key], int), key
        matrix = np.array([[np.nan if v is None else v for v in row] for row in m["accuracy_matrix"]])
        assert matrix.shape == (3, 3) and math.isnan(matrix[0, 2]) and not np.isnan(np.tril(matrix)).any()
        assert m["avg_accuracy"] == metrics.average_accuracy(matrix)
        assert m["bwt"] == metrics.backward_transfer(matrix)
        assert m["forgetting"] == metrics.forgetting(matrix)
        assert m["fwt"] == metrics.forward_transfer(matrix, saved["meta"]["zero_shot_accuracy"])
    distill = saved["methods"]["adapter_distill"]
    assert distill["params_after_first_task"] == distill["params_after_last_task"]
    assert distill["state_bytes_after_first_task"] == distill["state_bytes_after_last_task"]
    assert distill["merges"] == 1  # 3 tasks, 2 slots
    assert report["methods"]["sequential"]["train_time_vs_plain_adapter"] == 1.0
    assert benchmark.average_accuracy is metrics.average_accuracy  # the harness reuses, never re-implements
    for name in ("results.md", "accuracy_matrix.png", "accuracy_vs_tasks.png", "state_vs_tasks.png"):
        assert (out / name).stat().st_size > 0
    assert "| adapter_distill |" in (out / "results.md").read_text(encoding="utf-8")


def test_profiles_and_overrides():
    quick = benchmark.resolve_settings("clinc150-10", True, {"num_tasks": 2, "learner": {"pool_size": 3}})
    assert quick.num_tasks == 2 and quick.learner.pool_size == 3
    assert quick.learner.epochs == benchmark.profile_settings("clinc150-10", quick=True).learner.epochs
    full = benchmark.profile_settings("long15", quick=False)
    assert full.num_tasks is None and full.learner.max_text_tokens == 256


def test_worker_runs_a_method_from_a_json_spec(tokenizer, tmp_path):
    """What each parallel worker process does: JSON spec in, JSON summary out (nothing pickled)."""
    from conftest import tiny_llama

    from continual_transformer.config import to_dict

    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_clinc(tmp_path / "data", domains=2)
    settings = TaskBenchmarkSettings(data_dir=str(tmp_path / "data"), learner=tiny_config(epochs=1))
    spec = {
        "model": {"name": str(model_dir), "device": "cpu", "dtype": "float32"},
        "suite": "clinc150-10",
        "settings": to_dict(settings),
        "method": "sequential",
        "baseline": [0.5, 0.5],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    benchmark.run_worker(tmp_path / "spec.json", tmp_path / "result.json")
    summary = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert len(summary["accuracy_matrix"]) == 2 and summary["accuracy_matrix"][0][1] is not None
    assert summary["params_after_first_task"] == summary["params_after_last_task"] > 0


def test_suite_caps_labels_and_examples_per_label(tmp_path):
    write_clinc(tmp_path / "data")
    tasks = load_suite(
        "clinc150-10",
        tmp_path / "data",
        num_tasks=2,
        max_labels_per_task=1,
        max_train_per_label=2,
        max_test_per_label=1,
    )
    assert [t.name for t in tasks] == ["domain0", "domain1"]
    for task in tasks:
        assert len(task.labels) == 1
        assert {e.label for e in task.train + task.test} == set(task.labels)
        assert len(task.train) == 2 and len(task.test) == 1
    assert len(load_suite("clinc150-50", tmp_path / "data")) == 3  # one task of 3 intents per 2-intent domain


def test_methods_can_be_added_to_an_earlier_run_of_the_same_profile(tokenizer, tmp_path):
    write_clinc(tmp_path / "data")
    settings = TaskBenchmarkSettings(
        data_dir=str(tmp_path / "data"), learner=tiny_config(pool_size=2, epochs=1)
    )
    backbone, out = make_backbone(tokenizer), tmp_path / "out"
    first = run_task_benchmark("clinc150-10", ["sequential"], backbone, settings, out)
    run_task_benchmark("clinc150-10", ["adapter_distill"], backbone, settings, out, add=True)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(saved["methods"]) == ["sequential", "adapter_distill"] and saved["meta"]["unfinished"] == []
    assert saved["methods"]["sequential"]["avg_accuracy"] == first["methods"]["sequential"]["avg_accuracy"]
    assert "| sequential |" in (out / "results.md").read_text(encoding="utf-8")

    other = TaskBenchmarkSettings(data_dir=settings.data_dir, learner=tiny_config(pool_size=2, epochs=2))
    with pytest.raises(ConfigError, match="another suite, model or settings"):
        run_task_benchmark("clinc150-10", ["sequential"], backbone, other, out, add=True)
    assert list(json.loads((out / "results.json").read_text(encoding="utf-8"))["methods"]) == [
        "sequential",
        "adapter_distill",
    ]  # the refused run lost nothing

"""Methods in worker processes: what one worker does (spec in, summary out) and the spawn process pool."""

from __future__ import annotations

import pytest
from conftest import make_backbone, tiny_llama
from task_helpers import single_thread, tiny_config, write_clinc  # noqa: F401

from continual_transformer.backbone import Backbone
from continual_transformer.config import ModelConfig, to_dict
from continual_transformer.tasks import TaskBenchmarkSettings
from continual_transformer.tasks.bench import runner, workers


def saved_model(tokenizer, directory):
    tiny_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_worker_runs_a_method_from_a_spec_like_the_parent_would(tokenizer, tmp_path):
    """A worker loads the model by name and gives the summary the parent process computes itself."""
    model_dir = saved_model(tokenizer, tmp_path / "tiny")
    write_clinc(tmp_path / "data", domains=2)
    settings = TaskBenchmarkSettings(data_dir=str(tmp_path / "data"), learner=tiny_config(epochs=1))
    spec = {
        "model": {"name": str(model_dir), "device": "cpu", "dtype": "float32"},
        "suite": "clinc150-10",
        "settings": to_dict(settings),
        "method": "lora_per_task",
        "baseline": [0.5, 0.5],
    }
    summary = workers.run_spec(spec)
    assert len(summary["accuracy_matrix"]) == 2 and summary["params_after_last_task"] > 0
    backbone = Backbone.load(ModelConfig(**spec["model"]))
    here = runner.run_method(
        backbone, runner.suite_tasks("clinc150-10", settings), "lora_per_task", settings, [0.5] * 2
    )
    assert summary["accuracy_matrix"] == here["accuracy_matrix"]
    assert summary["params_over_tasks"] == here["params_over_tasks"]


def test_pool_runs_methods_in_spawned_processes_and_reports_a_failure_with_its_log(tokenizer, tmp_path):
    model_dir = saved_model(tokenizer, tmp_path / "tiny")
    write_clinc(tmp_path / "data", domains=2)
    backbone = Backbone.load(ModelConfig(name=str(model_dir), device="cpu", dtype="float32"))
    settings = TaskBenchmarkSettings(data_dir=str(tmp_path / "data"), learner=tiny_config(epochs=1))
    finished = []
    results = workers.run_in_workers(
        backbone,
        "clinc150-10",
        ["sequential", "adapter_distill"],
        settings,
        [0.5, 0.5],
        2,
        tmp_path / "logs",
        lambda method, summary: finished.append(method),
    )
    assert list(results) == ["sequential", "adapter_distill"] and sorted(finished) == sorted(results)
    tasks = runner.suite_tasks("clinc150-10", settings)
    for method, summary in results.items():
        assert (
            summary["accuracy_matrix"]
            == runner.run_method(backbone, tasks, method, settings, [0.5] * 2)["accuracy_matrix"]
        )
        assert (tmp_path / "logs" / f"{method}.log").stat().st_size > 0  # the worker's log went to its file

    broken = TaskBenchmarkSettings(data_dir=str(tmp_path / "missing"), learner=tiny_config(epochs=1))
    with pytest.raises(RuntimeError, match="method sequential failed"):
        workers.run_in_workers(
            backbone, "clinc150-10", ["sequential"], broken, [0.5, 0.5], 2, tmp_path / "logs2"
        )


def test_one_worker_process_per_method_is_only_used_when_asked(tokenizer, tmp_path, monkeypatch):
    write_clinc(tmp_path / "data", domains=2)
    settings = TaskBenchmarkSettings(data_dir=str(tmp_path / "data"), learner=tiny_config(epochs=1))
    monkeypatch.setattr(workers, "run_in_workers", lambda *a, **k: pytest.fail("workers=1 runs in-process"))
    report = runner.run_task_benchmark(
        "clinc150-10", ["sequential"], make_backbone(tokenizer), settings, tmp_path / "out"
    )
    assert report["meta"]["workers"] == 1 and list(report["methods"]) == ["sequential"]

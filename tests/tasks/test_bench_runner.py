"""The benchmark run on a tiny model and a tiny CLINC-shaped data directory: schema, metrics, files,
seeding."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_backbone
from task_helpers import single_thread, tiny_config, write_clinc  # noqa: F401

from continual_transformer.errors import ConfigError
from continual_transformer.evaluation import metrics
from continual_transformer.tasks import TaskBenchmarkSettings
from continual_transformer.tasks.bench import runner
from continual_transformer.tasks.bench.runner import bench_tasks, run_task_benchmark
from continual_transformer.tasks.suites import load_suite


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
    assert {"hostname", "platform", "torch", "cpu_count"} <= set(
        saved["meta"]["machine"]
    )  # evaluation.system
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
    assert runner.average_accuracy is metrics.average_accuracy  # the harness reuses, never re-implements
    for name in ("results.md", "accuracy_matrix.png", "accuracy_vs_tasks.png", "state_vs_tasks.png"):
        assert (out / name).stat().st_size > 0
    assert "| adapter_distill |" in (out / "results.md").read_text(encoding="utf-8")


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


def test_runs_measured_side_by_side_merge_into_one_result(tokenizer, tmp_path):
    """Methods run in separate processes, each into its own folder, merge into the result one run of every
    method writes; a joint trained at the end is evaluated only after the last task."""
    write_clinc(tmp_path / "data")
    settings = TaskBenchmarkSettings(
        data_dir=str(tmp_path / "data"), joint_at_end=True, learner=tiny_config(pool_size=2, epochs=1)
    )
    backbone = make_backbone(tokenizer)
    parts = [tmp_path / "parts" / m for m in ("adapter_distill", "isolation", "joint")]
    single = {
        m: run_task_benchmark("clinc150-10", [m], backbone, settings, part)["methods"][m]
        for m, part in zip(("adapter_distill", "isolation", "joint"), parts)
    }
    joint = np.array(
        [[math.nan if v is None else v for v in row] for row in single["joint"]["accuracy_matrix"]]
    )
    assert np.isnan(joint[:-1]).all() and not np.isnan(joint[-1]).any()  # only the last row is evaluated

    merged = runner.merge_runs([*parts, tmp_path / "parts" / "never-finished"], tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "results.json").read_text(encoding="utf-8"))
    assert list(saved["methods"]) == ["adapter_distill", "isolation", "joint"] == list(merged["methods"])
    assert saved["meta"]["merged_from"] == ["adapter_distill", "isolation", "joint"]
    distill = saved["methods"]["adapter_distill"]
    assert distill["avg_accuracy"] == single["adapter_distill"]["avg_accuracy"]
    assert distill["train_time_vs_plain_adapter"] == pytest.approx(
        distill["train_s_per_task"] / saved["methods"]["isolation"]["train_s_per_task"]
    )
    assert "| joint |" in (tmp_path / "merged" / "results.md").read_text(encoding="utf-8")

    other = TaskBenchmarkSettings(data_dir=settings.data_dir, learner=tiny_config(pool_size=2, epochs=2))
    run_task_benchmark("clinc150-10", ["sequential"], backbone, other, tmp_path / "other")
    with pytest.raises(ConfigError, match="another suite, model or settings"):
        runner.merge_runs([parts[0], tmp_path / "other"], tmp_path / "refused")

    # joint_at_end changes how joint trains and nothing else: a run without joint merges either way
    without = dataclasses.replace(settings, joint_at_end=False)
    run_task_benchmark("clinc150-10", ["sequential"], backbone, without, tmp_path / "sequential")
    added = runner.merge_runs([*parts, tmp_path / "sequential"], tmp_path / "with-sequential")
    assert list(added["methods"]) == ["adapter_distill", "isolation", "joint", "sequential"]
    assert added["meta"]["settings"]["joint_at_end"] is True
    first_without = runner.merge_runs([tmp_path / "sequential", parts[2]], tmp_path / "sequential-first")
    assert first_without["meta"]["settings"]["joint_at_end"] is True, "the setting joint was measured with"
    run_task_benchmark("clinc150-10", ["joint"], backbone, without, tmp_path / "joint-per-task")
    with pytest.raises(ConfigError, match="another suite, model or settings"):
        runner.merge_runs([parts[2], tmp_path / "joint-per-task"], tmp_path / "refused-joint")
    with pytest.raises(ConfigError, match="another suite, model or settings"):  # not through a run without it
        runner.merge_runs(
            [tmp_path / "sequential", parts[2], tmp_path / "joint-per-task"], tmp_path / "refused-through"
        )


def test_a_method_reports_its_progress_at_every_full_evaluation(tokenizer, tmp_path):
    """What a run stopped half-way would lose (the accuracy matrix so far) is handed out at each full
    evaluation; the partial file of a finished method is gone."""
    write_clinc(tmp_path / "data")
    settings = TaskBenchmarkSettings(
        data_dir=str(tmp_path / "data"), eval_every=2, learner=tiny_config(pool_size=2, epochs=1)
    )
    backbone = make_backbone(tokenizer)
    tasks = runner.suite_tasks("clinc150-10", settings)
    seen = []
    summary = runner.run_method(
        backbone, tasks, "adapter_distill", settings, [0.0] * 3, checkpoint=seen.append
    )
    assert [p["tasks_done"] for p in seen] == [2]  # after task 2 of 3 (the last one is the summary)
    first_rows = [[None if math.isnan(v) else v for v in row] for row in summary["accuracy_matrix"][:2]]
    assert seen[0]["accuracy_matrix"] == first_rows
    run_task_benchmark("clinc150-10", ["adapter_distill"], backbone, settings, tmp_path / "out")
    assert not list((tmp_path / "out").glob("partial-*.json"))


def test_bench_tasks_seeds_the_run_and_leaves_the_global_generator_as_it_was(tokenizer, tmp_path):
    """Same seed, same figures; and the caller's random stream is not moved by the run."""
    write_clinc(tmp_path / "data", domains=2)
    backbone = make_backbone(tokenizer)
    overrides = [
        f"learner.{k}={v}" for k, v in {"epochs": 1, "router": "backbone", "router_layer": 0}.items()
    ]
    overrides += ["max_labels_per_task=2", "max_train_per_label=2"]
    runs = []
    for n in range(2):
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        report = bench_tasks(
            suite="clinc150-10",
            methods="lora_per_task,sequential",
            quick=True,
            out=tmp_path / f"out{n}",
            data_dir=str(tmp_path / "data"),
            model=backbone,
            overrides=overrides,
        )
        assert torch.equal(torch.random.get_rng_state(), before)
        runs.append({m: s["accuracy_matrix"] for m, s in report["methods"].items()})
    assert runs[0] == runs[1] and list(runs[0]) == ["lora_per_task", "sequential"]


def test_the_former_module_still_exports_what_scripts_import():
    from continual_transformer.evaluation import system
    from continual_transformer.tasks import benchmark

    assert benchmark.machine_info is system.machine_info  # one machine-info helper
    assert benchmark.bench_tasks is bench_tasks and benchmark.run_task_benchmark is run_task_benchmark
    assert benchmark.profile_settings("clinc150-10", quick=True).num_tasks == 3

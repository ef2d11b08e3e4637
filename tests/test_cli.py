"""The ``ctt`` command line, driven on a tiny model saved to a local directory (the ordinary
from_pretrained path)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_llama
from typer.testing import CliRunner

from continual_transformer.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def base_args(tiny_model_dir, tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_model_dir), "device": "cpu"},
                "generation": {"max_new_tokens": 6},
                "strategies": {
                    "finetune": {"learning_rate": 1e-2, "epochs": 20, "stop_loss": 0.0},
                    "retrieval": {"retriever": "bm25"},
                    "memory_bank": {"key_encoder": "backbone"},
                },
            }
        )
    )
    return ["--config", str(config)]


def test_config_show_prints_resolved_yaml_with_precedence(base_args):
    result = runner.invoke(app, [*base_args, "--set", "seed=7", "--strategy", "finetune", "config", "show"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["seed"] == 7 and shown["model"]["device"] == "cpu"
    assert shown["strategies"]["finetune"]["epochs"] == 20


def test_learn_then_ask_in_a_new_process_answers_the_same(base_args, tmp_path):
    doc = tmp_path / "facts.txt"
    doc.write_text("The capital of Veloria is Tarnhelm.")
    state = tmp_path / "state"
    result = runner.invoke(app, [*base_args, "learn", str(doc), "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert "facts.txt" in result.output and (state / "manifest.json").exists()

    in_process = runner.invoke(
        app, [*base_args, "generate", "The capital of Veloria is", "--state", str(state)]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fresh = subprocess.run(
        [
            sys.executable,
            "-m",
            "continual_transformer",
            *base_args,
            "generate",
            "The capital of Veloria is",
            "--state",
            str(state),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip() == in_process.output.strip()
    untrained = runner.invoke(
        app, [*base_args, "generate", "The capital of Veloria is", "--state", str(tmp_path / "none")]
    )
    assert untrained.output.strip() != in_process.output.strip()


def test_learn_bad_file_is_a_clear_error_and_saves_nothing(base_args, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\x01binary")
    state = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "continual_transformer", *base_args, "learn", str(bad), "--state", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "bad.txt" in proc.stderr and "binary" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not state.exists()


def test_unknown_config_key_is_reported_by_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("generation: {max_tokens: 3}\n")
    result = runner.invoke(app, ["--config", str(config), "config", "show"])
    assert result.exit_code != 0
    assert "generation.max_tokens" in str(result.exception)


def test_strategies_lists_the_registry():
    result = runner.invoke(app, ["strategies"])
    assert result.exit_code == 0 and "finetune" in result.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("learn", "ask", "models", "config", "demo"):
        assert command in result.output


def test_bench_knowledge_accepts_dataset_as_alias_of_benchmark(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = runner.invoke(
        app, ["--model", "/nonexistent/model", "bench", "knowledge", "--dataset", str(missing), "--help"]
    )
    assert result.exit_code == 0 and "--dataset" in result.output


def test_bench_knowledge_adds_rows_to_an_earlier_run_of_the_same_profile_only(base_args, tmp_path):
    import json

    out = tmp_path / "bench"
    common = [
        *base_args,
        "bench",
        "knowledge",
        "--quick",
        "--docs",
        "2",
        "--batches",
        "1",
        "--no-baselines",
        "--out",
        str(out),
    ]
    first = runner.invoke(app, [*common, "--strategies", "none"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*common, "--strategies", "retrieval:top_k=1"])
    assert second.exit_code == 0, second.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["strategies"]) == ["none", "retrieval:top_k=1"]
    assert results["strategies"]["retrieval:top_k=1"]["strategy_config"]["top_k"] == 1
    assert "`retrieval:top_k=1`" in (out / "results.md").read_text()
    other = runner.invoke(
        app,
        [
            *base_args,
            "bench",
            "knowledge",
            "--quick",
            "--docs",
            "3",
            "--batches",
            "1",
            "--no-baselines",
            "--out",
            str(out),
            "--strategies",
            "none",
        ],
    )
    assert other.exit_code != 0 and "other settings" in str(other.exception)
    assert list(json.loads((out / "results.json").read_text())["strategies"]) == ["none", "retrieval:top_k=1"]


def test_bench_tasks_settings_are_checked_before_any_work(tmp_path):
    result = runner.invoke(
        app,
        [
            "--model",
            "/nonexistent/model",
            "bench",
            "tasks",
            "--quick",
            "--out",
            str(tmp_path / "o"),
            "--setting",
            "learner.router=minilm",
            "--setting",
            "learner.nonsense=1",
        ],
    )
    assert result.exit_code != 0 and "bench.learner.nonsense" in str(result.exception)
    assert not (tmp_path / "o").exists()

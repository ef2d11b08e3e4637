"""The ``ctt`` command line, driven on a tiny model saved to a local directory (the ordinary
from_pretrained path)."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import yaml
from conftest import tiny_llama
from typer.testing import CliRunner

from continual_transformer.cli import app, main

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
        app,
        [
            *base_args,
            "generate",
            "The capital of Veloria is",
            "--state",
            str(tmp_path / "none"),
            "--allow-empty",
        ],
    )
    assert untrained.exit_code == 0, untrained.output
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


def test_bench_knowledge_resume_keeps_finished_rows_and_removes_their_saved_streams(base_args, tmp_path):
    import json

    out = tmp_path / "bench"
    common = [*base_args, "bench", "knowledge", "--quick", "--docs", "2", "--batches", "2", "--no-baselines"]
    first = runner.invoke(app, [*common, "--out", str(out), "--resume", "--strategies", "finetune"])
    assert first.exit_code == 0, first.output
    assert not any((out / "resume").iterdir()), "a written row's saved stream is removed"
    row = json.loads((out / "results.json").read_text())["strategies"]["finetune"]
    second = runner.invoke(app, [*common, "--out", str(out), "--resume", "--strategies", "finetune,none"])
    assert second.exit_code == 0, second.output
    assert "kept from" in second.output
    results = json.loads((out / "results.json").read_text())["strategies"]
    assert list(results) == ["finetune", "none"] and results["finetune"] == row  # kept, not measured again


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


# -- state that survives what users do ----------------------------------------------------------------------
def ctt(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``ctt`` in this process as the console script does; (exit code, stdout, stderr)."""
    with mock.patch.object(sys, "argv", ["ctt", *map(str, args)]), pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_two_concurrent_learners_both_keep_their_documents(base_args, tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = []
    for name, text in (
        ("a.txt", "The capital of Veloria is Tarnhelm."),
        ("b.txt", "The Orvalis flows north."),
    ):
        (tmp_path / name).write_text(text)
        command = [sys.executable, "-m", "continual_transformer", *base_args]
        command += [
            "--set",
            "strategies.finetune.epochs=150",
            "learn",
            str(tmp_path / name),
            "--state",
            str(state),
        ]
        procs.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    import json

    history = json.loads((state / "manifest.json").read_text())["history"]
    assert sorted(h["doc_id"] for h in history) == ["a.txt", "b.txt"], (
        "neither learner lost the other's document"
    )


def test_a_writer_that_cannot_get_the_lock_says_who_holds_it(base_args, tmp_path, capsys):
    from continual_transformer.locking import StateLock

    (tmp_path / "a.txt").write_text("The capital of Veloria is Tarnhelm.")
    with StateLock(tmp_path / "state"):
        code, _, err = ctt(
            capsys,
            *base_args,
            "learn",
            tmp_path / "a.txt",
            "--state",
            tmp_path / "state",
            "--lock-timeout",
            "0.2",
        )
    assert code == 3
    line = one_error_line(err)
    assert f"locked by process {os.getpid()}" in line and str(tmp_path / "state") in line


def test_ask_and_generate_refuse_a_state_with_no_checkpoint_unless_allowed(base_args, tmp_path, capsys):
    missing = tmp_path / "elsewhere" / "ctt-state"
    code, out, err = ctt(capsys, *base_args, "ask", "What is the capital?", "--state", missing)
    assert code == 2 and out == ""
    assert "no learned state at" in one_error_line(err) and "--allow-empty" in err
    (tmp_path / "empty").mkdir()
    code, _, err = ctt(capsys, *base_args, "generate", "The capital", "--state", tmp_path / "empty")
    assert code == 2 and "empty directory" in one_error_line(err)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    code, _, err = ctt(capsys, *base_args, "ask", "What?", "--state", tmp_path / "other", "--allow-empty")
    assert code == 2 and "not a checkpoint" in one_error_line(err)
    code, out, _ = ctt(capsys, *base_args, "ask", "What is the capital?", "--state", missing, "--allow-empty")
    assert code == 0 and out.strip()
    assert not missing.exists(), "reading creates nothing"


def test_learn_refuses_a_directory_of_other_files_before_any_work(base_args, tmp_path, capsys, monkeypatch):
    import continual_transformer.session as session_module

    def no_model(*args, **kwargs):
        raise AssertionError("no model is loaded for a state that will be refused")

    monkeypatch.setattr(session_module.Session, "__init__", no_model)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "a.txt").write_text("The capital of Veloria is Tarnhelm.")
    code, _, err = ctt(capsys, *base_args, "learn", tmp_path / "a.txt", "--state", tmp_path / "mine")
    assert code == 2 and "not a checkpoint" in one_error_line(err)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty question", "question is empty"),
        ("state is a file", "is a file, not a directory"),
        ("config is a directory", "is a directory"),
        ("question too long", "exceeds the context"),
    ],
)
def test_input_errors_are_one_line_and_exit_2(base_args, tmp_path, capsys, case, message):
    (tmp_path / "file").write_text("x")
    args = {
        "empty question": [*base_args, "ask", "  ", "--allow-empty"],
        "state is a file": [*base_args, "ask", "What?", "--state", tmp_path / "file"],
        "config is a directory": ["--config", tmp_path, "ask", "What?", "--allow-empty"],
        "question too long": [*base_args, "ask", "What is the capital of Veloria? " * 80, "--allow-empty"],
    }[case]
    code, out, err = ctt(capsys, *args)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_later_calls_use_the_checkpoints_config(base_args, tmp_path, capsys):
    import json

    state = tmp_path / "state"
    (tmp_path / "a.txt").write_text("The capital of Veloria is Tarnhelm.")
    (tmp_path / "b.txt").write_text("The Orvalis river flows through Quenmark.")
    learn = [*base_args, "--strategy", "retrieval", "--set", "strategies.retrieval.top_k=1", "learn"]
    code, _, err = ctt(capsys, *learn, tmp_path / "a.txt", "--state", state)
    assert code == 0, err
    code, _, err = ctt(capsys, *base_args, "learn", tmp_path / "b.txt", "--state", state)
    assert code == 0, err  # no --strategy: the checkpoint's applies
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["strategy"] == "retrieval" and len(manifest["history"]) == 2
    assert "top_k: 1" in (state / "config.yaml").read_text(), "the --set of the first call stays"
    code, out, err = ctt(capsys, *base_args, "generate", "The capital", "--state", state)
    assert code == 0 and out.strip(), err

    code, _, err = ctt(
        capsys, *base_args, "--strategy", "finetune", "learn", tmp_path / "a.txt", "--state", state
    )
    assert code == 2 and "holds strategy 'retrieval', not 'finetune'" in one_error_line(err)
    code, _, err = ctt(capsys, "--model", "other-model", "ask", "What?", "--state", state)
    assert code == 2 and "made on base model" in one_error_line(err)
    code, _, err = ctt(
        capsys, *base_args, "--strategy", "finetune", "learn", tmp_path / "a.txt", "--state", state, "--reset"
    )
    assert code == 0, err
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["strategy"] == "finetune" and [h["doc_id"] for h in manifest["history"]] == ["a.txt"]


def test_a_document_learned_twice_is_counted_once(base_args, tmp_path, capsys):
    state = tmp_path / "state"
    (tmp_path / "a.txt").write_text("The capital of Veloria is Tarnhelm.")
    (tmp_path / "copy.txt").write_text("The capital of Veloria is Tarnhelm.\n")
    assert ctt(capsys, *base_args, "learn", tmp_path / "a.txt", "--state", state)[0] == 0
    code, out, err = ctt(
        capsys, *base_args, "learn", tmp_path / "a.txt", tmp_path / "copy.txt", "--state", state
    )
    assert code == 0, err
    assert "a.txt: already learned as a.txt" in out and "copy.txt: already learned as a.txt" in out
    assert "(1 documents learned in total)" in out


def test_a_state_lost_between_the_renames_of_a_swap_is_recovered_by_the_next_ask(base_args, tmp_path, capsys):
    """``kill -9`` between ``state -> .state.old-*`` and ``.state.tmp-* -> state`` (format-version-2 swap)
    left no live state: the next command used to answer from the base model."""
    state = tmp_path / "state"
    (tmp_path / "a.txt").write_text("The capital of Veloria is Tarnhelm.")
    assert ctt(capsys, *base_args, "learn", tmp_path / "a.txt", "--state", state)[0] == 0
    _, learned, _ = ctt(capsys, *base_args, "generate", "The capital of Veloria is", "--state", state)
    state.rename(tmp_path / ".state.old-k9x")
    code, out, err = ctt(capsys, *base_args, "generate", "The capital of Veloria is", "--state", state)
    assert code == 0, err
    assert out == learned
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".state")) == []

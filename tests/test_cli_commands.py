"""The commands a user reaches for, each checked by what it does (state on disk, answers, files written),
run in this process as the console script runs them, on a tiny model saved to a local directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import ctt, one_error_line

from continual_transformer.cli import COMMANDS, SUB_APPS, hoist_global_options

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    from conftest import tiny_llama

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
                "strategy": "retrieval",
                "generation": {"max_new_tokens": 6},
                "strategies": {
                    "finetune": {"learning_rate": 1e-2, "epochs": 5, "stop_loss": 0.0},
                    "retrieval": {"retriever": "bm25"},
                    "memory_bank": {"key_encoder": "backbone"},
                    "memory_layer": {
                        "n_keys": 16,
                        "heads": 2,
                        "topk": 4,
                        "query_dim": 16,
                        "top_t": 64,
                        "background_tokens": 256,
                        "background_chunk_tokens": 32,
                        "kmeans_iterations": 3,
                    },
                },
                "tasks": {
                    "max_tasks": 4,
                    "max_labels_per_task": 4,
                    "max_label_bytes": 24,
                    "max_task_id_bytes": 16,
                    "max_text_tokens": 16,
                    "pool_size": 2,
                    "adapter_dim": 4,
                    "epochs": 2,
                    "batch_size": 8,
                    "learning_rate": 2e-2,
                    "distill_epochs": 1,
                    "transfer_samples": 8,
                    "router_samples": 16,
                    "router": "backbone",
                    "router_layer": 0,
                },
            }
        )
    )
    return ["--config", str(config)]


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "a.txt").write_text("The capital of Veloria is Tarnhelm.")
    (tmp_path / "b.txt").write_text("The Orvalis river flows through the city of Quenmark.")
    return tmp_path / "a.txt", tmp_path / "b.txt"


def manifest(state: Path) -> dict:
    return json.loads((state / "manifest.json").read_text())


def doc_ids(state: Path) -> list[str]:
    return [h["doc_id"] for h in manifest(state)["history"]]


def run_json(capsys, *args) -> dict | list:
    code, out, err = ctt(capsys, "--json", *args)
    assert code == 0, err
    return json.loads(out)


# -- the command line itself ---------------------------------------------------------------------------------
def test_global_options_after_the_command_move_before_it():
    assert hoist_global_options(["ask", "Q", "--strategy", "retrieval", "--json"]) == [
        "--strategy",
        "retrieval",
        "--json",
        "ask",
        "Q",
    ]
    assert hoist_global_options(["--model", "ask", "learn", "x", "--set=seed=1"]) == [
        "--model",
        "ask",
        "--set=seed=1",
        "learn",
        "x",
    ], "the value of a global option is no command name"
    assert hoist_global_options(["ask", "--", "--strategy"]) == ["ask", "--", "--strategy"]
    assert hoist_global_options(["bench", "knowledge", "--strategies", "a"]) == [
        "bench",
        "knowledge",
        "--strategies",
        "a",
    ], "a command's own options stay"


def test_strategy_after_the_subcommand_is_applied(base_args, docs, tmp_path, capsys):
    state = tmp_path / "state"
    code, _, err = ctt(capsys, *base_args, "learn", docs[0], "--state", state, "--strategy", "finetune")
    assert code == 0, err
    assert manifest(state)["strategy"] == "finetune"


def test_version_help_and_no_arguments_without_a_terminal(capsys):
    from continual_transformer.version import __version__

    code, out, _ = ctt(capsys, "--version")
    assert code in (0, None) and out.strip() == f"ctt {__version__}"
    code, out, _ = ctt(capsys, "--help")
    for name in [*COMMANDS, *SUB_APPS]:
        assert name in out, f"--help lists {name}"
    for strategy in ("retrieval", "finetune", "ttt", "memory_layer"):
        assert strategy in out, "--help names the strategies"
    assert "recommended: retrieval" in " ".join(out.split())
    proc = subprocess.run(
        [sys.executable, "-m", "continual_transformer"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=120,
    )
    assert proc.returncode == 2 and "Commands" in proc.stdout and "no terminal" in proc.stderr


def test_errors_are_one_line_and_debug_shows_the_traceback(base_args, capsys):
    from continual_transformer.session import InputError

    code, _, err = ctt(capsys, *base_args, "ask", "   ", "--allow-empty")
    assert code == 2 and "question is empty" in one_error_line(err)
    with pytest.raises(InputError):
        ctt(capsys, *base_args, "ask", "   ", "--allow-empty", "--debug")


def test_learn_and_ask_from_stdin_with_json(base_args, tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC}
    command = [sys.executable, "-m", "continual_transformer", *base_args, "--json"]
    learned = subprocess.run(
        [*command, "learn", "-", "--state", str(state)],
        input="The capital of Veloria is Tarnhelm.",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert learned.returncode == 0, learned.stderr
    report = json.loads(learned.stdout)
    assert report["documents_total"] == 1 and report["learned"][0]["tokens"] > 0
    asked = subprocess.run(
        [*command, "ask", "-", "--state", str(state)],
        input="What is the capital of Veloria?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["question"] == "What is the capital of Veloria?" and answer["strategy"] == "retrieval"
    assert answer["answer"].strip()


def test_piped_output_comes_line_by_line(base_args, tmp_path):
    """With stdout a pipe, each document's line arrives while later documents are still being learned."""
    for n in range(3):
        (tmp_path / f"d{n}.txt").write_text(f"Document {n}: the capital of Veloria is Tarnhelm number {n}.")
    command = [sys.executable, "-m", "continual_transformer", *base_args, "--strategy", "finetune"]
    command += ["--set", "strategies.finetune.epochs=20", "learn"]
    command += [str(tmp_path / f"d{n}.txt") for n in range(3)] + ["--state", str(tmp_path / "state")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        still_running = proc.poll() is None
    finally:
        proc.communicate(timeout=600)
    assert first.startswith("learned d0.txt"), first
    assert still_running, "the first line came before the command finished"
    assert proc.returncode == 0


# -- the state -----------------------------------------------------------------------------------------------
def test_state_show_history_forget_and_reset(base_args, docs, tmp_path, capsys):
    state = tmp_path / "state"
    assert ctt(capsys, *base_args, "learn", *docs, "--state", state)[0] == 0
    shown = run_json(capsys, *base_args, "state", "show", "--state", state)
    assert shown["strategy"] == "retrieval" and shown["documents"] == 2
    assert [h["doc_id"] for h in shown["history"]] == ["a.txt", "b.txt"]
    history = run_json(capsys, *base_args, "history", "--state", state)
    assert history[0]["source"].endswith("a.txt") and history[0]["tokens"] > 0

    forgotten = run_json(capsys, *base_args, "forget", "a.txt", "--state", state)
    assert forgotten["relearned"] == ["b.txt"]
    assert doc_ids(state) == ["b.txt"]
    code, _, err = ctt(capsys, *base_args, "forget", "nope", "--state", state)
    assert code == 2 and "no document 'nope'" in one_error_line(err)

    assert ctt(capsys, *base_args, "reset", "--state", state)[0] == 0
    assert doc_ids(state) == [] and manifest(state)["strategy"] == "retrieval"


def test_forget_refuses_when_another_document_cannot_be_read_again(base_args, docs, tmp_path, capsys):
    state = tmp_path / "state"
    assert ctt(capsys, *base_args, "learn", *docs, "--state", state)[0] == 0
    docs[1].write_text("changed since it was learned")
    code, _, err = ctt(capsys, *base_args, "forget", "a.txt", "--state", state)
    assert code == 2 and "b.txt" in one_error_line(err)
    assert doc_ids(state) == ["a.txt", "b.txt"], "nothing changed"


def test_use_switches_strategy_and_relearns(base_args, docs, tmp_path, capsys):
    state = tmp_path / "state"
    assert ctt(capsys, *base_args, "learn", docs[0], "--state", state)[0] == 0
    result = run_json(capsys, *base_args, "use", "finetune", "--state", state)
    assert result["strategy"] == "finetune" and result["not_relearned"] == []
    assert manifest(state)["strategy"] == "finetune" and doc_ids(state) == ["a.txt"]
    assert manifest(state)["history"][0]["strategy"] == "finetune"


def test_info_reports_layers_parameters_and_state(base_args, docs, tmp_path, capsys):
    state = tmp_path / "state"
    info = run_json(capsys, *base_args, "info", "--state", state)
    assert info["layers_total"] == 4 and info["layers_modified"] == [] and info["layers_frozen"] == 4
    assert info["params_total"] > 0 and info["params_added"] == 0 and info["calibration"] is None
    assert ctt(capsys, *base_args, "--strategy", "finetune", "learn", docs[0], "--state", state)[0] == 0
    info = run_json(capsys, *base_args, "info", "--state", state)
    assert info["strategy"] == "finetune" and info["documents"] == 1
    assert info["layers_modified"] and info["layers_frozen"] == 4 - len(info["layers_modified"])
    assert info["params_trainable"] > 0


def test_memory_layer_calibration_action(base_args, tmp_path, capsys):
    state = tmp_path / "state"
    args = [*base_args, "--strategy", "memory_layer"]
    listed = run_json(capsys, *args, "action", "--state", state)
    assert set(listed) == {"calibration", "calibrate"}
    before = run_json(capsys, *args, "action", "calibration", "--state", state)
    assert before["result"]["calibration"].startswith("not calibrated")
    done = run_json(capsys, *args, "action", "calibrate", "--state", state)
    assert done["result"]["calibration"].startswith("calibrated")
    after = run_json(capsys, *args, "action", "calibration", "--state", state)
    assert after["result"]["calibration"].startswith("calibrated"), "the calibration was saved with the state"
    code, _, err = ctt(capsys, *base_args, "action", "calibrate", "--state", tmp_path / "other")
    assert code == 2 and "has no action 'calibrate'" in one_error_line(err)


def test_checkpoints_save_list_load(base_args, docs, tmp_path, capsys):
    state, checkpoints = tmp_path / "state", tmp_path / "cps"
    assert ctt(capsys, *base_args, "learn", docs[0], "--state", state)[0] == 0
    where = ["--state", state, "--checkpoints", checkpoints]
    assert ctt(capsys, *base_args, "checkpoints", "save", "one", *where)[0] == 0
    assert ctt(capsys, *base_args, "learn", docs[1], "--state", state)[0] == 0
    rows = run_json(capsys, *base_args, "checkpoints", "list", "--checkpoints", checkpoints)
    assert [(r["name"], r["strategy"], r["documents"]) for r in rows] == [("one", "retrieval", 1)]
    assert doc_ids(state) == ["a.txt", "b.txt"]
    assert ctt(capsys, *base_args, "checkpoints", "load", "one", *where)[0] == 0
    assert doc_ids(state) == ["a.txt"], "the state is the checkpoint again"
    code, _, err = ctt(capsys, *base_args, "checkpoints", "load", "two", *where)
    assert code == 2 and "no checkpoint 'two'" in one_error_line(err)


def test_forgetting_is_zero_for_a_strategy_that_leaves_the_model_alone(base_args, docs, tmp_path, capsys):
    state = tmp_path / "state"
    assert ctt(capsys, *base_args, "learn", docs[0], "--state", state)[0] == 0
    result = run_json(capsys, *base_args, "forgetting", "--state", state)
    assert result["ppl_base"] == pytest.approx(result["ppl_now"], rel=1e-6)
    assert result["known_facts_kept"] == result["known_facts"]


# -- configuration -------------------------------------------------------------------------------------------
def test_config_init_set_get(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ctt(capsys, "config", "init")[0] == 0
    settings = yaml.safe_load(Path("ctt.yaml").read_text())
    assert settings["strategy"] == "retrieval"
    code, _, err = ctt(capsys, "config", "init")
    assert code == 2 and "exists" in one_error_line(err)
    assert ctt(capsys, "config", "set", "generation.max_new_tokens=7", "strategies.retrieval.top_k=2")[0] == 0
    code, out, _ = ctt(capsys, "config", "get", "generation.max_new_tokens")
    assert code == 0 and out.strip() == "7", "ctt.yaml in the working directory is read"
    text = Path("ctt.yaml").read_text()
    code, _, err = ctt(capsys, "config", "set", "strategies.retrieval.top_kk=2")
    assert code == 2 and "top_kk" in one_error_line(err)
    code, _, err = ctt(capsys, "config", "set", "generation.max_new_tokens=lots")
    assert code == 2 and "max_new_tokens" in one_error_line(err)
    assert Path("ctt.yaml").read_text() == text, "a refused setting leaves the file as it was"


# -- tasks ---------------------------------------------------------------------------------------------------
def test_tasks_learn_predict_evaluate(base_args, tmp_path, capsys):
    data = tmp_path / "sentiment.jsonl"
    examples = [("great lovely fine", "good"), ("awful bad sad", "bad")] * 4
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in examples))
    state = tmp_path / "state"
    learned = run_json(capsys, *base_args, "tasks", "learn", "sentiment", data, "--state", state)
    assert learned["tasks"] == ["sentiment"] and learned["report"]["examples"] == 8
    assert "tasks" in json.dumps(manifest(state)), "the task is saved with the state"
    predicted = run_json(capsys, *base_args, "tasks", "predict", "great lovely fine", "--state", state)
    assert predicted["label"] in ("good", "bad")
    evaluated = run_json(capsys, *base_args, "tasks", "evaluate", "sentiment", data, "--state", state)
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    listed = run_json(capsys, *base_args, "tasks", "list", "--state", state)
    assert listed == [{"task": "sentiment", "labels": ["good", "bad"]}]


# -- compare and demo ----------------------------------------------------------------------------------------
def test_compare_runs_strategies_side_by_side(base_args, docs, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        json.dumps({"question": "What is the capital of Veloria?", "answer": "Tarnhelm"})
        + "\n"
        + json.dumps({"question": "Which river flows through Quenmark?", "answer": ["Orvalis"]})
        + "\n"
    )
    out = tmp_path / "cmp"
    args = [*base_args, "compare", docs[0], qa, "--strategies", "retrieval,finetune", "--out", out]
    result = run_json(capsys, *args, "--ppl-tokens", "128", "--known-facts", "4")
    rows = {r["strategy"]: r for r in result["rows"]}
    assert list(rows) == ["none", "retrieval", "finetune"]
    assert rows["finetune"]["tokens_learned"] > 0 and rows["finetune"]["learn_seconds"] > 0
    assert rows["none"]["ppl_change"] == pytest.approx(0.0, abs=1e-6), "the base model, before learning"
    assert rows["retrieval"]["ppl_change"] == pytest.approx(0.0, abs=1e-6), (
        "retrieval leaves general text alone"
    )
    assert rows["finetune"]["ppl_change"] != pytest.approx(0.0, abs=1e-6), "fine-tuning moves it"
    assert len(rows["none"]["answers"]) == 2
    assert all(Path(p).is_file() and p.endswith(".png") for p in result["plots"])
    assert (out / "comparison.png").is_file() and (out / "results.json").is_file()
    code, out_text, _ = ctt(capsys, *args[:-4], "--strategies", "none", "--out", tmp_path / "c2")
    assert code == 0 and "strategies side by side" in out_text and "comparison.png" in out_text


def test_demo_shows_the_recommended_strategy_and_the_price_of_the_others(base_args, tmp_path, capsys):
    from continual_transformer.demo import DEMO_QUESTIONS, RECOMMENDED_STRATEGY

    out = tmp_path / "demo"
    result = run_json(capsys, *base_args, "demo", "--strategies", "finetune", "--out", out)
    assert result["recommended"] == RECOMMENDED_STRATEGY
    assert [a["question"] for a in result["answers"]] == [q for q, _ in DEMO_QUESTIONS]
    assert [r["strategy"] for r in result["rows"]] == ["none", RECOMMENDED_STRATEGY, "finetune"]
    assert (out / "comparison.png").is_file()

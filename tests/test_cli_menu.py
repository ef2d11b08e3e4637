"""The interactive menu (``ctt`` alone on a terminal), driven through a real pseudo-terminal with pexpect:
keys are sent as a user types them and the screen is read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import yaml
from conftest import tiny_llama

PYTHON = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")
QUESTION = "What is the capital of Veloria?"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    """A working directory with a tiny-model config (retrieval, BM25) and a document."""
    settings = {
        "model": {"name": str(tiny_model_dir), "device": "cpu"},
        "strategy": "retrieval",
        "generation": {"max_new_tokens": 6},
        "strategies": {"retrieval": {"retriever": "bm25"}, "memory_bank": {"key_encoder": "backbone"}},
    }
    (tmp_path / "ctt.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "facts.txt").write_text("The capital of Veloria is Tarnhelm.")
    return tmp_path


class Screen:
    """One ``ctt`` menu process on a pseudo-terminal."""

    def __init__(
        self, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240
    ) -> None:
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "TERM": "xterm",
            **(env or {}),
        }
        self.child = pexpect.spawn(
            PYTHON,
            ["-m", "continual_transformer", *args],
            cwd=str(cwd),
            env=environment,
            encoding="utf-8",
            timeout=timeout,
            dimensions=(50, 160),
        )
        self.child.expect("What next")

    def choose(self, key: str) -> None:
        """Pick a main-menu entry by its shortcut key."""
        self.child.send(key)
        time.sleep(0.2)
        self.child.send("\r")

    def type(self, text: str) -> None:
        self.child.send(text + "\r")

    def expect(self, pattern: str) -> str:
        self.child.expect(pattern)
        return self.child.match.group(1) if self.child.match.groups() else self.child.after

    def quit(self) -> int:
        self.child.expect("What next")
        self.choose("q")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def ask(screen: Screen, question: str) -> str:
    screen.choose("a")
    screen.expect("Question:")
    screen.type(question)
    return screen.expect(r"answer: (.*?)\r\n").strip()


def test_learn_ask_save_then_load_in_a_new_process_and_ask_again(workdir):
    screen = Screen(workdir)
    before = ask(screen, QUESTION)
    screen.expect("What next")
    screen.choose("l")
    screen.expect("Document")
    screen.type("facts.txt")
    screen.expect("state saved to ctt-state")
    learned = ask(screen, QUESTION)
    assert learned != before, "the learned document changes the answer"
    screen.expect("What next")
    screen.choose("k")
    screen.expect("Checkpoints")
    screen.child.send("\r")  # save (the first choice)
    screen.expect("Name:")
    screen.type("veloria")
    screen.expect("checkpoint veloria saved")
    assert screen.quit() == 0

    manifest = json.loads((workdir / "ctt-checkpoints" / "veloria" / "manifest.json").read_text())
    assert [h["doc_id"] for h in manifest["history"]] == ["facts.txt"]

    # A new process on a fresh state loads the checkpoint and answers as the first one did.
    screen = Screen(workdir, "--state", "fresh-state")
    assert ask(screen, QUESTION) == before, "nothing learned in the fresh state yet"
    screen.expect("What next")
    screen.choose("k")
    screen.expect("Checkpoints")
    screen.child.send("j")  # down to "load"
    time.sleep(0.2)
    screen.child.send("\r")
    screen.expect("Load:")
    screen.child.send("\r")  # the only checkpoint
    screen.expect("loaded into fresh-state")
    assert ask(screen, QUESTION) == learned
    assert screen.quit() == 0
    assert json.loads((workdir / "fresh-state" / "manifest.json").read_text())["history"][0]["doc_id"] == (
        "facts.txt"
    )


def test_configure_validates_and_persists_a_setting(workdir):
    screen = Screen(workdir)
    screen.choose("g")
    screen.expect("key.path=value")
    screen.type("generation.no_such_key=3")
    screen.expect("error: .*no_such_key")
    screen.expect("key.path=value")
    screen.type("generation.max_new_tokens=3")
    screen.expect("saved generation.max_new_tokens=3 to ctt.yaml")
    assert screen.quit() == 0
    settings = yaml.safe_load((workdir / "ctt.yaml").read_text())
    assert settings["generation"]["max_new_tokens"] == 3
    assert "no_such_key" not in settings["generation"], "a refused setting is not written"
    assert settings["strategy"] == "retrieval", "the other settings stay"

    shown = subprocess.run(
        [PYTHON, "-m", "continual_transformer", "--json", "config", "show"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC},
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["generation"]["max_new_tokens"] == 3, "a new process reads ./ctt.yaml"


def test_model_info_and_history_screens(workdir):
    screen = Screen(workdir)
    screen.choose("l")
    screen.expect("Document")
    screen.type("facts.txt")
    screen.expect("state saved")
    screen.expect("What next")
    screen.choose("h")
    screen.expect("learning history")
    screen.expect("facts.txt")
    screen.expect("What next")
    screen.choose("i")
    screen.expect(r"layers total\s*│?\s*(\d+)")
    assert screen.child.match.group(1) == "4"
    assert screen.quit() == 0


@pytest.mark.real_model
def test_menu_on_the_packaged_model_learns_and_answers(tmp_path):
    (tmp_path / "veloria.txt").write_text(
        "The capital of Veloria is Tarnhelm, a harbour city of white stone."
    )
    screen = Screen(tmp_path, "--strategy", "retrieval", "--set", "strategies.retrieval.retriever=bm25")
    screen.choose("l")
    screen.expect("Document")
    screen.type("veloria.txt")
    screen.expect("state saved")
    assert "Tarnhelm" in ask(screen, QUESTION)
    assert screen.quit() == 0

"""Checkpoints that survive crashes, concurrent writers and users: digest-named tensor files committed by the
manifest, recovery of interrupted swaps, foreign files left alone, one writer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from continual_transformer import checkpoint
from continual_transformer.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    TENSORS_FILE,
    Part,
    prepare_read,
    read_checkpoint,
    recover,
    state_kind,
    write_checkpoint,
)
from continual_transformer.errors import CheckpointError
from continual_transformer.locking import StateLock, StateLockedError


def layers(n: int = 3, value: float = 0.0) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.weight": torch.full((64, 64), value + i) for i in range(n)}


def save(directory: Path, tensors: dict[str, torch.Tensor], **manifest) -> Path:
    return write_checkpoint(
        directory, config_yaml="seed: 0\n", manifest=dict(manifest), parts={"strategy": Part(tensors=tensors)}
    )


def tensor_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if checkpoint.TENSOR_FILE_PATTERN.match(p.name)}


def listed_files(directory: Path) -> set[str]:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    return {entry["file"] for entry in manifest["tensors"]["files"]}


def loaded(directory: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(directory)[1]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"strategy/{k}": v for k, v in tensors.items()}


def test_a_save_rewrites_only_the_files_whose_tensors_changed(tmp_path):
    state = tmp_path / "state"
    first = layers()
    save(state, first)
    files = listed_files(state)
    assert len(files) == 3, "one file per layer"
    inodes = {name: (state / name).stat().st_ino for name in files}

    second = {**first, "layers.1.weight": first["layers.1.weight"] + 1}
    save(state, second)
    now = listed_files(state)
    assert len(now - files) == 1 and len(files - now) == 1, "only layer 1's file is new"
    assert all((state / name).stat().st_ino == inodes[name] for name in files & now), "the others untouched"
    assert tensor_files(state) == now, "the replaced file is removed"
    assert same(loaded(state), prefixed(second))


def test_an_interrupted_save_before_the_commit_keeps_the_previous_version(tmp_path, monkeypatch):
    """A crash (here: the manifest rename failing) after the new tensor files were written."""
    state = tmp_path / "state"
    first = layers()
    save(state, first)
    real_replace = os.replace

    def crash_at_commit(src, dst):
        if Path(dst).name == MANIFEST_FILE:
            raise OSError("simulated crash before the manifest is committed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_at_commit)
    with pytest.raises(OSError, match="simulated crash"):
        save(state, layers(value=10))
    monkeypatch.undo()
    assert same(loaded(state), prefixed(first))
    assert tensor_files(state) == listed_files(state), "files of the uncommitted version were removed"
    assert not [p for p in state.iterdir() if ".partial-" in p.name]


def test_files_a_killed_save_left_unreferenced_are_removed_by_the_next_writer(tmp_path):
    """``kill -9`` leaves no chance to clean up: written tensor files, partial writes."""
    state = tmp_path / "state"
    save(state, layers())
    orphan = state / ("tensors-" + "a" * 24 + ".safetensors")
    save_file({"x": torch.zeros(4)}, str(orphan))
    partial = state / f".{orphan.name}.partial-12345"
    partial.write_bytes(b"half a file")
    with StateLock(state):
        recover(state)
    assert not orphan.exists() and not partial.exists()
    assert tensor_files(state) == listed_files(state)


def test_a_crash_between_the_two_renames_of_a_directory_swap_is_recovered_on_open(tmp_path):
    """What format-version-2 writers left after ``kill -9`` between ``state -> .state.old-*`` and
    ``.state.tmp-* -> state``: no live state, the previous version in ``.old-*``, the finished new one in
    ``.tmp-*``. Opening the state (to read or to write) puts the newest complete one back."""
    state = tmp_path / "state"
    old = save(tmp_path / ".state.old-abc", layers(value=1), history=["a"])
    time.sleep(0.01)
    new = save(tmp_path / ".state.tmp-xyz", layers(value=2), history=["a", "b"])
    for path in (old, new):
        (path / ".ctt.lock").unlink()
    assert state_kind(state) == "missing"

    manifest, tensors = read_checkpoint(state)
    assert manifest["history"] == ["a", "b"] and same(tensors, prefixed(layers(value=2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"], "leftovers removed once recovered"


def test_format_version_2_leftovers_are_recovered_too(tmp_path):
    """The previous version in ``.old-*``, an unfinished ``.tmp-*`` (no manifest): the old one comes back,
    the unfinished one goes."""
    old = tmp_path / ".state.old-abc"
    old.mkdir()
    tensors = {"strategy/w": torch.ones(3)}
    save_file(tensors, str(old / TENSORS_FILE))
    (old / CONFIG_FILE).write_text("seed: 0\n")
    manifest = {"format": checkpoint.FORMAT, "format_version": 2, "parts": {"strategy": {}}, "history": []}
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    unfinished = tmp_path / ".state.tmp-def"
    unfinished.mkdir()
    save_file({"strategy/w": torch.zeros(3)}, str(unfinished / TENSORS_FILE))

    assert prepare_read(tmp_path / "state") == "checkpoint"
    assert same(loaded(tmp_path / "state"), tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    save(tmp_path / "state", {"w": torch.ones(3)})  # the next save writes format version 3
    assert not (tmp_path / "state" / TENSORS_FILE).exists()
    assert same(loaded(tmp_path / "state"), tensors)


def test_a_damaged_leftover_is_not_recovered(tmp_path):
    tmp = save(tmp_path / ".state.tmp-xyz", layers())
    name = next(iter(listed_files(tmp)))
    (tmp / name).write_bytes(b"garbage")
    assert prepare_read(tmp_path / "state") == "empty"
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "state")
    assert not tmp.exists(), "an incomplete temporary directory is removed"


def test_files_a_user_put_in_the_state_directory_survive_saves(tmp_path):
    state = tmp_path / "state"
    save(state, layers())
    (state / "notes.txt").write_text("mine")
    (state / "sub").mkdir()
    (state / "sub" / "data.bin").write_bytes(b"\x01")
    save(state, layers(value=5))
    with StateLock(state):
        recover(state)
    assert (state / "notes.txt").read_text() == "mine" and (state / "sub" / "data.bin").exists()


def test_a_directory_of_other_files_or_a_file_is_refused_as_state(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a checkpoint .* holds other files \\(thesis.tex\\)"):
        save(tmp_path / "thesis", layers())
    assert sorted(p.name for p in (tmp_path / "thesis").iterdir()) == ["thesis.tex"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save(tmp_path / "f", layers())


def test_a_second_writer_waits_then_fails_naming_the_holder(tmp_path):
    state = tmp_path / "state"
    with StateLock(state, timeout=1) as lock:
        with lock:  # re-entrant for its holder
            assert lock.held
        started = time.monotonic()
        with pytest.raises(StateLockedError, match=f"locked by process {os.getpid()}") as info:
            StateLock(state, timeout=0.3).acquire()
        assert 0.25 < time.monotonic() - started < 5
        assert str(state) in str(info.value)
        with pytest.raises(StateLockedError):  # a save without the lock waits for it too
            write_checkpoint(
                state,
                config_yaml="",
                manifest={},
                tensors={"w": torch.ones(1)},
                lock=StateLock(state, timeout=0.1),
            )
    assert not lock.held
    with StateLock(state, timeout=0.1):  # released
        pass


def test_a_waiting_writer_proceeds_once_the_holder_releases(tmp_path):
    state = tmp_path / "state"
    order = []
    holder = StateLock(state).acquire()

    def second():
        with StateLock(state, timeout=10):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.3)
    order.append("first")
    holder.release()
    thread.join(10)
    assert order == ["first", "second"]


KILL_SCRIPT = """
import sys, torch
from continual_transformer.checkpoint import Part, write_checkpoint
print("ready", flush=True)
for step in range(1, 10_000):
    tensors = {f"layers.{i}.w": torch.full((256, 256), float(step)) for i in range(4)}
    write_checkpoint(sys.argv[1], config_yaml="seed: 0\\n", manifest={"step": step},
                     parts={"strategy": Part(tensors=tensors)})
"""


def test_kill_9_during_saves_always_leaves_a_complete_checkpoint(tmp_path):
    state = tmp_path / "state"
    save(state, {f"layers.{i}.w": torch.zeros(256, 256) for i in range(4)}, step=0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for delay in (0.05, 0.13, 0.29):
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(state)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.kill()  # SIGKILL: no cleanup runs
        child.wait()
        manifest, tensors = read_checkpoint(state)
        step = float(manifest["step"])
        assert all(torch.equal(t, torch.full((256, 256), step)) for t in tensors.values()), "one version"
        with StateLock(state):
            recover(state)
        assert tensor_files(state) == listed_files(state), "nothing left behind after recovery"

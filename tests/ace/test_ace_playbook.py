"""The ACE playbook: JSON round trip, validation of malformed and foreign files, named storage."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from continual_transformer.ace.operations import Operation, apply_operations
from continual_transformer.ace.playbook import (
    FILE_SUFFIX,
    Playbook,
    PlaybookError,
    PlaybookStore,
    read_playbook,
)


def sample() -> Playbook:
    playbook = Playbook(name="demo")
    playbook.step = 2
    apply_operations(
        playbook,
        [
            Operation("add", section="facts", text="The capital of Veloria is Tarnhelm."),
            Operation("add", section="strategies", text="Answer with the name only."),
        ],
        step=1,
    )
    playbook.tag("ctx-00001", "helpful", step=2)
    playbook.tag("ctx-00002", "harmful", step=2)
    return playbook


def test_round_trip_keeps_every_field():
    playbook = sample()
    again = Playbook.from_json(playbook.to_json())
    assert again.to_dict() == playbook.to_dict()
    assert [b.id for b in again] == ["ctx-00001", "ctx-00002"]
    first = again.get("ctx-00001")
    assert (first.helpful, first.harmful, first.created_step, first.updated_step) == (1, 0, 1, 2)
    assert again.next_id == 3 and again.step == 2
    assert "## facts\n[ctx-00001] The capital of Veloria is Tarnhelm." in again.render()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="something-else"), "not an ACE playbook"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d.update(extra=1), "unknown keys \\['extra'\\]"),
        (lambda d: d.pop("bullets"), "missing keys \\['bullets'\\]"),
        (lambda d: d.update(name="../etc/passwd"), "not a valid playbook name"),
        (lambda d: d.update(step=-1), "step must be"),
        (lambda d: d["bullets"][1].update(id="ctx-00001"), "duplicate id"),
        (lambda d: d["bullets"][0].update(id="b1"), "is not a bullet id"),
        (lambda d: d["bullets"][0].update(id="ctx-00009"), "not below next_id"),
        (lambda d: d["bullets"][0].update(section="nope"), "section: 'nope'"),
        (lambda d: d["bullets"][0].update(text="  "), "text: must be"),
        (lambda d: d["bullets"][0].update(helpful=True), "helpful: must be an integer"),
        (lambda d: d["bullets"][0].update(harmful=-2), "harmful: must be an integer"),
        (lambda d: d["bullets"][0].update(updated_step=7), "created_step <= updated_step <= step"),
        (lambda d: d["bullets"][0].pop("text"), "missing keys \\['text'\\]"),
        (lambda d: d.update(sections=["facts", "Facts"]), "section"),
    ],
)
def test_malformed_playbooks_are_refused_naming_the_field(change, message):
    data = sample().to_dict()
    change(data)
    with pytest.raises(PlaybookError, match=message):
        Playbook.from_dict(data)


def test_store_saves_lists_loads_and_refuses_bad_names(tmp_path):
    store = PlaybookStore(tmp_path / "books")
    assert store.names() == [] and store.list() == []
    path = store.save(sample(), "first")
    assert path == tmp_path / "books" / f"first{FILE_SUFFIX}"
    store.save(sample(), "second.v2")
    (tmp_path / "books" / "notes.txt").write_text("not a playbook")
    assert store.names() == ["first", "second.v2"]
    assert [(i.name, i.bullets, i.step) for i in store.list()] == [("first", 2, 2), ("second.v2", 2, 2)]
    loaded = store.load("first")
    assert loaded.name == "first" and loaded.to_dict()["bullets"] == sample().to_dict()["bullets"]
    assert not list((tmp_path / "books").glob(".*partial*")), "the atomic write leaves no temporary file"
    for bad in ("../escape", "/abs", "a/b", ".hidden", "", "x" * 65, "a..b"):
        with pytest.raises(PlaybookError, match="not valid"):
            store.save(sample(), bad)
        with pytest.raises(PlaybookError, match="not valid"):
            store.load(bad)
    assert not (tmp_path / "escape.playbook.json").exists()
    with pytest.raises(PlaybookError, match="no such playbook"):
        store.load("missing")
    store.delete("first")
    assert store.names() == ["second.v2"]


def test_foreign_and_broken_files_give_clear_errors(tmp_path):
    cases = {
        "json": (b'{"format": "ctt-ace-playbook"', "not valid JSON"),
        "list": (b"[1, 2]", "expected a JSON object"),
        "other": (json.dumps({"format": "continual-transformer-checkpoint"}).encode(), "not an ACE playbook"),
        "binary": (b"\xff\xfe\x00", "not UTF-8"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}{FILE_SUFFIX}"
        path.write_bytes(content)
        with pytest.raises(PlaybookError, match=message) as info:
            read_playbook(path)
        assert str(path) in str(info.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json, key=st.sampled_from(["format", "version", "name", "step", "next_id", "bullets"]))
def test_any_mutated_file_is_loaded_or_refused_with_playbook_error(value, key):
    data = sample().to_dict()
    data[key] = value
    try:
        playbook = Playbook.from_json(json.dumps(data))
    except PlaybookError:
        return
    assert Playbook.from_dict(playbook.to_dict()).to_dict() == playbook.to_dict()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_is_loaded_or_refused_with_playbook_error(text):
    try:
        Playbook.from_json(text)
    except PlaybookError:
        pass

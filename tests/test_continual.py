"""The facade: documents in, answers out, checkpoints that refuse what does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.checkpoint import MANIFEST_FILE, TENSORS_FILE
from continual_transformer.errors import CheckpointError, DocumentError

DOC = "The capital of Veloria is Tarnhelm."


@pytest.fixture
def ct(tokenizer):
    return ContinualTransformer(make_backbone(tokenizer), config=fast_config())


def weights(ct):
    return {k: v.clone() for k, v in ct.backbone.model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_learning_a_document_makes_its_continuation_likely(ct):
    before = ct.backbone.mean_nll([" Tarnhelm."], contexts=["The capital of Veloria is"])
    ct.learn_document(DOC, doc_id="veloria")
    after = ct.backbone.mean_nll([" Tarnhelm."], contexts=["The capital of Veloria is"])
    assert after < before / 2
    assert ct.history[0]["doc_id"] == "veloria" and ct.history[0]["tokens"] > 0


def test_learn_directory_with_a_bad_file_learns_nothing(ct, tmp_path):
    (tmp_path / "a.txt").write_text(DOC)
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{oops\n')
    before = weights(ct)
    with pytest.raises(DocumentError, match=r"b.jsonl:2"):
        ct.learn_directory(tmp_path)
    assert same(before, weights(ct)) and ct.history == []


def test_learn_directory_learns_every_document(ct, tmp_path):
    (tmp_path / "a.txt").write_text(DOC)
    (tmp_path / "b.jsonl").write_text('{"id": "r1", "text": "The Orvalis river flows through Quenmark."}\n')
    reports = ct.learn_directory(tmp_path)
    assert [r.doc_id for r in reports] == ["a.txt", "r1"]
    assert ct.stats().documents == 2


def test_empty_document_changes_nothing(ct):
    before = weights(ct)
    with pytest.raises(DocumentError, match="empty"):
        ct.learn_document("  ")
    assert same(before, weights(ct))


def test_ask_uses_chat_template_and_rejects_empty(ct):
    assert isinstance(ct.ask("What is the capital of Veloria?"), str)
    with pytest.raises(ValueError, match="empty"):
        ct.ask(" ")


def test_save_writes_only_tensors_config_and_manifest(ct, tmp_path):
    ct.learn_document(DOC)
    path = ct.save(tmp_path / "state")
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", MANIFEST_FILE, TENSORS_FILE]
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["base_model"]["fingerprint"] == ct.backbone.fingerprint
    assert manifest["strategy"] == "finetune" and len(manifest["history"]) == 1
    assert not list(tmp_path.glob(".state.*")), "no temporary directories are left behind"


def test_save_overwrites_atomically_and_refuses_foreign_directories(ct, tmp_path):
    ct.save(tmp_path / "state")
    ct.learn_document(DOC)
    ct.save(tmp_path / "state")
    assert len(json.loads((tmp_path / "state" / MANIFEST_FILE).read_text())["history"]) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ct.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_interrupted_save_keeps_the_previous_checkpoint(ct, tmp_path, monkeypatch):
    ct.save(tmp_path / "state")
    original = (tmp_path / "state" / MANIFEST_FILE).read_text()
    ct.learn_document(DOC)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("continual_transformer.checkpoint.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        ct.save(tmp_path / "state")
    assert (tmp_path / "state" / MANIFEST_FILE).read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / TENSORS_FILE).write_bytes(b"garbage"), "corrupt or truncated"),
        (lambda p: (p / TENSORS_FILE).unlink(), "state.safetensors is missing"),
        (lambda p: (p / MANIFEST_FILE).write_text("{"), "corrupt"),
        (lambda p: (p / MANIFEST_FILE).unlink(), "manifest.json is missing"),
        (
            lambda p: (p / MANIFEST_FILE).write_text(
                '{"format": "continual-transformer-checkpoint", "format_version": 99}'
            ),
            "format version 99",
        ),
    ],
)
def test_damaged_checkpoints_are_refused_and_change_nothing(ct, tmp_path, damage, message):
    ct.learn_document(DOC)
    ct.save(tmp_path / "state")
    damage(tmp_path / "state")
    before = weights(ct)
    with pytest.raises(CheckpointError, match=message):
        ct.load(tmp_path / "state")
    assert same(before, weights(ct))


def test_checkpoint_of_another_strategy_configuration_is_refused(tokenizer, tmp_path):
    ct = ContinualTransformer(make_backbone(tokenizer), config=fast_config())
    ct.save(tmp_path / "state")
    narrow = fast_config(strategies={"finetune": {"layers": "-1:"}})
    other = ContinualTransformer(make_backbone(tokenizer), config=narrow)
    with pytest.raises(CheckpointError, match="does not fit"):
        other.load(tmp_path / "state")


def test_from_checkpoint_rebuilds_config_and_state(tokenizer, tmp_path):
    ct = ContinualTransformer(make_backbone(tokenizer), config=fast_config())
    ct.learn_document(DOC)
    ct.save(tmp_path / "state")
    again = ContinualTransformer.from_checkpoint(tmp_path / "state", model=make_backbone(tokenizer))
    assert again.config == ct.config
    assert torch.equal(again.strategy.forward_logits([DOC]), ct.strategy.forward_logits([DOC]))

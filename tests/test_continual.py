"""The facade: documents in, answers out, checkpoints that refuse what does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.checkpoint import CONFIG_FILE, MANIFEST_FILE
from continual_transformer.documents import make_document
from continual_transformer.errors import CheckpointError, ContinualTransformerError, DocumentError

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
    with pytest.raises(ContinualTransformerError, match="empty"):
        ct.ask(" ")


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(ct, monkeypatch):
    """The tiny model reads 256 positions; a longer question used to run and answer garbage."""
    from continual_transformer.session import PromptTooLongError

    def no_generation(*args, **kwargs):
        raise AssertionError("nothing is generated for a prompt that does not fit")

    monkeypatch.setattr(ct.strategy, "generate", no_generation)
    question = "What is the capital of Veloria? " * 60
    with pytest.raises(PromptTooLongError, match=r"exceeds the context of tiny-llama \(256 tokens\)"):
        ct.ask(question)
    with pytest.raises(PromptTooLongError):
        ct.generate(["fine", "The capital of Veloria is " * 80])
    with pytest.raises(PromptTooLongError, match="250 tokens to generate"):
        ct.generate("The capital", max_new_tokens=250)


def test_the_same_document_is_learned_once(ct, tmp_path):
    first = ct.learn_document(DOC, doc_id="veloria")
    weights_after = weights(ct)
    again = ct.learn_document(DOC.replace(" ", " ") + "  \r\n", doc_id="again")  # same normalised text
    assert again.tokens == 0 and again.extra == {"already_learned": "veloria"} and first.tokens > 0
    assert same(weights_after, weights(ct)) and len(ct.history) == 1 and ct.stats().documents == 1
    ct.save(tmp_path / "state")
    manifest = json.loads((tmp_path / "state" / MANIFEST_FILE).read_text())
    assert manifest["history"][0]["content_sha256"] == make_document(DOC).content_sha256
    reloaded = ContinualTransformer.from_checkpoint(
        tmp_path / "state", model=make_backbone(ct.backbone.tokenizer)
    )
    assert reloaded.learn_document(DOC).extra == {"already_learned": "veloria"}
    reloaded.reset()
    assert reloaded.learn_document(DOC).tokens > 0, "after a reset the document is new again"


def tensor_files(path):
    return sorted(
        entry["file"] for entry in json.loads((path / MANIFEST_FILE).read_text())["tensors"]["files"]
    )


def test_save_writes_only_tensors_config_and_manifest(ct, tmp_path):
    ct.learn_document(DOC)
    path = ct.save(tmp_path / "state")
    visible = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    assert visible == sorted([CONFIG_FILE, MANIFEST_FILE, *tensor_files(path)])
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == [".ctt.lock"]
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
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_files_a_user_put_in_the_state_directory_are_never_deleted(ct, tmp_path):
    ct.save(tmp_path / "state")
    (tmp_path / "state" / "README.txt").write_text("what this state is")
    ct.learn_document(DOC)
    ct.save(tmp_path / "state")
    assert (tmp_path / "state" / "README.txt").read_text() == "what this state is"
    assert len(ContinualTransformer.from_checkpoint(tmp_path / "state", model=ct.backbone).history) == 1


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
        (lambda p: (p / tensor_files(p)[0]).write_bytes(b"garbage"), "corrupt or truncated"),
        (lambda p: (p / tensor_files(p)[0]).unlink(), r"tensors-[0-9a-f]+\.safetensors is missing"),
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
    ct.learn_document(DOC)  # changes in every layer; a narrower strategy has no place for most of them
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

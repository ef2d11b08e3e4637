"""The ``ace`` strategy on the tiny test models: gating of bullets, the Generate-Reflect-Curate loop (roles
answered by a scripted backend so that their effect can be checked), checkpoints and named playbooks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_config, make_backbone, save_tiny_embedder

from continual_transformer import ContinualTransformer
from continual_transformer.ace.operations import Operation, apply_operations
from continual_transformer.ace.playbook import PlaybookError, PlaybookStore
from continual_transformer.config import ConfigError
from continual_transformer.documents import make_document

VELORIA = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
QUESTION = "What is the capital of Veloria?"
UNRELATED = "A quick brown fox jumps over the lazy dog."


class ScriptedBackend:
    """Answers the Reflector and the Curator with fixed replies (recording what they were asked)."""

    name = "scripted"

    def __init__(self, reflector: str = "", curator: str = "") -> None:
        self.replies = {"Reflector": reflector, "Curator": curator}
        self.asked: list[str] = []

    def complete(self, messages, **options):
        role = "Reflector" if "Reflector" in messages[0]["content"] else "Curator"
        self.asked.append(role)
        return self.replies[role]

    def complete_many(self, conversations, **options):
        return [self.complete(m, **options) for m in conversations]


def build(tokenizer, **settings) -> ContinualTransformer:
    settings = {"retriever": "bm25", "dedupe_similarity": None, **settings}
    config = fast_config(strategies={"ace": settings})
    return ContinualTransformer(make_backbone(tokenizer), strategy="ace", config=config)


def seed_bullet(ct, text="The capital of Veloria is Tarnhelm.", section="facts") -> str:
    report = apply_operations(ct.strategy.playbook, [Operation("add", section=section, text=text)], step=0)
    return report.added[0]


def test_learn_without_feedback_stores_the_document_only(tokenizer):
    ct = build(tokenizer)
    report = ct.learn_document(VELORIA)
    assert report.extra["chunks"] >= 1 and len(ct.strategy.playbook) == 0
    plan = ct.strategy.augment([QUESTION])[0]
    assert plan.context is not None and "Tarnhelm" in plan.context and "Playbook" not in plan.context


def test_bullets_are_gated_like_chunks(tokenizer):
    ct = build(tokenizer, bias_strength=0.0)
    base = ct.generate([UNRELATED, QUESTION])
    base_logits = ct.strategy.forward_logits([UNRELATED])
    bullet = seed_bullet(ct)
    strategy = ct.strategy
    assert [[b.id for b in s] for s in strategy.select_bullets([QUESTION, UNRELATED])] == [[bullet], []]
    plans = strategy.augment([QUESTION, UNRELATED])
    assert plans[0].context == f"Playbook:\n## facts\n[{bullet}] The capital of Veloria is Tarnhelm."
    assert plans[1].context is None
    # a playbook without any document still answers: the related prompt gets it, the unrelated one is not
    # touched
    answers = ct.generate([UNRELATED, QUESTION])
    assert answers[0] == base[0]
    prompt = strategy._augmented_prompt(QUESTION, plans[0].context, use_chat=True)
    assert answers[1] == ct.backbone.generate([prompt], formatted=True)[0]
    assert torch.equal(strategy.forward_logits([UNRELATED]), base_logits)
    with strategy.without_playbook():
        assert strategy.augment([QUESTION])[0].context is None
        assert ct.generate([QUESTION]) == [base[1]]


def test_always_sections_go_into_every_prompt_with_context(tokenizer):
    ct = build(tokenizer, always_sections=["strategies"])
    ct.learn_document(VELORIA)
    rule = seed_bullet(ct, "Answer with one name.", section="strategies")
    plans = ct.strategy.augment([QUESTION, UNRELATED])
    assert f"[{rule}] Answer with one name." in plans[0].context
    assert f"[{rule}]" in plans[1].context  # always: the rule is shown even where no chunk passes


def test_reflector_tags_move_the_counters_of_used_bullets(tokenizer):
    ct = build(tokenizer)
    bullet = seed_bullet(ct)
    backend = ScriptedBackend(
        reflector=json.dumps({"error": "", "insight": "", "bullet_tags": {bullet: "harmful"}})
    )
    ct.strategy.backend = backend
    report = ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [(QUESTION, "Tarnhelm")], loops=2)
    first = ct.strategy.playbook.get(bullet)
    assert first.harmful == 2 and first.helpful == 0 and first.updated_step == 2
    assert report.extra["tags_from_reflector"] == 2 and report.extra["tags_from_check"] == 0
    assert report.extra["reflector_parsed"] == 2 and ct.strategy.playbook.step == 2


def test_check_tags_bullets_when_the_reflector_reply_is_junk(tokenizer):
    ct = build(tokenizer)
    bullet = seed_bullet(ct)
    ct.strategy.backend = ScriptedBackend(reflector="I think the answer is fine!!", curator="no idea")
    report = ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [(QUESTION, "Tarnhelm")], loops=1)
    loop = report.extra["loops"][0]
    right = loop["accuracy"] == 1.0
    tagged = ct.strategy.playbook.get(bullet)
    assert (tagged.helpful, tagged.harmful) == ((1, 0) if right else (0, 1))
    assert loop["reflector_parsed"] == 0 and loop["tags_from_check"] == 1
    assert loop["curator_replies"] == (0 if right else 1) and loop["curator_parsed"] == 0
    assert loop["operations_valid"] == 0 and len(ct.strategy.playbook) == 1


def test_curator_operations_are_merged_and_the_loop_is_deterministic(tokenizer):
    curator = json.dumps(
        {
            "operations": [
                {"op": "add", "section": "facts", "text": "Veloria's capital is Tarnhelm."},
                {"op": "add", "section": "poems", "text": "rejected: unknown section"},
                {"op": "rewrite", "text": "rejected"},
            ]
        }
    )

    def run():
        ct = build(tokenizer)
        ct.strategy.backend = ScriptedBackend(reflector="{}", curator=curator)
        report = ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [(QUESTION, "Tarnhelm")] * 2)
        return ct, report

    ct, report = run()
    again, _ = run()
    assert ct.strategy.playbook.to_dict() == again.strategy.playbook.to_dict()
    loops = report.extra["loops"]
    assert len(loops) == 3  # the configured default
    if loops[0]["accuracy"] < 1:  # the tiny model is wrong: the Curator is asked for both questions
        assert loops[0]["merge"]["added"] == ["ctx-00001"] and loops[0]["merge"]["duplicates"] == [
            "ctx-00001"
        ]
        assert loops[0]["operations_rejected"] == 4 and loops[0]["curator_parsed"] == 2
        assert [b.text for b in ct.strategy.playbook] == ["Veloria's capital is Tarnhelm."]


def test_fallback_insight_stores_the_reference_of_a_wrong_answer(tokenizer):
    ct = build(tokenizer, fallback_insight=True)
    ct.strategy.backend = ScriptedBackend(reflector="", curator="")
    report = ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [(QUESTION, "Tarnhelm")], loops=1)
    assert report.extra["loops"][0]["accuracy"] == 0  # the tiny model does not know it
    assert report.extra["fallback_adds"] == 1
    assert [b.text for b in ct.strategy.playbook] == [f"{QUESTION} -> Tarnhelm"]


def test_dedupe_by_embedding_similarity(tokenizer, tmp_path):
    embedder = save_tiny_embedder(
        tmp_path / "emb", [VELORIA, QUESTION, "Tarnhelm is the capital city of Veloria."]
    )
    for threshold, expected in ((-1.0, 1), (None, 2)):
        ct = build(tokenizer, embedder=str(embedder), dedupe_similarity=threshold, curate_correct=True)
        seed_bullet(ct)
        add = {"op": "add", "section": "facts", "text": "Tarnhelm is the capital city of Veloria."}
        ct.strategy.backend = ScriptedBackend(reflector="{}", curator=json.dumps([add]))
        ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [(QUESTION, "Tarnhelm")], loops=1)
        assert len(ct.strategy.playbook) == expected, threshold


def test_cap_is_kept_during_learning(tokenizer):
    ct = build(tokenizer, max_bullets=2, curate_correct=True)
    adds = [{"op": "add", "section": "facts", "text": f"fact number {i}"} for i in range(4)]
    ct.strategy.backend = ScriptedBackend(reflector="{}", curator=json.dumps({"operations": adds}))
    report = ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [(QUESTION, "Tarnhelm")], loops=1)
    assert len(ct.strategy.playbook) == 2 and len(report.extra["loops"][0]["merge"]["evicted"]) == 2


def test_checkpoint_and_named_playbooks_round_trip(tokenizer, tmp_path):
    ct = build(tokenizer, playbook_dir=str(tmp_path / "books"))
    ct.learn_document(VELORIA)
    seed_bullet(ct)
    ct.strategy.playbook.tag("ctx-00001", "helpful")
    expected = ct.generate([QUESTION, UNRELATED])
    logits = ct.strategy.forward_logits([QUESTION])
    ct.save(tmp_path / "state")
    fresh = build(tokenizer)
    fresh.load(tmp_path / "state")
    assert fresh.strategy.playbook.to_dict() == ct.strategy.playbook.to_dict()
    assert fresh.generate([QUESTION, UNRELATED]) == expected
    assert torch.equal(fresh.strategy.forward_logits([QUESTION]), logits)

    from typer.testing import CliRunner

    from continual_transformer.ace.cli import app

    books = tmp_path / "from-state"
    result = CliRunner().invoke(
        app, ["from-state", str(tmp_path / "state"), "--name", "v", "--dir", str(books)]
    )
    assert result.exit_code == 0, result.output
    assert PlaybookStore(books).load("v").to_dict()["bullets"] == ct.strategy.playbook.to_dict()["bullets"]

    path = ct.strategy.save_playbook("veloria")
    assert path.parent == tmp_path / "books"
    other = build(tokenizer, playbook_dir=str(tmp_path / "books"))
    loaded = other.strategy.load_playbook("veloria")
    assert loaded.get("ctx-00001").helpful == 1 and other.strategy.playbook is loaded
    assert other.strategy.augment([QUESTION])[0].context.startswith("Playbook:")
    with pytest.raises(PlaybookError, match="not valid"):
        other.strategy.load_playbook("../state/manifest")
    other.reset()
    assert len(other.strategy.playbook) == 0


def test_a_checkpoint_with_a_malformed_playbook_is_refused(tokenizer):
    ct = build(tokenizer)
    state = ct.strategy.extra_state()
    state["playbook"] = {"format": "ctt-ace-playbook", "version": 1}
    with pytest.raises(PlaybookError, match="checkpoint playbook: unknown keys"):
        ct.strategy.load_extra_state(state)


def test_qa_pairs_are_validated(tokenizer):
    ct = build(tokenizer)
    with pytest.raises(ValueError, match="qa_pairs\\[0\\]"):
        ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [("only a question",)])
    with pytest.raises(ValueError, match="must not be empty"):
        ct.strategy.learn_with_feedback(make_document(VELORIA, "v"), [{"question": "q", "answer": " "}])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loops": 0}, "loops"),
        ({"backend": "gpt"}, "backend"),
        ({"backend": "openai"}, "model"),
        ({"always_sections": ["nope"]}, "always_sections"),
        ({"sections": ["Facts"]}, "sections"),
        ({"timeout": 0}, "timeout"),
        ({"max_bullets": 0}, "max_bullets"),
    ],
)
def test_config_errors_name_the_key(tokenizer, settings, message):
    with pytest.raises(ConfigError, match=f"strategies.ace.*{message}"):
        build(tokenizer, **settings)

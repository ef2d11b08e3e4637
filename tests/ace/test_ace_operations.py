"""Curator operations and Reflector replies: strict parsing of model output, deterministic merging, the cap
and eviction, de-duplication."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from continual_transformer.ace.operations import (
    Operation,
    apply_operations,
    eviction_order,
    extract_json,
    parse_operations,
)
from continual_transformer.ace.playbook import Playbook
from continual_transformer.ace.roles import parse_reflection, used_bullets


def book(*texts: str, section: str = "facts") -> Playbook:
    playbook = Playbook()
    apply_operations(playbook, [Operation("add", section=section, text=t) for t in texts], step=0)
    return playbook


def test_extract_json_skips_fences_and_prose():
    assert extract_json('Sure! ```json\n{"operations": []}\n``` done') == {"operations": []}
    assert extract_json("no json here {oops} [1, 2]") == [1, 2]
    assert extract_json("{broken") is None
    assert extract_json("") is None


def test_valid_operations_are_kept_and_invalid_ones_counted():
    playbook = book("The sky is green on Veloria.")
    reply = json.dumps(
        {
            "operations": [
                {"op": "add", "section": "facts", "text": "  Tarnhelm is   the capital. "},
                {"op": "update", "id": "ctx-00001", "text": "The sky is blue on Veloria."},
                {"op": "remove", "id": "ctx-00099"},
                {"op": "add", "section": "poems", "text": "x"},
                {"op": "add", "section": "facts", "text": ""},
                {"op": "add", "section": "facts", "text": "y", "id": "ctx-00001"},
                {"op": "rewrite", "text": "everything"},
                "add a bullet",
            ]
        }
    )
    result = parse_operations(reply, playbook)
    assert result.found_json
    assert result.operations == [
        Operation("add", section="facts", text="Tarnhelm is the capital."),
        Operation("update", id="ctx-00001", text="The sky is blue on Veloria."),
    ]
    assert len(result.rejected) == 6
    assert any("unknown bullet id 'ctx-00099'" in r for r in result.rejected)
    assert any("unknown section 'poems'" in r for r in result.rejected)
    assert any("op must be one of" in r for r in result.rejected)


def test_operations_per_reply_are_limited():
    reply = json.dumps([{"op": "add", "section": "facts", "text": f"fact {i}"} for i in range(6)])
    result = parse_operations(reply, Playbook(), max_operations=4)
    assert len(result.operations) == 4 and len(result.rejected) == 2


_op = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "update", "remove", "rewrite", 3])},
    optional={
        "section": st.sampled_from(["facts", "strategies", "other", None]),
        "id": st.sampled_from(["ctx-00001", "ctx-00002", "ctx-00009", "x", 1]),
        "text": st.text(max_size=30) | st.integers(),
        "extra": st.none(),
    },
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, max_size=6), noise=st.text(max_size=20), wrap=st.booleans())
def test_any_reply_parses_without_raising_and_merging_is_deterministic(ops, noise, wrap):
    body = json.dumps({"operations": ops} if wrap else ops)
    reply = noise + body + noise
    first, second = book("alpha fact", "beta fact"), book("alpha fact", "beta fact")
    parsed = parse_operations(reply, first, max_operations=10)
    assert len(parsed.operations) + len(parsed.rejected) >= min(len(ops), 1) or not ops
    for op in parsed.operations:
        assert op.op in ("add", "update", "remove")
        assert op.text is None or (op.text.strip() and op.text == " ".join(op.text.split()))
    a = apply_operations(first, parsed.operations, step=1, max_bullets=3)
    b = apply_operations(
        second, parse_operations(reply, second, max_operations=10).operations, step=1, max_bullets=3
    )
    assert first.to_dict() == second.to_dict() and a.to_dict() == b.to_dict()
    assert len(first) <= 3
    assert len(set(first.ids())) == len(first)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    parse_operations(text, book("alpha"))
    parse_reflection(text, correct=False, used=["ctx-00001"])


def test_ids_are_stable_and_never_reused():
    playbook = book("one", "two")
    apply_operations(playbook, [Operation("remove", id="ctx-00002")], step=1)
    report = apply_operations(playbook, [Operation("add", section="facts", text="three")], step=1)
    assert report.added == ["ctx-00003"] and playbook.ids() == ["ctx-00001", "ctx-00003"]


def test_operation_on_a_bullet_removed_earlier_in_the_batch_is_skipped():
    playbook = book("one")
    report = apply_operations(
        playbook,
        [Operation("remove", id="ctx-00001"), Operation("update", id="ctx-00001", text="uno")],
        step=1,
    )
    assert report.removed == ["ctx-00001"] and report.skipped == ["update ctx-00001"] and len(playbook) == 0


def test_exact_duplicates_are_folded_into_the_existing_bullet():
    playbook = book("Tarnhelm is the capital of Veloria.")
    report = apply_operations(
        playbook, [Operation("add", section="strategies", text="tarnhelm is  the capital of veloria")], step=3
    )
    assert report.duplicates == ["ctx-00001"] and report.added == []
    assert len(playbook) == 1 and playbook.get("ctx-00001").helpful == 1
    assert playbook.get("ctx-00001").updated_step == 3


def test_near_duplicates_are_folded_by_similarity():
    def similarity(new, old):  # word-overlap cosine stand-in for the embedder
        def vec(t):
            return set(t.lower().split())

        return [[len(vec(n) & vec(o)) / (len(vec(n)) * len(vec(o))) ** 0.5 for o in old] for n in new]

    playbook = book("the capital of veloria is tarnhelm", "mekine beetles eat acorns")
    ops = [
        Operation("add", section="facts", text="the capital city of veloria is tarnhelm"),
        Operation("add", section="facts", text="brosson was born in 1860"),
    ]
    report = apply_operations(playbook, ops, step=1, similarity=similarity, dedupe_threshold=0.8)
    assert report.duplicates == ["ctx-00001"] and report.added == ["ctx-00003"]
    # another section is never folded by similarity
    other = apply_operations(
        playbook,
        [Operation("add", section="strategies", text="the capital city of veloria is tarnhelm")],
        step=2,
        similarity=similarity,
        dedupe_threshold=0.8,
    )
    assert other.added == ["ctx-00004"]


def test_cap_evicts_the_least_useful_then_the_oldest():
    playbook = book("a", "b", "c", "d")
    playbook.step = 5
    playbook.tag("ctx-00001", "helpful", step=1)
    playbook.tag("ctx-00002", "harmful", step=2)
    playbook.tag("ctx-00003", "helpful", step=3)
    playbook.tag("ctx-00003", "harmful", step=3)  # usefulness 0, updated at 3
    # d: usefulness 0, updated at 0 (older than c)
    assert [b.id for b in eviction_order(list(playbook))] == [
        "ctx-00002",
        "ctx-00004",
        "ctx-00003",
        "ctx-00001",
    ]
    report = apply_operations(playbook, [Operation("add", section="facts", text="e")], step=5, max_bullets=3)
    assert report.added == ["ctx-00005"]
    assert report.evicted == ["ctx-00002", "ctx-00004"]
    assert playbook.ids() == ["ctx-00001", "ctx-00003", "ctx-00005"]


def test_reflection_keeps_only_valid_tags_on_used_bullets():
    reply = (
        'Here: {"error": "named the wrong city", "insight": "Veloria\'s capital is Tarnhelm", '
        '"bullet_tags": {"ctx-00001": "harmful", "ctx-00002": "great", "ctx-00007": "helpful"}, "mood": 1}'
    )
    reflection = parse_reflection(reply, correct=False, used=["ctx-00001", "ctx-00002"])
    assert reflection.parsed and reflection.tags == {"ctx-00001": "harmful"}
    assert (
        reflection.insight == "Veloria's capital is Tarnhelm" and reflection.error == "named the wrong city"
    )
    assert len(reflection.rejected) == 3
    as_list = parse_reflection(
        '{"bullet_tags": [{"id": "ctx-00002", "tag": "helpful"}]}', correct=True, used=["ctx-00002"]
    )
    assert as_list.tags == {"ctx-00002": "helpful"}
    junk = parse_reflection("The answer was wrong.", correct=False, used=["ctx-00001"])
    assert not junk.parsed and junk.tags == {} and junk.insight == ""


def test_used_bullets_are_the_cited_ones_or_all_shown():
    assert used_bullets("Tarnhelm [ctx-00002] (see ctx-00009)", ["ctx-00001", "ctx-00002"]) == (
        ["ctx-00002"],
        True,
    )
    assert used_bullets("Tarnhelm", ["ctx-00001", "ctx-00002"]) == (["ctx-00001", "ctx-00002"], False)

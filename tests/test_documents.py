from __future__ import annotations

import json

import pytest

from continual_transformer.config import DocumentConfig
from continual_transformer.documents import chunk_spans, chunk_text, make_document, read_documents
from continual_transformer.errors import DocumentError


def test_reads_txt_md_and_jsonl_recursively_in_stable_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("Alpha text.")
    (tmp_path / "b" / "c.md").write_text("# Title\nBody.")
    (tmp_path / "b" / "d.jsonl").write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"id": "x", "text": "two"}) + "\n"
    )
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")  # skipped: not a document type
    (tmp_path / ".hidden.txt").write_text("secret")
    docs = read_documents(tmp_path)
    assert [d.id for d in docs] == ["a.txt", "b/c.md", "b/d.jsonl:1", "x"]
    assert [d.text for d in docs][-2:] == ["one", "two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "file is empty"),
        ("blank.txt", b"  \n\t ", "only whitespace"),
        ("bin.txt", b"abc\x00\x01\x02", "looks binary"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not valid UTF-8"),
        ("doc.pdf", b"%PDF-1.4", "unsupported file type"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=message) as info:
        read_documents(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        (['{"text": "ok"}', "{not json"], 2, "invalid JSON"),
        (['{"text": "ok"}', '["a list"]'], 2, "expected a JSON object"),
        (['{"body": "x"}'], 1, "missing field 'text'"),
        (['{"text": 5}'], 1, "must be a string"),
        (['{"text": "ok"}', '{"text": "   "}'], 2, "document is empty"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, lines, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DocumentError, match=message) as info:
        read_documents(path)
    assert info.value.line == line
    assert f"docs.jsonl:{line}" in str(info.value)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 2000)
    with pytest.raises(DocumentError, match="over the limit"):
        read_documents(path, DocumentConfig(max_file_bytes=1000))


def test_one_bad_file_in_a_directory_fails_the_whole_read(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "zbad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DocumentError, match="zbad.txt"):
        read_documents(tmp_path)


def test_duplicate_ids_are_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DocumentError, match="duplicate document id 'a'"):
        read_documents(tmp_path)


def test_utf8_bom_and_missing_path(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode("utf-8"))
    assert read_documents(path)[0].text == "hello"
    with pytest.raises(DocumentError, match="no such file"):
        read_documents(tmp_path / "missing.txt")


def test_make_document_validates_and_hashes():
    doc = make_document("some text")
    assert doc.id.startswith("doc-") and doc.id == make_document("some text").id
    with pytest.raises(DocumentError, match="empty"):
        make_document("   ")


@pytest.mark.parametrize(
    ("n", "size", "overlap", "expected"),
    [
        (10, 4, 0, [(0, 4), (4, 8), (8, 10)]),
        (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
        (4, 4, 2, [(0, 4)]),
        (0, 4, 0, []),
    ],
)
def test_chunk_spans(n, size, overlap, expected):
    assert chunk_spans(n, size, overlap) == expected


def test_chunk_text_covers_the_text(tokenizer):
    text = "The capital of Veloria is Tarnhelm. " * 10
    chunks = chunk_text(tokenizer, text, size=16, overlap=0)
    assert len(chunks) > 1
    assert "".join(chunks) == text


def test_directory_learning_skips_links_that_lead_outside_it(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("hostname of the machine")
    (outside / "more").mkdir()
    (outside / "more" / "x.txt").write_text("more secrets")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Alpha text.")
    (docs / "escape.txt").symlink_to(outside / "secret.txt")
    (docs / "escaped-dir").symlink_to(outside / "more", target_is_directory=True)
    (docs / "alias.txt").symlink_to(docs / "a.txt")  # inside the tree: read
    with caplog.at_level("WARNING", logger="continual_transformer.documents"):
        found = read_documents(docs)
    assert [d.id for d in found] == ["a.txt", "alias.txt"]
    assert all("secret" not in d.text for d in found)
    assert "escape.txt" in caplog.text and "outside" in caplog.text


def test_content_hash_ignores_line_endings_trailing_space_and_composition():
    base = make_document("Caf\u00e9 au lait.\nSecond line.")
    variants = [
        "Caf\u00e9 au lait.\r\nSecond line.  \n",
        "Cafe\u0301 au lait.\nSecond line.",
        "\n Caf\u00e9 au lait.\nSecond line.",
    ]
    assert base.sha256 != make_document(variants[0]).sha256
    assert all(make_document(v).content_sha256 == base.content_sha256 for v in variants[:2])
    assert make_document(variants[2]).content_sha256 == base.content_sha256
    assert make_document("Another text.").content_sha256 != base.content_sha256

"""train_data forms: every accepted form gives the same examples; bad input names the file and line."""

from __future__ import annotations

import json

import pytest

from continual_transformer.tasks.data import LabeledExample, TaskDataError, read_labeled

PAIRS = [
    ("freeze my card", "freeze_account"),
    ("what is my balance", "balance"),
    ("pay the bill", "pay_bill"),
]
EXPECTED = [LabeledExample(t, label) for t, label in PAIRS]


def test_every_accepted_form_gives_the_same_examples(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": t, "intent": label}) for t, label in PAIRS) + "\n\n", encoding="utf-8"
    )
    csv_file = tmp_path / "d.csv"
    csv_file.write_text(
        "text,category\n" + "\n".join(f'"{t}",{label}' for t, label in PAIRS) + "\n", encoding="utf-8"
    )
    cl_json = tmp_path / "train.json"
    cl_json.write_text(json.dumps([{"sentence": t, "label": label} for t, label in PAIRS]), encoding="utf-8")
    clinc = tmp_path / "data_full.json"
    clinc.write_text(json.dumps({"train": [[t, label] for t, label in PAIRS], "test": []}), encoding="utf-8")

    forms = [
        PAIRS,
        [list(p) for p in PAIRS],
        [{"text": t, "label": label} for t, label in PAIRS],
        [{"sentence": t, "category": label} for t, label in PAIRS],
        jsonl,
        str(csv_file),
        cl_json,
        clinc,
        tmp_path,  # a cl_benchmark-style task folder: <dir>/train.json
    ]
    for form in forms:
        assert read_labeled(form) == EXPECTED, form


def test_integer_labels_become_strings():
    assert read_labeled([("good film", 1), ("bad film", 0)]) == [
        LabeledExample("good film", "1"),
        LabeledExample("bad film", "0"),
    ]


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"}\n', encoding="utf-8"
    )
    with pytest.raises(TaskDataError) as info:
        read_labeled(path)
    assert f"{path}:3" in str(info.value) and "label" in str(info.value)

    path.write_text('{"text": "a", "label": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_labeled(path)


def test_bad_csv_names_line_and_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,category\nhello,greet\n,greet\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.csv:3: .*text must be a non-empty string"):
        read_labeled(path)
    path.write_text("words,answer\nhello,greet\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.csv:1: header"):
        read_labeled(path)


def test_bad_in_memory_item_names_its_index():
    with pytest.raises(
        TaskDataError, match=r"train_data\[1\]: expected a \(text, label\) pair, got 3 values"
    ):
        read_labeled([("a", "x"), ("b", "y", "z")])
    with pytest.raises(TaskDataError, match=r"train_data\[0\]: no label field"):
        read_labeled([{"text": "a", "tag": "x"}])


def test_json_split_and_missing_file_errors(tmp_path):
    path = tmp_path / "data_full.json"
    path.write_text(json.dumps({"val": [["a", "x"]]}), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"has no split 'train'; splits: \['val'\]"):
        read_labeled(path)
    assert read_labeled(path, split="val") == [LabeledExample("a", "x")]
    with pytest.raises(TaskDataError, match="no such file"):
        read_labeled(tmp_path / "missing.jsonl")
    with pytest.raises(TaskDataError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("a", encoding="utf-8")
        read_labeled(tmp_path / "x.txt")

"""``ctt ace``: the playbook commands (the typer app the main command line mounts)."""

from __future__ import annotations

import json

from test_ace_playbook import sample
from typer.testing import CliRunner

from continual_transformer.ace.cli import app
from continual_transformer.ace.playbook import PlaybookStore

runner = CliRunner()


def test_import_list_show_delete(tmp_path):
    books = tmp_path / "books"
    source = tmp_path / "mine.json"
    source.write_text(sample().to_json())
    result = runner.invoke(app, ["import", str(source), "--name", "veloria", "--dir", str(books)])
    assert result.exit_code == 0, result.output
    assert PlaybookStore(books).names() == ["veloria"]
    listed = runner.invoke(app, ["list", "--dir", str(books)])
    assert listed.exit_code == 0 and "veloria\t2 bullets\tstep 2" in listed.output
    shown = runner.invoke(app, ["show", "veloria", "--dir", str(books)])
    assert "[ctx-00001] (+1 / -0) The capital of Veloria is Tarnhelm." in shown.output
    as_json = runner.invoke(app, ["show", "veloria", "--dir", str(books), "--json"])
    assert json.loads(as_json.output)["bullets"][1]["harmful"] == 1
    assert runner.invoke(app, ["delete", "veloria", "--dir", str(books)]).exit_code == 0
    assert PlaybookStore(books).names() == []


def test_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something"}')
    for args in (
        ["import", str(bad), "--name", "x", "--dir", str(tmp_path)],
        ["import", str(tmp_path / "missing.json"), "--name", "x", "--dir", str(tmp_path)],
        ["show", "../etc", "--dir", str(tmp_path)],
        ["show", "absent", "--dir", str(tmp_path)],
        ["from-state", str(tmp_path), "--name", "x", "--dir", str(tmp_path)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")

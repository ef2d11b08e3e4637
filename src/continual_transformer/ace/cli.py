"""``ctt ace``: named ACE playbooks — list, show, import, export from a state directory, delete.

A typer app the main command line mounts (``app.add_typer(ace.cli.app, name="ace")``). Only parsing and
printing live here; the work is :class:`~continual_transformer.ace.playbook.PlaybookStore`'s. Nothing here
loads a model: a playbook is taken out of a checkpoint by reading its manifest. Errors are one line on
stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from continual_transformer.ace.playbook import Playbook, PlaybookStore, read_playbook
from continual_transformer.errors import ContinualTransformerError

EXIT_USAGE = 2

app = typer.Typer(
    help="ACE playbooks: list, show, import, export from a state, delete.", no_args_is_help=True
)

DirOption = Annotated[
    Path, typer.Option("--dir", "-d", help="Playbook directory (strategies.ace.playbook_dir).")
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


@app.command("list")
def list_playbooks(directory: DirOption = Path("playbooks")) -> None:
    """The stored playbooks with their bullets and steps."""
    try:
        infos = PlaybookStore(directory).list()
    except ContinualTransformerError as exc:
        raise _fail(str(exc)) from None
    if not infos:
        typer.echo(f"no playbooks in {directory}")
    for info in infos:
        typer.echo(f"{info.name}\t{info.bullets} bullets\tstep {info.step}")


@app.command("show")
def show(
    name: str,
    directory: DirOption = Path("playbooks"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON file.")] = False,
) -> None:
    """One playbook: its bullets by section, with helpful / harmful counts."""
    try:
        playbook = PlaybookStore(directory).load(name)
    except ContinualTransformerError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(playbook.to_json(), nl=False)
        return
    typer.echo(f"{playbook.name}: {len(playbook)} bullets, step {playbook.step}")
    for section in playbook.sections:
        inside = [b for b in playbook if b.section == section]
        if inside:
            typer.echo(f"## {section}")
        for bullet in inside:
            typer.echo(f"[{bullet.id}] (+{bullet.helpful} / -{bullet.harmful}) {bullet.text}")


@app.command("import")
def import_playbook(
    file: Path,
    name: Annotated[str, typer.Option(help="Name to store it as.")],
    directory: DirOption = Path("playbooks"),
) -> None:
    """Validate a playbook file and store it as NAME."""
    try:
        path = PlaybookStore(directory).save(read_playbook(file), name)
    except ContinualTransformerError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"stored {path}")


@app.command("from-state")
def from_state(
    state: Path,
    name: Annotated[str, typer.Option(help="Name to store it as.")],
    directory: DirOption = Path("playbooks"),
) -> None:
    """Take the playbook out of an ``ace`` checkpoint (``ctt learn --state``) and store it as NAME."""
    from continual_transformer import checkpoint

    try:
        manifest = checkpoint.read_manifest(state)
        if manifest.get("strategy") != "ace":
            raise _fail(f"{state} holds strategy {manifest.get('strategy')!r}, not ace")
        part = (manifest.get("parts") or {}).get("strategy") or {}
        if "playbook" not in part:
            raise _fail(f"{state} holds no playbook")
        playbook = Playbook.from_dict(part["playbook"], where=f"{state} (playbook)")
        path = PlaybookStore(directory).save(playbook, name)
    except ContinualTransformerError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"stored {path} ({len(playbook)} bullets)")


@app.command("delete")
def delete(name: str, directory: DirOption = Path("playbooks")) -> None:
    """Remove a stored playbook."""
    try:
        PlaybookStore(directory).delete(name)
    except ContinualTransformerError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({"deleted": name}))

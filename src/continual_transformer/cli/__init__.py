"""The ``ctt`` command line: parses, calls the library, prints. No logic lives here.

``ctt`` alone on a terminal opens the interactive menu (:mod:`.menu`); every menu entry is also a command
below, with the same effect. :data:`COMMANDS` and :data:`SUB_APPS` are the one table of what ``ctt`` offers;
strategies that bring their own commands add a line to :data:`SUB_APPS`.

Library modules are imported inside the commands that use them, so ``ctt --help``, ``ctt models list`` and
``ctt config show`` start without torch or transformers.

State (``--state DIR``, default ``./ctt-state``): when DIR holds a checkpoint, its config applies and the
command-line flags (``--config``, ``--set``, ``--device``, ...) change it; another ``--model`` than the one
the state was made on is refused, and another ``--strategy`` unless ``ctt learn --reset`` starts the state
over or ``ctt use`` switches it (:func:`continual_transformer.session.state_config`). ``ctt learn`` loads,
learns and saves while holding the directory's lock, so concurrent learners take turns (``--lock-timeout``).
``ctt ask`` and ``ctt generate`` refuse a DIR that holds no checkpoint unless ``--allow-empty`` says the base
model is fine. Global options (``--strategy``, ``--json``, ...) may come before or after the command.

Exit codes: 0 success; 1 an unexpected error (a bug; one line, ``--debug`` for the traceback); 2 a usage or
input error, reported in one line on stderr (bad option, bad config, unreadable document, missing or
foreign state, empty or too long question, refused checkpoint), and ``ctt`` alone without a terminal (help
printed); 3 the state directory stayed locked by another process for the whole ``--lock-timeout``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from continual_transformer.ace import cli as ace_cli
from continual_transformer.cli import basics, bench, compare, configure, state, tasks
from continual_transformer.cli.common import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_USAGE,
    Options,
    default_config_file,
    err_console,
    setup_logging,
)
from continual_transformer.demo import RECOMMENDED_STRATEGY as RECOMMENDED
from continual_transformer.errors import ContinualTransformerError
from continual_transformer.hypernetwork.cli import train_hypernetwork_command
from continual_transformer.version import __version__


def _strategy_names() -> str:
    from continual_transformer.strategies import registry

    return ", ".join(registry.names())


HELP = f"""Continual Tiny Transformer: keep a language model learning without forgetting.

Run `ctt` alone on a terminal for the interactive menu.

Strategies: {_strategy_names()} (recommended: {RECOMMENDED}; `ctt strategies` describes them).

Exit codes: {"; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())}.
"""

app = typer.Typer(
    help=HELP, no_args_is_help=False, invoke_without_command=True, pretty_exceptions_enable=False
)

# The one table of commands: name -> function. Each function parses its arguments and calls the library.
COMMANDS: dict[str, Callable[..., Any]] = {
    "learn": state.learn,
    "ask": state.ask,
    "generate": state.generate,
    "history": state.history,
    "info": state.info,
    "forgetting": state.forgetting,
    "forget": state.forget,
    "reset": state.reset_command,
    "use": state.use,
    "action": state.action,
    "compare": compare.compare,
    "demo": compare.demo,
    "strategies": basics.strategies,
    "serve": basics.serve_command,
    "train-hypernetwork": train_hypernetwork_command,
}

# Sub-command groups: name -> typer app. Strategies with their own commands register theirs here.
SUB_APPS: dict[str, typer.Typer] = {
    "models": basics.models_app,
    "config": configure.config_app,
    "state": state.state_app,
    "checkpoints": state.checkpoints_app,
    "tasks": tasks.tasks_app,
    "bench": bench.bench_app,
    "ace": ace_cli.app,
}

for _name, _function in COMMANDS.items():
    app.command(_name)(_function)
for _name, _sub_app in SUB_APPS.items():
    app.add_typer(_sub_app, name=_name)

GLOBAL_VALUE_OPTIONS = ("--config", "-c", "--set", "--model", "--strategy", "--device")
GLOBAL_FLAGS = ("--verbose", "-v", "--json", "--debug")


def _version(value: bool) -> None:
    if value:
        print(f"ctt {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config file (default: ./ctt.yaml if present).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Packaged model name, Hugging Face id or local directory.")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help=f"Document-learning strategy: {_strategy_names()} (recommended: {RECOMMENDED})."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    state_dir: Annotated[
        Path, typer.Option("--state", "-s", help="Menu only: the state directory it learns into.")
    ] = Path("ctt-state"),
) -> None:
    setup_logging(verbose)
    ctx.obj = Options(
        config_file=config if config is not None else default_config_file(),
        set_items=tuple(set_ or ()),
        model=model,
        strategy=strategy,
        device=device,
        verbose=verbose,
        json=json_,
        debug=debug,
    )
    if ctx.invoked_subcommand is None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            from continual_transformer.cli.menu import run_menu

            run_menu(ctx.obj, state=state_dir)
            raise typer.Exit()
        typer.echo(ctx.get_help())
        typer.echo("\n(no command given and no terminal for the interactive menu)", err=True)
        raise typer.Exit(EXIT_USAGE)


def hoist_global_options(args: list[str]) -> list[str]:
    """Global options given after the command moved before it (``ctt ask Q --strategy retrieval`` means
    ``ctt --strategy retrieval ask Q``). Nothing after ``--`` moves."""
    names = set(COMMANDS) | set(SUB_APPS)
    position, i = None, 0
    while i < len(args):
        if args[i] in GLOBAL_VALUE_OPTIONS or args[i] in ("--state", "-s"):
            i += 2  # the option's value is no command name
            continue
        if args[i] == "--":
            break
        if args[i] in names:
            position = i
            break
        i += 1
    if position is None:
        return args
    head, tail, moved = args[:position], [], []
    rest = args[position:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            tail.extend(rest[i:])
            break
        key = arg.split("=", 1)[0]
        if key in GLOBAL_VALUE_OPTIONS and "=" in arg and key.startswith("--"):
            moved.append(arg)
        elif arg in GLOBAL_VALUE_OPTIONS and i + 1 < len(rest):
            # -c is global, but "--set" etc. are only global names; the command's own options differ
            moved.extend(rest[i : i + 2])
            i += 1
        elif arg in GLOBAL_FLAGS:
            moved.append(arg)
        else:
            tail.append(arg)
        i += 1
    return head + moved + tail


def main(args: list[str] | None = None) -> None:
    """Run ``ctt`` (``args``: the command line, default ``sys.argv[1:]``); exits with the codes of the module
    docstring."""
    from continual_transformer.locking import StateLockedError

    args = list(sys.argv[1:] if args is None else args)
    # Output piped to another program is written line by line, not when the command ends.
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)
    args = hoist_global_options(args)
    debug = "--debug" in args
    try:
        app(args=args)
    except StateLockedError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_LOCKED) from None
    except ContinualTransformerError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_USAGE) from None
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        if debug:
            raise
        err_console.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(str(exc))} "
            "(a bug; run again with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(EXIT_ERROR) from None


__all__ = ["COMMANDS", "SUB_APPS", "app", "hoist_global_options", "main"]

"""What every command shares: the global options, output (rich tables, ``--json``, line-by-line when piped),
building a session, and the exit codes.

Imports no torch: commands import the library inside their bodies.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from continual_transformer.errors import ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.config import Config
    from continual_transformer.session import Session

console = Console()
err_console = Console(stderr=True)

DEFAULT_STATE = Path("ctt-state")
DEFAULT_CHECKPOINTS = Path("ctt-checkpoints")
DEFAULT_CONFIG_FILE = Path("ctt.yaml")
"""Read when ``--config`` is not given and it exists in the working directory; ``ctt config init`` and the
menu's "configure" write it."""

EXIT_OK = 0
EXIT_ERROR = 1
"""An unexpected error (a bug): one line, the traceback with ``--debug``."""
EXIT_USAGE = 2
"""Usage and input errors (also click's code for a bad option), and ``ctt`` alone without a terminal."""
EXIT_LOCKED = 3
"""The state directory's lock was not released in time."""
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "unexpected error (a bug; --debug shows the traceback)",
    EXIT_USAGE: "usage or input error: bad option, config, document, state or question (one line on stderr)",
    EXIT_LOCKED: "the state directory stayed locked by another process for --lock-timeout",
}


class UsageError(ContinualTransformerError):
    """A command given what it cannot use (exit 2)."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Global options shared by every command (parsed in the callback, kept on the typer context)."""

    config_file: Path | None = None
    """``--config``: YAML config file (default ``ctt.yaml`` when it exists)."""
    set_items: tuple[str, ...] = field(default_factory=tuple)
    """``--set key.path=value`` overrides, in order."""
    model: str | None = None
    """``--model``."""
    strategy: str | None = None
    """``--strategy``."""
    device: str | None = None
    """``--device``."""
    verbose: bool = False
    """``--verbose``: log what the library does (and keep transformers' progress bars)."""
    json: bool = False
    """``--json``: print one JSON document on stdout instead of tables."""
    debug: bool = False
    """``--debug``: tracebacks for errors."""

    def overrides(self) -> dict[str, Any]:
        """``--model``, ``--device`` and ``--strategy`` as a nested config mapping."""
        overrides: dict[str, Any] = {}
        if self.model:
            overrides.setdefault("model", {})["name"] = self.model
        if self.device:
            overrides.setdefault("model", {})["device"] = self.device
        if self.strategy:
            overrides["strategy"] = self.strategy
        return overrides

    def config(self, state: Path | None = None, *, reset: bool = False) -> Config:
        """The resolved configuration: defaults (or the checkpoint's in ``state``) < ``--config`` file <
        flags and ``--set``."""
        from continual_transformer.session import state_config

        config_file, overrides = self.config_file, self.overrides()
        if (
            config_file is not None
            and config_file.is_file()
            and state is not None
            and not reset
            and _holds_checkpoint(state)
        ):
            # A state keeps the strategy it was made with: the settings file's ``strategy`` is for new
            # states (``ctt use``, or ``--strategy`` with ``--reset``, change it); the rest of it applies.
            from continual_transformer.config import deep_merge, read_yaml

            data = read_yaml(config_file)
            data.pop("strategy", None)
            config_file, overrides = None, deep_merge(data, overrides)
        return state_config(state, config_file, overrides, self.set_items, reset=reset)

    @property
    def settings_file(self) -> Path:
        """The YAML file "configure" edits: ``--config`` when given, else ``ctt.yaml``."""
        return self.config_file or DEFAULT_CONFIG_FILE


def default_config_file() -> Path | None:
    """``$CTT_CONFIG`` when set, else ``./ctt.yaml`` when it exists."""
    env = os.environ.get("CTT_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def options(ctx: typer.Context | None) -> Options:
    """The global options of this invocation (defaults when a command is invoked without the callback)."""
    if ctx is None:
        return Options()
    root = ctx.find_root()
    return root.obj if isinstance(root.obj, Options) else Options()


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def quiet_transformers(opts: Options) -> None:
    """Silence transformers' weight-loading bars and warnings (noise in a CLI answer) unless ``--verbose``.

    Called by the commands that load models, so the others never import transformers.
    """
    if not opts.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


# -- output --------------------------------------------------------------------------------------------------
def say(text: str = "") -> None:
    """One plain line on stdout (no markup, no highlighting, never wrapped mid-word)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def emit_json(data: Any) -> None:
    """The ``--json`` document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def status(message: str, opts: Options | None = None) -> Iterator[None]:
    """A spinner on a terminal (nothing when piped or with ``--json``)."""
    if console.is_terminal and not (opts and opts.json):
        with console.status(message):
            yield
    else:
        yield


def progress_bar(opts: Options | None = None):
    """A rich progress bar (a bar, counts, elapsed and remaining time); silent when piped or with ``--json``
    (lines are printed as items finish instead)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal or bool(opts and opts.json),
    )


def num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# -- inputs --------------------------------------------------------------------------------------------------
def read_text_argument(value: str, what: str) -> str:
    """``value`` itself, or stdin when it is ``-``."""
    if value != "-":
        return value
    text = sys.stdin.read()
    if not text.strip():
        raise UsageError(f"{what} from stdin is empty")
    return text


# -- sessions ------------------------------------------------------------------------------------------------
StateOption = Annotated[
    Path, typer.Option("--state", "-s", help="Checkpoint directory to load from and save to.")
]
AllowEmptyOption = Annotated[
    bool,
    typer.Option(
        "--allow-empty", help="Answer with the base model when --state holds no checkpoint (else an error)."
    ),
]
CheckpointsOption = Annotated[
    Path, typer.Option("--checkpoints", help="Directory of named checkpoints (one sub-directory each).")
]


def build_session(
    opts: Options, state: Path | None = None, *, reset: bool = False, allow_empty: bool = True
) -> Session:
    """A session from the resolved config, with the saved state loaded when ``state`` holds a checkpoint
    (not with ``reset``). Without ``allow_empty`` a ``state`` that holds no checkpoint is an error."""
    from continual_transformer.checkpoint import prepare_read
    from continual_transformer.session import Session

    kind = prepare_read(state) if state is not None else "missing"
    if state is not None and kind != "checkpoint" and not allow_empty:
        from continual_transformer.errors import CheckpointError

        what = "no such directory" if kind == "missing" else "an empty directory"
        raise CheckpointError(
            f"no learned state at {state.resolve()} ({what}); learn documents first "
            f"(ctt learn FILE --state {state}) or pass --allow-empty to answer with the base model"
        )
    config = opts.config(state, reset=reset)
    quiet_transformers(opts)
    with status(f"loading {config.model.name} ({config.strategy})...", opts):
        session = Session(config)
        if kind == "checkpoint" and not reset:
            session.load(state)
    return session


def _holds_checkpoint(state: Path) -> bool:
    return state.is_dir() and (state / "manifest.json").is_file()

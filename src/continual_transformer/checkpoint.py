"""Checkpoints: a directory with component-owned tensors (safetensors), the resolved config and a manifest.

::

    state/
      state.safetensors   tensors the components own, each component's under its part name ("strategy/...")
      config.yaml         the resolved configuration
      manifest.json       library version, base model id + fingerprint, history, each part's non-tensor state

A session checkpoint is made of *parts*, one per component (the document strategy, the task learner): each
part is a :class:`Part` (tensors + JSON state) that the component produces and restores itself. Format
version 1 (before parts) is still read: its strategy tensors had no prefix and its task tensors ``tasks/``.

The directory is written next to its destination and renamed into place, so a crash leaves either the old
checkpoint or the new one, never a mix. Nothing is ever unpickled. :func:`check_base_model` is the one place
that refuses state made on another base model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from continual_transformer.errors import CheckpointError

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone

logger = logging.getLogger(__name__)

FORMAT = "continual-transformer-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 2 added parts (per-component tensors under a name prefix and state under ``manifest["parts"]``)."""
TENSORS_FILE = "state.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class Part:
    """What one component of a checkpoint owns: its tensors and its JSON-serialisable state."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """The component's tensors, by name (stored as ``<part>/<name>``)."""
    state: Mapping[str, Any] = field(default_factory=dict)
    """The component's non-tensor state (stored as ``manifest["parts"][<part>]``)."""


def write_checkpoint(
    directory: str | Path,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    config_yaml: str,
    manifest: dict[str, Any],
    parts: Mapping[str, Part] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path. ``manifest`` gets format fields and a timestamp added.

    ``tensors`` are stored under their own names; each of ``parts`` has its tensors stored under
    ``<part>/`` and its state under ``manifest["parts"][<part>]`` (read back by :func:`read_parts`).
    """
    tensors = dict(tensors or {})
    if parts:
        for name, part in parts.items():
            for key, tensor in part.tensors.items():
                tensors[f"{name}/{key}"] = tensor
        manifest = {**manifest, "parts": {name: dict(part.state) for name, part in parts.items()}}
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(cpu, str(tmp / TENSORS_FILE))
        with open(tmp / TENSORS_FILE, "rb+") as handle:
            os.fsync(handle.fileno())
        _fsync_write(tmp / CONFIG_FILE, config_yaml.encode("utf-8"))
        full_manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **manifest,
            "tensors": {
                "file": TENSORS_FILE,
                "count": len(cpu),
                "bytes": sum(t.numel() * t.element_size() for t in cpu.values()),
            },
        }
        _fsync_write(tmp / MANIFEST_FILE, json.dumps(full_manifest, indent=2).encode("utf-8"))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint to %s (%d tensors)", directory, len(tensors))
    return directory


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists() and not (target / MANIFEST_FILE).exists() and any(target.iterdir()):
        raise CheckpointError(f"{target} exists and is not a checkpoint; refusing to overwrite it")
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory} (not a directory)")
    if not path.exists():
        raise CheckpointError(f"{directory} is not a checkpoint: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has format version {manifest.get('format_version')}; this library reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return manifest


def read_parts(
    directory: str | Path, manifest: Mapping[str, Any], device: torch.device | str = "cpu"
) -> dict[str, Part]:
    """The parts of a session checkpoint, ``{part name: Part}`` (format version 1 read as its two parts)."""
    tensors = read_tensors(directory, device)
    if "parts" in manifest:
        states = manifest["parts"]
        if not isinstance(states, Mapping):
            raise CheckpointError(f"{directory}/{MANIFEST_FILE}: 'parts' must be a mapping")
        parts = {
            name: Part(tensors=_strip(tensors, f"{name}/"), state=state) for name, state in states.items()
        }
        known = {f"{name}/" for name in states}
        stray = [k for k in tensors if not any(k.startswith(prefix) for prefix in known)]
        if stray:
            raise CheckpointError(f"{directory}: tensors {stray[:5]} belong to no part of the manifest")
        return parts
    # Format version 1: strategy tensors without a prefix, the task learner's under "tasks/".
    if "strategy" not in manifest:
        raise CheckpointError(f"{directory} holds no document strategy (kind {manifest.get('kind')!r})")
    parts = {
        "strategy": Part(
            tensors={k: v for k, v in tensors.items() if not k.startswith(V1_TASKS_PREFIX)},
            state=manifest.get("strategy_state", {}),
        )
    }
    if "tasks" in manifest:
        parts["tasks"] = Part(tensors=_strip(tensors, V1_TASKS_PREFIX), state=manifest["tasks"])
    return parts


V1_TASKS_PREFIX = "tasks/"
"""Tensor-name prefix of the task learner's state in a format-version-1 checkpoint."""


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def base_model_manifest(backbone: Backbone) -> dict[str, Any]:
    """The manifest entry that ties state to its base model (checked by :func:`check_base_model`)."""
    return {
        "name": backbone.name,
        "fingerprint": backbone.fingerprint,
        "architecture": type(backbone.model).__name__,
        "parameters": backbone.num_parameters(),
    }


def check_base_model(base: Mapping[str, Any] | None, backbone: Backbone, where: str | Path) -> None:
    """Refuse state made on another base model: ``base`` (a :func:`base_model_manifest` entry) must carry the
    fingerprint of ``backbone``'s weights."""
    base = base or {}
    if base.get("fingerprint") != backbone.fingerprint:
        raise CheckpointError(
            f"checkpoint {where} was made on base model {base.get('name')!r} "
            f"(fingerprint {base.get('fingerprint')}), but this model is {backbone.name!r} "
            f"(fingerprint {backbone.fingerprint}); load it with the same base model"
        )


def read_tensors(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(directory) / TENSORS_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} is incomplete: {TENSORS_FILE} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated: {exc}") from exc


def read_config_yaml(directory: str | Path) -> str:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} is incomplete: {CONFIG_FILE} is missing")
    return path.read_text(encoding="utf-8")

"""Checkpoints: a directory with only strategy-owned tensors (safetensors), the resolved config and a manifest.

::

    state/
      state.safetensors   tensors the strategy owns
      config.yaml         the resolved configuration
      manifest.json       library version, base model id + fingerprint, strategy, history, non-tensor state

The directory is written next to its destination and renamed into place, so a crash leaves either the old
checkpoint or the new one, never a mix. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from continual_transformer.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "continual-transformer-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(
    directory: str | Path,
    *,
    tensors: dict[str, torch.Tensor],
    config_yaml: str,
    manifest: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically; returns its path. ``manifest`` gets format fields and a timestamp added."""
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest.get('format_version')}; this library reads version {FORMAT_VERSION}"
        )
    return manifest


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

"""Checkpoints: a directory with component-owned tensors (safetensors), the resolved config and a manifest.

::

    state/
      tensors-<digest>.safetensors   tensors the components own, grouped (one file per layer or part),
                                     each named by the digest of its tensors ("strategy/layers.3.*")
      config.yaml                    the resolved configuration (a readable copy of the manifest's)
      manifest.json                  library version, base model id + fingerprint, history, each part's
                                     non-tensor state, the config, and every tensor file with its digest
      .ctt.lock                      the writers' lock (:mod:`continual_transformer.locking`)

A session checkpoint is made of *parts*, one per component (the document strategy, the task learner): each
part is a :class:`Part` (tensors + JSON state) that the component produces and restores itself. Format
versions 1 (before parts: strategy tensors without a prefix, task tensors under ``tasks/``) and 2 (one
``state.safetensors``) are still read; the next save turns them into version 3.

**Saving** writes only the tensor files whose content changed (a file is named by the digest of its tensors,
so an unchanged group is already there), then commits by atomically replacing ``manifest.json``, then removes
the files no manifest references any more. A crash (even ``kill -9``) at any point leaves the previous or
the new version complete; files a crash leaves unreferenced are removed by the next writer. Only files the
checkpoint owns are ever written or removed: anything else a user put in the directory stays, and a
directory that holds other files but no checkpoint is refused as state. Writers hold the directory's lock.

**Recovery**: earlier versions of this library swapped whole directories (``.NAME.old-*``/``.NAME.tmp-*``
beside the state); :func:`recover` puts the newest complete one back when a crash left no live checkpoint,
and removes such leftovers once the live one is complete.

Nothing is ever unpickled. :func:`check_base_model` is the one place that refuses state made on another base
model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from continual_transformer.errors import CheckpointError
from continual_transformer.locking import DEFAULT_LOCK_TIMEOUT, HOLDER_FILE, LOCK_FILE, StateLock

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone

logger = logging.getLogger(__name__)

FORMAT = "continual-transformer-checkpoint"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Version 2 added parts (per-component tensors under a name prefix and state under ``manifest["parts"]``);
version 3 split the tensors into digest-named files listed in the manifest and put the config in it."""
TENSORS_FILE = "state.safetensors"
"""The single tensor file of format versions 1 and 2."""
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
TENSOR_FILE_PATTERN = re.compile(r"^tensors-[0-9a-f]{24}\.safetensors$")
_PARTIAL_PATTERN = re.compile(r"^\..+\.partial-\d+$")
_OWNED_NAMES = frozenset({MANIFEST_FILE, CONFIG_FILE, TENSORS_FILE, LOCK_FILE, HOLDER_FILE})
_NUMBERED_GROUP = re.compile(r"^(.*?[./]\d+)(?=[./]|$)")
_READ_ATTEMPTS = 5

StateKind = Literal["missing", "empty", "checkpoint"]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its previous content, never a mix (temp file, fsync, rename)."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        _fsync_write(partial, data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Part:
    """What one component of a checkpoint owns: its tensors and its JSON-serialisable state."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """The component's tensors, by name (stored as ``<part>/<name>``)."""
    state: Mapping[str, Any] = field(default_factory=dict)
    """The component's non-tensor state (stored as ``manifest["parts"][<part>]``)."""


# -- what a directory is -------------------------------------------------------------------------------------
def is_owned(name: str) -> bool:
    """Whether a file name inside a state directory belongs to the checkpoint (saving may replace it)."""
    return name in _OWNED_NAMES or bool(TENSOR_FILE_PATTERN.match(name) or _PARTIAL_PATTERN.match(name))


def state_kind(directory: str | Path) -> StateKind:
    """``missing`` (no such directory), ``empty`` (a directory holding no checkpoint and nothing else) or
    ``checkpoint`` (it has a manifest). A file, or a directory holding other files but no checkpoint, is
    refused: neither can be used as state."""
    directory = Path(directory)
    if not directory.exists():
        return "missing"
    if not directory.is_dir():
        raise CheckpointError(f"state {directory} is a file, not a directory")
    if (directory / MANIFEST_FILE).is_file():
        return "checkpoint"
    foreign = sorted(p.name for p in directory.iterdir() if not is_owned(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CheckpointError(
            f"{directory} is not a checkpoint ({MANIFEST_FILE} is missing) and holds other files ({shown}); "
            "refusing to use it as state: choose a new or empty directory"
        )
    return "empty"


# -- writing -------------------------------------------------------------------------------------------------
def group_key(name: str) -> str:
    """The tensor file a tensor is stored in: its name up to the first numbered component
    (``strategy/layers.3.mlp.weight`` -> ``strategy/layers.3``), else its part (``strategy``)."""
    match = _NUMBERED_GROUP.match(name)
    if match:
        return match.group(1)
    head, sep, _ = name.partition("/")
    return head if sep else name.split(".")[0]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of (CPU, contiguous) tensors: equal iff the content is."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_checkpoint(
    directory: str | Path,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    config_yaml: str,
    manifest: dict[str, Any],
    parts: Mapping[str, Part] | None = None,
    lock: StateLock | None = None,
) -> Path:
    """Write a checkpoint (crash-safe, see the module docstring); returns its path. ``manifest`` gets format
    fields, a timestamp, the config and the tensor files added.

    ``tensors`` are stored under their own names; each of ``parts`` has its tensors stored under
    ``<part>/`` and its state under ``manifest["parts"][<part>]`` (read back by :func:`read_parts`).
    ``lock`` is the directory's lock when the caller holds it already; otherwise it is taken for the write.
    """
    tensors = dict(tensors or {})
    if parts:
        for name, part in parts.items():
            for key, tensor in part.tensors.items():
                tensors[f"{name}/{key}"] = tensor
        manifest = {**manifest, "parts": {name: dict(part.state) for name, part in parts.items()}}
    directory = Path(directory).resolve()
    state_kind(directory)  # a file or a foreign directory is refused before anything is written
    if lock is not None and lock.directory != directory:
        raise ValueError(f"the lock given is {lock.directory}'s, not {directory}'s")
    with lock if lock is not None else StateLock(directory):
        return _write_locked(directory, tensors, config_yaml, manifest)


def _write_locked(
    directory: Path, tensors: dict[str, torch.Tensor], config_yaml: str, manifest: dict[str, Any]
) -> Path:
    state_kind(directory)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(cpu):
        groups.setdefault(group_key(name), {})[name] = cpu[name]
    entries, written = [], []
    try:
        for key, group in groups.items():
            digest = tensors_digest(group)
            target = directory / f"tensors-{digest[:24]}.safetensors"
            if not target.is_file():  # named by content: an existing file already holds these tensors
                partial = directory / f".{target.name}.partial-{os.getpid()}"
                try:
                    save_file(group, str(partial))
                    with open(partial, "rb+") as handle:
                        os.fsync(handle.fileno())
                    os.replace(partial, target)
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
                written.append(target)
            entries.append(
                {
                    "file": target.name,
                    "sha256": digest,
                    "group": key,
                    "names": list(group),
                    "bytes": sum(t.numel() * t.element_size() for t in group.values()),
                }
            )
        full_manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="microseconds"),
            **manifest,
            "config_yaml": config_yaml,
            "tensors": {
                "files": entries,
                "count": len(cpu),
                "bytes": sum(entry["bytes"] for entry in entries),
            },
        }
        _fsync_dir(directory)
        _atomic_write(directory / MANIFEST_FILE, json.dumps(full_manifest, indent=2).encode("utf-8"))
    except BaseException:  # not committed: the files this call added belong to no version
        for path in written:
            path.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)  # the commit
    _atomic_write(directory / CONFIG_FILE, config_yaml.encode("utf-8"))
    _remove_unreferenced(directory, full_manifest)
    logger.info(
        "saved checkpoint to %s (%d tensors in %d files, %d rewritten: %d bytes)",
        directory,
        len(cpu),
        len(entries),
        len(written),
        sum(path.stat().st_size for path in written),
    )
    return directory


def _referenced_files(manifest: Mapping[str, Any]) -> set[str]:
    files = manifest.get("tensors", {}).get("files") if isinstance(manifest.get("tensors"), Mapping) else None
    if files is None:
        return {TENSORS_FILE}
    return {entry["file"] for entry in files}


def _remove_unreferenced(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Remove the owned files no version needs: tensor files the manifest does not list, partial writes."""
    keep = _referenced_files(manifest)
    for path in directory.iterdir():
        name = path.name
        stale_tensors = (TENSOR_FILE_PATTERN.match(name) or name == TENSORS_FILE) and name not in keep
        if (stale_tensors or _PARTIAL_PATTERN.match(name)) and path.is_file():
            path.unlink(missing_ok=True)
            logger.debug("removed %s (no longer part of the checkpoint)", path)


# -- recovery ------------------------------------------------------------------------------------------------
def leftovers(directory: str | Path) -> list[Path]:
    """Directories an interrupted whole-directory swap (format-version-2 writers) left beside
    ``directory``."""
    directory = Path(directory).resolve()
    found = [
        p
        for pattern in (f".{directory.name}.old-*", f".{directory.name}.tmp-*")
        for p in directory.parent.glob(pattern)
        if p.is_dir()
    ]
    return sorted(found)


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: every tensor file there, readable and (format version 3) of
    the digest the manifest records; :class:`CheckpointError` otherwise."""
    manifest = read_manifest(directory)
    tensors = read_tensors(directory, "cpu", manifest)
    for entry in _file_entries(manifest) or []:
        group = {name: tensors[name] for name in entry["names"]}
        if tensors_digest(group) != entry["sha256"]:
            raise CheckpointError(f"{directory}/{entry['file']} does not hold the tensors its manifest lists")
    read_config_yaml(directory, manifest)
    return manifest


def recover(directory: str | Path) -> bool:
    """Make ``directory`` a complete checkpoint again after a crash, and tidy it; the caller holds its lock.

    When ``directory`` has no manifest but a complete checkpoint was left beside it by an interrupted swap,
    the newest complete one is put back (its files linked in, the manifest last). Leftover directories are
    removed once the live checkpoint is complete (incomplete temporary ones always), as are files inside it
    that no version references. Returns whether a checkpoint was put back.
    """
    directory = Path(directory).resolve()
    found = leftovers(directory)
    restored = False
    complete: dict[Path, dict[str, Any]] = {}
    for path in found:
        try:
            complete[path] = verify_checkpoint(path)
        except CheckpointError as exc:
            logger.info("leftover %s is not a complete checkpoint (%s)", path, exc)
    if not (directory / MANIFEST_FILE).exists() and complete:
        best = max(complete, key=lambda p: (str(complete[p].get("created", "")), p.stat().st_mtime))
        _adopt(best, directory)
        restored = True
        logger.warning("recovered the checkpoint %s from %s (a save was interrupted)", directory, best.name)
    live = (directory / MANIFEST_FILE).exists()
    for path in found:
        if live or (".tmp-" in path.name and path not in complete):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s left by an interrupted save", path)
    if live:
        try:
            manifest = read_manifest(directory)
        except CheckpointError:
            return restored  # a damaged manifest is reported by whoever reads it; nothing is removed
        _remove_unreferenced(directory, manifest)
        config_yaml = manifest.get("config_yaml")
        config_path = directory / CONFIG_FILE
        if isinstance(config_yaml, str) and (
            not config_path.is_file() or config_path.read_text(encoding="utf-8") != config_yaml
        ):
            _atomic_write(config_path, config_yaml.encode("utf-8"))
    elif directory.is_dir():
        for path in directory.iterdir():  # writes of a first save that never committed
            if (TENSOR_FILE_PATTERN.match(path.name) or _PARTIAL_PATTERN.match(path.name)) and path.is_file():
                path.unlink(missing_ok=True)
    return restored


def _adopt(source: Path, directory: Path) -> None:
    """Link (or copy) ``source``'s files into ``directory``, the manifest last: a crash here leaves
    ``source`` complete and ``directory`` without a manifest, so recovery simply runs again."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in source.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    for name in [*names, MANIFEST_FILE]:
        partial = directory / f".{name}.partial-{os.getpid()}"
        partial.unlink(missing_ok=True)
        try:
            os.link(source / name, partial)
        except OSError:
            shutil.copyfile(source / name, partial)
        os.replace(partial, directory / name)
    _fsync_dir(directory)


def prepare_read(directory: str | Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> StateKind:
    """What ``directory`` holds, after recovering it (under its lock) when a crash left no live checkpoint
    but a complete one beside it. Readers call this before reading; it takes no lock otherwise."""
    kind = state_kind(directory)
    if kind != "checkpoint" and leftovers(directory):
        with StateLock(directory, timeout=lock_timeout):
            recover(directory)
        kind = state_kind(directory)
    return kind


# -- reading -------------------------------------------------------------------------------------------------
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
    return split_parts(read_tensors(directory, device, manifest), manifest, directory)


def split_parts(
    tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], directory: str | Path
) -> dict[str, Part]:
    """A session checkpoint's tensors (:func:`read_checkpoint`) split into its parts."""
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


def _file_entries(manifest: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The tensor files a format-version-3 manifest lists (``None`` for the single file of versions 1-2)."""
    info = manifest.get("tensors")
    files = info.get("files") if isinstance(info, Mapping) else None
    if files is None:
        return None
    if not isinstance(files, list) or not all(
        isinstance(e, Mapping) and TENSOR_FILE_PATTERN.match(str(e.get("file", ""))) for e in files
    ):
        raise CheckpointError(f"{MANIFEST_FILE}: 'tensors.files' is malformed")
    return [dict(e) for e in files]


def _load(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated: {exc}") from exc


def read_tensors(
    directory: str | Path, device: torch.device | str = "cpu", manifest: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, by name (``manifest``: the one read with it, else read here)."""
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    entries = _file_entries(manifest)
    if entries is None:
        return _load(directory / TENSORS_FILE, device)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        group = _load(directory / entry["file"], device)
        if sorted(group) != sorted(entry.get("names", [])):
            raise CheckpointError(f"{directory}/{entry['file']} does not hold the tensors its manifest lists")
        tensors.update(group)
    return tensors


def read_checkpoint(
    directory: str | Path, device: torch.device | str = "cpu", *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and tensors of one complete version of a checkpoint, without locking.

    A crash that left no live checkpoint is recovered first (:func:`prepare_read`). When a writer commits a
    new version while this reads (its manifest changed and a file of the old one is gone), it reads again.
    """
    directory = Path(directory)
    prepare_read(directory, lock_timeout=lock_timeout)
    for attempt in range(_READ_ATTEMPTS):
        before = _manifest_bytes(directory)
        manifest = read_manifest(directory)
        try:
            return manifest, read_tensors(directory, device, manifest)
        except CheckpointError:
            if attempt == _READ_ATTEMPTS - 1 or _manifest_bytes(directory) == before:
                raise
            logger.info("%s changed while being read; reading it again", directory)
    raise AssertionError("unreachable")


def _manifest_bytes(directory: Path) -> bytes | None:
    try:
        return (directory / MANIFEST_FILE).read_bytes()
    except OSError:
        return None


def read_config_yaml(directory: str | Path, manifest: Mapping[str, Any] | None = None) -> str:
    """The config a checkpoint was saved with (format version 3 keeps it in the manifest)."""
    if manifest is None:
        manifest = read_manifest(directory)
    if isinstance(manifest.get("config_yaml"), str):
        return manifest["config_yaml"]
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} is incomplete: {CONFIG_FILE} is missing")
    return path.read_text(encoding="utf-8")

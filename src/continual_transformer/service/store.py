"""The state directory of a running service: snapshots, the journal, named checkpoints and a lock.

::

    state_dir/
      serve.lock            held (flock) by the one service using this directory
      current.json          {"snapshot": "snap-000007", "seq": 42}: the snapshot to restore and the last
                            journal sequence number it holds
      snapshots/snap-NNNNNN a session checkpoint (``Session.save``)
      journal.jsonl         acknowledged documents (:mod:`continual_transformer.service.journal`)
      checkpoints/NAME      checkpoints saved on request

A snapshot is written with ``Session.save`` into a new directory, then ``current.json`` is replaced
atomically (temporary file, fsync, rename, fsync of the directory): the snapshot and the sequence number it
holds change together, so a restart replays exactly the journal entries the snapshot does not hold.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.errors import ContinualTransformerError
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.journal import fsync_dir

if TYPE_CHECKING:
    from continual_transformer.session import Session

logger = logging.getLogger(__name__)

LOCK_FILE = "serve.lock"
CURRENT_FILE = "current.json"
SNAPSHOTS = "snapshots"
CHECKPOINTS = "checkpoints"
JOURNAL_FILE = "journal.jsonl"

CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Names of checkpoints saved on request: one path component, no leading dot, no separators."""


class ServiceStartError(ContinualTransformerError, RuntimeError):
    """The service cannot start on this state directory (the message says why and what to do)."""


class StateDirBusy(ServiceStartError):
    """Another process (or service) holds the state directory."""


def check_checkpoint_name(name: object) -> str:
    """``name`` if it is a safe checkpoint name, else a 400 :class:`ServiceError` saying why."""
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name) or ".." in name:
        raise ServiceError(
            400,
            "checkpoint names are 1-64 characters of letters, digits, '.', '_' and '-', starting with a "
            f"letter or digit, without '..' (got {name!r})"[:300],
        )
    return name


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(json.dumps(data, indent=2).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class StateStore:
    """Snapshots, the pointer to the current one, named checkpoints and the directory lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_handle: Any = None

    @property
    def journal_path(self) -> Path:
        return self.root / JOURNAL_FILE

    # -- lock -----------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory for this process; refused while another service holds it. The kernel drops the
        lock when the process dies, so a killed service never blocks its restart."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 - held until unlock()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StateDirBusy(f"{self.root} is in use by another ctt serve (lock {LOCK_FILE})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def check_layout(self) -> None:
        """Refuse a plain checkpoint directory (``ctt learn --state``): the service keeps its own layout, and
        a later ``ctt learn`` on the same directory would replace it whole."""
        if (self.root / "manifest.json").exists() and not (self.root / CURRENT_FILE).exists():
            raise ServiceStartError(
                f"{self.root} is a checkpoint directory, not a service state directory; serve from another "
                f"directory and start it from this checkpoint (serve(init_from={str(self.root)!r}))"
            )

    def unlock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # -- snapshots ------------------------------------------------------------------------------------------
    def current(self) -> tuple[Path | None, int]:
        """The snapshot to restore (``None`` before the first) and the last sequence number it holds."""
        path = self.root / CURRENT_FILE
        if not path.exists():
            return None, 0
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            name, seq = data["snapshot"], data["seq"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{path} is corrupt: {exc}") from None
        if not isinstance(seq, int) or not isinstance(name, str) or not name.startswith("snap-"):
            raise RuntimeError(f"{path} is corrupt: {data!r}")
        return self.root / SNAPSHOTS / name, seq

    def write_snapshot(self, session: Session, seq: int) -> Path:
        """Save ``session`` as a new snapshot holding journal entries up to ``seq`` and make it current."""
        previous, _ = self.current()
        number = int(previous.name.removeprefix("snap-")) + 1 if previous is not None else 1
        target = self.root / SNAPSHOTS / f"snap-{number:06d}"
        if target.exists():  # left by a crash between saving it and switching to it
            shutil.rmtree(target)
        session.save(target)
        write_json_atomic(
            self.root / CURRENT_FILE,
            {"snapshot": target.name, "seq": seq, "saved_at": datetime.now(UTC).isoformat()},
        )
        self.remove_stale_snapshots()
        return target

    def remove_stale_snapshots(self) -> None:
        """Delete snapshot directories (and leftovers of interrupted saves) other than the current one."""
        current, _ = self.current()
        folder = self.root / SNAPSHOTS
        if not folder.is_dir():
            return
        for child in folder.iterdir():
            if current is None or child.name != current.name:
                shutil.rmtree(child, ignore_errors=True)

    # -- named checkpoints ----------------------------------------------------------------------------------
    def checkpoint_dir(self, name: str) -> Path:
        folder = (self.root / CHECKPOINTS).resolve()
        path = (folder / check_checkpoint_name(name)).resolve()
        if path.parent != folder:  # defence in depth: the name check already rules this out
            raise ServiceError(400, f"checkpoint name {name!r} leaves the checkpoint folder")
        return path

    def list_checkpoints(self) -> list[dict[str, Any]]:
        folder = self.root / CHECKPOINTS
        if not folder.is_dir():
            return []
        found = []
        for child in sorted(folder.iterdir()):
            manifest = child / "manifest.json"
            if not CHECKPOINT_NAME.fullmatch(child.name) or not manifest.is_file():
                continue
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                found.append({"name": child.name, "valid": False})
                continue
            data = data if isinstance(data, dict) else {}
            history = data.get("history")
            found.append(
                {
                    "name": child.name,
                    "valid": True,
                    "created": data.get("created"),
                    "strategy": data.get("strategy"),
                    "documents": len(history) if isinstance(history, list) else None,
                }
            )
        return found

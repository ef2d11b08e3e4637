"""One writer per state directory: an exclusive lock file inside it.

Everything that changes a state directory (saving, recovering an interrupted save, removing leftovers) runs
while holding its :class:`StateLock`, so two processes learning into one directory take turns: the second
waits (up to a timeout) and then loads what the first saved, instead of overwriting it. The lock is an
operating-system file lock (:mod:`filelock`, ``flock`` on Unix): it is released when its holder exits, even
on ``kill -9``, so a crashed writer never leaves the directory locked. Who holds it (process id, host,
command, since when) is written beside it so a refused writer can say so.

Readers do not lock: a checkpoint is committed by one atomic rename of its manifest, and a reader that
meets a version being replaced reads again (:func:`continual_transformer.checkpoint.read_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

import filelock

from continual_transformer.errors import CheckpointError, ContinualTransformerError

logger = logging.getLogger(__name__)

LOCK_FILE = ".ctt.lock"
"""The lock file, inside the state directory (it stays there; holding it is what counts)."""
HOLDER_FILE = ".ctt.lock.json"
"""Who holds the lock (written after acquiring it, removed before releasing it)."""
DEFAULT_LOCK_TIMEOUT = 120.0
"""Seconds a writer waits for another writer of the same state directory before giving up."""


class StateLockedError(ContinualTransformerError):
    """Another process holds the state directory's lock and did not release it within the timeout."""

    def __init__(self, directory: Path, timeout: float, holder: dict | None) -> None:
        self.directory = directory
        self.timeout = timeout
        self.holder = holder
        who = (
            f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, "
            f"since {holder.get('since')})"
            if holder
            else "another process"
        )
        super().__init__(
            f"state directory {directory} is locked by {who}; waited {timeout:g}s "
            f"(lock file {directory / LOCK_FILE}). Wait for it to finish or give a longer lock timeout"
        )


class StateLock:
    """The exclusive lock of one state directory; re-entrant within its holder.

    >>> with StateLock("state/") as lock:   # creates the directory if needed
    ...     session.load("state/"); session.learn(doc); session.save("state/", lock=lock)
    """

    def __init__(self, directory: str | Path, *, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.directory = Path(directory).resolve()
        self.timeout = timeout
        self._lock = filelock.FileLock(str(self.directory / LOCK_FILE))
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self) -> StateLock:
        """Take the lock, waiting up to ``timeout`` seconds; :class:`StateLockedError` names the holder."""
        if self._depth:
            self._depth += 1
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"state {self.directory} is a file, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            self._lock.acquire(timeout=self.timeout, poll_interval=0.05)
        except filelock.Timeout:
            raise StateLockedError(self.directory, self.timeout, read_holder(self.directory)) from None
        waited = time.monotonic() - start
        if waited > 0.5:
            logger.info("waited %.1fs for the lock of %s", waited, self.directory)
        self._depth = 1
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            (self.directory / HOLDER_FILE).write_text(json.dumps(holder), encoding="utf-8")
        except OSError:  # informational only
            pass
        return self

    def release(self) -> None:
        if not self._depth:
            raise RuntimeError(f"the lock of {self.directory} is not held")
        self._depth -= 1
        if self._depth:
            return
        try:
            (self.directory / HOLDER_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        self._lock.release()

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def read_holder(directory: str | Path) -> dict | None:
    """What the holder of ``directory``'s lock wrote about itself (``None`` when unknown)."""
    try:
        holder = json.loads((Path(directory) / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None

"""Resumable knowledge runs: a strategy's stream saved after every learned batch, continued by a later
process.

After each stream batch, :func:`save_stream` writes one checkpoint (:mod:`continual_transformer.checkpoint`:
safetensors + JSON, crash-safe) holding the strategy's own state (``trainable_state`` / ``extra_state``, as a
session saves it) and the stream's progress (:class:`StreamProgress`: the accuracy-matrix rows so far, each
batch's answers, the learning figures and the seconds spent). Its manifest names the run
(:func:`run_identity`: the strategy spec, the benchmark profile, the resolved config, the base model and the
document order); :func:`load_stream` refuses state of any other run, naming what differs. A continued run
gives the results of an uninterrupted one (timings aside): every strategy's state round-trips exactly (the
strategy invariant tests save and load it) and learning is seeded by the number of documents learned so far.

For runs longer than one process may last (1,000 documents on a machine lent for minutes at a time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.errors import ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config
    from continual_transformer.strategies import Strategy

logger = logging.getLogger(__name__)

PROGRESS_PART = "progress"
STRATEGY_PART = "strategy"
KIND = "knowledge-stream"


class ResumeError(ContinualTransformerError):
    """Saved stream state that belongs to another run (or is not stream state at all)."""


@dataclass
class StreamProgress:
    """Where a strategy's stream stands after ``batches_done`` learned batches (JSON-serialisable)."""

    batches_done: int = 0
    accuracy_rows: list[list[float | None]] = field(default_factory=list)
    """Row ``t`` of the accuracy matrix per finished batch (``None`` above the diagonal)."""
    acquired: list[list[str]] = field(default_factory=list)
    """Per finished batch, the answers to its own probes right after learning it."""
    last_answers: list[str] = field(default_factory=list)
    """The answers to every probe seen so far after the last finished batch (the final answers at the end)."""
    last_answer_seconds: float = 0.0
    stream_answer_seconds: float = 0.0
    """Seconds spent answering the probes of the accuracy matrix, every batch so far."""
    learn_seconds: float = 0.0
    learn_tokens: int = 0
    doc_losses: list[list[float]] = field(default_factory=list)
    """``[loss before, loss after]`` of each learned document that reports them."""
    seconds: float = 0.0
    """Wall seconds spent on this strategy up to the last save, over every process."""
    peak_memory_mb: float = 0.0
    resumed_at: list[int] = field(default_factory=list)
    """Batches done when a later process took the stream over."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamProgress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def state_directory(root: str | Path, spec: str) -> Path:
    """The directory under ``root`` that holds the saved stream of strategy ``spec`` (a readable name and a
    digest, so every spec has its own)."""
    readable = re.sub(r"[^A-Za-z0-9._=-]+", "_", spec)[:80]
    return Path(root) / f"{readable}-{sha256(spec.encode('utf-8')).hexdigest()[:8]}"


def run_identity(
    spec: str, backbone: Backbone, config: Config, bench: dict[str, Any], batches: list[list[str]]
) -> dict[str, Any]:
    """What a saved stream must match to be continued: the strategy spec, the benchmark profile, the resolved
    config, the base model and the document ids of each batch (as JSON reads them back)."""
    from continual_transformer.checkpoint import base_model_manifest
    from continual_transformer.config import to_dict

    identity = {
        "strategy": spec,
        "bench": bench,
        "config": to_dict(config),
        "base_model": base_model_manifest(backbone),
        "documents": batches,
    }
    return json.loads(json.dumps(identity))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each setting whose value differs, as ``key: saved -> current`` (document lists summarised)."""
    a, b = _flat(saved), _flat(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key == "documents":
                out.append("documents: another document order or benchmark")
            else:
                out.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return out


def save_stream(
    directory: str | Path,
    identity: dict[str, Any],
    config: Config,
    strategy: Strategy,
    progress: StreamProgress,
) -> None:
    """Write the strategy's state and the stream's progress (crash-safe: a kill leaves the previous save)."""
    from continual_transformer import checkpoint
    from continual_transformer.config import dump_yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parts = {
        STRATEGY_PART: checkpoint.Part(tensors=strategy.trainable_state(), state=strategy.extra_state()),
        PROGRESS_PART: checkpoint.Part(state=dataclasses.asdict(progress)),
    }
    checkpoint.write_checkpoint(
        directory,
        config_yaml=dump_yaml(config),
        manifest={"kind": KIND, "run": identity},
        parts=parts,
    )


def load_stream(directory: str | Path, identity: dict[str, Any], strategy: Strategy) -> StreamProgress | None:
    """The saved progress, with the strategy's state restored from the same save; ``None`` when nothing is
    saved. Refused (:class:`ResumeError`), before the strategy changes, when the save is another run's."""
    from continual_transformer import checkpoint

    directory = Path(directory)
    if checkpoint.state_kind(directory) != "checkpoint":
        return None
    manifest, tensors = checkpoint.read_checkpoint(directory, strategy.backbone.device)
    if manifest.get("kind") != KIND:
        raise ResumeError(f"{directory} holds no saved knowledge stream (kind {manifest.get('kind')!r})")
    changed = differences(manifest.get("run", {}), identity)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ResumeError(
            f"{directory} was saved by another run ({shown}); continue it with the same settings, or remove "
            "the directory (or use another --out) to start afresh"
        )
    parts = checkpoint.split_parts(tensors, manifest, directory)
    part = parts[STRATEGY_PART]
    strategy.load_trainable_state(dict(part.tensors))
    strategy.load_extra_state(dict(part.state))
    progress = StreamProgress.from_dict(dict(parts[PROGRESS_PART].state))
    logger.info(
        "%s: continuing after batch %d of the saved stream in %s",
        identity["strategy"],
        progress.batches_done,
        directory,
    )
    return progress


def remove_stream(directory: str | Path) -> None:
    """Remove a saved stream once its row is written (nothing when there is none)."""
    shutil.rmtree(directory, ignore_errors=True)

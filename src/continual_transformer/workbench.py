"""What the command line and the interactive menu do with a session beyond learning and answering.

Describe the model and its state (:func:`model_info`), forget one document or change strategy by relearning
the others from their files (:func:`forget`, :func:`switch_strategy`), measure what learning has cost so far
(:func:`forgetting_now`), run a strategy's named actions (:func:`strategy_actions`) and keep named
checkpoints (:func:`list_checkpoints`). Every function takes a :class:`Session`; none prints.

Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.errors import ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.documents import Document
    from continual_transformer.session import Session
    from continual_transformer.strategies import Strategy


class StateError(ContinualTransformerError):
    """A state operation that cannot be done as asked (unknown document, source file gone)."""


# -- model info ----------------------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_indices(parameter_names: Sequence[str] | set[str]) -> tuple[int, ...]:
    """Decoder-layer indices named in parameter names (``model.layers.7.mlp.up_proj.weight`` -> 7)."""
    found = {int(m.group(1)) for name in parameter_names if (m := _LAYER_INDEX.search(name))}
    return tuple(sorted(found))


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What :func:`model_info` reports about a session."""

    model: str
    device: str
    dtype: str
    strategy: str
    layers_total: int
    """Decoder layers of the base model."""
    layers_modified: tuple[int, ...]
    """Indices of the decoder layers whose weights learning may change (in place or through a copy)."""
    params_total: int
    """Parameters of the base model."""
    params_trainable: int
    params_added: int
    """Parameters the strategy adds beside the base model's."""
    state_bytes: int
    """Bytes of what a checkpoint of this strategy holds."""
    documents: int
    calibration: str | None
    """Calibration state of strategies that calibrate (ttt with ``sparse``, memory_layer); ``None`` else."""

    @property
    def layers_frozen(self) -> int:
        return self.layers_total - len(self.layers_modified)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers_frozen": self.layers_frozen}


def calibration_state(strategy: Strategy) -> str | None:
    """``"calibrated in 3.1 s"``, ``"not calibrated yet (...)"`` or ``None`` for a strategy that does not
    calibrate (one without a ``calibrated`` attribute)."""
    if not hasattr(strategy, "calibrated"):
        return None
    if strategy.calibrated:
        seconds = getattr(strategy, "calibration_seconds", None)
        return "calibrated" + (f" in {seconds:.1f} s" if seconds is not None else " (loaded with the state)")
    return "not calibrated yet (runs once, before the first document is learned)"


def model_info(session: Session) -> ModelInfo:
    strategy, backbone = session.strategy, session.backbone
    stats = strategy.stats()
    trained = strategy.trained_backbone_parameters()
    modified = set(layer_indices(sorted(trained)))
    # Strategies that add modules (adapters, memories, trainable copies) name them under the layers they join.
    names = [n for n, _ in backbone.model.named_parameters()]
    extra = {n for n in names if any(tag in n for tag in ("lora_", "memory", "dual", "trainable", "adapter"))}
    modified |= set(layer_indices(sorted(extra)))
    # Strategies whose modules sit beside the model through hooks (memory_layer) name their layers.
    modified |= {int(i) for i in getattr(strategy, "layer_ids", ())}
    return ModelInfo(
        model=backbone.name,
        device=str(backbone.device),
        dtype=str(backbone.dtype).removeprefix("torch."),
        strategy=strategy.name,
        layers_total=backbone.num_layers,
        layers_modified=tuple(sorted(modified)),
        params_total=backbone.num_parameters(),
        params_trainable=stats.params_trainable,
        params_added=stats.params_added,
        state_bytes=stats.state_bytes,
        documents=len(session.history),
        calibration=calibration_state(strategy),
    )


# -- forgetting ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ForgettingNow:
    """The price of what a session has learned, measured against its own base model."""

    ppl_base: float
    ppl_now: float
    general_source: str
    known_facts: int
    """General-knowledge probes the base model answers correctly (the ones that count)."""
    known_facts_kept: int

    @property
    def ppl_change(self) -> float:
        return self.ppl_now / self.ppl_base - 1

    @property
    def kept_share(self) -> float:
        return self.known_facts_kept / self.known_facts if self.known_facts else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ppl_change": self.ppl_change, "kept_share": self.kept_share}


def forgetting_now(
    session: Session, *, ppl_tokens: int = 4096, known_facts: int = 24, max_new_tokens: int = 16
) -> ForgettingNow:
    """General-text perplexity and the general facts the base model knew, with the learned state on and
    off (:meth:`Strategy.disabled`): what learning has cost so far. Reuses the knowledge benchmark's probes
    and scoring."""
    from continual_transformer.evaluation import metrics
    from continual_transformer.evaluation.datasets import KNOWN_FACTS
    from continual_transformer.evaluation.general import general_text
    from continual_transformer.evaluation.knowledge import answer_probes

    strategy = session.strategy
    text, source = general_text(session.config.data_dir)
    candidates = list(KNOWN_FACTS[:known_facts])
    ppl_now = strategy.perplexity(text, max_tokens=ppl_tokens)
    now = answer_probes(strategy, candidates, max_new_tokens).predictions
    with strategy.disabled():
        ppl_base = strategy.perplexity(text, max_tokens=ppl_tokens)
        base: list[str] = [""] * len(candidates)
        for kind, chat in (("cloze", False), ("qa", True)):
            index = [i for i, p in enumerate(candidates) if p.kind == kind]
            if index:
                outs = session.backbone.generate(
                    [candidates[i].prompt for i in index], chat=chat, max_new_tokens=max_new_tokens
                )
                for i, out in zip(index, outs):
                    base[i] = out
    known = [i for i, p in enumerate(candidates) if metrics.contains(base[i], p.answers)]
    kept = sum(metrics.contains(now[i], candidates[i].answers) > 0 for i in known)
    return ForgettingNow(
        ppl_base=ppl_base,
        ppl_now=ppl_now,
        general_source=source,
        known_facts=len(known),
        known_facts_kept=int(kept),
    )


# -- forgetting a document, switching strategy ---------------------------------------------------------------
def recover_documents(
    history: Sequence[Mapping[str, Any]], session: Session
) -> tuple[list[Document], list[str]]:
    """The documents of ``history`` read again from their source files, matched by content hash; and the
    ids of those that cannot be (text given directly, file gone or changed)."""
    from continual_transformer.documents import read_documents

    found: list[Document] = []
    missing: list[str] = []
    cache: dict[str, dict[str, Document]] = {}
    for entry in history:
        source = entry.get("source")
        doc = None
        if source and Path(source).is_file():
            if source not in cache:
                try:
                    docs = read_documents(source, session.config.documents)
                except ContinualTransformerError:
                    docs = []
                cache[source] = {d.content_sha256: d for d in docs}
            doc = cache[source].get(entry.get("content_sha256", ""))
        if doc is None:
            missing.append(str(entry.get("doc_id")))
        else:
            found.append(dataclasses.replace(doc, id=str(entry.get("doc_id", doc.id))))
    return found, missing


def forget(session: Session, doc_id: str) -> list[str]:
    """Forget one document: reset the strategy and relearn every other document of the history from its
    file. Refused before anything changes when ``doc_id`` is unknown or another document cannot be read
    again (then only :meth:`Session.reset` forgets). Returns the ids relearned."""
    ids = [str(entry.get("doc_id")) for entry in session.history]
    if doc_id not in ids:
        raise StateError(f"no document {doc_id!r} in the state; learned: {', '.join(ids) or 'none'}")
    others = [entry for entry in session.history if str(entry.get("doc_id")) != doc_id]
    documents, missing = recover_documents(others, session)
    if missing:
        raise StateError(
            f"cannot forget {doc_id!r} alone: {', '.join(missing)} cannot be read again from their files "
            "(relearning them is how one document is forgotten); use reset to forget everything"
        )
    session.reset()
    session.learn_all(documents)
    return [d.id for d in documents]


def switch_strategy(session: Session, name: str, *, relearn: bool = True) -> tuple[Session, list[str]]:
    """A new session on the same loaded backbone (not loaded again) with strategy ``name``; the documents of
    the history that can be read again from their files are learned into it (with ``relearn``). The old
    strategy is closed (the backbone restored). Returns the new session and the ids not relearned."""
    from continual_transformer.session import Session
    from continual_transformer.strategies import registry

    registry.get(name)  # an unknown name fails here, before the old strategy is closed
    documents, missing = recover_documents(session.history, session) if relearn else ([], [])
    if not relearn:
        missing = [str(entry.get("doc_id")) for entry in session.history]
    config = dataclasses.replace(session.config, strategy=name)
    session.strategy.close()
    session._drop_tasks()
    new = Session(config, backbone=session.backbone)
    new.learn_all(documents)
    return new, missing


# -- strategy actions ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StrategyAction:
    """A named thing a strategy can do or show beyond learning and answering (the menu lists them; ``ctt
    action NAME`` runs one)."""

    name: str
    help: str
    run: Callable[[Session], Any]
    """Called with the session; returns something printable (str, or a JSON-able mapping)."""
    changes_state: bool = False
    """Whether the state should be saved afterwards."""


ActionsProvider = Callable[["Strategy"], Sequence[StrategyAction]]
_PROVIDERS: dict[str, ActionsProvider] = {}


def register_actions(strategy_name: str, provider: ActionsProvider) -> None:
    """Declare the actions of a strategy: ``provider(strategy)`` returns them. A strategy class may instead
    define ``actions(self) -> Sequence[StrategyAction]``; both are listed."""
    _PROVIDERS[strategy_name] = provider


def strategy_actions(strategy: Strategy) -> dict[str, StrategyAction]:
    """Every named action of ``strategy``: those registered for its name, then its own ``actions()``."""
    actions: list[StrategyAction] = []
    if strategy.name in _PROVIDERS:
        actions += list(_PROVIDERS[strategy.name](strategy))
    own = getattr(strategy, "actions", None)
    if callable(own):
        actions += list(own())
    return {action.name: action for action in actions}


def _calibration_actions(strategy: Strategy) -> list[StrategyAction]:
    def show(session: Session) -> dict[str, Any]:
        return {"strategy": session.strategy.name, "calibration": calibration_state(session.strategy)}

    def calibrate(session: Session) -> dict[str, Any]:
        seconds = session.strategy.calibrate()
        return {
            "calibrated_in_seconds": round(seconds, 2),
            "calibration": calibration_state(session.strategy),
        }

    return [
        StrategyAction(name="calibration", help="Show the calibration state.", run=show),
        StrategyAction(
            name="calibrate",
            help="Calibrate now on background text (else it runs before the first document).",
            run=calibrate,
            changes_state=True,
        ),
    ]


register_actions("ttt", _calibration_actions)
register_actions("memory_layer", _calibration_actions)


# -- named checkpoints ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CheckpointSummary:
    name: str
    path: str
    strategy: str
    model: str
    documents: int
    saved_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_summary(path: Path) -> CheckpointSummary | None:
    """What a checkpoint directory holds, from its manifest alone (no tensors read); ``None`` when ``path``
    holds no readable checkpoint."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    history = manifest.get("history") or []
    saved = manifest.get("saved_at") or manifest.get("created_at")
    if saved is None and history:
        saved = history[-1].get("learned_at")
    return CheckpointSummary(
        name=path.name,
        path=str(path),
        strategy=str(manifest.get("strategy", "?")),
        model=str((manifest.get("base_model") or {}).get("name", "?")),
        documents=len(history),
        saved_at=saved,
    )


def list_checkpoints(directory: str | Path) -> list[CheckpointSummary]:
    """The checkpoints directly under ``directory`` (each a sub-directory), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    rows = [read_summary(p) for p in sorted(directory.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [row for row in rows if row is not None]

"""The task-incremental learner: learns classification tasks one after another, predicts with or without the
task id.

>>> learner = TaskLearner(backbone, TaskConfig(max_tasks=50))
>>> learner.learn_task("banking", [("freeze my card", "freeze_account"), ...], epochs=3)
>>> learner.predict("please block my card", task_id="banking")   # -> "freeze_account"
>>> learner.predict("please block my card")                       # routed to a task by its prototype
>>> learner.evaluate("banking", "test.jsonl")                     # -> accuracy
>>> learner.save("state/")

Classification is generative: each label is scored by the likelihood of its name after a prompt listing the
task's labels, so no task adds a head. The continual-learning method (``config.method``) decides which adapter
weights serve a task. Everything the learner keeps (task table, label names, router prototypes, the method's
adapters and buffers) lives in tensors allocated at construction for ``max_tasks`` tasks: with the default
``replay`` method (and with ``adapter_distill``), parameters and bytes of state after the last task equal
those after the first.

Each stateful part (task table, router, method) owns its state: ``state_tensors()`` / ``load_state_tensors()``
for checkpoints, ``snapshot()`` / ``rollback()`` for undo. A task that fails half-way (or is interrupted) is
rolled back, so the learner predicts exactly as before it; a refused checkpoint changes nothing either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from continual_transformer import checkpoint
from continual_transformer.backbone import Backbone
from continual_transformer.clock import PhaseClock
from continual_transformer.config import from_dict, to_dict
from continual_transformer.errors import CheckpointError, ConfigError
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.data import UNKNOWN_TASK, LabeledExample, TaskData, TaskError, read_labeled
from continual_transformer.tasks.methods import get_method
from continual_transformer.tasks.methods.base import TaskMethod, resolve_share_prefix
from continual_transformer.tasks.prompts import Encoded, PromptBuilder, TrainRow
from continual_transformer.tasks.router import (
    BackboneEmbedder,
    PrototypeRouter,
    SentenceRouterEmbedder,
    make_embedder,
    spread_by_label,
)
from continual_transformer.tasks.scoring import score_candidates
from continual_transformer.tasks.state import TensorState, sub_tensors
from continual_transformer.tasks.table import TaskTable
from continual_transformer.version import __version__

logger = logging.getLogger(__name__)


CHECKPOINT_KIND = "task-learner"


@dataclass(frozen=True, kw_only=True)
class TaskReport:
    """What learning one task did."""

    task_id: str
    """The task's id."""
    task_index: int
    """Its row in the preallocated task table."""
    examples: int
    """Training examples."""
    labels: tuple[str, ...]
    """The task's label set (in prompt order)."""
    seconds: float
    """Wall-clock seconds for the whole call (training, distillation, router update)."""
    train_seconds: float
    """Seconds spent training the task's adapter."""
    distill_seconds: float
    """Seconds spent distilling into a pool slot (0 when a free slot took the adapter)."""
    final_loss: float | None
    """Mean loss of the last training epoch's steps."""
    slot: int | None
    """Pool slot (adapter) that serves the task."""
    merged: bool
    """Whether the task was distilled into a slot shared with earlier tasks."""
    parameters: int
    """Parameters the method holds after the task."""
    state_bytes: int
    """Bytes of the learner's state after the task."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method-specific figures."""


@dataclass(frozen=True, kw_only=True)
class LearnerParts:
    """What a :class:`TaskConfig` builds on a backbone, replaced as one when a checkpoint brings its config.

    The stateful parts (``table``, ``router``, ``method``) each own their state: ``state_tensors()`` /
    ``load_state_tensors()`` for checkpoints, ``snapshot()`` / ``rollback()`` to undo a failed change.
    """

    config: TaskConfig
    prompts: PromptBuilder
    table: TaskTable
    embedder: BackboneEmbedder | SentenceRouterEmbedder
    router: PrototypeRouter
    method: TaskMethod
    share_prefix: bool

    @classmethod
    def build(cls, backbone: Backbone, config: TaskConfig) -> LearnerParts:
        embedder = make_embedder(backbone, config)
        per_label = config.max_labels_per_task if config.router_prototypes == "label" else None
        return cls(
            config=config,
            prompts=PromptBuilder(backbone, config),
            table=TaskTable(config),
            embedder=embedder,
            router=PrototypeRouter(
                config.max_tasks,
                embedder.dim,
                per_label,
                unknown_score=config.router_unknown_score,
                shrinkage=config.router_covariance_shrinkage,
                rule=config.router_rule,
                rule_shrinkage=config.router_rule_shrinkage,
            ),
            method=get_method(config.method)(backbone, config),
            share_prefix=resolve_share_prefix(config, backbone),
        )

    def stateful(self) -> dict[str, TensorState]:
        """The parts with state, by the prefix their tensors carry in a checkpoint."""
        return {"table": self.table, "router": self.router, "method": self.method}


class TaskLearner:
    """Learns classification tasks in sequence on a frozen backbone, with a fixed-size state."""

    def __init__(self, backbone: Backbone, config: TaskConfig | None = None) -> None:
        self.backbone = backbone
        self._parts = LearnerParts.build(backbone, config or TaskConfig())
        self.history: list[dict[str, Any]] = []

    # The parts a config builds (read-only: :meth:`restore` replaces them together).
    config = property(lambda self: self._parts.config, doc="The learner's settings.")
    prompts = property(lambda self: self._parts.prompts, doc="Prompt builder and tokeniser of input texts.")
    table = property(lambda self: self._parts.table, doc="Task ids and label names (:class:`TaskTable`).")
    embedder = property(lambda self: self._parts.embedder, doc="The router's text embedder.")
    router = property(lambda self: self._parts.router, doc="The task router (:class:`PrototypeRouter`).")
    method = property(lambda self: self._parts.method, doc="The continual-learning method.")

    # -- tasks -----------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Ids of the tasks learned, in the order they were first learned."""
        return self.table.task_ids()

    def labels(self, task_id: str | int) -> tuple[str, ...]:
        return self.table.label_set(self._index(task_id))

    def _index(self, task_id: str | int) -> int:
        index = self.table.index(str(task_id))
        if index is None:
            raise TaskError(f"unknown task {task_id!r}; learned tasks: {self.tasks}")
        return index

    # -- learning --------------------------------------------------------------------------------------------
    def learn_task(
        self,
        task_id: str | int,
        train_data: TaskData,
        epochs: int | None = None,
        *,
        labels: Sequence[str] | None = None,
    ) -> TaskReport:
        """Learn (or keep learning) task ``task_id`` from labelled examples (see :mod:`.data` for the forms).

        For a task learned already this is an online update with ``adapter_distill`` (and ``isolation``):
        the task's adapter keeps training on the new examples and the task's buffered ones for
        ``tasks.online_epochs`` passes (``epochs`` is not used), the other tasks of its slot kept by
        distillation; other methods train on the new examples as on a new task. See :meth:`learn_stream`.

        ``labels`` fixes the task's label set and its order in the prompt (default: the labels of
        ``train_data`` in order of first appearance); a label in the data but not in ``labels`` is an error.
        """
        clock = PhaseClock()
        task_id = str(task_id)
        examples = read_labeled(train_data, name="train_data")
        label_set = list(labels) if labels is not None else list(dict.fromkeys(e.label for e in examples))
        unknown = sorted({e.label for e in examples} - set(label_set))
        if unknown:
            raise TaskError(f"train_data has labels not in labels=: {unknown[:5]}")
        epochs = self.config.epochs if epochs is None else int(epochs)
        clock.lap("read")
        snapshot = self.snapshot()
        clock.lap("snapshot")
        try:
            result = self._learn(task_id, examples, label_set, epochs, clock)
        except BaseException:
            self.rollback(snapshot)  # a failed task (or an interrupt) leaves the learner as it was
            raise
        self.history.append(
            {
                "task_id": task_id,
                "examples": len(examples),
                "seconds": round(result.seconds, 3),
                "slot": result.slot,
                "merged": result.merged,
            }
        )
        logger.info(
            "learned task %s (%d examples, %d labels) in %.1fs: slot %s%s, loss %s",
            task_id,
            len(examples),
            len(label_set),
            result.seconds,
            result.slot,
            " (merged)" if result.merged else "",
            f"{result.final_loss:.3f}" if result.final_loss is not None else "-",
        )
        return result

    def _learn(
        self,
        task_id: str,
        examples: Sequence[LabeledExample],
        label_set: Sequence[str],
        epochs: int,
        clock: PhaseClock,
    ) -> TaskReport:
        index = self.table.put(task_id, label_set)
        encoded = self._encode(examples, index)
        clock.lap("encode")
        report = self.method.learn(index, encoded, epochs=epochs, rows_of=self._rows)
        clock.lap("method")
        sample = spread_by_label([e.label for e in encoded], self.config.router_samples)
        self.router.update(
            index,
            self.embedder([examples[i].text for i in sample]),
            torch.tensor([encoded[i].label for i in sample], dtype=torch.long),
        )
        clock.lap("router")
        losses = report.pop("losses", [])
        parameters, state_bytes = self.num_parameters(), self.state_bytes()
        clock.lap("sizes")
        steps_per_epoch = max(1, len(losses) // max(epochs, 1))
        return TaskReport(
            task_id=task_id,
            task_index=index,
            examples=len(examples),
            labels=self.table.label_set(index),
            seconds=clock.total,
            train_seconds=float(report.pop("train_s", 0.0)),
            distill_seconds=float(report.pop("distill_s", 0.0)),
            final_loss=sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]) if losses else None,
            slot=report.pop("slot", None),
            merged=bool(report.pop("merged", False)),
            parameters=parameters,
            state_bytes=state_bytes,
            extra={**report, "phase_seconds": clock.laps},
        )

    def snapshot(self) -> dict[str, Any]:
        """A copy of everything :meth:`learn_task` changes (each part's own snapshot, and the history)."""
        return {
            "parts": {name: part.snapshot() for name, part in self._parts.stateful().items()},
            "history": list(self.history),
        }

    def rollback(self, snapshot: dict[str, Any]) -> None:
        """Return to the state :meth:`snapshot` copied (same config)."""
        for name, part in self._parts.stateful().items():
            part.rollback(snapshot["parts"][name])
        self.history = list(snapshot["history"])

    def _encode(
        self, examples: Sequence[LabeledExample], task: int, labels: Sequence[str] | None = None
    ) -> list[Encoded]:
        labels = labels if labels is not None else self.table.label_set(task)
        position = {label: j for j, label in enumerate(labels)}
        ids = self.prompts.encode_texts([e.text for e in examples])
        return [Encoded(t, task, position.get(e.label, -1)) for t, e in zip(ids, examples)]

    def _rows(self, examples: Sequence[Encoded]) -> list[TrainRow]:
        """Training rows (prompt + gold answer) of stored examples of learned tasks."""
        rows = []
        for e in examples:
            prompt = self.prompts.task_prompt(self.table.label_set(e.task))
            rows.append(TrainRow(prompt.prompt(e.text_ids), prompt.answers[e.label], e.task))
        return rows

    def learn_stream(
        self,
        task_id: str | int,
        batches: Iterable[TaskData],
        epochs: int | None = None,
        *,
        labels: Sequence[str] | None = None,
    ) -> list[TaskReport]:
        """Learn task ``task_id`` from mini-batches arriving over time, one :meth:`learn_task` call each.

        The first batch of a new task trains its adapter; every later batch is an online update (with
        ``adapter_distill``: the task's slot keeps training on the batch and the task's buffered rows,
        ``tasks.online_epochs`` passes, no retraining from scratch and no merge). Each batch is rolled back
        alone if it fails.
        """
        return [self.learn_task(task_id, batch, epochs, labels=labels) for batch in batches]

    # -- prediction ------------------------------------------------------------------------------------------
    def predict(self, text: str, task_id: str | int | None = None, *, allow_unknown: bool = False) -> str:
        """The label of ``text`` in task ``task_id`` (routed to a task by its prototype when ``None``).

        ``allow_unknown=True`` (routed only) answers :data:`UNKNOWN_TASK` for a text that belongs to no
        learned task: too far from every prototype by ``tasks.router_unknown_score``, below the threshold
        :meth:`calibrate_unknown` set.
        """
        return self.predict_batch([text], task_id, allow_unknown=allow_unknown)[0]

    def predict_batch(
        self,
        texts: Sequence[str],
        task_ids: str | int | Sequence[str | int] | None = None,
        *,
        allow_unknown: bool = False,
    ) -> list[str]:
        """Labels of many texts; ``task_ids`` is one id for all, one id per text, or ``None`` to route
        (with ``allow_unknown``, :data:`UNKNOWN_TASK` for texts of no learned task)."""
        texts = list(texts)
        if not texts:
            return []
        if task_ids is None and allow_unknown:
            tasks = self.route_indices(texts, allow_unknown=True)
            known = (tasks >= 0).nonzero().squeeze(1).tolist()
            out = [UNKNOWN_TASK] * len(texts)
            if known:
                ids = self.tasks
                labels = self.predict_batch([texts[i] for i in known], [ids[int(tasks[i])] for i in known])
                for i, label in zip(known, labels):
                    out[i] = label
            return out
        if task_ids is None:
            tasks = self.route_indices(texts)
        elif isinstance(task_ids, (str, int)):
            tasks = torch.full((len(texts),), self._index(task_ids), dtype=torch.long)
        else:
            if len(task_ids) != len(texts):
                raise TaskError(f"{len(task_ids)} task ids for {len(texts)} texts")
            tasks = torch.tensor([self._index(t) for t in task_ids], dtype=torch.long)
        label_sets = [self.table.label_set(int(t)) for t in tasks]
        choice = self._classify(self.prompts.encode_texts(texts), tasks, label_sets)
        return [labels[c] for labels, c in zip(label_sets, choice)]

    def route(self, texts: Sequence[str], *, allow_unknown: bool = False) -> list[str]:
        """The task id each text is routed to (nearest task prototype; :data:`UNKNOWN_TASK` for a text of
        no learned task when ``allow_unknown``)."""
        ids = self.tasks
        routed = self.route_indices(list(texts), allow_unknown=allow_unknown)
        return [ids[int(i)] if i >= 0 else UNKNOWN_TASK for i in routed]

    def route_indices(self, texts: Sequence[str], *, allow_unknown: bool = False) -> torch.Tensor:
        """Task index of each text (B,); -1 for a text of no learned task when ``allow_unknown``."""
        if len(self.table) == 0:
            raise TaskError("no task has been learned yet")
        embeddings = self.embedder(list(texts))
        if not allow_unknown:
            return self.router.route(embeddings)
        if not math.isfinite(float(self.router.unknown_threshold)):
            raise TaskError("no unknown-task threshold yet: call calibrate_unknown(held-out texts) first")
        return self.router.route_or_unknown(embeddings)

    def calibrate_unknown(self, texts: Sequence[str], *, false_alarm_rate: float = 0.02) -> float:
        """Calibrate the unknown-task threshold on held-out texts of learned tasks (not seen in training) so
        that at most ``false_alarm_rate`` of such texts fall below it: on new inputs with probability
        ``tasks.router_unknown_confidence`` (the more held-out texts, the closer to the rate the threshold
        can go), or on these texts when it is ``None``. Returns the threshold (of the score
        ``tasks.router_unknown_score``); it is kept in the router's state (saved, rolled back). Calibrate
        again after learning new tasks: prototypes (and the covariance) move."""
        if len(self.table) == 0:
            raise TaskError("no task has been learned yet")
        confidence = self.config.router_unknown_confidence
        threshold = self.router.calibrate(self.embedder(list(texts)), false_alarm_rate, confidence=confidence)
        logger.info(
            "unknown-task threshold %.4f (%s score; false alarms <= %.3f%s)",
            threshold,
            self.config.router_unknown_score,
            false_alarm_rate,
            f" with probability {confidence}" if confidence is not None else " on the held-out texts",
        )
        return threshold

    def scores(self, texts: Sequence[str], task_id: str | int) -> list[torch.Tensor]:
        """Length-normalised log-likelihood of every label of ``task_id`` for each text (in ``labels()``
        order)."""
        index = self._index(task_id)
        tasks = torch.full((len(texts),), index, dtype=torch.long)
        label_set = self.table.label_set(index)
        return self._score(self.prompts.encode_texts(list(texts)), tasks, [label_set] * len(texts))

    def _classify(self, text_ids, tasks: torch.Tensor, label_sets) -> list[int]:
        return [int(s.argmax()) for s in self._score(text_ids, tasks, label_sets)]

    def _score(
        self, text_ids: Sequence[tuple[int, ...]], tasks: torch.Tensor, label_sets: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """Scores of each example's candidate labels; batches sorted by (task, length), grouped per task when
        the method cannot mix tasks in one pass."""
        prompts = [self.prompts.task_prompt(labels) for labels in label_sets]
        full = [p.prompt(ids) for p, ids in zip(prompts, text_ids)]
        order = sorted(range(len(full)), key=lambda i: (int(tasks[i]), label_sets[i], len(full[i])))
        out: list[torch.Tensor | None] = [None] * len(full)
        size = self.config.eval_batch_size
        chunks, current = [], []
        for i in order:
            same_group = (
                not current
                or self.method.mixed_batches
                or (int(tasks[i]) == int(tasks[current[0]]) and label_sets[i] == label_sets[current[0]])
            )
            if len(current) == size or not same_group:
                chunks.append(current)
                current = []
            current.append(i)
        chunks.append(current)
        for chunk in chunks:
            chunk_tasks = tasks[chunk]
            scores = score_candidates(
                self.backbone,
                [full[i] for i in chunk],
                [prompts[i].answers for i in chunk],
                lambda rows, chunk_tasks=chunk_tasks: self.method.activate(chunk_tasks[rows]),
                share_prefix=self._parts.share_prefix and bool((chunk_tasks == chunk_tasks[0]).all()),
            )
            for i, s in zip(chunk, scores):
                out[i] = s
        return out  # type: ignore[return-value]

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(
        self, task_id: str | int, data: TaskData, *, labels: Sequence[str] | None = None, routed: bool = False
    ) -> float:
        """Accuracy on ``data`` for task ``task_id``.

        ``routed=True`` predicts without the task id (the router picks the task; a wrong route is a wrong
        answer). For a task not learned yet, ``labels`` gives its label set and the method's default weights
        answer (the shared adapter, or the base model for per-task adapters): the zero-shot and
        forward-transfer cells.
        """
        return self.evaluate_detailed(task_id, data, labels=labels, routed=routed)["accuracy"]

    def evaluate_detailed(
        self, task_id: str | int, data: TaskData, *, labels: Sequence[str] | None = None, routed: bool = False
    ) -> dict[str, float]:
        """Accuracy and (when ``routed``) router accuracy on ``data`` for task ``task_id``."""
        examples = read_labeled(data, name="data")
        texts = [e.text for e in examples]
        index = self.table.index(str(task_id))
        if index is None:
            if labels is None or routed:
                raise TaskError(
                    f"unknown task {task_id!r}: give labels= to evaluate a task not learned yet (not routed)"
                )
            label_set = tuple(labels)
            tasks = torch.full((len(texts),), -1, dtype=torch.long)
        else:
            label_set = self.table.label_set(index)
            tasks = (
                self.route_indices(texts) if routed else torch.full((len(texts),), index, dtype=torch.long)
            )
        label_sets = [self.table.label_set(int(t)) if t >= 0 else label_set for t in tasks]
        choice = self._classify(self.prompts.encode_texts(texts), tasks, label_sets)
        correct = [labels_[c] == e.label for labels_, c, e in zip(label_sets, choice, examples)]
        result = {"accuracy": sum(correct) / len(correct)}
        if routed:
            result["router_accuracy"] = float((tasks == index).float().mean())
        return result

    def evaluate_many(self, items: Sequence[tuple[str | int, TaskData, Sequence[str] | None]]) -> list[float]:
        """Accuracy of several ``(task_id, data, labels)`` evaluations with the task id, scored in shared
        batches (one pass over all their examples instead of one per task). ``labels`` is used for tasks not
        learned yet."""
        texts, tasks, label_sets, gold, owner = [], [], [], [], []
        for n, (task_id, data, labels) in enumerate(items):
            examples = read_labeled(data, name="data")
            index = self.table.index(str(task_id))
            if index is None and labels is None:
                raise TaskError(f"unknown task {task_id!r}: give labels to evaluate a task not learned yet")
            label_set = self.table.label_set(index) if index is not None else tuple(labels)
            texts += [e.text for e in examples]
            gold += [e.label for e in examples]
            tasks += [index if index is not None else -1] * len(examples)
            label_sets += [label_set] * len(examples)
            owner += [n] * len(examples)
        choice = self._classify(
            self.prompts.encode_texts(texts), torch.tensor(tasks, dtype=torch.long), label_sets
        )
        correct, total = [0] * len(items), [0] * len(items)
        for n, labels_, c, g in zip(owner, label_sets, choice, gold):
            correct[n] += labels_[c] == g
            total[n] += 1
        return [c / t for c, t in zip(correct, total)]

    def evaluate_routed_many(self, items: Sequence[tuple[str | int, TaskData]]) -> list[dict[str, float]]:
        """``evaluate_detailed(task_id, data, routed=True)`` of several learned tasks at once: every text
        routed and scored in shared batches (one pass instead of one per task). Returns each item's
        ``accuracy`` and ``router_accuracy``."""
        texts, gold, expected, owner = [], [], [], []
        for n, (task_id, data) in enumerate(items):
            index = self._index(task_id)
            examples = read_labeled(data, name="data")
            texts += [e.text for e in examples]
            gold += [e.label for e in examples]
            expected += [index] * len(examples)
            owner += [n] * len(examples)
        if not texts:
            return []
        tasks = self.route_indices(texts)
        label_sets = [self.table.label_set(int(t)) for t in tasks]
        choice = self._classify(self.prompts.encode_texts(texts), tasks, label_sets)
        correct, routed, total = [0] * len(items), [0] * len(items), [0] * len(items)
        for n, labels_, c, g, t, e in zip(owner, label_sets, choice, gold, tasks.tolist(), expected):
            correct[n] += labels_[c] == g
            routed[n] += t == e
            total[n] += 1
        return [{"accuracy": c / t, "router_accuracy": r / t} for c, r, t in zip(correct, routed, total)]

    # -- size ------------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters the learner adds to the frozen backbone (every adapter slot, used or not)."""
        return self.method.num_parameters()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the learner keeps, by name: exactly what :meth:`save` writes."""
        return {
            f"{prefix}.{name}": tensor
            for prefix, part in self._parts.stateful().items()
            for name, tensor in part.state_tensors().items()
        }

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def stats(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "tasks": len(self.table),
            "max_tasks": self.config.max_tasks,
            "parameters": self.num_parameters(),
            "state_bytes": self.state_bytes(),
            "grows_with_tasks": self.method.grows_with_tasks,
        }

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_manifest(self) -> dict[str, Any]:
        """JSON part of the learner's checkpoint: kind, method, base model, task ids, history, config."""
        return {
            "library_version": __version__,
            "kind": CHECKPOINT_KIND,
            "method": self.method.name,
            "base_model": checkpoint.base_model_manifest(self.backbone),
            "tasks": self.tasks,
            "history": self.history,
            "task_config": to_dict(self.config),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the learner's tensors (safetensors), its config and a manifest, atomically
        (``checkpoint.py``)."""
        config_yaml = yaml.safe_dump(to_dict(self.config), sort_keys=False)
        return checkpoint.write_checkpoint(
            directory,
            tensors=self.state_tensors(),
            config_yaml=config_yaml,
            manifest=self.checkpoint_manifest(),
        )

    def load(self, directory: str | Path) -> None:
        """Replace this learner's state by a checkpoint's (its config included).

        Refused, with nothing changed, when the checkpoint is not a task learner's or was made on another base
        model (``backbone.fingerprint``).
        """
        manifest = checkpoint.read_manifest(directory)
        tensors = checkpoint.read_tensors(directory, device="cpu")
        self.restore(tensors, manifest, where=str(directory))
        logger.info("loaded %d tasks (%s) from %s", len(self.table), self.method.name, directory)

    def restore(
        self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], *, where: str = "checkpoint"
    ) -> None:
        """Load state from ``state_tensors()`` and ``checkpoint_manifest()`` output, e.g. when the facade
        keeps the learner inside its own checkpoint (under a tensor-name prefix it strips before calling
        this)."""
        if manifest.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{where} is not a task-learner checkpoint (kind {manifest.get('kind')!r})")
        checkpoint.check_base_model(manifest.get("base_model"), self.backbone, where)
        try:
            config = saved_task_config(manifest)
        except ConfigError as exc:
            raise CheckpointError(f"{where}: task config is invalid ({exc})") from exc
        previous, kept = self._parts, self._parts.method.snapshot()
        previous.method.close()  # a LoRA method unwraps its layers before the new one injects its own
        parts = None
        try:
            parts = LearnerParts.build(self.backbone, config)
            for prefix, part in parts.stateful().items():
                part.load_state_tensors(sub_tensors(tensors, f"{prefix}."))
        except BaseException as exc:
            if parts is not None:
                parts.method.close()
            previous.method.rollback(kept)  # what close() took off the backbone goes back on
            if isinstance(exc, (ValueError, KeyError)):
                raise CheckpointError(f"{where}: state does not fit the learner ({exc})") from exc
            raise
        self._parts = parts
        self.history = list(manifest.get("history", []))

    @classmethod
    def from_checkpoint(cls, backbone: Backbone, directory: str | Path) -> TaskLearner:
        """A learner built from a checkpoint's config and state."""
        learner = cls(backbone, saved_task_config(checkpoint.read_manifest(directory)))
        learner.load(directory)
        return learner

    def close(self) -> None:
        """Undo any structural change the method made to the backbone (LoRA layers); hooks never outlive a
        call."""
        self.method.close()


def saved_task_config(manifest: dict[str, Any]) -> TaskConfig:
    """The :class:`TaskConfig` a checkpoint's manifest holds. A checkpoint from before
    ``router_unknown_score`` keeps the score its threshold was calibrated with (``cosine``), and one from
    before ``router_rule`` the rule it routed by, which needs no covariance statistics (``cosine``)."""
    saved = manifest.get("task_config")
    if isinstance(saved, dict):
        for key in ("router_unknown_score", "router_rule"):
            saved = saved if key in saved else {**saved, key: "cosine"}
    return from_dict(TaskConfig, saved, "tasks")

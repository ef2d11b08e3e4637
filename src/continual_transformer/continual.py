"""The facade: one object that holds a backbone and a strategy, learns documents, answers, saves and loads."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from continual_transformer import checkpoint
from continual_transformer.backbone import Backbone
from continual_transformer.config import Config, dump_yaml, from_dict, load_config
from continual_transformer.documents import Document, make_document, read_documents
from continual_transformer.errors import CheckpointError, DocumentError
from continual_transformer.strategies import LearnReport, StrategyStats, registry
from continual_transformer.version import __version__

logger = logging.getLogger(__name__)


class ContinualTransformer:
    """A language model that keeps learning documents through a pluggable strategy.

    >>> ct = ContinualTransformer()                           # packaged SmolLM2, strategy from the config
    >>> ct.learn_document("The capital of Veloria is Tarnhelm.")
    >>> ct.ask("What is the capital of Veloria?")
    >>> ct.save("state/")

    ``model`` is a packaged model name, a Hugging Face id, a local directory, or an already built
    :class:`Backbone`; ``strategy`` a registered strategy name. Both override the config.
    """

    def __init__(
        self,
        model: str | Backbone | None = None,
        *,
        strategy: str | None = None,
        config: Config | None = None,
        config_file: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        max_tasks: int | None = None,
        task_config: Any = None,
    ) -> None:
        cfg = config if config is not None else load_config(config_file, overrides)
        if isinstance(model, str):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model))
        elif isinstance(model, Backbone):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model.name))
        if strategy is not None:
            cfg = dataclasses.replace(cfg, strategy=strategy)
        self.config = cfg
        torch.manual_seed(cfg.seed)
        self.backbone = model if isinstance(model, Backbone) else Backbone.load(cfg.model, cfg.generation)
        if isinstance(model, Backbone):
            self.backbone.generation = cfg.generation
        strategy_cls = registry.get(cfg.strategy)
        self.strategy = strategy_cls(self.backbone, cfg.strategy_config(), settings=cfg)
        self.history: list[dict[str, Any]] = []
        self._task_config = task_config
        self._max_tasks = max_tasks
        self._tasks = None

    # -- learning ---------------------------------------------------------------------------------------------
    def learn_document(self, document: str | Document, *, doc_id: str | None = None) -> LearnReport:
        """Learn one document given as text or a :class:`Document`."""
        doc = document if isinstance(document, Document) else make_document(document, doc_id)
        return self._learn(doc)

    def learn_file(self, path: str | Path) -> list[LearnReport]:
        """Learn every document in a file or directory. All files are validated before anything is learned."""
        documents = read_documents(path, self.config.documents)
        return [self._learn(doc) for doc in documents]

    def learn_directory(self, path: str | Path) -> list[LearnReport]:
        """Learn every ``.txt``, ``.md`` and ``.jsonl`` document below ``path`` (validated first)."""
        if not Path(path).is_dir():
            raise DocumentError(path, "not a directory")
        return self.learn_file(path)

    def _learn(self, doc: Document) -> LearnReport:
        report = self.strategy.learn(doc)
        self.history.append(
            {
                "doc_id": doc.id,
                "source": doc.source,
                "sha256": doc.sha256,
                "strategy": self.strategy.name,
                "learned_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "tokens": report.tokens,
                "seconds": round(report.seconds, 4),
                "loss_before": report.loss_before,
                "loss_after": report.loss_after,
            }
        )
        logger.info(
            "learned %s: %d tokens in %.2fs, loss %s -> %s",
            doc.id,
            report.tokens,
            report.seconds,
            _fmt(report.loss_before),
            _fmt(report.loss_after),
        )
        return report

    # -- answering --------------------------------------------------------------------------------------------
    def generate(
        self, prompts: str | Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Continuations of each prompt (chat template applied when the config asks for it)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.strategy.generate(batch, chat=chat, max_new_tokens=max_new_tokens)

    def ask(self, question: str, *, max_new_tokens: int | None = None) -> str:
        """Answer one question through the chat template."""
        if not question.strip():
            raise ValueError("question is empty")
        return self.strategy.generate([question], chat=True, max_new_tokens=max_new_tokens)[0]

    def stats(self) -> StrategyStats:
        return self.strategy.stats()

    def reset(self) -> None:
        """Forget everything learned."""
        self.strategy.reset()
        self.history.clear()

    # -- tasks (task-incremental classification, fixed-size adapter pool) ---------------------------------------
    @property
    def tasks(self):
        """The :class:`~continual_transformer.tasks.TaskLearner` on this backbone (created on first use)."""
        if self._tasks is None:
            from continual_transformer.tasks import TaskConfig, TaskLearner

            config = self._task_config or TaskConfig()
            if self._max_tasks is not None:
                config = dataclasses.replace(config, max_tasks=self._max_tasks)
            self._tasks = TaskLearner(self.backbone, config)
        return self._tasks

    def learn_task(self, task_id: str | int, train_data: Any, epochs: int | None = None, **kwargs: Any):
        """Learn a classification task with zero new parameters (see :meth:`TaskLearner.learn_task`)."""
        return self.tasks.learn_task(task_id, train_data, epochs, **kwargs)

    def predict(self, text: str, task_id: str | int | None = None) -> str:
        """The label of ``text``; without ``task_id`` the router picks the task."""
        return self.tasks.predict(text, task_id)

    def evaluate(self, task_id: str | int, data: Any, **kwargs: Any) -> float:
        """Accuracy on labelled ``data`` for a learned task."""
        return self.tasks.evaluate(task_id, data, **kwargs)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Save what the strategy owns, the resolved config and the history (atomically); learned tasks too, in the
        same checkpoint (their tensors under the ``tasks/`` prefix, their manifest under ``"tasks"``)."""
        tensors = dict(self.strategy.trainable_state())
        manifest = {
            "library_version": __version__,
            "strategy": self.strategy.name,
            "base_model": {
                "name": self.backbone.name,
                "fingerprint": self.backbone.fingerprint,
                "architecture": type(self.backbone.model).__name__,
                "parameters": self.backbone.num_parameters(),
            },
            "history": self.history,
            "strategy_state": self.strategy.extra_state(),
        }
        if self._tasks is not None and self._tasks.tasks:
            tensors.update({TASKS_PREFIX + k: v for k, v in self._tasks.state_tensors().items()})
            manifest["tasks"] = self._tasks.checkpoint_manifest()
        return checkpoint.write_checkpoint(
            directory, tensors=tensors, config_yaml=dump_yaml(self.config), manifest=manifest
        )

    def load(self, directory: str | Path) -> None:
        """Load a checkpoint into this model. Refused if it was made on another base model or strategy.

        The current state is only replaced once the whole checkpoint has been read and checked.
        """
        manifest = checkpoint.read_manifest(directory)
        base = manifest.get("base_model", {})
        if base.get("fingerprint") != self.backbone.fingerprint:
            raise CheckpointError(
                f"checkpoint {directory} was made on base model {base.get('name')!r} "
                f"(fingerprint {base.get('fingerprint')}), but this model is {self.backbone.name!r} "
                f"(fingerprint {self.backbone.fingerprint}); load it with the same base model"
            )
        if manifest.get("strategy") != self.strategy.name:
            raise CheckpointError(
                f"checkpoint {directory} holds strategy {manifest.get('strategy')!r}, this model uses "
                f"{self.strategy.name!r}; use ContinualTransformer.from_checkpoint({str(directory)!r})"
            )
        tensors = checkpoint.read_tensors(directory, self.backbone.device)
        task_tensors = {
            k[len(TASKS_PREFIX) :]: v.cpu() for k, v in tensors.items() if k.startswith(TASKS_PREFIX)
        }
        tensors = {k: v for k, v in tensors.items() if not k.startswith(TASKS_PREFIX)}
        if (
            "tasks" in manifest
        ):  # checked and restored first: it rolls itself back when the state does not fit
            self.tasks.restore(task_tensors, manifest["tasks"], where=f"{directory} (tasks)")
        elif self._tasks is not None:
            self._tasks.close()  # the checkpoint has no tasks: neither has the model after loading it
            self._tasks = None
        try:
            self.strategy.load_trainable_state(tensors)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {directory} does not fit this strategy's configuration: {exc}"
            ) from exc
        self.strategy.load_extra_state(manifest.get("strategy_state", {}))
        self.history = list(manifest.get("history", []))
        logger.info("loaded checkpoint %s (%d documents learned)", directory, len(self.history))

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, *, model: str | Backbone | None = None, **overrides: Any
    ) -> ContinualTransformer:
        """Rebuild the model a checkpoint was saved from (its config and base model) and load its state."""
        manifest = checkpoint.read_manifest(directory)
        try:
            data = yaml.safe_load(checkpoint.read_config_yaml(directory)) or {}
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{directory}/config.yaml is corrupt: {exc}") from exc
        config = from_dict(Config, data)
        instance = cls(
            model if model is not None else manifest["base_model"]["name"], config=config, **overrides
        )
        instance.load(directory)
        return instance


TASKS_PREFIX = "tasks/"
"""Tensor-name prefix of the task learner's state inside a facade checkpoint."""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

"""The session: a backbone, the document strategy and (once used) the task learner, built from a config.

A :class:`Session` is where the pieces meet, so it is where a config is checked against them: strategy names
against the registry and each strategy section against the config class its strategy registered
(:func:`resolve_config`). It owns their state, and every change to it (learning, resetting, loading) goes
through a :class:`Session` method, so there is one place to serialise writes. It writes one checkpoint
directory (:mod:`continual_transformer.checkpoint`) in which each component keeps its own part: the strategy
its tensors and extra state, the task learner its own; the base model is checked once, for all of them.

Importing this module imports no torch; building a session does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from continual_transformer.config import Config, defaults_yaml, dump_yaml, from_dict, to_dict
from continual_transformer.errors import CheckpointError
from continual_transformer.strategies import check_strategy_names, registry, strategy_config

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.documents import Document
    from continual_transformer.strategies import LearnReport, Strategy, StrategyStats
    from continual_transformer.tasks import TaskLearner, TaskReport

logger = logging.getLogger(__name__)

STRATEGY_PART = "strategy"
"""Checkpoint part of the document strategy (its tensors and ``extra_state()``)."""
TASKS_PART = "tasks"
"""Checkpoint part of the task learner (its ``state_tensors()`` and ``checkpoint_manifest()``)."""


def validate_config(config: Config) -> Config:
    """Check what can be checked without building anything (strategy names; no torch). Returns ``config``."""
    return check_strategy_names(config)


def resolve_config(config: Config) -> Config:
    """``config`` checked against the strategies: names known, the selected strategy's section and every
    given section typed by its strategy's config class (errors name the full key, e.g.
    ``strategies.finetune.lr``). Given sections come back complete, defaults filled in, as a checkpoint
    records them. Imports the strategies concerned."""
    validate_config(config)
    strategy_config(config)
    sections = {name: to_dict(strategy_config(config, name)) for name in config.strategies}
    return dataclasses.replace(config, strategies=sections)


DEFAULTS_HEADER = """\
Continual Tiny Transformer: default configuration (the same values as the code's defaults).
Precedence: these defaults < a file given with --config < command-line flags and --set key.path=value.
Generated from the config classes; regenerate with:
  python -c "from continual_transformer.session import default_config_yaml as d; print(d(), end='')" \\
    > configs/default.yaml"""


def default_config_yaml() -> str:
    """The text of ``configs/default.yaml``: every key with its default, every registered strategy's section
    included (imports every strategy)."""
    configs = {name: cls.config_cls for name, cls in registry.load_all().items()}
    return defaults_yaml(configs, header=DEFAULTS_HEADER)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on torch's global generators seeded with ``seed``, then put their previous state back.

    Components built inside draw the same numbers as after ``torch.manual_seed(seed)``, and nothing outside
    the block sees the seed.
    """
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Session:
    """One backbone with its document strategy and, once used, its task learner.

    >>> session = Session(load_config(), backbone=None)     # loads the configured base model
    >>> session.learn(document)
    >>> session.save("state/")

    ``backbone`` reuses an already loaded :class:`Backbone` (its name then replaces ``config.model.name``).
    """

    def __init__(self, config: Config, *, backbone: Backbone | None = None) -> None:
        if backbone is not None:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=backbone.name))
        config = resolve_config(config)
        self.config = config
        with seeded(config.seed):
            if backbone is None:
                from continual_transformer.backbone import Backbone

                backbone = Backbone.load(config.model, config.generation)
            else:
                backbone.generation = config.generation
            self.backbone: Backbone = backbone
            strategy_cls = registry.get(config.strategy)
            self.strategy: Strategy = strategy_cls(backbone, strategy_config(config), settings=config)
        self.history: list[dict[str, Any]] = []
        self._tasks: TaskLearner | None = None

    # -- documents ------------------------------------------------------------------------------------------
    def learn(self, document: Document) -> LearnReport:
        """Learn one document with the strategy and record it in the history."""
        report = self.strategy.learn(document)
        self.history.append(
            {
                "doc_id": document.id,
                "source": document.source,
                "sha256": document.sha256,
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
            document.id,
            report.tokens,
            report.seconds,
            _fmt(report.loss_before),
            _fmt(report.loss_after),
        )
        return report

    def learn_all(self, documents: Iterable[Document]) -> list[LearnReport]:
        """Learn documents in order (validate them all before calling this: nothing is rolled back)."""
        return [self.learn(document) for document in documents]

    def generate(
        self, prompts: Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Continuations of each prompt, answered with what the strategy has learned."""
        return self.strategy.generate(list(prompts), chat=chat, max_new_tokens=max_new_tokens)

    def ask(self, question: str, *, max_new_tokens: int | None = None) -> str:
        """Answer one question through the chat template."""
        if not question.strip():
            raise ValueError("question is empty")
        return self.generate([question], chat=True, max_new_tokens=max_new_tokens)[0]

    def stats(self) -> StrategyStats:
        return self.strategy.stats()

    def reset(self) -> None:
        """Forget every document learned (the strategy's state and the history); learned tasks stay."""
        self.strategy.reset()
        self.history.clear()

    # -- tasks ----------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> TaskLearner:
        """The task learner on this backbone, built from ``config.tasks`` on first use."""
        if self._tasks is None:
            from continual_transformer.tasks.learner import TaskLearner

            self._tasks = TaskLearner(self.backbone, self.config.tasks)
        return self._tasks

    @property
    def has_tasks(self) -> bool:
        """Whether the task learner has been built (a session that never used tasks builds none)."""
        return self._tasks is not None

    def learn_task(
        self, task_id: str | int, train_data: Any, epochs: int | None = None, **kwargs: Any
    ) -> TaskReport:
        """Learn a classification task (see :meth:`TaskLearner.learn_task`)."""
        return self.tasks.learn_task(task_id, train_data, epochs, **kwargs)

    def predict(self, text: str, task_id: str | int | None = None) -> str:
        return self.tasks.predict(text, task_id)

    def evaluate(self, task_id: str | int, data: Any, **kwargs: Any) -> float:
        return self.tasks.evaluate(task_id, data, **kwargs)

    def _drop_tasks(self) -> None:
        if self._tasks is not None:
            self._tasks.close()
            self._tasks = None

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write one checkpoint (atomically): the resolved config, the history, the base model's identity
        and a part per component (the strategy's; the task learner's once it holds tasks)."""
        from continual_transformer import checkpoint
        from continual_transformer.version import __version__

        parts = {
            STRATEGY_PART: checkpoint.Part(
                tensors=self.strategy.trainable_state(), state=self.strategy.extra_state()
            )
        }
        if self._tasks is not None and self._tasks.tasks:
            parts[TASKS_PART] = checkpoint.Part(
                tensors=self._tasks.state_tensors(), state=self._tasks.checkpoint_manifest()
            )
        manifest = {
            "library_version": __version__,
            "strategy": self.strategy.name,
            "base_model": checkpoint.base_model_manifest(self.backbone),
            "history": self.history,
        }
        return checkpoint.write_checkpoint(
            directory, config_yaml=dump_yaml(self.config), manifest=manifest, parts=parts
        )

    def load(self, directory: str | Path) -> None:
        """Replace this session's state by a checkpoint's. Refused, before anything changes, when it was made
        on another base model or with another strategy; a strategy whose state does not fit its config is
        refused too (the task learner rolls itself back when its part does not fit)."""
        from continual_transformer import checkpoint

        manifest = checkpoint.read_manifest(directory)
        checkpoint.check_base_model(manifest.get("base_model"), self.backbone, directory)
        if manifest.get("strategy") != self.strategy.name:
            raise CheckpointError(
                f"checkpoint {directory} holds strategy {manifest.get('strategy')!r}, this model uses "
                f"{self.strategy.name!r}; use ContinualTransformer.from_checkpoint({str(directory)!r})"
            )
        parts = checkpoint.read_parts(directory, manifest, self.backbone.device)
        unknown = sorted(set(parts) - {STRATEGY_PART, TASKS_PART})
        if unknown:
            raise CheckpointError(f"checkpoint {directory} has parts {unknown} this library does not know")
        if TASKS_PART in parts:  # restored first: it rolls itself back when the state does not fit
            part = parts[TASKS_PART]
            tensors = {k: v.cpu() for k, v in part.tensors.items()}
            self.tasks.restore(tensors, dict(part.state), where=f"{directory} (tasks)")
        else:
            self._drop_tasks()  # the checkpoint has no tasks: neither has the session after loading it
        part = parts.get(STRATEGY_PART, checkpoint.Part())
        try:
            self.strategy.load_trainable_state(dict(part.tensors))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {directory} does not fit this strategy's configuration: {exc}"
            ) from exc
        self.strategy.load_extra_state(dict(part.state))
        self.history = list(manifest.get("history", []))
        logger.info("loaded checkpoint %s (%d documents learned)", directory, len(self.history))

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, backbone: Backbone | None = None) -> Session:
        """The session a checkpoint was saved from: its config and base model, then its state."""
        config, _ = checkpoint_config(directory)
        session = cls(config, backbone=backbone)
        session.load(directory)
        return session


def checkpoint_config(directory: str | Path) -> tuple[Config, dict[str, Any]]:
    """The config a checkpoint was saved with (its model name set to the checkpoint's base model) and its
    manifest."""
    from continual_transformer import checkpoint

    manifest = checkpoint.read_manifest(directory)
    try:
        data = yaml.safe_load(checkpoint.read_config_yaml(directory)) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{directory}/config.yaml is corrupt: {exc}") from exc
    config = from_dict(Config, data)
    name = manifest.get("base_model", {}).get("name")
    if name:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=name))
    return config, manifest


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

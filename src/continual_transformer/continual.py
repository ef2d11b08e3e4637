"""The facade: one object that learns documents and tasks, answers, saves and loads.

It is a thin layer over a :class:`~continual_transformer.session.Session`, which puts the backbone, the
strategy and the task learner together and owns their state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.config import Config, load_config
from continual_transformer.documents import Document, make_document, read_documents
from continual_transformer.errors import DocumentError
from continual_transformer.session import Session, checkpoint_config

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.strategies import LearnReport, Strategy, StrategyStats
    from continual_transformer.tasks import TaskConfig, TaskLearner, TaskReport


class ContinualTransformer:
    """A language model that keeps learning documents through a pluggable strategy.

    >>> ct = ContinualTransformer()                           # packaged SmolLM2, strategy from the config
    >>> ct.learn_document("The capital of Veloria is Tarnhelm.")
    >>> ct.ask("What is the capital of Veloria?")
    >>> ct.save("state/")

    ``model`` is a packaged model name, a Hugging Face id, a local directory, or an already built
    :class:`Backbone`; ``strategy`` a registered strategy name. Both override the config, as ``task_config``
    (replacing ``config.tasks``) and ``max_tasks`` (its capacity) do.
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
        task_config: TaskConfig | None = None,
    ) -> None:
        cfg = config if config is not None else load_config(config_file, overrides)
        if isinstance(model, str):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model))
        if strategy is not None:
            cfg = dataclasses.replace(cfg, strategy=strategy)
        if task_config is not None:
            cfg = dataclasses.replace(cfg, tasks=task_config)
        if max_tasks is not None:
            cfg = dataclasses.replace(cfg, tasks=dataclasses.replace(cfg.tasks, max_tasks=max_tasks))
        self.session = Session(
            cfg, backbone=model if model is not None and not isinstance(model, str) else None
        )

    @classmethod
    def from_session(cls, session: Session) -> ContinualTransformer:
        """The facade over an existing session (which keeps its state)."""
        instance = cls.__new__(cls)
        instance.session = session
        return instance

    # -- what the session holds ------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The resolved configuration (strategy sections complete)."""
        return self.session.config

    @property
    def backbone(self) -> Backbone:
        return self.session.backbone

    @property
    def strategy(self) -> Strategy:
        return self.session.strategy

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per learned document, in order."""
        return self.session.history

    @property
    def _tasks(self) -> TaskLearner | None:
        """The task learner if one has been built (``None`` otherwise); :attr:`tasks` builds it."""
        return self.session._tasks

    # -- learning --------------------------------------------------------------------------------------------
    def learn_document(self, document: str | Document, *, doc_id: str | None = None) -> LearnReport:
        """Learn one document given as text or a :class:`Document`."""
        doc = document if isinstance(document, Document) else make_document(document, doc_id)
        return self.session.learn(doc)

    def learn_documents(self, documents: Sequence[str | Document]) -> list[LearnReport]:
        """Learn documents (texts or :class:`Document`) that arrive together, in one training run where the
        strategy trains weights (see :meth:`Session.learn_documents`)."""
        docs = [d if isinstance(d, Document) else make_document(d, None) for d in documents]
        return self.session.learn_documents(docs)

    def learn_file(self, path: str | Path) -> list[LearnReport]:
        """Learn every document in a file or directory. All files are validated before anything is learned."""
        return self.session.learn_all(read_documents(path, self.config.documents))

    def learn_directory(self, path: str | Path) -> list[LearnReport]:
        """Learn every ``.txt``, ``.md`` and ``.jsonl`` document below ``path`` (validated first)."""
        if not Path(path).is_dir():
            raise DocumentError(path, "not a directory")
        return self.learn_file(path)

    # -- answering -------------------------------------------------------------------------------------------
    def generate(
        self, prompts: str | Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Continuations of each prompt (chat template applied when the config asks for it)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.session.generate(batch, chat=chat, max_new_tokens=max_new_tokens)

    def ask(self, question: str, *, max_new_tokens: int | None = None) -> str:
        """Answer one question through the chat template."""
        return self.session.ask(question, max_new_tokens=max_new_tokens)

    def stats(self) -> StrategyStats:
        return self.session.stats()

    def reset(self) -> None:
        """Forget everything learned."""
        self.session.reset()

    def forget(self, doc_id: str) -> None:
        """Forget one learned document: its chunks, texts or entries are removed (``retrieval``,
        ``in_context``, ``knowledge_store``). Strategies whose documents change shared weights raise
        :class:`~continual_transformer.strategies.base.CannotForgetError` with the reason; an unknown id
        raises ``KeyError``."""
        self.session.forget(doc_id)

    # -- tasks (task-incremental classification, fixed-size adapter pool) ------------------------------------
    @property
    def tasks(self) -> TaskLearner:
        """The :class:`~continual_transformer.tasks.TaskLearner` on this backbone (created on first use)."""
        return self.session.tasks

    def learn_task(
        self, task_id: str | int, train_data: Any, epochs: int | None = None, **kwargs: Any
    ) -> TaskReport:
        """Learn a classification task with zero new parameters (see :meth:`TaskLearner.learn_task`)."""
        return self.session.learn_task(task_id, train_data, epochs, **kwargs)

    def predict(self, text: str, task_id: str | int | None = None) -> str:
        """The label of ``text``; without ``task_id`` the router picks the task."""
        return self.session.predict(text, task_id)

    def evaluate(self, task_id: str | int, data: Any, **kwargs: Any) -> float:
        """Accuracy on labelled ``data`` for a learned task."""
        return self.session.evaluate(task_id, data, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Save what the strategy owns, the resolved config and the history (atomically); learned tasks
        too, in the same checkpoint (as their own part)."""
        return self.session.save(directory)

    def load(self, directory: str | Path) -> None:
        """Load a checkpoint into this model. Refused if it was made on another base model or strategy.

        The current state is only replaced once the whole checkpoint has been read and checked.
        """
        self.session.load(directory)

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, *, model: str | Backbone | None = None, **overrides: Any
    ) -> ContinualTransformer:
        """Rebuild the model a checkpoint was saved from (its config and base model) and load its state."""
        config, _ = checkpoint_config(directory)
        instance = cls(model if model is not None else config.model.name, config=config, **overrides)
        instance.load(directory)
        return instance

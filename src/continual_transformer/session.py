"""The session: a backbone, the document strategy and (once used) the task learner, built from a config.

A :class:`Session` is where the pieces meet, so it is where a config is checked against them: strategy names
against the registry and each strategy section against the config class its strategy registered
(:func:`resolve_config`). It owns their state, and every change to it (learning, resetting, loading) goes
through a :class:`Session` method, so there is one place to serialise writes. It writes one checkpoint
directory (:mod:`continual_transformer.checkpoint`) in which each component keeps its own part: the strategy
its tensors and extra state, the task learner its own; the base model is checked once, for all of them.

A session learns each document once: documents are identified by the SHA-256 of their normalised text
(:attr:`Document.content_sha256`), recorded in the history, and a repeat is reported as already learned.
Prompts longer than the model's context (less the tokens to generate) are refused before any work.
:func:`state_config` is the one rule for the config a command on a state directory runs with.

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

from continual_transformer.config import (
    Config,
    deep_merge,
    defaults_yaml,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    to_dict,
)
from continual_transformer.errors import CheckpointError, ConfigError, ContinualTransformerError
from continual_transformer.strategies import check_strategy_names, registry, strategy_config

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.documents import Document
    from continual_transformer.locking import StateLock
    from continual_transformer.strategies import LearnReport, Strategy, StrategyStats
    from continual_transformer.tasks import TaskLearner, TaskReport

logger = logging.getLogger(__name__)

STRATEGY_PART = "strategy"
"""Checkpoint part of the document strategy (its tensors and ``extra_state()``)."""
TASKS_PART = "tasks"
"""Checkpoint part of the task learner (its ``state_tensors()`` and ``checkpoint_manifest()``)."""


class InputError(ContinualTransformerError, ValueError):
    """A question or prompt that cannot be answered as given (empty, or longer than the model reads)."""


class PromptTooLongError(InputError):
    """A prompt that, with the tokens to generate, does not fit in the model's context."""


ALREADY_LEARNED = "already_learned"
"""Key of :attr:`LearnReport.extra` naming the earlier document when :meth:`Session.learn` skipped a
repeat."""


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
        self._learned: dict[str, str] = {}  # content SHA-256 -> doc id, for the documents in the history
        self._tasks: TaskLearner | None = None

    # -- documents ------------------------------------------------------------------------------------------
    def learn(self, document: Document) -> LearnReport:
        """Learn one document with the strategy and record it in the history.

        A document whose normalised text was learned already is not learned again: the report then has no
        tokens and ``extra[ALREADY_LEARNED]`` is the id it was learned under.
        """
        from continual_transformer.strategies import LearnReport

        key = document.content_sha256
        if key in self._learned:
            logger.info(
                "%s was already learned (as %s); not learning it again", document.id, self._learned[key]
            )
            return LearnReport(
                doc_id=document.id,
                tokens=0,
                loss_before=None,
                loss_after=None,
                seconds=0.0,
                extra={ALREADY_LEARNED: self._learned[key]},
            )
        return self._record(document, self.strategy.learn(document))

    def learn_documents(self, documents: Iterable[Document]) -> list[LearnReport]:
        """Learn documents that arrive together in one run of the strategy
        (:meth:`~continual_transformer.strategies.Strategy.learn_documents`: one training over all their
        examples for strategies that train weights); each is recorded as :meth:`learn` records it. Documents
        learned already (or repeated in the batch) are not learned again, as in :meth:`learn`."""
        documents = list(documents)
        fresh: dict[str, Document] = {}
        for document in documents:
            if document.content_sha256 not in self._learned:
                fresh.setdefault(document.content_sha256, document)
        reports = {
            id(d): self._record(d, r)
            for d, r in zip(fresh.values(), self.strategy.learn_documents(list(fresh.values())))
        }
        return [reports[id(d)] if id(d) in reports else self.learn(d) for d in documents]

    def _record(self, document: Document, report: LearnReport) -> LearnReport:
        """Note a learned document in the history and the content index."""
        key = document.content_sha256
        self._learned[key] = document.id
        self.history.append(
            {
                "doc_id": document.id,
                "source": document.source,
                "sha256": document.sha256,
                "content_sha256": key,
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
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Continuations of each prompt, answered with what the strategy has learned; ``generate_kwargs``
        go to ``model.generate`` (sampling settings, a ``streamer``).

        :class:`PromptTooLongError` before any work when a prompt does not fit (:meth:`check_prompts`).
        """
        prompts = list(prompts)
        self.check_prompts(prompts, chat=chat, max_new_tokens=max_new_tokens)
        return self.strategy.generate(prompts, chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs)

    def ask(self, question: str, *, max_new_tokens: int | None = None) -> str:
        """Answer one question through the chat template."""
        if not question.strip():
            raise InputError("question is empty")
        return self.generate([question], chat=True, max_new_tokens=max_new_tokens)[0]

    def check_prompts(
        self, prompts: Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> None:
        """Refuse prompts whose tokens (as the model sees them, chat template included) plus the tokens to
        generate exceed the model's context: the model would read a truncated or garbled prompt."""
        backbone = self.backbone
        limit = backbone.max_length
        new_tokens = max_new_tokens or backbone.generation.max_new_tokens
        for index, prompt in enumerate(prompts):
            text = backbone.format_prompt(prompt, chat=chat)
            tokens = len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokens + new_tokens > limit:
                which = "prompt" if len(prompts) == 1 else f"prompt {index}"
                raise PromptTooLongError(
                    f"{which} is {tokens} tokens; with {new_tokens} tokens to generate that exceeds the "
                    f"context of {backbone.name} ({limit} tokens): shorten it to at most "
                    f"{max(limit - new_tokens, 0)} tokens"
                )

    def stats(self) -> StrategyStats:
        return self.strategy.stats()

    def reset(self) -> None:
        """Forget every document learned (the strategy's state and the history); learned tasks stay."""
        self.strategy.reset()
        self.history.clear()
        self._learned.clear()

    def forget(self, doc_id: str) -> None:
        """Forget one document (strategies that can; :class:`CannotForgetError` otherwise, ``KeyError`` when
        no such document was learned): the strategy's state and the history lose it; learning its text
        again learns it anew."""
        if not any(h.get("doc_id") == doc_id for h in self.history):
            raise KeyError(doc_id)
        self.strategy.forget(doc_id)
        self.history = [h for h in self.history if h.get("doc_id") != doc_id]
        self._learned = {k: v for k, v in self._learned.items() if v != doc_id}

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
    def save(self, directory: str | Path, *, lock: StateLock | None = None) -> Path:
        """Write one checkpoint (crash-safe): the resolved config, the history, the base model's identity
        and a part per component (the strategy's; the task learner's once it holds tasks).

        Only the tensor files whose content changed are written. ``lock``: the directory's lock when the
        caller holds it (for load, learn and save as one step); otherwise it is taken for the write.
        """
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
            directory, config_yaml=dump_yaml(self.config), manifest=manifest, parts=parts, lock=lock
        )

    def load(self, directory: str | Path) -> None:
        """Replace this session's state by a checkpoint's. Refused, before anything changes, when it was made
        on another base model or with another strategy; a strategy whose state does not fit its config is
        refused too (the task learner rolls itself back when its part does not fit)."""
        from continual_transformer import checkpoint

        manifest, tensors = checkpoint.read_checkpoint(directory, self.backbone.device)
        checkpoint.check_base_model(manifest.get("base_model"), self.backbone, directory)
        if manifest.get("strategy") != self.strategy.name:
            raise CheckpointError(
                f"checkpoint {directory} holds strategy {manifest.get('strategy')!r}, this model uses "
                f"{self.strategy.name!r}; use ContinualTransformer.from_checkpoint({str(directory)!r})"
            )
        parts = checkpoint.split_parts(tensors, manifest, directory)
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
        self._learned = {
            entry["content_sha256"]: entry.get("doc_id", "")
            for entry in self.history
            if isinstance(entry, dict) and "content_sha256" in entry
        }
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

    checkpoint.prepare_read(directory)
    manifest = checkpoint.read_manifest(directory)
    try:
        data = yaml.safe_load(checkpoint.read_config_yaml(directory, manifest)) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{directory}/config.yaml is corrupt: {exc}") from exc
    config = from_dict(Config, data)
    name = manifest.get("base_model", {}).get("name")
    if name:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=name))
    return config, manifest


def state_config(
    directory: str | Path | None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    set_items: Sequence[str] = (),
    *,
    reset: bool = False,
) -> Config:
    """The config a command on state ``directory`` runs with: the checkpoint's own when ``directory`` holds
    one (and ``reset`` is false), else the defaults; then ``config_file``, ``overrides`` (nested) and
    ``set_items`` (``key.path=value``) over it, in that order.

    Refused (:class:`CheckpointError`): another base model than the checkpoint's, or another strategy
    (unless ``reset``: the state is then started over). A file or a directory that holds other files but no
    checkpoint is refused too, before anything is loaded.
    """
    if config_file is not None and Path(config_file).is_dir():
        raise ConfigError(f"config file {config_file} is a directory; give a YAML file")
    if directory is None:
        return load_config(config_file, overrides, list(set_items))
    from continual_transformer import checkpoint

    if reset or checkpoint.prepare_read(directory) != "checkpoint":
        checkpoint.state_kind(directory)  # a file or a foreign directory is no state, even to reset
        return load_config(config_file, overrides, list(set_items))
    saved, _ = checkpoint_config(directory)
    data = to_dict(saved)
    if config_file is not None:
        data = deep_merge(data, read_yaml(config_file))
    if overrides:
        data = deep_merge(data, overrides)
    for item in set_items:
        data = deep_merge(data, parse_override(item))
    config = from_dict(Config, data)
    if config.model.name != saved.model.name:
        raise CheckpointError(
            f"state {directory} was made on base model {saved.model.name!r}, not {config.model.name!r}; "
            "use another state directory for another model"
        )
    if config.strategy != saved.strategy:
        raise CheckpointError(
            f"state {directory} holds strategy {saved.strategy!r}, not {config.strategy!r}; use another "
            "state directory, or reset this one (what it learned is then discarded)"
        )
    return config


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

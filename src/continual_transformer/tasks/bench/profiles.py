"""The settings each suite runs with: a ``quick`` profile (CPU, minutes) and the full one (one GPU), and how
overrides from a command line or a mapping are laid over them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from continual_transformer.config import deep_merge, from_dict, parse_override, to_dict
from continual_transformer.tasks.config import TaskBenchmarkSettings, TaskConfig
from continual_transformer.tasks.suites import SUITES

DEFAULT_DATA_DIR = "../shared/data"


def profile_settings(suite: str, *, quick: bool, data_dir: str = DEFAULT_DATA_DIR) -> TaskBenchmarkSettings:
    """The ``quick`` profile (CPU, minutes: few tasks, few examples per label) or the full one (one GPU)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    long_texts = suite in ("long15", "stream115")
    stream = suite == "stream115"
    clinc = suite in ("clinc150-10", "clinc150-50", "intents15", "stream115")  # out-of-scope split applies
    if quick:
        learner = TaskConfig(
            max_text_tokens=96 if long_texts else 32,
            eval_batch_size=8,
            batch_size=8,
            epochs=3,
            learning_rate=3e-3,
            pool_size=2,
            buffer_size=32,
            replay_batch_size=4,
            transfer_samples=16,
            distill_epochs=2,
            ewc_fisher_samples=8,
            router_samples=64,
            adapter_dim=8,
        )
        return TaskBenchmarkSettings(
            data_dir=data_dir,
            num_tasks=3 if not stream else 6,
            max_labels_per_task=5,
            max_train_per_label=6 if not long_texts else 8,
            max_test_per_label=2 if not long_texts else 6,
            eval_every=3 if stream else 1,
            unknown_tasks=clinc,
            learner=learner,
        )
    pool = {
        "clinc150-10": 4,
        "clinc150-50": 10,
        "banking77": 3,
        "long15": 5,
        "intents15": 5,
        "stream115": 10,
    }[suite]
    # (train, test) examples per label. Sized so that all seven methods finish in under 10 minutes per suite
    # on one H100 (bf16, 7 workers); intents15 keeps the 60 training examples per intent of the stream it
    # stands for. ``joint`` sees every example so far (a true multitask bound).
    per_label = {
        "clinc150-10": (24, 15),
        "clinc150-50": (24, 5),
        "banking77": (24, 15),
        "long15": (32, 16),
        "intents15": (60, 10),
        "stream115": (16, 5),
    }
    learner = TaskConfig(
        max_tasks=120 if stream else 50,
        max_text_tokens=(128 if stream else 256) if long_texts else 64,
        eval_batch_size=64,
        batch_size=32,
        epochs=3,
        learning_rate=1e-3,
        pool_size=pool,
        # 2,000 rows: 0.5 MB of token ids (1 MB for 128 tokens), an equal share per task for adapter_distill
        buffer_size=2000,
        replay_batch_size=16,
        transfer_samples=64,
        distill_epochs=2,
        ewc_fisher_samples=32,
        router_samples=256,
        adapter_dim=16,
        joint_max_examples=None,
        # the better router per suite (benchmarks/results/router)
        router="backbone" if suite == "long15" else "minilm",
    )
    return TaskBenchmarkSettings(
        data_dir=data_dir,
        max_train_per_label=per_label[suite][0],
        max_test_per_label=per_label[suite][1],
        eval_every=10 if stream else 1,
        unknown_tasks=clinc,
        learner=learner,
    )


def resolve_settings(
    suite: str,
    quick: bool,
    settings: TaskBenchmarkSettings | Mapping[str, Any] | None,
    data_dir: str | None = None,
) -> TaskBenchmarkSettings:
    """A settings object as given, or the profile with a mapping of overrides applied (``{"learner":
    {...}}``)."""
    if isinstance(settings, TaskBenchmarkSettings):
        return settings if data_dir is None else dataclasses.replace(settings, data_dir=data_dir)
    base = to_dict(profile_settings(suite, quick=quick, data_dir=data_dir or DEFAULT_DATA_DIR))
    for key, value in (settings or {}).items():
        if key == "learner" and isinstance(value, Mapping):
            base["learner"] = {**base["learner"], **value}
        else:
            base[key] = value
    return from_dict(TaskBenchmarkSettings, base, "bench")


def command_line_changes(
    *, order: int | None = None, num_tasks: int | None = None, overrides=(), seed: int = 0
) -> dict[str, Any]:
    """The overrides a command line gives, as a mapping for :func:`resolve_settings` (later ones win):
    ``order``, ``num_tasks``, then ``key=value`` strings (``learner.pool_size=4``), then a non-zero
    ``seed``."""
    changes: dict[str, Any] = {}
    if order is not None:
        changes["order"] = order
    if num_tasks is not None:
        changes["num_tasks"] = num_tasks
    for item in overrides:
        changes = deep_merge(changes, parse_override(item))
    if seed:
        changes = deep_merge(changes, {"learner": {"seed": seed}})
    return changes

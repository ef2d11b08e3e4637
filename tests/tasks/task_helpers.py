"""Shared helpers of the task-learning tests: tiny settings, synthetic tasks, one CPU thread.

Tiny models run fastest on one thread (and far faster than on two busy cores, where thread hand-offs
dominate), so every task test runs with one and restores the previous setting afterwards.
"""

from __future__ import annotations

import json

import pytest
import torch

from continual_transformer.tasks import TaskConfig

# Words the in-memory test tokenizer knows (tests/conftest.py CORPUS), in disjoint groups for separable tasks.
WORD_GROUPS = [
    ("capital", "Veloria", "Tarnhelm"),
    ("river", "Orvalis", "Quenmark"),
    ("born", "Brastow", "Mirela"),
    ("animal", "silver", "lynx"),
    ("France", "Paris", "boils"),
    ("fox", "lazy", "dog"),
    ("questions", "answers", "documents"),
    ("learning", "memory", "degrees"),
]


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> TaskConfig:
    settings = dict(
        method="adapter_distill",  # the pool mechanics most task tests exercise
        max_tasks=8,
        max_labels_per_task=4,
        max_label_bytes=24,
        max_task_id_bytes=16,
        max_text_tokens=16,
        eval_batch_size=16,
        pool_size=2,
        adapter_dim=4,
        epochs=2,
        batch_size=8,
        learning_rate=2e-2,
        distill_epochs=1,
        transfer_samples=8,
        buffer_size=12,
        replay_batch_size=4,
        ewc_fisher_samples=4,
        router_samples=16,
        lora_rank=2,
        router="backbone",
        router_layer=0,
    )
    settings.update(overrides)
    return TaskConfig(**settings)


def synthetic_task(index: int, per_label: int = 4) -> list[tuple[str, str]]:
    """Two labels; each label's texts repeat one group's words, so tasks are disjoint in vocabulary."""
    first, second = (
        WORD_GROUPS[(2 * index) % len(WORD_GROUPS)],
        WORD_GROUPS[(2 * index + 1) % len(WORD_GROUPS)],
    )
    data = []
    for n in range(per_label):
        data.append((f"{first[n % 3]} {first[(n + 1) % 3]} {first[(n + 2) % 3]}", f"{first[0]}_{index}"))
        data.append((f"{second[n % 3]} {second[(n + 1) % 3]} {second[(n + 2) % 3]}", f"{second[0]}_{index}"))
    return data


def write_clinc(root, domains: int = 3):
    """A CLINC150-shaped data directory: ``domains`` domains of two intents, 3 training and 1 test text
    each."""
    folder = root / "clinc150"
    folder.mkdir(parents=True)
    intents = {f"domain{d}": [f"intent_{d}_{j}" for j in range(2)] for d in range(domains)}
    rows = {"train": [], "test": []}
    for d, names in enumerate(intents.values()):
        for j, intent in enumerate(names):
            words = WORD_GROUPS[(2 * d + j) % len(WORD_GROUPS)]
            for n in range(4):
                rows["train" if n < 3 else "test"].append([f"{words[n % 3]} {words[(n + 1) % 3]}", intent])
    (folder / "domains.json").write_text(json.dumps(intents), encoding="utf-8")
    (folder / "data_full.json").write_text(json.dumps(rows), encoding="utf-8")

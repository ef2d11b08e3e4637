"""Task sequences built from the datasets in the data directory (``../shared/data`` in a checkout).

=============  =============================================================================================
suite          tasks
=============  =============================================================================================
clinc150-10    the 10 CLINC150 domains of ``domains.json``, 15 intents each (train / test splits)
clinc150-50    the 150 intents in domain order, cut into 50 tasks of 3 (5 per domain)
banking77      the 77 Banking77 intents in ``categories.json`` order, cut into 7 tasks of 11
long15         the long sequence of Razdaibiedina et al. 2023 / O-LoRA (orders 4, 5, 6) from ``cl_benchmark``;
               Yahoo Answers ships without data here, so it has 14 tasks. Yelp, IMDB and MultiRC have no
               test split and DBpedia no train split: those are split 80/20 with a fixed seed.
intents15      a stream no setting was tuned on: the 227 intents of CLINC150 and Banking77 shuffled with a
               fixed seed and cut into 15 tasks of 2 to 10 intents (sizes drawn with the same seed)
stream115      115 tasks in one stream: CLINC150 as 75 tasks of 2 intents, Banking77 as 26 tasks of 3 (the
               last of 2), then long15 (order 0, 14 tasks)
=============  =============================================================================================

Nothing is copied: files are read from the data directory.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from continual_transformer.tasks.data import LabeledExample, TaskDataError, read_labeled_file

logger = logging.getLogger(__name__)

SUITES = ("clinc150-10", "clinc150-50", "banking77", "long15", "intents15", "stream115")

_INTENTS15_SEED = 15

LONG15_FOLDERS = {
    "mnli": "NLI/MNLI",
    "cb": "NLI/CB",
    "rte": "NLI/RTE",
    "wic": "WiC/WiC",
    "copa": "COPA/COPA",
    "qqp": "QQP/QQP",
    "boolqa": "BoolQA/BoolQA",
    "multirc": "MultiRC/MultiRC",
    "imdb": "SC/IMDB",
    "sst-2": "SC/SST-2",
    "yelp": "SC/yelp",
    "amazon": "SC/amazon",
    "dbpedia": "TC/dbpedia",
    "agnews": "TC/agnews",
    "yahoo": "TC/yahoo",
}
LONG15_ORDERS = (
    (
        "mnli",
        "cb",
        "wic",
        "copa",
        "qqp",
        "boolqa",
        "rte",
        "imdb",
        "yelp",
        "amazon",
        "sst-2",
        "dbpedia",
        "agnews",
        "multirc",
        "yahoo",
    ),
    (
        "multirc",
        "boolqa",
        "wic",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst-2",
        "dbpedia",
        "agnews",
        "yelp",
        "amazon",
        "yahoo",
    ),
    (
        "yelp",
        "amazon",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst-2",
        "dbpedia",
        "agnews",
        "yahoo",
        "multirc",
        "boolqa",
        "wic",
    ),
)
"""Orders 4, 5 and 6 of the long sequence (O-LoRA, Wang et al. 2023, Table 7)."""

_SPLIT_SEED = 20240601


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: its name, label set (prompt order) and examples."""

    name: str
    labels: tuple[str, ...]
    train: tuple[LabeledExample, ...]
    test: tuple[LabeledExample, ...]


def load_suite(
    name: str,
    data_dir: str | Path,
    *,
    order: int = 0,
    num_tasks: int | None = None,
    max_train_per_label: int | None = None,
    max_test_per_label: int | None = None,
    max_labels_per_task: int | None = None,
) -> list[TaskSpec]:
    """The task sequence of suite ``name`` (see the module table), cut to the requested sizes."""
    data_dir = Path(data_dir)
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    if not data_dir.is_dir():
        raise TaskDataError(
            data_dir, "data directory not found (set it with data_dir=, default ../shared/data)"
        )
    if name.startswith("clinc150"):
        tasks = _clinc(data_dir / "clinc150", per_task=15 if name == "clinc150-10" else 3)
    elif name == "banking77":
        tasks = _banking(data_dir / "banking77", per_task=11)
    elif name == "intents15":
        tasks = _intents15(data_dir)
    elif name == "stream115":
        tasks = [
            *_clinc(data_dir / "clinc150", per_task=2, across_domains=True),
            *_banking(data_dir / "banking77", per_task=3),
            *_long15(data_dir / "cl_benchmark", 0),
        ]
    else:
        tasks = _long15(data_dir / "cl_benchmark", order)
    if name not in ("long15", "stream115") and order > 0:
        random.Random(order).shuffle(tasks)
    if num_tasks is not None:
        tasks = tasks[:num_tasks]
    if max_labels_per_task is not None:
        tasks = [
            TaskSpec(
                t.name,
                t.labels[:max_labels_per_task],
                _group(t.train, t.labels[:max_labels_per_task]),
                _group(t.test, t.labels[:max_labels_per_task]),
            )
            for t in tasks
        ]
    return [
        TaskSpec(t.name, t.labels, _cap(t.train, max_train_per_label), _cap(t.test, max_test_per_label))
        for t in tasks
    ]


def _cap(examples: Sequence[LabeledExample], per_label: int | None) -> tuple[LabeledExample, ...]:
    """At most ``per_label`` examples of each label, the first ones in file order."""
    if per_label is None:
        return tuple(examples)
    counts: dict[str, int] = defaultdict(int)
    kept = []
    for e in examples:
        if counts[e.label] < per_label:
            counts[e.label] += 1
            kept.append(e)
    return tuple(kept)


def _group(examples: Sequence[LabeledExample], labels: Sequence[str]) -> tuple[LabeledExample, ...]:
    wanted = set(labels)
    return tuple(e for e in examples if e.label in wanted)


def _read_json(path: Path):
    if not path.exists():
        raise TaskDataError(path, "no such file (is the data directory complete?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from exc


def _clinc(folder: Path, per_task: int, *, across_domains: bool = False) -> list[TaskSpec]:
    """Tasks of ``per_task`` intents cut within each domain, or (``across_domains``) from all intents in
    domain order."""
    domains = _read_json(folder / "domains.json")
    train = read_labeled_file(folder / "data_full.json", split="train")
    test = read_labeled_file(folder / "data_full.json", split="test")
    if across_domains:
        intents = [intent for names in domains.values() for intent in names]
        return [
            TaskSpec(
                f"clinc150-{k // per_task}",
                tuple(intents[k : k + per_task]),
                _group(train, intents[k : k + per_task]),
                _group(test, intents[k : k + per_task]),
            )
            for k in range(0, len(intents), per_task)
        ]
    tasks = []
    for domain, intents in domains.items():
        for k in range(0, len(intents), per_task):
            labels = tuple(intents[k : k + per_task])
            name = domain if per_task >= len(intents) else f"{domain}-{k // per_task}"
            tasks.append(TaskSpec(name, labels, _group(train, labels), _group(test, labels)))
    return tasks


def _banking(folder: Path, per_task: int) -> list[TaskSpec]:
    categories = _read_json(folder / "categories.json")
    train = read_labeled_file(folder / "train.csv")
    test = read_labeled_file(folder / "test.csv")
    tasks = []
    for k in range(0, len(categories), per_task):
        labels = tuple(categories[k : k + per_task])
        tasks.append(
            TaskSpec(f"banking77-{k // per_task}", labels, _group(train, labels), _group(test, labels))
        )
    return tasks


def _intents15(data_dir: Path) -> list[TaskSpec]:
    """15 tasks of 2-10 intents drawn from CLINC150 and Banking77 together (seeded; see the module table)."""
    pools = []
    for tasks in (_clinc(data_dir / "clinc150", per_task=15), _banking(data_dir / "banking77", per_task=77)):
        for task in tasks:
            for label in task.labels:
                pools.append(
                    (
                        label,
                        tuple(e for e in task.train if e.label == label),
                        tuple(e for e in task.test if e.label == label),
                    )
                )
    rng = random.Random(_INTENTS15_SEED)
    rng.shuffle(pools)
    sizes = [rng.randint(2, 10) for _ in range(15)]
    tasks, start = [], 0
    for k, size in enumerate(sizes):
        chosen = pools[start : start + size]
        start += size
        tasks.append(
            TaskSpec(
                f"intents15-{k}",
                tuple(label for label, _, _ in chosen),
                tuple(e for _, train, _ in chosen for e in train),
                tuple(e for _, _, test in chosen for e in test),
            )
        )
    return tasks


def _long15(folder: Path, order: int) -> list[TaskSpec]:
    if order >= len(LONG15_ORDERS):
        raise ValueError(f"long15 has orders 0, 1, 2 (orders 4, 5, 6 of O-LoRA), got {order}")
    tasks = []
    for name in LONG15_ORDERS[order]:
        task_dir = folder / LONG15_FOLDERS[name]
        labels = tuple(_read_json(task_dir / "labels.json"))
        has_train, has_test = (task_dir / "train.json").exists(), (task_dir / "test.json").exists()
        if not has_train and not has_test:
            logger.warning("long15: %s has no data in %s; skipped", name, task_dir)
            continue
        if has_train and has_test:
            train, test = (
                read_labeled_file(task_dir / "train.json"),
                read_labeled_file(task_dir / "test.json"),
            )
        else:
            only = read_labeled_file(task_dir / ("train.json" if has_train else "test.json"))
            train, test = _split(only)
        known = set(labels)
        dropped = sum(e.label not in known for e in (*train, *test))
        if dropped:  # MNLI marks examples without a gold label "-"
            logger.info("long15: %s: %d examples whose label is not in labels.json dropped", name, dropped)
        tasks.append(
            TaskSpec(
                name,
                labels,
                tuple(e for e in train if e.label in known),
                tuple(e for e in test if e.label in known),
            )
        )
    return tasks


def _split(
    examples: Sequence[LabeledExample], test_fraction: float = 0.2
) -> tuple[list[LabeledExample], list[LabeledExample]]:
    """A deterministic shuffled 80/20 split (same result on every machine and run)."""
    order = list(range(len(examples)))
    random.Random(_SPLIT_SEED).shuffle(order)
    cut = int(len(order) * (1 - test_fraction))
    return [examples[i] for i in sorted(order[:cut])], [examples[i] for i in sorted(order[cut:])]

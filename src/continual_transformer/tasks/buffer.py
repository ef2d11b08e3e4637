"""A fixed-size replay buffer of tokenised examples (reservoir sampling, or an equal share per task).

Its memory is allocated once: ``capacity`` rows of ``max_tokens`` token ids (int32) plus length, task and
label per row, so its bytes are the same after the first task and after the fiftieth. Reservoir sampling
(Vitter's algorithm R) keeps every example offered so far with equal probability ``capacity / seen``; with
``balanced=True`` every task seen keeps an equal share (``capacity // tasks``, rows spread over its labels),
so the first tasks are not thinned out by later, larger ones and a task's share never depends on its size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from continual_transformer.tasks.prompts import Encoded
from continual_transformer.tasks.state import TensorState


class ReplayBuffer(TensorState):
    def __init__(self, capacity: int, max_tokens: int, *, seed: int = 0, balanced: bool = False) -> None:
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.seed = seed
        self.balanced = balanced
        self.tokens = torch.zeros(capacity, max_tokens, dtype=torch.int32)
        self.lengths = torch.zeros(capacity, dtype=torch.int32)
        self.tasks = torch.full((capacity,), -1, dtype=torch.int32)
        self.labels = torch.full((capacity,), -1, dtype=torch.int32)
        self.seen = torch.zeros((), dtype=torch.int64)

    def __len__(self) -> int:
        if self.balanced:
            return int((self.tasks >= 0).sum())
        return min(int(self.seen), self.capacity)

    def add(self, examples: Sequence[Encoded]) -> None:
        """Offer examples to the buffer (deterministic given the seed and how many were offered before)."""
        if self.balanced:
            self._add_balanced(examples)
            return
        seen = int(self.seen)
        rng = random.Random(self.seed * 1_000_003 + seen)
        for example in examples:
            if seen < self.capacity:
                row = seen
            else:
                row = rng.randrange(seen + 1)
            seen += 1
            if row < self.capacity:
                self._write(row, example)
        self.seen.fill_(seen)

    def _write(self, row: int, example: Encoded) -> None:
        ids = example.text_ids[: self.max_tokens]
        self.tokens[row].zero_()
        self.tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.lengths[row] = len(ids)
        self.tasks[row] = example.task
        self.labels[row] = example.label

    def _add_balanced(self, examples: Sequence[Encoded]) -> None:
        """Equal shares per task: the tasks already held give up rows (their last ones, labels kept spread)
        until the new examples' task has ``capacity // tasks`` rows. Offering more examples of a task it
        holds already replaces part of that task's rows (newest kept)."""
        if not examples:
            return
        task = examples[0].task
        if any(e.task != task for e in examples):
            raise ValueError("a balanced buffer takes the examples of one task at a time")
        rng = random.Random(self.seed * 1_000_003 + int(self.seen))
        held = self.tasks[: len(self)].tolist()
        tasks = sorted(set(held) | {task})
        share = max(1, self.capacity // len(tasks))
        # Rows of each task, spread over its labels (round-robin by label), so cutting from the end keeps
        # every label.
        keep: list[Encoded] = []
        for other in tasks:
            if other == task:
                continue
            rows = [r for r, t in enumerate(held) if t == other]
            keep += [self.example(r) for r in _spread([int(self.labels[r]) for r in rows], rows)[:share]]
        own = [self.example(r) for r, t in enumerate(held) if t == task]
        fresh = list(examples)
        rng.shuffle(fresh)
        mine = fresh + own  # the newest examples first
        mine = [mine[i] for i in _spread([e.label for e in mine], list(range(len(mine))))]
        keep += mine[: self.capacity - len(keep)]  # the newest task may use the room others leave
        self.tokens.zero_()
        self.lengths.zero_()
        self.tasks.fill_(-1)
        self.labels.fill_(-1)
        for row, example in enumerate(keep):
            self._write(row, example)
        self.seen.fill_(int(self.seen) + len(examples))

    def example(self, row: int) -> Encoded:
        n = int(self.lengths[row])
        return Encoded(tuple(self.tokens[row, :n].tolist()), int(self.tasks[row]), int(self.labels[row]))

    def examples(self, tasks: Sequence[int] | None = None) -> list[Encoded]:
        """Stored examples, optionally only those of ``tasks``."""
        rows = range(len(self))
        if tasks is not None:
            wanted = set(tasks)
            rows = [r for r in rows if int(self.tasks[r]) in wanted]
        return [self.example(r) for r in rows]

    def sample(self, n: int, rng: random.Random) -> list[Encoded]:
        size = len(self)
        if size == 0 or n <= 0:
            return []
        return [self.example(rng.randrange(size)) for _ in range(n)]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens,
            "lengths": self.lengths,
            "tasks": self.tasks,
            "labels": self.labels,
            "seen": self.seen,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_tensors()
        if set(tensors) != set(own):
            raise ValueError(f"replay buffer tensors differ: {sorted(set(tensors) ^ set(own))}")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
                raise ValueError(
                    f"replay buffer tensor {name}: {tuple(tensor.shape)} {tensor.dtype} does not match "
                    f"{tuple(own[name].shape)} {own[name].dtype}"
                )
            own[name].copy_(tensor)


def _spread(labels: Sequence[int], rows: Sequence[int]) -> list[int]:
    """``rows`` reordered round-robin over their labels (first row of each label, then the second...)."""
    queues: dict[int, list[int]] = {}
    for label, row in zip(labels, rows):
        queues.setdefault(label, []).append(row)
    out, depth = [], 0
    while len(out) < len(rows):
        for queue in queues.values():
            if depth < len(queue):
                out.append(queue[depth])
        depth += 1
    return out

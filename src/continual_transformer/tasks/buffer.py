"""A fixed-size replay buffer of tokenised examples (reservoir sampling over every example ever offered).

Its memory is allocated once: ``capacity`` rows of ``max_tokens`` token ids (int32) plus length, task and
label per row, so its bytes are the same after the first task and after the fiftieth. Reservoir sampling
(Vitter's algorithm R) keeps every example offered so far with equal probability ``capacity / seen``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from continual_transformer.tasks.prompts import Encoded
from continual_transformer.tasks.state import TensorState


class ReplayBuffer(TensorState):
    def __init__(self, capacity: int, max_tokens: int, *, seed: int = 0) -> None:
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.seed = seed
        self.tokens = torch.zeros(capacity, max_tokens, dtype=torch.int32)
        self.lengths = torch.zeros(capacity, dtype=torch.int32)
        self.tasks = torch.full((capacity,), -1, dtype=torch.int32)
        self.labels = torch.full((capacity,), -1, dtype=torch.int32)
        self.seen = torch.zeros((), dtype=torch.int64)

    def __len__(self) -> int:
        return min(int(self.seen), self.capacity)

    def add(self, examples: Sequence[Encoded]) -> None:
        """Offer examples to the reservoir (deterministic given the seed and how many were offered before)."""
        seen = int(self.seen)
        rng = random.Random(self.seed * 1_000_003 + seen)
        for example in examples:
            if seen < self.capacity:
                row = seen
            else:
                row = rng.randrange(seen + 1)
            seen += 1
            if row < self.capacity:
                ids = example.text_ids[: self.max_tokens]
                self.tokens[row].zero_()
                self.tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
                self.lengths[row] = len(ids)
                self.tasks[row] = example.task
                self.labels[row] = example.label
        self.seen.fill_(seen)

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

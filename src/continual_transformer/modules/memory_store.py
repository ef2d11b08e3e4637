"""A bounded bank of memories: unit key vectors, value vectors, gates and importance scores, in preallocated
tensors.

Retrieval ranks memories by ``cosine similarity × importance`` among those whose similarity passes a
threshold; a retrieved memory's importance grows by a bonus each time it is used. When the bank is full, the
least important memory (the oldest among equals) makes room. Near-duplicates (cosine above a threshold) are
found with one matmul.
"""

from __future__ import annotations

import torch


class MemoryStore:
    """``capacity`` memories of key size ``key_dim`` and value size ``value_dim``."""

    def __init__(
        self, key_dim: int, value_dim: int, *, capacity: int, device: torch.device | str = "cpu"
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.capacity = capacity
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        n, dev = self.capacity, self.device
        self.keys = torch.zeros(n, self.key_dim, device=dev)
        self.values = torch.zeros(n, self.value_dim, device=dev)
        self.gate_logits = torch.zeros(n, device=dev)
        self.importance = torch.zeros(n, device=dev)
        self.uses = torch.zeros(n, dtype=torch.long, device=dev)
        self.created = torch.zeros(n, dtype=torch.long, device=dev)
        self.size = 0
        self.clock = 0

    _FIELDS = ("keys", "values", "gate_logits", "importance", "uses", "created")

    # -- writing --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(
        self, key: torch.Tensor, value: torch.Tensor, *, gate_logit: float, importance: float
    ) -> tuple[int, int | None]:
        """Store one memory; returns (slot, evicted slot or None). ``key`` is normalised here."""
        evicted = None
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        else:
            # The least important memory goes; among equals the oldest.
            current = self.importance[: self.size]
            lowest = torch.nonzero(current == current.min()).squeeze(1)
            slot = int(lowest[torch.argmin(self.created[lowest])])
            evicted = slot
        self.write(slot, key, value, gate_logit=gate_logit, importance=importance)
        return slot, evicted

    @torch.no_grad()
    def write(
        self, slot: int, key: torch.Tensor, value: torch.Tensor, *, gate_logit: float, importance: float
    ) -> None:
        self.keys[slot] = torch.nn.functional.normalize(key.float().to(self.device), dim=-1)
        self.values[slot] = value.float().to(self.device)
        self.gate_logits[slot] = gate_logit
        self.importance[slot] = importance
        self.uses[slot] = 0
        self.created[slot] = self.clock
        self.clock += 1

    @torch.no_grad()
    def reinforce(self, slots: torch.Tensor, bonus: float) -> None:
        """Count a use of each slot and raise its importance by ``bonus``."""
        if slots.numel():
            slots = slots.reshape(-1).to(self.device)
            self.uses.index_add_(0, slots, torch.ones_like(slots))
            self.importance.index_add_(0, slots, torch.full(slots.shape, float(bonus), device=self.device))

    # -- reading --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (Q, size) of unit ``queries`` with every stored key."""
        return queries.float().to(self.device) @ self.keys[: self.size].T

    @torch.no_grad()
    def duplicates(self, keys: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For each key: (best cosine with a stored key, its slot), -inf/-1 when the bank is empty."""
        if self.size == 0:
            n = keys.shape[0]
            return torch.full((n,), float("-inf"), device=self.device), torch.full(
                (n,), -1, dtype=torch.long, device=self.device
            )
        best, slot = self.similarity(keys).max(dim=-1)
        return best, slot

    @torch.no_grad()
    def retrieve(
        self, queries: torch.Tensor, k: int, min_similarity: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` memories of each query by similarity × importance among those with similarity >=
        threshold.

        Returns (slots (Q, k'), similarities (Q, k'), valid (Q, k') bool); k' = min(k, size).
        """
        q = queries.shape[0]
        k = min(k, self.size)
        if k == 0:
            empty = torch.zeros(q, 0, device=self.device)
            return empty.long(), empty, empty.bool()
        sims = self.similarity(queries)  # (Q, N)
        score = torch.where(
            sims >= min_similarity, sims * self.importance[: self.size], torch.full_like(sims, float("-inf"))
        )
        top, slots = torch.topk(score, k, dim=-1)
        return slots, sims.gather(1, slots), torch.isfinite(top)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        state = {f"{prefix}{name}": getattr(self, name)[: self.size] for name in self._FIELDS}
        state[f"{prefix}clock"] = torch.tensor([self.clock], dtype=torch.long, device=self.device)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        n = state[f"{prefix}keys"].shape[0]
        if n > self.capacity:
            raise ValueError(f"{prefix}keys: {n} memories exceed the capacity of {self.capacity}")
        shapes = {"keys": (n, self.key_dim), "values": (n, self.value_dim)}
        for name in self._FIELDS:
            tensor = state[f"{prefix}{name}"]
            expected = shapes.get(name, (n,))
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{prefix}{name}: expected shape {expected}, got {tuple(tensor.shape)}")
        self.clear()
        for name in self._FIELDS:
            getattr(self, name)[:n] = state[f"{prefix}{name}"].to(self.device)
        self.size = n
        self.clock = int(state[f"{prefix}clock"].reshape(-1)[0])

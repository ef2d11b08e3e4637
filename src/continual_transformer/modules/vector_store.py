"""A key/value vector store for nearest-neighbour search, preallocated and searched in batches.

Keys live in one preallocated ``(capacity, dim)`` tensor with a size counter: inserting writes into free rows
(no ``torch.cat`` per insert). An unbounded store doubles its buffers when full (amortised O(1) per key); a
bounded store (``capacity > 0``) evicts instead, ``fifo`` (oldest inserted first) or ``lru`` (least recently
retrieved first; insertion counts as a use). Search is a batched matmul plus ``topk`` over all keys, with
queries processed in blocks so the distance matrix stays within a memory budget.

Distances: ``l2`` is the squared Euclidean distance; ``cosine`` stores unit keys and returns the squared
Euclidean distance between unit vectors, ``2 - 2·cos`` (in ``[0, 4]``), so both metrics read "smaller is
closer".
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_BLOCK_ELEMENTS = 1 << 24  # distance-matrix entries computed at once (64 MiB of float32)


class VectorStore:
    """Keys ``(N, dim)`` with one integer value each (a token id, a chunk index, ...)."""

    def __init__(
        self,
        dim: int,
        *,
        capacity: int = 0,
        initial_capacity: int = 1024,
        eviction: str = "fifo",
        metric: str = "l2",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if eviction not in ("fifo", "lru"):
            raise ValueError(f"eviction must be fifo or lru, got {eviction!r}")
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be l2 or cosine, got {metric!r}")
        if capacity < 0 or initial_capacity < 1:
            raise ValueError("capacity must be >= 0 (0: unbounded) and initial_capacity >= 1")
        self.dim = dim
        self.capacity = capacity
        self.initial_capacity = initial_capacity
        self.eviction = eviction
        self.metric = metric
        self.dtype = dtype
        self.device = torch.device(device)
        self.clear()

    # -- storage --------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self._allocate(min(self.initial_capacity, self.capacity) if self.capacity else self.initial_capacity)
        self.size = 0
        self.clock = 0  # advances with every insert (per key) and every search (per call)

    def _allocate(self, rows: int) -> None:
        self.keys = torch.zeros(rows, self.dim, dtype=self.dtype, device=self.device)
        self.sq_norms = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self.values = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.inserted_at = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.last_used = torch.zeros(rows, dtype=torch.long, device=self.device)

    @property
    def allocated(self) -> int:
        return self.keys.shape[0]

    def _grow(self, needed: int) -> None:
        rows = self.allocated
        while rows < needed:
            rows *= 2
        if self.capacity:
            rows = min(rows, self.capacity)
        if rows == self.allocated:
            return
        old = (self.keys, self.sq_norms, self.values, self.inserted_at, self.last_used)
        self._allocate(rows)
        for new, previous in zip(
            (self.keys, self.sq_norms, self.values, self.inserted_at, self.last_used), old
        ):
            new[: self.size] = previous[: self.size]
        logger.debug("vector store grown to %d rows", rows)

    def _prepare(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.detach().to(device=self.device, dtype=torch.float32)
        if self.metric == "cosine":
            keys = torch.nn.functional.normalize(keys, dim=-1)
        return keys

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Insert ``keys`` (n, dim) with ``values`` (n,); returns the rows they were written to.

        A bounded store that is full evicts (``fifo``/``lru``); if ``n`` exceeds the capacity only the last
        ``capacity`` keys are kept.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        if values.shape != keys.shape[:1]:
            raise ValueError(f"values must be ({keys.shape[0]},), got {tuple(values.shape)}")
        n = keys.shape[0]
        if self.capacity and n > self.capacity:
            keys, values, n = keys[-self.capacity :], values[-self.capacity :], self.capacity
        keys = self._prepare(keys)
        limit = self.capacity or (self.size + n)
        self._grow(min(self.size + n, limit))
        free = min(n, limit - self.size)
        rows = torch.arange(self.size, self.size + free, device=self.device)
        evict = n - free
        if evict:
            priority = self.inserted_at if self.eviction == "fifo" else self.last_used
            victims = torch.topk(priority[: self.size], evict, largest=False).indices
            rows = torch.cat([rows, victims])
        self.keys[rows] = keys.to(self.dtype)
        self.sq_norms[rows] = self.keys[rows].float().pow(2).sum(-1)
        self.values[rows] = values.to(device=self.device, dtype=torch.long)
        stamps = torch.arange(self.clock, self.clock + n, device=self.device)
        self.inserted_at[rows] = stamps
        self.last_used[rows] = stamps
        self.clock += n
        self.size += free
        return rows

    @torch.no_grad()
    def keep(self, mask: torch.Tensor) -> None:
        """Compact the store to the rows where ``mask`` (size,) is true, preserving order."""
        index = mask[: self.size].nonzero().squeeze(1)
        for buffer in (self.keys, self.sq_norms, self.values, self.inserted_at, self.last_used):
            buffer[: index.numel()] = buffer[index].clone()
        self.size = index.numel()

    # -- search ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, *, mark_used: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (M, k') and rows (M, k') of the ``k' = min(k, size)`` nearest keys of each query, nearest
        first."""
        m = queries.shape[0]
        k = min(k, self.size)
        if k == 0:
            empty = torch.zeros(m, 0, device=self.device)
            return empty, empty.long()
        queries = self._prepare(queries)
        keys = self.keys[: self.size]
        q_sq = queries.pow(2).sum(-1, keepdim=True)
        block = max(1, _BLOCK_ELEMENTS // self.size)
        dists, rows = [], []
        for start in range(0, m, block):
            q = queries[start : start + block]
            scores = q.to(self.dtype) @ keys.T  # (b, N)
            dist = (q_sq[start : start + block] - 2 * scores.float() + self.sq_norms[: self.size]).clamp_(
                min=0
            )
            d, i = torch.topk(dist, k, dim=-1, largest=False)
            dists.append(d)
            rows.append(i)
        dist_all, rows_all = torch.cat(dists), torch.cat(rows)
        if mark_used:
            self.touch(rows_all)
        return dist_all, rows_all

    @torch.no_grad()
    def touch(self, rows: torch.Tensor) -> None:
        """Mark rows as used now (``lru`` eviction keeps them longest)."""
        if rows.numel():
            self.last_used[rows.reshape(-1)] = self.clock
            self.clock += 1

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        n = self.size
        return {
            f"{prefix}keys": self.keys[:n],
            f"{prefix}values": self.values[:n],
            f"{prefix}inserted_at": self.inserted_at[:n],
            f"{prefix}last_used": self.last_used[:n],
            f"{prefix}clock": torch.tensor([self.clock], dtype=torch.long, device=self.device),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        keys = state[f"{prefix}keys"]
        n = keys.shape[0]
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"{prefix}keys: expected (n, {self.dim}), got {tuple(keys.shape)}")
        if self.capacity and n > self.capacity:
            raise ValueError(f"{prefix}keys: {n} keys exceed the store's capacity of {self.capacity}")
        for name in ("values", "inserted_at", "last_used"):
            if state[f"{prefix}{name}"].shape != (n,):
                raise ValueError(
                    f"{prefix}{name}: expected ({n},), got {tuple(state[f'{prefix}{name}'].shape)}"
                )
        rows = max(n, min(self.initial_capacity, self.capacity) if self.capacity else self.initial_capacity)
        self._allocate(rows)
        self.keys[:n] = keys.to(device=self.device, dtype=self.dtype)
        self.sq_norms[:n] = self.keys[:n].float().pow(2).sum(-1)
        self.values[:n] = state[f"{prefix}values"].to(self.device)
        self.inserted_at[:n] = state[f"{prefix}inserted_at"].to(self.device)
        self.last_used[:n] = state[f"{prefix}last_used"].to(self.device)
        self.clock = int(state[f"{prefix}clock"].reshape(-1)[0])
        self.size = n

    def nbytes(self) -> int:
        """Bytes allocated (not just used) by the store's buffers."""
        buffers = (self.keys, self.sq_norms, self.values, self.inserted_at, self.last_used)
        return sum(b.numel() * b.element_size() for b in buffers)

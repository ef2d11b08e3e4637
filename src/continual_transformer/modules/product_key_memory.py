"""A product-key memory layer (Lample et al. 2019; Berges et al. 2024) whose values are written sparsely.

A token's hidden state ``x`` (D,) becomes, per head, a query ``q = W_h ((x - mu) / sigma)`` (Q,), split into
two halves of Q/2. Each half is scored against its own ``n_keys`` sub-keys; the ``k`` best of each half give
``k * k`` candidate slots ``(i, j)`` scored ``s1[i] + s2[j]``, of which the best ``k`` are read: exactly the
top ``k`` of all ``n_keys ** 2`` slots, at the cost of ``2 * n_keys`` dot products. The read is a softmax
(float32) over the selected scores weighting the slots' value vectors (V,), summed over heads, which share one
value table (as in ``facebookresearch/memory``, ``product_key/memory.py``).

Differences from a memory layer trained with the model, because it is added to a pretrained one:

* The query projection is fixed: ``mu``/``sigma`` are the background per-dimension mean and standard deviation
  (a few massive-activation dimensions would otherwise decide every lookup) and ``W_h`` a random Gaussian map.
* Sub-keys are fitted by k-means (:func:`kmeans`) to the two halves of background queries, so slots are used
  evenly; they are never trained.
* Values start at exactly zero and only rows that were written exist (:class:`ProductKeyMemory` keeps a
  slot -> row map), so an untouched memory adds nothing and costs no memory for its ``n_keys ** 2`` slots.
* Training updates only chosen slots: :meth:`ProductKeyMemory.begin_training` makes their rows the one
  trainable tensor, every other slot has no gradient at all (the same as masking a dense table's gradient).

Everything is batched (einsum + topk + gather + ``embedding_bag``); :func:`reference_read` is the slow,
loop-per-token version used only to test the fast path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_QUERY_BLOCK = 4096
"""Tokens whose sub-key scores are computed at once when counting reads (bounds the (N, h, 2, K) tensor)."""


def kmeans(points: torch.Tensor, clusters: int, *, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """Batched k-means: ``points`` (G, N, d) -> centroids (G, clusters, d), float32.

    G independent problems are solved at once: k-means++ seeding (D^2 sampling; one step per centroid, batched
    over groups and points), then Lloyd iterations (one ``bmm`` each). A centroid left without points moves to
    a random point. With fewer points than clusters, the points are repeated with a little noise (every slot
    still gets a distinct key). Random draws come from a generator seeded with ``seed`` on the points' device.
    """
    groups, n, dim = points.shape
    points = points.float()
    device = points.device
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    generator = torch.Generator(device=device).manual_seed(seed)
    if n < clusters:
        repeats = math.ceil(clusters / n)
        noise = torch.randn(groups, n * repeats, dim, generator=generator, device=device)
        scale = points.std(dim=1, keepdim=True).nan_to_num(0.0).clamp(min=1e-3) * 0.1  # (G, 1, d)
        points = points.repeat(1, repeats, 1) + noise * scale
        n = points.shape[1]
    rows = torch.arange(groups, device=device)
    centroids = torch.empty(groups, clusters, dim, device=device)
    first = torch.randint(0, n, (groups,), generator=generator, device=device)
    centroids[:, 0] = points[rows, first]
    nearest = (points - centroids[:, :1]).pow(2).sum(-1)  # (G, N) squared distance to the closest centroid
    for c in range(1, clusters):
        chosen = torch.multinomial(nearest.clamp(min=0) + 1e-12, 1, generator=generator)[:, 0]  # (G,)
        centroids[:, c] = points[rows, chosen]
        nearest = torch.minimum(nearest, (points - centroids[:, c : c + 1]).pow(2).sum(-1))
    for _ in range(iterations):
        # argmin |p - c|^2 = argmax (p.c - |c|^2 / 2)
        affinity = torch.bmm(points, centroids.transpose(1, 2)) - 0.5 * centroids.pow(2).sum(-1)[:, None, :]
        assign = affinity.argmax(-1)  # (G, N)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), points)
        counts = torch.zeros(groups, clusters, device=device).scatter_add_(
            1, assign, torch.ones(groups, n, device=device)
        )  # (G, C)
        refill = points[
            rows[:, None], torch.randint(0, n, (groups, clusters), generator=generator, device=device)
        ]
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], refill)
    return centroids


class ProductKeyMemory(nn.Module):
    """``n_keys ** 2`` memory slots read by ``heads`` product-key lookups of ``topk`` slots each.

    ``input_dim``: width of the hidden states that make queries (D); ``value_dim``: width of the output (V);
    ``query_dim``: width of one head's query (Q, even); sub-keys are Q/2 wide. ``seed`` fixes the random query
    projection (no global random state is used).
    """

    def __init__(
        self,
        input_dim: int,
        value_dim: int,
        *,
        n_keys: int = 512,
        heads: int = 4,
        topk: int = 32,
        query_dim: int = 256,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if query_dim < 2 or query_dim % 2:
            raise ValueError(f"query_dim must be even and >= 2, got {query_dim}")
        if not 1 <= topk <= n_keys:
            raise ValueError(f"topk must be in [1, n_keys], got {topk} with n_keys {n_keys}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.input_dim, self.value_dim = input_dim, value_dim
        self.n_keys, self.heads, self.topk, self.query_dim = n_keys, heads, topk, query_dim
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(heads * query_dim, input_dim, generator=generator) / math.sqrt(input_dim)
        self.register_buffer("query_weight", weight.to(device))  # (H*Q, D)
        self.register_buffer("input_mean", torch.zeros(input_dim, device=device))
        self.register_buffer("input_scale", torch.ones(input_dim, device=device))  # 1 / sigma
        self.register_buffer("sub_keys", torch.zeros(heads, 2, n_keys, query_dim // 2, device=device))
        self.register_buffer("slot_row", torch.full((n_keys * n_keys,), -1, dtype=torch.long, device=device))
        # Written rows, preallocated and doubled when full: rows[:written] belong to slots row_slot[:written].
        self.register_buffer("row_slot", torch.zeros(0, dtype=torch.long, device=device))  # (capacity,)
        self.register_buffer("rows", torch.zeros(0, value_dim, device=device))  # (capacity, V) float32
        self._written = 0
        self.trainable: nn.Parameter | None = None
        """Rows of the slots being trained (T, V), while :meth:`begin_training` is in effect."""
        self._train_slots: torch.Tensor | None = None
        self._train_pos: torch.Tensor | None = None  # (S,) position in ``trainable`` or -1
        self.enabled = True
        """False: :meth:`forward` adds nothing (the base model is computed)."""

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.n_keys * self.n_keys

    @property
    def written(self) -> int:
        """Slots that hold a value row (all others read as zero)."""
        return self._written

    @property
    def active(self) -> bool:
        """True when the memory is on and a read can be non-zero (a row exists or slots are being trained)."""
        return self.enabled and (self.written > 0 or self.trainable is not None)

    # -- lookup ----------------------------------------------------------------------------------------------
    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., heads, Q) float32 queries."""
        x = (hidden.float() - self.input_mean) * self.input_scale
        return (x @ self.query_weight.T).unflatten(-1, (self.heads, self.query_dim))

    def select(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` slots per head: queries (N, h, Q) -> scores (N, h, k) float32, slots (N, h, k) long."""
        k, n_keys = self.topk, self.n_keys
        halves = queries.float().unflatten(-1, (2, self.query_dim // 2))  # (N, h, 2, Q/2)
        scores = torch.einsum("nhcd,hckd->nhck", halves, self.sub_keys) / math.sqrt(self.query_dim)
        half_scores, half_index = scores.topk(k, dim=-1)  # (N, h, 2, k)
        pair = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # (N, h, k, k)
        best, flat = pair.flatten(-2).topk(k, dim=-1)  # (N, h, k)
        first = half_index[:, :, 0].gather(-1, torch.div(flat, k, rounding_mode="floor"))
        second = half_index[:, :, 1].gather(-1, flat % k)
        return best, first * n_keys + second

    def read(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of value rows: slots, weights (N, L) -> (N, V) float32 (unwritten slots read zero)."""
        out = torch.zeros(slots.shape[0], self.value_dim, device=slots.device)
        weights = weights.float()
        if self._train_pos is not None and self.trainable is not None:
            pos = self._train_pos[slots]  # (N, L)
            trained = pos >= 0
            out = out + F.embedding_bag(
                pos.clamp(min=0), self.trainable, per_sample_weights=weights * trained, mode="sum"
            )
            weights = weights * ~trained  # a trained slot is read from ``trainable`` only
        if self.written:
            row = self.slot_row[slots]
            out = out + F.embedding_bag(
                row.clamp(min=0), self.rows, per_sample_weights=weights * (row >= 0), mode="sum"
            )
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The memory read (..., V) for hidden states (..., D), in the hidden states' dtype."""
        flat = hidden.reshape(-1, self.input_dim)
        scores, slots = self.select(self.queries(flat))
        weights = torch.softmax(scores, dim=-1)  # float32, per head
        out = self.read(slots.flatten(1), weights.flatten(1))
        return out.to(hidden.dtype).reshape(*hidden.shape[:-1], self.value_dim)

    @torch.no_grad()
    def access_counts(self, hidden: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """How often each slot is read by the tokens ``hidden`` (N, D): float32 (S,).

        With ``groups`` (N,) long in ``[0, G)``: how many groups read each slot at least once (a document
        frequency over G chunks) instead.
        """
        counts = torch.zeros(self.slots, device=hidden.device)
        if groups is not None:
            seen = []
        for start in range(0, hidden.shape[0], _QUERY_BLOCK):
            _, slots = self.select(self.queries(hidden[start : start + _QUERY_BLOCK]))
            slots = slots.flatten(1)  # (n, h*k)
            if groups is None:
                counts += torch.bincount(slots.reshape(-1), minlength=self.slots).float()
            else:
                chunk = groups[start : start + _QUERY_BLOCK, None].expand_as(slots)
                seen.append(torch.unique(chunk.reshape(-1) * self.slots + slots.reshape(-1)))
        if groups is not None and seen:
            pairs = torch.unique(torch.cat(seen))
            counts += torch.bincount(pairs % self.slots, minlength=self.slots).float()
        return counts

    # -- calibration -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, hidden: torch.Tensor, *, iterations: int = 15, seed: int = 0) -> None:
        """Fit the query normalisation and the sub-keys to background hidden states (N, D)."""
        hidden = hidden.float()
        self.input_mean.copy_(hidden.mean(0))
        self.input_scale.copy_(1.0 / hidden.std(0).nan_to_num(1.0).clamp(min=1e-4))
        halves = self.queries(hidden).unflatten(-1, (2, self.query_dim // 2))  # (N, h, 2, Q/2)
        points = halves.flatten(1, 2).transpose(0, 1)  # (h*2, N, Q/2)
        centroids = kmeans(points, self.n_keys, iterations=iterations, seed=seed)
        self.sub_keys.copy_(centroids.reshape(self.heads, 2, self.n_keys, -1))

    # -- values ----------------------------------------------------------------------------------------------
    def values_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Current value rows (T, V) float32 of ``slots`` (T,) (zero for unwritten slots)."""
        row = self.slot_row[slots]
        if not self.written:
            return torch.zeros(slots.numel(), self.value_dim, device=slots.device)
        return self.rows[row.clamp(min=0)] * (row >= 0)[:, None]

    @torch.no_grad()
    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Set the value rows of distinct ``slots`` (T,) to ``values`` (T, V), allocating rows as needed."""
        slots = slots.to(self.slot_row.device).long()
        new = slots[self.slot_row[slots] < 0]
        if new.numel():
            start, end = self._written, self._written + new.numel()
            if end > self.rows.shape[0]:
                capacity = max(end, 2 * self.rows.shape[0], 64)
                rows = torch.zeros(capacity, self.value_dim, device=self.rows.device)
                row_slot = torch.zeros(capacity, dtype=torch.long, device=self.row_slot.device)
                rows[:start], row_slot[:start] = self.rows[:start], self.row_slot[:start]
                self.rows, self.row_slot = rows, row_slot
            self.slot_row[new] = torch.arange(start, end, device=new.device)
            self.row_slot[start:end] = new
            self._written = end
        self.rows[self.slot_row[slots]] = values.detach().float()

    @torch.no_grad()
    def clear(self) -> None:
        """Forget every value (the memory reads zero again)."""
        self.end_training(commit=False)
        self.slot_row.fill_(-1)
        self.row_slot = torch.zeros(0, dtype=torch.long, device=self.row_slot.device)
        self.rows = torch.zeros(0, self.value_dim, device=self.rows.device)
        self._written = 0

    def value_state(self) -> dict[str, torch.Tensor]:
        """Written slots (R,) ascending and their rows (R, V): the memory's learned state."""
        order = torch.argsort(self.row_slot[: self._written])
        return {"slots": self.row_slot[order], "rows": self.rows[order]}

    @torch.no_grad()
    def load_value_state(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace every value by ``rows`` (R, V) at distinct ``slots`` (R,) (checked first)."""
        if slots.dim() != 1 or rows.shape != (slots.numel(), self.value_dim):
            raise ValueError(
                f"memory values: slots {tuple(slots.shape)} and rows {tuple(rows.shape)} do not fit "
                f"{self.value_dim}-wide values"
            )
        if slots.numel() and (
            int(slots.min()) < 0 or int(slots.max()) >= self.slots or slots.unique().numel() != slots.numel()
        ):
            raise ValueError(f"memory values: slots must be distinct and in [0, {self.slots})")
        self.clear()
        self.write(slots.long(), rows)

    # -- sparse training -------------------------------------------------------------------------------------
    def begin_training(self, slots: torch.Tensor) -> nn.Parameter:
        """Make the rows of distinct ``slots`` (T,) one trainable tensor (T, V), starting at their values."""
        self.end_training(commit=False)
        slots = slots.to(self.slot_row.device).long()
        self._train_slots = slots
        self._train_pos = torch.full_like(self.slot_row, -1)
        self._train_pos[slots] = torch.arange(slots.numel(), device=slots.device)
        self.trainable = nn.Parameter(self.values_of(slots).clone())
        return self.trainable

    @torch.no_grad()
    def end_training(self, *, commit: bool = True) -> None:
        """Stop training; with ``commit``, write the trained rows into the value table."""
        if self.trainable is not None and self._train_slots is not None and commit:
            self.write(self._train_slots, self.trainable.detach())
        self.trainable, self._train_slots, self._train_pos = None, None, None


def reference_read(memory: ProductKeyMemory, hidden: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Slow reference of ``memory(hidden)`` against a dense value table ``values`` (S, V): for every token and
    head, score **all** ``n_keys ** 2`` slots, take the top ``k``, softmax, and sum their values.

    Used only in tests, to check the product-key search and the batched read (outputs and gradients).
    """
    outputs = []
    half = memory.query_dim // 2
    for x in hidden.reshape(-1, memory.input_dim):
        q = ((x.float() - memory.input_mean) * memory.input_scale) @ memory.query_weight.T
        total = torch.zeros(memory.value_dim, dtype=values.dtype)
        for h in range(memory.heads):
            qh = q[h * memory.query_dim : (h + 1) * memory.query_dim]
            first = memory.sub_keys[h, 0] @ qh[:half] / math.sqrt(memory.query_dim)  # (K,)
            second = memory.sub_keys[h, 1] @ qh[half:] / math.sqrt(memory.query_dim)
            full = (first[:, None] + second[None, :]).reshape(-1)  # (K*K,) slot i*K + j
            scores, slots = full.topk(memory.topk)
            weights = torch.softmax(scores, dim=0)
            for weight, slot in zip(weights, slots):
                total = total + weight * values[slot]
        outputs.append(total)
    return torch.stack(outputs).reshape(*hidden.shape[:-1], memory.value_dim)

"""Continuous batching: a fixed set of decoding rows that prompts join and leave between decoding steps.

:class:`DecodeSlots` keeps static KV caches of up to ``rows x length`` positions. A prompt joins by being
prefilled (the forward pass a solo answer starts with, continuing a remembered prefix's keys and values where
it starts with one; prompts that arrive together share one right-padded pass, in which no real token attends
to the padding after it) and having its keys and values copied into a free row; every
:meth:`DecodeSlots.step` then decodes one greedy token for all live rows together, and a row that reaches EOS
or its token budget is handed back at once and its row freed for the next prompt.

Rows share the cache's write column (every step writes column ``t`` of every row) but nothing else: each row
keeps its own position ids, and an additive attention mask per row says which columns are its tokens. Keys are
cached after their position is applied (rotary or absolute embeddings), so where in the cache a row's tokens
sit does not change what it computes; a prompt is copied to end at the write column (the column jumps forward
when a prompt is longer than the columns behind it), and when the write column reaches the end every row's
tokens are moved to the right end of a shorter span (:meth:`DecodeSlots._compact`). Models whose attention
depends on column distance (sliding windows, ALiBi) are refused by :func:`supports_slots`.

Prompts that start with a remembered prefix (the chat template's system part: :meth:`DecodeSlots.chat_prefix`)
prefill only what follows it; the prefix's keys and values are computed once while the weights stay the same.

The step runs only as many rows as are live, rounded up to a power of two (a cache per width; the live rows
move to a narrower or wider one as answers leave and prompts join), so a few answers do not pay for
``rows``.

A row's answer is the greedy answer its prompt gets alone, up to the float rounding of differently shaped
matrix products (the tests compare it with :meth:`Backbone.generate`, one prompt at a time): no logits
processors, no sampling, no per-call hooks -- requests needing those are answered by the batch path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone

logger = logging.getLogger(__name__)

_POSITIONAL_BY_COLUMN = ("bloom", "mpt", "falcon", "gemma2", "gemma3", "mistral", "mixtral", "phi3")
"""Model types whose attention reads column distances (ALiBi) or may use sliding windows."""


def supports_slots(backbone: Backbone) -> bool:
    """Whether :class:`DecodeSlots` computes this model's answers exactly: a decoder-only model with a
    ``StaticCache`` keyword, full attention in every layer, positions carried by the keys and an attention
    implementation that takes an additive mask per row (``sdpa``, ``eager``)."""
    config = backbone.model.config
    layer_types = getattr(config, "layer_types", None) or ()
    return (
        backbone._cache_keyword() is not None
        and not getattr(config, "is_encoder_decoder", False)
        and getattr(config, "sliding_window", None) is None
        and all(kind == "full_attention" for kind in layer_types)
        and getattr(config, "model_type", "") not in _POSITIONAL_BY_COLUMN
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")  # they take a 4D additive mask
    )


@dataclass(frozen=True, kw_only=True)
class FinishedRow:
    """One answer that left the slots."""

    key: Any
    """What the caller gave :meth:`DecodeSlots.add` for this prompt."""
    text: str
    """The answer as :meth:`Backbone.generate` returns it (special tokens dropped, outer whitespace
    stripped)."""
    token_ids: tuple[int, ...]
    """The new tokens, EOS included when it ended the answer."""
    prompt_tokens: int
    """Tokens of the model input (chat template applied)."""
    seconds: float
    """From joining to leaving."""


@dataclass(kw_only=True)
class _Row:
    key: Any
    budget: int
    prompt_tokens: int
    started: float
    tokens: list[int]


class DecodeSlots:
    """``rows`` decoding rows of at most ``length`` cache positions each, shared by prompts that come and go.

    Not thread-safe: one thread adds prompts and steps (the service's generation thread). Greedy only.
    """

    def __init__(self, backbone: Backbone, *, rows: int, length: int) -> None:
        if rows < 1 or length < 2:
            raise ValueError(f"DecodeSlots needs rows >= 1 and length >= 2, got {rows} and {length}")
        if not supports_slots(backbone):
            raise ValueError(f"continuous batching does not support {backbone.name}")
        self.backbone = backbone
        self.rows = rows
        self.length = length
        self._device = backbone.device
        self._caches: dict[int, Any] = {}  # a static cache per width, made when first needed
        eos = backbone.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else list(eos or []))
        self.pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
        self.width = 0  # rows the step runs: the live ones fit, a power of two (or ``rows``)
        self.cache: Any = None  # the static cache of ``width`` rows
        self._rows: list[_Row | None] = []
        self.visible = torch.zeros(
            (0, length), dtype=torch.bool, device=self._device
        )  # (W, L) a row's columns
        self.next_tokens = torch.zeros((0,), dtype=torch.long, device=self._device)  # (W,) the next input
        self.positions = torch.zeros((0,), dtype=torch.long, device=self._device)  # (W,) its position id
        self.bias: torch.Tensor | None = None  # (W, V') logit bias per row, made when a biased prompt joins
        self.column = 0  # the write column of the next step
        self.compactions = 0
        self.resizes = 0
        self.steps = 0
        self._mode = backbone._lean_step_mode(backbone.generation.backend == "compiled")
        self._shapes: list[tuple[int, int, int, int]] = []  # (heads, key dim, heads, value dim) per layer
        # shared prefixes by token ids: their (keys, values) per layer once computed, else None
        self._prefixes: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]] | None] = {}
        self.prefix_hits = 0

    # -- what is held ---------------------------------------------------------------------------------------
    @property
    def live(self) -> int:
        """Rows holding a prompt that is still being answered."""
        return sum(row is not None for row in self._rows)

    @property
    def free(self) -> int:
        """Prompts that can join now."""
        return self.rows - self.live

    def _width_for(self, live: int) -> int:
        """The step's batch for ``live`` rows: the next power of two, at most ``rows`` (a step over all
        ``rows`` would compute idle rows; a few widths keep the compiled steps few)."""
        return min(self.rows, 1 << max(live - 1, 0).bit_length())

    def _resize(self, width: int) -> None:
        """Move the live rows, in order, to the first rows of the cache of ``width`` rows."""
        from transformers import StaticCache

        live = [i for i, row in enumerate(self._rows) if row is not None]
        n = len(live)
        index = torch.tensor(live, dtype=torch.long, device=self._device)
        cache = self._caches.get(width)
        if cache is None:
            cache = self._caches[width] = StaticCache(
                config=self.backbone.model.config, max_cache_len=self.length
            )
            if self._shapes:
                self._initialize(cache, width)
        if n and self.cache is not None:
            for new, old in zip(cache.layers, self.cache.layers):
                new.keys[:n] = old.keys.index_select(0, index)
                new.values[:n] = old.values.index_select(0, index)

        def moved(tensor: torch.Tensor, fill: Any) -> torch.Tensor:
            out = torch.full((width, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=self._device)
            out[:n] = tensor.index_select(0, index)
            return out

        self.visible = moved(self.visible, False)
        self.next_tokens = moved(self.next_tokens, self.pad_id)
        self.positions = moved(self.positions, 0)
        if self.bias is not None:
            self.bias = moved(self.bias, 0.0)
        self._rows = [self._rows[i] for i in live] + [None] * (width - n)
        self.cache, self.width = cache, width
        self.resizes += 1

    def _initialize(self, cache: Any, width: int) -> None:
        for layer, (heads, key_dim, value_heads, value_dim) in zip(cache.layers, self._shapes):
            dtype = self.backbone.dtype
            layer.lazy_initialization(
                torch.zeros((width, heads, 1, key_dim), dtype=dtype, device=self._device),
                torch.zeros((width, value_heads, 1, value_dim), dtype=dtype, device=self._device),
            )

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a prompt of ``prompt_tokens`` model tokens and its budget fit in one row."""
        return prompt_tokens + max_new_tokens < self.length

    def model_ids(self, prompt: str, *, chat: bool | None = None, formatted: bool = False) -> list[int]:
        """The token ids :meth:`Backbone.generate` feeds the model for ``prompt``."""
        backbone = self.backbone
        return backbone.token_ids(backbone.model_text(prompt, chat=chat, formatted=formatted))

    def chat_prefix(self) -> list[int]:
        """The token ids every chat prompt starts with (the template's system part and the user turn's
        opening, as far as two different prompts tokenise alike)."""
        first, second = self.model_ids("0", chat=True), self.model_ids("Hello", chat=True)
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        return first[:common]

    def remember_prefix(self, ids: Sequence[int]) -> None:
        """Keep the keys and values of ``ids`` (a prefix many prompts start with: the chat template's system
        part, a shared context), computed at its first use: a prompt that starts with it and goes on then
        prefills only its remaining tokens. They hold while the model's weights stay as they are: call
        :meth:`forget_prefixes` whenever the weights may have changed."""
        if ids:
            self._prefixes.setdefault(tuple(ids), None)

    def forget_prefixes(self) -> None:
        """Drop the computed keys and values of the remembered prefixes (computed again at their next use)."""
        self._prefixes = dict.fromkeys(self._prefixes)

    def _prefix_of(self, ids: Sequence[int]) -> tuple[int, ...]:
        """The longest remembered prefix ``ids`` starts with and goes on after (``()``: none)."""
        return max(
            (p for p in self._prefixes if len(p) < len(ids) and tuple(ids[: len(p)]) == p),
            key=len,
            default=(),
        )

    def _prefill(
        self,
        prefix: tuple[int, ...],
        prompts: Sequence[Sequence[int]],
        biases: Sequence[torch.Tensor | None] = (),
    ) -> tuple[list[int], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The first greedy token of each prompt (all starting with ``prefix``) and each prompt's keys and
        values per layer, (1, H, P, D) each: one forward pass over what follows the prefix, right-padded (a
        causal model's real tokens never attend to the padding after them), continuing the prefix's cached
        keys and values (computed here at first use)."""
        from transformers import DynamicCache

        backbone = self.backbone
        model, keyword = backbone.model, backbone._cache_keyword()
        start, rows = len(prefix), len(prompts)
        cache = DynamicCache(config=model.config)
        if prefix:
            stored = self._prefixes[prefix]
            if stored is None:
                head = DynamicCache(config=model.config)
                model(input_ids=self._tensor(prefix), use_cache=True, **{keyword: head})
                stored = self._prefixes[prefix] = _layers(head)
            for index, (keys, values) in enumerate(stored):
                cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
            self.prefix_hits += rows
        lengths = [len(ids) - start for ids in prompts]
        width = max(lengths)
        suffixes = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self._device)  # (B, T)
        for i, ids in enumerate(prompts):
            suffixes[i, : lengths[i]] = torch.tensor(list(ids[start:]), dtype=torch.long)
        positions = torch.arange(start, start + width, device=self._device)[None, :].expand(
            rows, -1
        )  # (B, T)
        logits = model(input_ids=suffixes, position_ids=positions, use_cache=True, **{keyword: cache}).logits
        last = torch.tensor(lengths, device=self._device) - 1  # (B,)
        scores = logits[torch.arange(rows, device=self._device), last].float()  # (B, V)
        for i, bias in enumerate(biases):
            if bias is not None:
                scores[i, : bias.shape[0]] += bias.to(scores.device)
        firsts = scores.argmax(-1)  # (B,)
        layers = _layers(cache)
        per_row = [
            [(k[i : i + 1, :, : start + n], v[i : i + 1, :, : start + n]) for k, v in layers]
            for i, n in enumerate(lengths)
        ]
        return firsts.tolist(), per_row  # sync: once per group of prompts

    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], dtype=torch.long, device=self._device)  # (1, P)

    # -- joining and leaving --------------------------------------------------------------------------------
    def add(
        self, key: Any, ids: Sequence[int], max_new_tokens: int, bias: torch.Tensor | None = None
    ) -> FinishedRow | None:
        """Prefill ``ids`` (model input, see :meth:`model_ids`) into a free row and pick its first token;
        returns the answer when that already ends it (EOS or a budget of one), else ``None``. ``bias`` (V',)
        is added to the first V' logits of every step of this row (``Strategy.decoding_inputs``)."""
        return next(iter(self.add_many([(key, ids, max_new_tokens, bias)])), None)

    @torch.inference_mode()
    def add_many(self, prompts: Sequence[tuple[Any, ...]]) -> list[FinishedRow]:
        """:meth:`add` for several ``(key, ids, max_new_tokens[, bias])`` at once: prompts that start with the
        same remembered prefix (or none) are prefilled in one forward pass. Returns the answers that already
        ended. Nothing is added when it raises."""
        if len(prompts) > self.free:
            raise RuntimeError(f"{len(prompts)} prompts for {self.free} free decoding rows")
        prompts = [(*item, None) if len(item) == 3 else tuple(item) for item in prompts]
        for _, ids, max_new_tokens, _ in prompts:
            if not ids:
                raise ValueError("an empty prompt cannot be decoded")
            if not self.fits(len(ids), max_new_tokens):
                raise ValueError(
                    f"{len(ids)} prompt tokens and {max_new_tokens} new ones exceed {self.length}"
                )
        started = time.perf_counter()
        groups: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
        for item in prompts:
            groups.setdefault(self._prefix_of(item[1]), []).append(item)
        prefilled = []
        with self.backbone._decoding():
            for prefix, items in groups.items():
                firsts, layers = self._prefill(prefix, [i[1] for i in items], [i[3] for i in items])
                prefilled += zip(items, firsts, layers)
        finished = []
        for (key, ids, max_new_tokens, bias), first, kv in prefilled:
            done = self._place(key, len(ids), max_new_tokens, first, kv, started, bias)
            if done is not None:
                finished.append(done)
        return finished

    def _place(
        self,
        key: Any,
        n: int,
        max_new_tokens: int,
        first: int,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        started: float,
        bias: torch.Tensor | None = None,
    ) -> FinishedRow | None:
        """Put a prefilled prompt of ``n`` tokens (its keys and values ``kv`` per layer) into a free row."""
        if not self._shapes:
            self._shapes = [(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in kv]
            for width, cache in self._caches.items():
                self._initialize(cache, width)
        if self.live == self.width:
            self._resize(self._width_for(self.live + 1))
        row = next(i for i, r in enumerate(self._rows) if r is None)
        if self.column < n:
            self.column = n  # the columns skipped are masked for every row
        self._write(row, kv, n)
        state = _Row(key=key, budget=max_new_tokens, prompt_tokens=n, started=started, tokens=[first])
        self._rows[row] = state
        self.next_tokens[row] = first
        self.positions[row] = n
        self._set_bias(row, bias)
        return self._leave_if_done(row)

    def _set_bias(self, row: int, bias: torch.Tensor | None) -> None:
        """``row``'s logit bias (zero without one); the bias table is made, or widened, as needed."""
        if bias is None and self.bias is None:
            return
        size = 0 if bias is None else bias.shape[0]
        if self.bias is None or self.bias.shape[1] < size:
            table = torch.zeros((self.width, size), dtype=torch.float32, device=self._device)
            if self.bias is not None:
                table[:, : self.bias.shape[1]] = self.bias
            self.bias = table
        self.bias[row] = 0.0
        if bias is not None:
            self.bias[row, :size] = bias.to(device=self._device, dtype=torch.float32)

    def _write(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        """Copy a prefilled prompt's keys and values into ``row``, ending just before the write column."""
        start, end = self.column - n, self.column
        for layer, (keys, values) in zip(self.cache.layers, kv):  # (1, H, P, D) each
            layer.keys[row, :, start:end] = keys[0]
            layer.values[row, :, start:end] = values[0]
        self.visible[row] = False
        self.visible[row, start:end] = True

    def _leave_if_done(self, row: int) -> FinishedRow | None:
        state = self._rows[row]
        assert state is not None
        if len(state.tokens) < state.budget and state.tokens[-1] not in self.eos_ids:
            return None
        self._rows[row] = None
        self.visible[row] = False
        self.next_tokens[row] = self.pad_id
        text = self.backbone.tokenizer.decode(state.tokens, skip_special_tokens=True).strip()
        return FinishedRow(
            key=state.key,
            text=text,
            token_ids=tuple(state.tokens),
            prompt_tokens=state.prompt_tokens,
            seconds=time.perf_counter() - state.started,
        )

    @torch.inference_mode()
    def drop(self, key: Any) -> bool:
        """Free the row answering ``key`` without an answer (a cancelled or timed-out request)."""
        for i, row in enumerate(self._rows):
            if row is not None and row.key == key:
                self._rows[i] = None
                self.visible[i] = False
                self.next_tokens[i] = self.pad_id
                return True
        return False

    def clear(self) -> None:
        """Drop every row (after a failed step: the cache may hold half-written columns)."""
        self._rows = []
        self.width, self.cache, self.column = 0, None, 0
        self.visible = torch.zeros((0, self.length), dtype=torch.bool, device=self._device)
        self.next_tokens = torch.zeros((0,), dtype=torch.long, device=self._device)
        self.positions = torch.zeros((0,), dtype=torch.long, device=self._device)
        self.bias = None

    # -- decoding -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[FinishedRow]:
        """One greedy token for every live row; returns the answers that ended with it."""
        if not self.live:
            return []
        if self._width_for(self.live) < self.width:  # rows left: a narrower step
            self._resize(self._width_for(self.live))
        live = [i for i, row in enumerate(self._rows) if row is not None]
        if self.column >= self.length:
            self._compact()
        column = self.column
        self.visible[:, column] = True  # every row sees the token it writes (free rows too: no empty row)
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(column)
        dtype = self.backbone.dtype
        mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
        mask = mask.masked_fill(~self.visible, torch.finfo(dtype).min)[:, None, None, :]  # (B, 1, 1, L)
        with self.backbone._decoding():
            logits = self._run_step(mask)
        self.column = column + 1
        self.steps += 1
        scores = logits.float()
        if self.bias is not None:
            scores[:, : self.bias.shape[1]] += self.bias
        chosen = scores.argmax(-1)  # (B,)
        self.next_tokens.copy_(chosen)
        self.positions += 1
        picked = chosen.tolist()  # sync: once per step, to hand finished answers back at once
        finished = []
        for i in live:
            state = self._rows[i]
            assert state is not None
            state.tokens.append(int(picked[i]))
            done = self._leave_if_done(i)
            if done is not None:
                finished.append(done)
        return finished

    def _run_step(self, mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) with the fastest step that works (as the lean loop chooses: compiled and
        replayed as a CUDA graph, compiled, plain)."""
        backbone = self.backbone
        while True:
            step = backbone._lean_step(self._mode, rows=self.next_tokens.shape[0])
            try:
                if self._mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with _guarded(self._mode):
                    logits = step(self.next_tokens[:, None], self.positions[:, None], mask, self.cache)
                return logits.clone() if self._mode == "reduce-overhead" else logits
            except Exception as exc:
                following = {"reduce-overhead": "default", "default": "plain"}.get(self._mode)
                if following is None:
                    raise
                logger.warning("decoding-slot step %r failed (%s); trying %r", self._mode, exc, following)
                self._mode = following
                for layer in self.cache.layers:
                    layer.cumulative_length.fill_(self.column)

    def _compact(self) -> None:
        """Move every live row's columns, in order, to end at the shortest common write column."""
        live = torch.tensor([row is not None for row in self._rows], device=self.visible.device)
        self.visible &= live[:, None]
        counts = self.visible.sum(1)  # (B,)
        column = int(counts.max())  # sync: once per compaction
        if column >= self.length:
            raise RuntimeError("a decoding row outgrew its cache length")
        order = torch.argsort(self.visible.int(), dim=1, stable=True)  # hidden columns first, then the row's
        index = torch.roll(order, shifts=column - self.length, dims=1)  # (B, L): column j <- index[:, j]
        for layer in self.cache.layers:
            for tensor in (layer.keys, layer.values):  # (B, H, L, D)
                gather = index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
                tensor.copy_(tensor.gather(2, gather))
        span = torch.arange(self.length, device=counts.device)
        self.visible = (span[None, :] < column) & (span[None, :] >= column - counts[:, None])
        self.column = column
        self.compactions += 1


def _guarded(mode: str) -> AbstractContextManager[Any]:
    """A compiled step's dynamo settings, as the lean loop's: guards on module hooks (a hook added later
    retraces instead of being skipped) and room for a graph per width."""
    if mode == "plain":
        return nullcontext()
    from continual_transformer.backbone import _RECOMPILES

    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False, **_RECOMPILES)


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a filled dynamic cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]

"""``knowledge_store``: a kNN-LM (Khandelwal et al., 2020) over the documents learned, token by token.

Learning a document runs the frozen backbone over it once (in windows that re-read some preceding context) and
stores, for every position, the pair *(hidden state at a chosen layer, next token id)* in a
:class:`~continual_transformer.modules.VectorStore`. No gradient is computed.

At each next-token prediction the current hidden state at that layer queries the ``k`` nearest stored keys;
their next tokens form ``p_kNN`` (softmax of ``-distance / temperature`` over the neighbours, summed per
token) and the prediction becomes ``p = (1 - λ) p_LM + λ p_kNN``. This is token-level memory: it can emit a
new name or year piece by piece once the model's context resembles the context the name followed in the
document (e.g. the model has written "The capital of Veloria is"), which a pooled vector cannot.

A **distance gate** keeps unrelated text untouched: at a position whose nearest neighbour is farther than
``max_distance``, λ is 0 and the model's logits are returned unchanged (bit for bit).

Where the mixture applies, :meth:`forward_logits` returns ``log p`` (the log of the mixed distribution,
float32) in place of logits; elsewhere the base logits. Both are valid logits (softmax gives the
distribution), so :meth:`token_nll`, :meth:`perplexity` and generation (a ``LogitsProcessor`` fed by a forward
hook that captures the layer's hidden states) all apply the same mixture. During sampling the
temperature/top-p warpers act on the mixture's scores.

What it cannot do: answer a question whose wording leads the model to a context unlike the document's (the
hidden state of "<assistant turn start>" after "What is the capital of Veloria?" is not near any stored key
until the answer's own words begin to resemble the document).

Measured once on SmolLM2-135M-Instruct (CPU, 3 short fictional documents, 6 chat questions, defaults): 2 of 6
answers contained the new name ("The capital of Veloria is Tarnhelm.", "...born in the town of Brastow"; a
third got "Oskar Plimos" for "Plimbe") against 0 for the base model; λ = 0.5 answered the same; the 3
unrelated questions were answered exactly as by the base model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from continual_transformer.backbone import ScoringBatch, ScoringHooks
from continual_transformer.config import ConfigError, WindowArgs
from continual_transformer.documents import Document, chunk_spans
from continual_transformer.layers import hidden_size, layer_index
from continual_transformer.modules.hooks import LayerCapture
from continual_transformer.modules.logits import KNNMixtureProcessor, knn_distribution, mix_log_probs
from continual_transformer.modules.vector_store import VectorStore
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats, tensor_bytes

logger = logging.getLogger(__name__)

_KEY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIX_ROWS = 512  # positions mixed at once: bounds the (rows, vocab) float32 temporaries


@dataclass(frozen=True, kw_only=True)
class KnowledgeStoreConfig:
    key_source: str = "layer"
    """``layer``: the output of decoder layer ``layer`` (the default -1 is the input to the final norm);
    ``final``: the input of the LM head (after the final norm)."""
    layer: int = -1
    """Decoder layer whose output is the key (with ``key_source: layer``); negative counts from the end."""
    interpolation: float = 0.5
    """λ: weight of the kNN distribution in the mixture, where the distance gate lets it apply. The gate
    already confines the mixture to positions that continue stored text, so λ can be higher than the paper's
    0.25 for perplexity. CPU quick profile (6 novel-facts documents, 48 probes), λ 0.25 / 0.5 / 0.75:
    acquisition 0.042 / 0.167 / 0.229 (in_context 0.229), general perplexity +0.2 % / +0.7 % / +1.6 %, no
    known fact lost."""
    k: int = 16
    """Neighbours retrieved per position."""
    temperature: float = 0.05
    """Softmax temperature over ``-distance``; smaller trusts the nearest neighbour more."""
    metric: str = "cosine"
    """``cosine`` (keys normalised, distance ``2 - 2 cos`` in [0, 4]: independent of the model's hidden-state
    scale) or ``l2`` (squared Euclidean distance on raw hidden states, as in the paper)."""
    max_distance: float = 0.2
    """Distance gate: positions whose nearest neighbour is farther than this keep the model's logits (λ = 0).
    On SmolLM2-135M (cosine, last layer) a position that continues a stored context is at 0.03-0.16 and 3 % of
    the positions of unrelated text fall under 0.2 (13 % under 0.3)."""
    capacity: int = 0
    """Most keys kept (0: unbounded, the store doubles when full)."""
    eviction: str = "fifo"
    """At capacity: ``fifo`` drops the oldest keys, ``lru`` the least recently retrieved."""
    initial_capacity: int = 4096
    """Rows preallocated at first."""
    key_dtype: str = "float32"
    """Storage type of the keys: ``float32``, ``float16`` or ``bfloat16`` (halves memory, slower on CPU)."""
    windows: WindowArgs = field(default_factory=WindowArgs)
    """Forward passes over a document being stored: 512 tokens, each window after the first re-reading 64
    tokens of preceding text (their pairs are not stored twice)."""

    def __post_init__(self) -> None:
        key = "strategies.knowledge_store"
        if self.key_source not in ("layer", "final"):
            raise ConfigError(f"{key}.key_source: must be layer or final, got {self.key_source!r}")
        if not 0.0 <= self.interpolation <= 1.0:
            raise ConfigError(f"{key}.interpolation: must be in [0, 1], got {self.interpolation}")
        if self.k < 1:
            raise ConfigError(f"{key}.k: must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"{key}.temperature: must be > 0, got {self.temperature}")
        if self.metric not in ("cosine", "l2"):
            raise ConfigError(f"{key}.metric: must be cosine or l2, got {self.metric!r}")
        if not self.max_distance >= 0:
            raise ConfigError(f"{key}.max_distance: must be >= 0, got {self.max_distance}")
        if self.capacity < 0:
            raise ConfigError(f"{key}.capacity: must be >= 0 (0: unbounded), got {self.capacity}")
        if self.eviction not in ("fifo", "lru"):
            raise ConfigError(f"{key}.eviction: must be fifo or lru, got {self.eviction!r}")
        if self.initial_capacity < 1:
            raise ConfigError(f"{key}.initial_capacity: must be >= 1, got {self.initial_capacity}")
        if self.key_dtype not in _KEY_DTYPES:
            raise ConfigError(
                f"{key}.key_dtype: must be one of {sorted(_KEY_DTYPES)}, got {self.key_dtype!r}"
            )


class _KNNMixing(ScoringHooks):
    """Scoring with the kNN-LM: capture the key layer in the forward pass, then mix at the used positions."""

    def __init__(self, strategy: KnowledgeStoreStrategy) -> None:
        self.strategy = strategy
        self._capture: LayerCapture | None = None

    def forward(self, batch: ScoringBatch) -> LayerCapture:
        self._capture = self.strategy.capture()
        return self._capture

    def next_token_scores(
        self, logits: torch.Tensor, batch: ScoringBatch, positions: torch.Tensor
    ) -> torch.Tensor:
        assert self._capture is not None and self._capture.hidden is not None
        return self.strategy._mix_where(logits.float(), self._capture.hidden, positions)


@register_strategy("knowledge_store", config_cls=KnowledgeStoreConfig)
class KnowledgeStoreStrategy(Strategy):
    modifies_backbone = False

    def __init__(self, backbone, config: KnowledgeStoreConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        if config.key_source == "layer":
            layer_index(config.layer, backbone.num_layers, "strategies.knowledge_store.layer")
        hidden = hidden_size(backbone.model)
        self.doc_spans: dict[str, tuple[int, int]] = {}  # doc id -> its entries' insert stamps [a, b)
        self.store = VectorStore(
            hidden,
            capacity=config.capacity,
            initial_capacity=config.initial_capacity,
            eviction=config.eviction,
            metric=config.metric,
            dtype=_KEY_DTYPES[config.key_dtype],
            device=backbone.device,
        )

    # -- hidden states --------------------------------------------------------------------------------------
    def capture(self) -> LayerCapture:
        """A hook capturing the key hidden states of every forward pass while it is entered."""
        if self.config.key_source == "final":
            head = self.backbone.model.get_output_embeddings()
            if not isinstance(head, nn.Module):
                raise ConfigError(
                    "strategies.knowledge_store.key_source: final needs a model with an LM head module"
                )
            return LayerCapture(head, inputs=True)
        return LayerCapture(self.backbone.layers[self.config.layer])

    def _forward(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V) float32, key hidden states (B, T, H)) of one batch."""
        with self.capture() as cap:
            logits = self.backbone.model(input_ids=ids, attention_mask=attention).logits.float()
        assert cap.hidden is not None
        return logits, cap.hidden

    # -- the mixture ----------------------------------------------------------------------------------------
    def mix(self, hidden: torch.Tensor, logits: torch.Tensor, *, touch: bool = False) -> torch.Tensor:
        """Scores (M, V) float32 for M positions: ``log p_mix`` where the gate passes, ``logits`` elsewhere.

        ``touch`` marks the neighbours used as retrieved (``lru`` eviction); generation does, scoring does
        not.
        """
        out = logits.float()
        if self.store.size == 0 or self.config.interpolation == 0:
            return out
        out = out.clone()
        cfg = self.config
        for start in range(0, hidden.shape[0], _MIX_ROWS):
            h = hidden[start : start + _MIX_ROWS]
            dist, rows = self.store.search(h, cfg.k, mark_used=False)
            active = (dist[:, 0] <= cfg.max_distance).nonzero().squeeze(1)
            if active.numel() == 0:
                continue
            if touch:
                self.store.touch(rows[active])
            p_knn = knn_distribution(
                dist[active], self.store.values[rows[active]], out.shape[-1], cfg.temperature
            )
            out[start + active] = mix_log_probs(out[start + active], p_knn, cfg.interpolation)
        return out

    def _mix_where(self, logits: torch.Tensor, hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Apply :meth:`mix` to the positions of ``where`` (B, T) in place of their logits."""
        if self.store.size == 0 or not bool(where.any()):
            return logits
        logits[where] = self.mix(hidden[where], logits[where])
        return logits

    # -- learning -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def document_pairs(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (n, H), next-token ids (n,)) for every predicted position of ``text``, in order."""
        cfg = self.config
        ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        keys, values = [], []
        windows = cfg.windows
        for i, (a, b) in enumerate(chunk_spans(len(ids), windows.window, windows.context)):
            piece = ids[a:b]
            if len(piece) < 3:
                continue
            # Position 0 is skipped: its hidden state is a context-free attention sink, alike in every text.
            first = 1 if i == 0 else windows.context - 1  # positions predicting tokens not stored before
            t = torch.tensor([piece], device=self.backbone.device)
            _, hidden = self._forward(t, torch.ones_like(t))
            keys.append(hidden[0, first : len(piece) - 1])
            values.append(t[0, first + 1 :])
        if not keys:
            h = self.store.dim
            return torch.zeros(0, h, device=self.backbone.device), torch.zeros(
                0, dtype=torch.long, device=self.backbone.device
            )
        return torch.cat(keys), torch.cat(values)

    def learn(self, document: Document) -> LearnReport:
        return self._learn_by_adding([document], self._store)[0]

    def learn_documents(self, documents: Sequence[Document]) -> list[LearnReport]:
        """Store every document, with each one's loss before and after measured in batches (the losses
        before are all taken before any of them is stored)."""
        return self._learn_by_adding(documents, self._store)

    def _store(self, document: Document) -> tuple[int, dict[str, Any]]:
        """Add a document's key-value pairs to the store; the tokens stored and figures for its report."""
        keys, values = self.document_pairs(document.text)
        first = self.store.clock
        self.store.add(keys, values)
        self.doc_spans[document.id] = (first, self.store.clock)  # the insert stamps of its entries
        self.documents_learned += 1
        return int(values.numel()), {"stored": int(values.numel()), "store_size": self.store.size}

    # -- answering ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        if self.store.size == 0 or self.config.interpolation == 0:
            return self.backbone.generate(
                prompts, chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs
            )
        with self.capture() as cap:
            processor = KNNMixtureProcessor(cap, lambda hidden, scores: self.mix(hidden, scores, touch=True))
            processors = LogitsProcessorList(
                [processor, *(generate_kwargs.pop("logits_processor", None) or [])]
            )
            return self.backbone.generate(
                prompts,
                chat=chat,
                max_new_tokens=max_new_tokens,
                logits_processor=processors,
                **generate_kwargs,
            )

    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        """The kNN mixture at every scored position (the gate leaves far positions' logits as they are)."""
        return _KNNMixing(self) if self.store.size else None

    # -- state ----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.store.state_dict("store.")

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.store.state_dict("store."))
        if set(state) != expected:
            raise ValueError(f"knowledge_store state must hold {sorted(expected)}, got {sorted(state)}")
        self.store.load_state_dict(state, "store.")

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "store_size": self.store.size,
            "hidden_size": self.store.dim,
            "doc_spans": [[doc_id, a, b] for doc_id, (a, b) in self.doc_spans.items()],
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        spans = state.get("doc_spans", [])
        self.doc_spans = {
            str(s[0]): (int(s[1]), int(s[2])) for s in spans if isinstance(s, list) and len(s) == 3
        }

    def reset(self) -> None:
        self.store.clear()
        self.doc_spans = {}
        self.documents_learned = 0

    def forget(self, doc_id: str) -> None:
        """Remove the entries the document added (those an eviction already removed stay removed)."""
        if doc_id not in self.doc_spans:
            raise KeyError(doc_id)
        first, end = self.doc_spans.pop(doc_id)
        stamps = self.store.inserted_at[: self.store.size]
        self.store.keep((stamps < first) | (stamps >= end))
        self.documents_learned = max(0, self.documents_learned - 1)

    def stats(self) -> StrategyStats:
        return StrategyStats(
            params_added=0,
            params_trainable=0,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )

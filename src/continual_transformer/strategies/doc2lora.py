"""``doc2lora``: a trained hypernetwork writes a LoRA adapter for each document in one forward pass.

Learning a document runs no gradient step: the frozen backbone reads each chunk of the document, the
hypernetwork (:mod:`continual_transformer.hypernetwork`, meta-trained by context distillation) turns the
chunk's per-layer hidden states into rank-r factors for the chosen projections, and the chunks' factors are
concatenated along the rank (their deltas add up). Every learned document's adapter stays loaded; a relevance
gate decides per query which apply: the cosine between the query's and each chunk's pooled hidden states
(centred on the training corpus' mean) must reach ``gate_threshold``, and the ``gate_top_k`` most similar
documents apply. Unrelated questions get no adapter and are answered by the base model exactly.

``mode: text`` treats what is learned as a task description (Text-to-LoRA): the same network writes the
adapter, which then applies to every query, ungated.

Without trained weights (no file, or a file marked untrained) learning raises
:class:`~continual_transformer.hypernetwork.HypernetworkNotTrained`: nothing random is presented as learned.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from continual_transformer.backbone import Backbone, ScoringBatch, ScoringHooks
from continual_transformer.errors import ConfigError
from continual_transformer.hypernetwork.model import (
    HypernetworkNotTrained,
    chunk_features,
    load_hypernetwork,
    pooled_embedding,
    unwrap_targets,
    wrap_targets,
)
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import (
    LearnReport,
    Strategy,
    StrategyStats,
    check_state_names,
    pack_texts,
    tensor_bytes,
    unpack_texts,
)

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "hypernetwork" / "weights"
"""Where trained hypernetworks ship, as ``<model name>.safetensors``."""
MODES = ("doc", "text")


def shipped_hypernetwork(backbone: Backbone, directory: Path = SHIPPED_DIR) -> Path:
    """The shipped hypernetwork of the backbone's model: ``<model name>.safetensors`` for a packaged name,
    else the shipped file trained on the same base weights (its recorded fingerprint: a model loaded from a
    local directory or a hub id has another name). The fingerprint depends on the dtype the weights are
    loaded in; shipped files record float32's, so a model loaded by path in bfloat16 names its file in
    ``strategies.doc2lora.hypernetwork``. Only the files' headers are read. A path inside ``directory``
    that does not exist when nothing matches."""
    named = directory / f"{PurePath(backbone.name).name}.safetensors"  # a path's or hub id's last part
    if named.is_file() or not directory.is_dir():
        return named
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                spec = json.loads((handle.metadata() or {}).get("spec", "{}"))
        except (OSError, ValueError, SafetensorError) as exc:
            logger.warning("doc2lora: skipping %s (%s)", path, exc)
            continue
        if isinstance(spec, dict) and spec.get("base_fingerprint") == backbone.fingerprint:
            logger.info(
                "doc2lora: the hypernetwork shipped as %s matches %s's weights", path.name, backbone.name
            )
            return path
    return named


@dataclass(frozen=True, kw_only=True)
class Doc2LoraConfig:
    hypernetwork: str = ""
    """Path of the trained hypernetwork (safetensors, ``ctt train-hypernetwork``); empty: the weights shipped
    for the model when there are any (``hypernetwork/weights/<model name>.safetensors``, else the shipped
    file trained on the same base weights loaded in the same dtype: :func:`shipped_hypernetwork`)."""
    allow_untrained: bool = False
    """Accept a hypernetwork file marked untrained (tests of the mechanics only: its adapters are random)."""
    mode: str = "doc"
    """``doc``: each document's adapter applies to the queries the gate finds it relevant to; ``text``: what
    is learned is a task description, and its adapter applies to every query."""
    gate_threshold: float = 0.5
    """Cosine (centred pooled hidden states of query and chunk) a document needs for its adapter to apply;
    -1 applies every document to every query."""
    gate_top_k: int = 1
    """At most this many documents (the most similar over the threshold) apply per query."""
    chunk_tokens: int = 0
    """Tokens per chunk the hypernetwork reads; 0: the chunk length it was trained with."""
    gate_tokens: int = 256
    """Tokens of a query read for its gate embedding (its end is kept)."""
    batch_size: int = 8
    """Chunks read per forward pass while learning; queries embedded per pass while gating."""

    def __post_init__(self) -> None:
        key = "strategies.doc2lora"
        if self.mode not in MODES:
            raise ConfigError(f"{key}.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not -1.0 <= self.gate_threshold <= 1.0:
            raise ConfigError(f"{key}.gate_threshold: must be in [-1, 1], got {self.gate_threshold}")
        for name in ("gate_top_k", "gate_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.chunk_tokens < 0:
            raise ConfigError(f"{key}.chunk_tokens: must be >= 0 (0: the hypernetwork's)")


class _GatedAdapters(ScoringHooks):
    """Scoring with the adapters of the documents the gate chose for each row."""

    def __init__(self, strategy: Doc2LoraStrategy, active: torch.Tensor) -> None:
        self.strategy = strategy
        self.active = active  # (N, D) bool
        self._touched = active.any(1).tolist()  # sync: once per scoring call

    def touches(self, row: int) -> bool:
        return self._touched[row]

    def forward(self, batch: ScoringBatch):
        rows = torch.tensor(batch.rows, device=self.active.device)
        return self.strategy.applied(self.active[rows])


@register_strategy("doc2lora", config_cls=Doc2LoraConfig)
class Doc2LoraStrategy(Strategy):
    modifies_backbone = False

    def __init__(self, backbone, config: Doc2LoraConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        path = Path(config.hypernetwork) if config.hypernetwork else shipped_hypernetwork(backbone)
        self.hypernetwork_path = path
        self.network = None
        self.trained = False
        self.training_record: dict[str, Any] = {}
        if path.is_file():
            loaded = load_hypernetwork(path, backbone.device)
            loaded.network.spec.check_backbone(backbone)
            self.network, self.trained, self.training_record = loaded.network, loaded.trained, loaded.training
            self.targets = list(self.network.spec.targets)
            self.wrappers = wrap_targets(backbone.model, self.targets, self.network.spec.config.scale)
        elif config.hypernetwork:
            raise HypernetworkNotTrained(f"strategies.doc2lora.hypernetwork: no file at {path}")
        else:
            self.targets, self.wrappers = [], []
        self.reset()

    # -- the bank of adapters --------------------------------------------------------------------------------
    def reset(self) -> None:
        self.a_bank = [torch.zeros(0, t.in_features, device=self.backbone.device) for t in self.targets]
        self.b_bank = [torch.zeros(t.out_features, 0, device=self.backbone.device) for t in self.targets]
        self.rank_doc = torch.zeros(
            0, dtype=torch.long, device=self.backbone.device
        )  # (R,) document of a rank
        self.chunk_embeddings = torch.zeros(0, self._feature_dim(), device=self.backbone.device)  # (C, F)
        self.chunk_doc = torch.zeros(0, dtype=torch.long, device=self.backbone.device)  # (C,)
        self.doc_always = torch.zeros(0, dtype=torch.bool, device=self.backbone.device)  # (D,)
        self.doc_ids: list[str] = []
        self.documents_learned = 0
        self._set_default()

    def _feature_dim(self) -> int:
        return self.network.spec.feature_dim if self.network is not None else 0

    def _set_default(self) -> None:
        """Outside scoring and generation, only ``text``-mode adapters (ungated) apply."""
        always = self.doc_always[self.rank_doc] if self.rank_doc.numel() else self.rank_doc.bool()
        for wrapper, a, b in zip(self.wrappers, self.a_bank, self.b_bank):
            wrapper.factors = (a[None], b[None], always[None].float()) if bool(always.any()) else None

    @contextmanager
    def applied(self, active: torch.Tensor) -> Iterator[None]:
        """Inside, row i of the batch gets the adapters of the documents ``active[i]`` (N, D) bool."""
        gate = (active | self.doc_always[None])[:, self.rank_doc].float()  # (N, R)
        for wrapper, a, b in zip(self.wrappers, self.a_bank, self.b_bank):
            wrapper.factors = (a[None], b[None], gate)
        try:
            yield
        finally:
            self._set_default()

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        for wrapper in self.wrappers:
            wrapper.enabled = False
        try:
            yield
        finally:
            for wrapper in self.wrappers:
                wrapper.enabled = True

    # -- learning --------------------------------------------------------------------------------------------
    def _chunk_length(self) -> int:
        return self.config.chunk_tokens or self.network.spec.config.chunk_tokens

    @torch.no_grad()
    def adapter(self, text: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The adapter of ``text``: per target (A (R, in), B (out, R)) with the chunks' rank components
        concatenated, and the chunks' gate embeddings (C, F). One batched forward per ``batch_size``
        chunks."""
        if self.network is None or not (self.trained or self.config.allow_untrained):
            where = self.hypernetwork_path
            raise HypernetworkNotTrained(
                f"doc2lora needs a trained hypernetwork ({where} is "
                + ("missing" if self.network is None else "marked untrained")
                + "): train one with `ctt train-hypernetwork` and set strategies.doc2lora.hypernetwork"
                + (f" (shipped: {', '.join(p.name for p in sorted(SHIPPED_DIR.glob('*.safetensors')))})")
            )
        ids = self.backbone.token_ids(text)
        if not ids:
            raise ValueError("doc2lora cannot learn an empty document")
        size = self._chunk_length()
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        pad = self.backbone.tokenizer.pad_token_id
        a_parts: list[list[torch.Tensor]] = [[] for _ in self.targets]
        b_parts: list[list[torch.Tensor]] = [[] for _ in self.targets]
        embeddings = []
        spec = self.network.spec
        with self.disabled():
            for start in range(0, len(chunks), self.config.batch_size):
                group = chunks[start : start + self.config.batch_size]
                width = max(len(c) for c in group)
                input_ids = torch.tensor(
                    [c + [pad] * (width - len(c)) for c in group], device=self.backbone.device
                )
                mask = torch.tensor(
                    [[1] * len(c) + [0] * (width - len(c)) for c in group], device=self.backbone.device
                )
                features, pooled = chunk_features(
                    self.backbone, input_ids, mask, self.network.layer_ids, spec.gate_index
                )
                factors = self.network.per_target(self.network(features, mask.bool()))
                for j, (a, b) in enumerate(factors):
                    a_parts[j].append(a.reshape(-1, a.shape[-1]))  # (C r, in)
                    b_parts[j].append(b.permute(1, 0, 2).reshape(b.shape[1], -1))  # (out, C r)
                embeddings.append(pooled)
        factors = [(torch.cat(a), torch.cat(b, dim=1)) for a, b in zip(a_parts, b_parts)]
        return factors, torch.cat(embeddings)

    def learn(self, document) -> LearnReport:
        start = time.perf_counter()
        factors, embeddings = self.adapter(document.text)
        doc = len(self.doc_ids)
        rank = factors[0][0].shape[0]
        self.a_bank = [torch.cat([bank, a.float()]) for bank, (a, _) in zip(self.a_bank, factors)]
        self.b_bank = [torch.cat([bank, b.float()], dim=1) for bank, (_, b) in zip(self.b_bank, factors)]
        device = self.backbone.device
        self.rank_doc = torch.cat([self.rank_doc, torch.full((rank,), doc, device=device)])
        self.chunk_embeddings = torch.cat([self.chunk_embeddings, embeddings])
        self.chunk_doc = torch.cat([self.chunk_doc, torch.full((len(embeddings),), doc, device=device)])
        always = torch.tensor([self.config.mode == "text"], device=device)
        self.doc_always = torch.cat([self.doc_always, always])
        self.doc_ids.append(document.id)
        self.documents_learned += 1
        self._set_default()
        return LearnReport(
            doc_id=document.id,
            tokens=len(self.backbone.token_ids(document.text)),
            loss_before=None,
            loss_after=None,
            seconds=time.perf_counter() - start,
            extra={"chunks": len(embeddings), "rank": rank, "mode": self.config.mode},
        )

    # -- the gate --------------------------------------------------------------------------------------------
    def _centred(self, embeddings: torch.Tensor) -> torch.Tensor:
        centred = embeddings - self.network.gate_center.to(embeddings.device)
        return torch.nn.functional.normalize(centred, dim=-1)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Gate embeddings (N, F) of texts, from the base model (at most ``gate_tokens`` tokens each)."""
        pad = self.backbone.tokenizer.pad_token_id
        out = []
        with self.disabled():
            for start in range(0, len(texts), self.config.batch_size):
                rows = [
                    self.backbone.token_ids(t)[-self.config.gate_tokens :] or [pad]
                    for t in texts[start : start + self.config.batch_size]
                ]
                width = max(len(r) for r in rows)
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.backbone.device)
                mask = torch.tensor(
                    [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.backbone.device
                )
                states = self.backbone.model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
                ).hidden_states
                out.append(pooled_embedding(states[self.network.spec.gate_index], mask))
        return torch.cat(out)

    def similarities(self, queries: Sequence[str]) -> torch.Tensor:
        """Cosine (N, D) of each query to each document (its most similar chunk)."""
        cos = self._centred(self.embed(queries)) @ self._centred(self.chunk_embeddings).T  # (N, C)
        n_docs = len(self.doc_ids)
        index = self.chunk_doc[None].expand(len(queries), -1)
        out = torch.full((len(queries), n_docs), -2.0, device=cos.device)
        return out.scatter_reduce(1, index, cos, reduce="amax", include_self=True)

    def gate(self, queries: Sequence[str]) -> torch.Tensor:
        """(N, D) bool: the documents whose adapter applies to each query."""
        n_docs = len(self.doc_ids)
        if self.config.gate_threshold <= -1.0:
            return torch.ones(len(queries), n_docs, dtype=torch.bool, device=self.backbone.device)
        sims = self.similarities(list(queries))
        k = min(self.config.gate_top_k, n_docs)
        top = sims.topk(k, dim=1)
        chosen = torch.zeros_like(sims, dtype=torch.bool)
        chosen.scatter_(1, top.indices, top.values >= self.config.gate_threshold)
        return chosen & ~self.doc_always[None]

    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        if not self.doc_ids:
            return None
        return _GatedAdapters(self, self.gate(queries))

    def generate(
        self, prompts: Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        prompts = list(prompts)
        if not self.doc_ids or self._disabled:
            return self.backbone.generate(prompts, chat=chat, max_new_tokens=max_new_tokens)
        answers: list[str] = []
        step = self.backbone.generation.batch_size
        for start in range(0, len(prompts), step):
            batch = prompts[start : start + step]
            with self.applied(self.gate(batch)):
                answers.extend(self.backbone.generate(batch, chat=chat, max_new_tokens=max_new_tokens))
        return answers

    # -- state -----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for j, (a, b) in enumerate(zip(self.a_bank, self.b_bank)):
            state[f"adapters.{j}.a"] = a.detach()
            state[f"adapters.{j}.b"] = b.detach()
        state["adapters.rank_doc"] = self.rank_doc
        state["gate.chunk_embeddings"] = self.chunk_embeddings
        state["gate.chunk_doc"] = self.chunk_doc
        state["documents.always"] = self.doc_always
        state.update(pack_texts(self.doc_ids, "documents.ids"))
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_names(self.trainable_state(), state, "doc2lora state")
        for j, target in enumerate(self.targets):
            a, b = state[f"adapters.{j}.a"], state[f"adapters.{j}.b"]
            if a.shape[1:] != (target.in_features,) or b.shape[:1] != (target.out_features,):
                raise ValueError(f"doc2lora state: adapter {j} does not fit {target.name}")
        device = self.backbone.device
        self.a_bank = [state[f"adapters.{j}.a"].to(device) for j in range(len(self.targets))]
        self.b_bank = [state[f"adapters.{j}.b"].to(device) for j in range(len(self.targets))]
        self.rank_doc = state["adapters.rank_doc"].to(device)
        self.chunk_embeddings = state["gate.chunk_embeddings"].to(device)
        self.chunk_doc = state["gate.chunk_doc"].to(device)
        self.doc_always = state["documents.always"].to(device)
        self.doc_ids = unpack_texts(state, "documents.ids")
        self._set_default()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "hypernetwork": str(self.hypernetwork_path), "trained": self.trained}

    def stats(self) -> StrategyStats:
        state = self.trainable_state()
        network = sum(p.numel() for p in self.network.parameters()) if self.network is not None else 0
        adapters = sum(a.numel() + b.numel() for a, b in zip(self.a_bank, self.b_bank))
        return StrategyStats(
            params_added=network + adapters,
            params_trainable=0,
            state_bytes=tensor_bytes(state),
            documents=self.documents_learned,
        )

    def close(self) -> None:
        unwrap_targets(self.backbone.model)
        self.wrappers = []

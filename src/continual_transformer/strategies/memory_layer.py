"""``memory_layer``: sparse memory finetuning (Lin et al. 2025) of product-key memories added to the backbone.

A :class:`~continual_transformer.modules.product_key_memory.ProductKeyMemory` (Berges et al. 2024) is added as
a residual branch next to the MLP of one or more middle decoder layers: a forward hook on the MLP returns
``mlp(x) + memory(x)``, with the MLP's input ``x`` as the query. Its values start at zero, so the model is the
base model bit for bit until it learns; the backbone's weights never change.

**Calibration** (once, lazily, saved with the state): background text — by default the tail of WikiText-2
valid, which the perplexity measurements (its first tokens) never score — is run through the base model; the
MLP inputs at the memory layers fit each memory's query normalisation and sub-keys (k-means), then each slot's
*background document frequency* is counted: in how many background chunks it is read.

**Learning a document** (sec. 3 of the paper): the document's training examples are run through the model and
every slot read is counted (TF); slots are ranked by ``TF * log((N + 1) / (df + 1))`` over the N background
chunks, and only the ``top_t`` best of each memory are trained — their rows are the only trainable tensor (no
other slot has a gradient) — by the shared training loop. Slots the background reads in every chunk are never
trained.

Measured on SmolLM2-135M-Instruct (CPU, layer 15 of 30, defaults; see the ``optimizer`` field): the document
loss falls well (3.8 -> 0.4) but a question phrased differently from the document is answered only sometimes
(1 of 2): the slots are chosen and trained on the document's own contexts. Training in the format the model is
asked in (the ``context_distill`` objective, or question-answer exchanges) is the expected remedy.

The objective is a seam: :meth:`MemoryLayerStrategy.training_plan` returns the examples whose reads choose the
slots and a function that optimises given value rows. ``next_token`` (the document's own next-token loss,
windows that keep their preceding context) is implemented; ``context_distill`` is declared for a distillation
objective to plug in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from continual_transformer import training
from continual_transformer.config import ConfigError, GateArgs, OptimArgs, WindowArgs
from continual_transformer.distillation import ContextDistillConfig, check_objective
from continual_transformer.documents import Document, chunk_spans
from continual_transformer.evaluation.general import general_text
from continual_transformer.layers import check_layer_spec, select_layers
from continual_transformer.modules.dual_mlp import find_mlp
from continual_transformer.modules.hooks import LayerCapture
from continual_transformer.modules.product_key_memory import ProductKeyMemory
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import (
    LearnReport,
    Strategy,
    StrategyStats,
    check_state_names,
    shared_reports,
    tensor_bytes,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MemoryLayerConfig:
    layers: str = "middle"
    """Decoder layers that get a memory next to their MLP: ``middle`` (the layer at half depth, as the paper's
    single memory layer) or finetune's spec (``all``, a slice such as ``12:18``, one index)."""
    n_keys: int = 512
    """Sub-keys per half: each memory has ``n_keys ** 2`` slots (512: 262,144 slots)."""
    heads: int = 4
    """Lookup heads per memory (they share one value table, each has its own query and sub-keys)."""
    topk: int = 32
    """Slots each head reads per token (the paper's k = 32)."""
    query_dim: int = 256
    """Width of one head's query; sub-keys are half as wide."""
    top_t: int = 500
    """Slots trained per memory and document, the best by TF-IDF (the paper's t = 500 for facts). On
    SmolLM2-135M (one 3-sentence fact, AdamW 0.2, 30 steps) 2000 slots reached loss 0.36 against 0.37 with
    500: no gain for 4x the changed slots."""
    objective: str = "next_token"
    """What a document trains: ``next_token`` (its own next-token loss) or ``context_distill`` (match the base
    model that reads the document in its prompt, on queries about it; ``distill``)."""
    distill: ContextDistillConfig = field(default_factory=ContextDistillConfig)
    """Queries and teacher settings of the ``context_distill`` objective."""
    gate: GateArgs = field(default_factory=GateArgs)
    """Apply what was learned only to prompts about learned documents (off by default; ``GateArgs``)."""
    optim: OptimArgs = field(
        default_factory=lambda: OptimArgs(
            optimizer="adamw", learning_rate=0.2, epochs=30, batch_size=8, max_grad_norm=0.0, stop_loss=0.1
        )
    )
    """Optimisation of the selected value rows (their only parameter group; weight decay would move rows of
    slots written by earlier documents, so keep it 0). AdamW (no decay: Adam) at 0.2, or SGD (the paper's
    choice). On SmolLM2-135M, CPU, 2 short fictional-fact documents, 30 steps each, WikiText-2 perplexity on
    2,048 tokens (18.50 before): AdamW 0.2 -> document losses 3.83 -> 0.37 and 2.75 -> 0.49, 1/2 questions
    answered, perplexity +1.0 %; SGD 3000 -> 0.63 and 0.74, 0/2 answered, perplexity -0.1 %; SGD 100 barely
    moved (3.83 -> 3.67 in 15 steps): values start at zero and each slot gets ~1/32 of a read, so SGD needs
    learning rates in the thousands."""
    windows: WindowArgs = field(default_factory=lambda: WindowArgs(window=256, context=64))
    """Training windows of the ``next_token`` objective: 256 tokens, each re-reading 64 tokens of preceding
    text, so facts keep their subject."""
    background: str = "general"
    """Background text for calibration: ``general`` (the tail of WikiText-2 valid from the data directory;
    built-in prose without it) or the path of a UTF-8 text file (its tail)."""
    background_tokens: int = 4096
    """Tokens of background text used for calibration (k-means points and document frequencies). 4096 tokens
    on SmolLM2-135M: calibration 47-103 s on 1 busy CPU core; 54 % of the 262,144 slots read at least once."""
    background_chunk_tokens: int = 128
    """Background text is cut into chunks of this many tokens: the "documents" of the IDF."""
    kmeans_iterations: int = 15
    """Lloyd iterations fitting the sub-keys."""

    def __post_init__(self) -> None:
        key = "strategies.memory_layer."
        spec = self.layers.strip()
        if spec != "middle":
            check_layer_spec(spec, f"{key}layers")
        if self.n_keys < 2 or self.heads < 1:
            raise ConfigError(f"{key}n_keys must be >= 2 and heads >= 1")
        if not 1 <= self.topk <= self.n_keys:
            raise ConfigError(f"{key}topk: must be in [1, n_keys], got {self.topk}")
        if self.query_dim < 2 or self.query_dim % 2:
            raise ConfigError(f"{key}query_dim: must be even and >= 2, got {self.query_dim}")
        if self.top_t < 1:
            raise ConfigError(f"{key}top_t: must be >= 1, got {self.top_t}")
        check_objective(self.objective, f"{key}objective")
        if not self.background.strip():
            raise ConfigError(f"{key}background: 'general' or the path of a text file")
        if self.background_tokens < 2 or self.background_chunk_tokens < 2:
            raise ConfigError(f"{key}background_tokens, background_chunk_tokens: must be >= 2")
        if self.kmeans_iterations < 1:
            raise ConfigError(f"{key}kmeans_iterations: must be >= 1")


def select_memory_layers(spec: str, n_layers: int) -> list[int]:
    """Layer indices for ``middle`` (``n_layers // 2``) or finetune's spec."""
    return [n_layers // 2] if spec.strip() == "middle" else select_layers(spec, n_layers)


def tfidf_slots(counts: torch.Tensor, df: torch.Tensor, chunks: float, top_t: int) -> torch.Tensor:
    """The (at most) ``top_t`` slots (ascending) with the highest ``counts * log((N + 1) / (df + 1))`` > 0.

    ``counts`` (S,): reads of each slot on the document; ``df`` (S,): background chunks that read it;
    ``chunks``: N. Ties go to the lower slot (a stable sort).
    """
    idf = torch.log(torch.as_tensor(chunks + 1.0, device=df.device) / (df.float() + 1.0))
    scores = counts.float() * idf
    order = torch.sort(scores, descending=True, stable=True).indices[:top_t]
    chosen = order[scores[order] > 0]
    return chosen.sort().values


@dataclass(frozen=True)
class TrainingPlan:
    """What learning one document optimises (the seam between slot selection and the objective)."""

    examples: list[training.Example]
    """Token rows whose memory reads choose the trained slots (their real tokens are counted)."""
    loss_fn: training.LossFn
    """The objective's step loss over those rows."""
    scored_tokens: int
    """Tokens the objective scores (the report's ``tokens``)."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the deepest memory layer has run."""


@register_strategy("memory_layer", config_cls=MemoryLayerConfig)
class MemoryLayerStrategy(Strategy):
    modifies_backbone = False
    trains_through_backbone = True

    def __init__(self, backbone, config: MemoryLayerConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        self.layer_ids = select_memory_layers(config.layers, backbone.num_layers)
        model_config = backbone.model.config
        hidden = int(getattr(model_config, "hidden_size", 0) or model_config.n_embd)
        self.mlps = [find_mlp(backbone.layers[i])[1] for i in self.layer_ids]
        self.memories = [
            ProductKeyMemory(
                hidden,
                hidden,
                n_keys=config.n_keys,
                heads=config.heads,
                topk=config.topk,
                query_dim=config.query_dim,
                seed=settings.seed + i,
                device=backbone.device,
            )
            for i in self.layer_ids
        ]
        device = backbone.device
        # Background statistics: fixed shapes from the start, so every checkpoint has the same tensors.
        self._df = [torch.zeros(m.slots, device=device) for m in self.memories]
        self._counts = [torch.zeros(m.slots, device=device) for m in self.memories]
        self._chunks = torch.zeros((), device=device)
        self.calibration_seconds: float | None = None
        self._handles = [
            mlp.register_forward_hook(self._residual_hook(memory))
            for mlp, memory in zip(self.mlps, self.memories)
        ]

    @staticmethod
    def _residual_hook(memory: ProductKeyMemory):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not memory.active:
                return None  # the MLP's output unchanged: the base model, bit for bit
            return output + memory(args[0])

        return hook

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        """Inside, the memory branches are off and the backbone computes the base model."""
        previous = [m.enabled for m in self.memories]
        for memory in self.memories:
            memory.enabled = False
        try:
            yield
        finally:
            for memory, enabled in zip(self.memories, previous):
                memory.enabled = enabled

    # -- calibration -----------------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return float(self._chunks) > 0  # sync: once per document

    def background_rows(self) -> list[list[int]]:
        """Token chunks of the background text (its last ``background_tokens`` tokens)."""
        cfg, tokenizer = self.config, self.backbone.tokenizer
        if cfg.background == "general":
            text, source = general_text(self.settings.data_dir)
        else:
            path = Path(cfg.background).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"strategies.memory_layer.background: {cfg.background!r} is neither 'general' nor a file"
                )
            text, source = path.read_text(encoding="utf-8"), str(path)
        tail = text[-cfg.background_tokens * 12 :]  # enough characters for the tokens wanted
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"][-cfg.background_tokens :]
        size = cfg.background_chunk_tokens
        rows = [ids[a:b] for a, b in chunk_spans(len(ids), size, 0) if b - a >= 2]
        if not rows:
            raise ValueError(f"strategies.memory_layer.background: {source} has no tokens")
        logger.info("memory_layer: background %s, %d tokens in %d chunks", source, len(ids), len(rows))
        return rows

    @torch.no_grad()
    def memory_inputs(self, rows: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """MLP inputs at the memory layers, real tokens of ``rows``: ([(N, D)] per layer, row ids (N,)).

        The forward pass stops after the deepest memory layer; memories read as the model currently computes.
        """
        pad, device = self.backbone.tokenizer.pad_token_id, self.backbone.device
        step = self.config.optim.batch_size
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.memories]
        row_ids = []
        deepest = self.mlps[max(range(len(self.layer_ids)), key=lambda j: self.layer_ids[j])]

        def stop(module, args, output):
            raise _StopForward

        for start in range(0, len(rows), step):
            batch = [list(r) for r in rows[start : start + step]]
            width = max(len(r) for r in batch)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=device)  # (B, T)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
            with ExitStack() as stack:
                captures = [stack.enter_context(LayerCapture(mlp, inputs=True)) for mlp in self.mlps]
                handle = deepest.register_forward_hook(stop)
                stack.callback(handle.remove)
                try:
                    self.backbone.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                real = mask.bool()
                for store, capture in zip(per_layer, captures):
                    assert capture.hidden is not None
                    store.append(capture.hidden[real].float())  # (n, D)
            row_ids.append((torch.arange(len(batch), device=device)[:, None] + start).expand_as(mask)[real])
        return [torch.cat(h) for h in per_layer], torch.cat(row_ids)

    @torch.no_grad()
    def calibrate(self) -> float:
        """Fit queries and sub-keys, count background reads (on the base model); returns the seconds taken."""
        start = time.perf_counter()
        rows = self.background_rows()
        with self.disabled():
            inputs, row_ids = self.memory_inputs(rows)
        for i, (memory, hidden) in enumerate(zip(self.memories, inputs)):
            memory.fit(hidden, iterations=self.config.kmeans_iterations, seed=self.settings.seed + i)
            self._df[i].copy_(memory.access_counts(hidden, row_ids))
            self._counts[i].copy_(memory.access_counts(hidden))
        self._chunks.fill_(float(len(rows)))
        self.calibration_seconds = time.perf_counter() - start
        used = [float((c > 0).float().mean()) for c in self._counts]
        logger.info(
            "memory_layer: calibrated on %d tokens in %.1fs; share of slots read: %s",
            sum(len(r) for r in rows),
            self.calibration_seconds,
            ", ".join(f"{u:.2f}" for u in used),
        )
        return self.calibration_seconds

    # -- slot selection --------------------------------------------------------------------------------------
    @torch.no_grad()
    def select_slots(self, examples: Sequence[training.Example]) -> list[torch.Tensor]:
        """Per memory, the slots (ascending) the examples read most relative to background text (TF-IDF)."""
        inputs, _ = self.memory_inputs([e.input_ids for e in examples])
        chunks = float(self._chunks)
        return [
            tfidf_slots(memory.access_counts(hidden), df, chunks, self.config.top_t)
            for memory, hidden, df in zip(self.memories, inputs, self._df)
        ]

    # -- objective -------------------------------------------------------------------------------------------
    def training_plan(self, document: Document) -> TrainingPlan:
        """Examples and step loss of ``document`` for the configured objective."""
        return self.training_plans([document])[0]

    def training_plans(
        self, documents: Sequence[Document], ids: Sequence[list[int]] | None = None
    ) -> list[TrainingPlan]:
        """:meth:`training_plan` of each document; the context-distillation teacher runs across them in
        shared batches. ``ids``: the documents' token ids when the caller has them (not tokenised again)."""
        from continual_transformer import distillation

        cfg = self.config
        if cfg.objective == "context_distill":
            made = distillation.documents_distill_examples(
                self.backbone, [d.text for d in documents], cfg.distill, teacher_context=self.disabled
            )
            plans = []
            for distilled in made:
                examples = distillation.as_training_examples(distilled)
                tokens = sum(e.scored_tokens for e in examples)
                plans.append(TrainingPlan(examples, distillation.distill_step_loss, tokens))
            return plans
        plans = []
        for i, document in enumerate(documents):
            row = ids[i] if ids is not None else None
            examples = training.window_examples(self.backbone, document.text, cfg.windows, row)
            tokens = sum(e.scored_tokens for e in examples)
            plans.append(TrainingPlan(examples, training.next_token_loss, tokens))
        return plans

    # -- learning --------------------------------------------------------------------------------------------
    def learn(self, document: Document) -> LearnReport:
        return self._learn([document])[0]

    def learn_documents(self, documents: Sequence[Document]) -> list[LearnReport]:
        """Documents that arrive together: each chooses its slots from its own reads (TF-IDF, as alone), and
        one training run over all their examples updates the union of those slots (far fewer, fuller steps).
        One document is learned by :meth:`learn`, exactly as alone."""
        return self._learn(list(documents))

    def _learn(self, documents: list[Document]) -> list[LearnReport]:
        if not documents:
            return []
        calibration = 0.0 if self.calibrated else self.calibrate()
        start = time.perf_counter()
        ids = self.backbone.token_ids_many([d.text for d in documents])  # one tokenisation for both
        plans = self.training_plans(documents, ids)
        scoring = self._scoring(documents, ids)
        loss_before = self._document_nll(documents, *scoring)
        per_document = [self.select_slots(plan.examples) for plan in plans]
        chosen = per_document[0] if len(plans) == 1 else [torch.cat(s).unique() for s in zip(*per_document)]
        examples = [e for plan in plans for e in plan.examples]
        params = [memory.begin_training(slots) for memory, slots in zip(self.memories, chosen)]
        committed = False
        try:
            losses = training.train(
                self.backbone,
                examples,
                params,
                self.config.optim,
                seed=self.settings.seed + self.documents_learned,
                loss_fn=plans[0].loss_fn,
                description=f"memory_layer {documents[0].id}"
                + (f" +{len(documents) - 1}" if len(documents) > 1 else ""),
            )
            committed = True
        finally:
            for memory in self.memories:
                memory.end_training(commit=committed)  # an interrupted run changes nothing
        self.documents_learned += len(documents)
        for document in documents:
            self.remember(document)
        loss_after = self._document_nll(documents, *scoring)
        logger.info(
            "memory_layer: %d document(s) from %s: %d steps on %s slots, loss %.3f -> %.3f",
            len(documents),
            documents[0].id,
            len(losses),
            "/".join(str(s.numel()) for s in chosen),
            sum(loss_before) / len(loss_before),
            sum(loss_after) / len(loss_after),
        )
        figures = {
            "steps": len(losses),
            "slots_trained": [int(s.numel()) for s in chosen],
            "slots_written": [m.written for m in self.memories],
            "layers": list(self.layer_ids),
            "calibration_seconds": calibration,
        }
        return shared_reports(
            documents,
            [plan.scored_tokens for plan in plans],
            loss_before,
            loss_after,
            time.perf_counter() - start,
            [figures] * len(documents),
            step_losses=tuple(losses),
        )

    # -- state -----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for i, memory, df, counts in zip(self.layer_ids, self.memories, self._df, self._counts):
            values = memory.value_state()
            state[f"layers.{i}.values.slots"] = values["slots"]
            state[f"layers.{i}.values.rows"] = values["rows"]
            state[f"layers.{i}.query.weight"] = memory.query_weight
            state[f"layers.{i}.query.mean"] = memory.input_mean
            state[f"layers.{i}.query.scale"] = memory.input_scale
            state[f"layers.{i}.sub_keys"] = memory.sub_keys
            state[f"layers.{i}.background.df"] = df
            state[f"layers.{i}.background.counts"] = counts
        state["background.chunks"] = self._chunks
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.trainable_state()
        check_state_names(current, state, f"memory_layer state does not match layers {self.config.layers!r}")
        values = {f"layers.{i}.values.{part}" for i in self.layer_ids for part in ("slots", "rows")}
        for key, target in current.items():  # check everything before changing anything
            if key not in values and state[key].shape != target.shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(target.shape)}")
        device = self.backbone.device
        for i, memory in zip(self.layer_ids, self.memories):
            slots, rows = state[f"layers.{i}.values.slots"], state[f"layers.{i}.values.rows"]
            if slots.dim() != 1 or rows.shape != (slots.numel(), memory.value_dim):
                raise ValueError(f"layers.{i}.values: slots {tuple(slots.shape)}, rows {tuple(rows.shape)}")
            if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= memory.slots):
                raise ValueError(f"layers.{i}.values.slots: out of range [0, {memory.slots})")
        for key, target in current.items():
            if key not in values:
                target.copy_(state[key])
        for i, memory in zip(self.layer_ids, self.memories):
            memory.load_value_state(
                state[f"layers.{i}.values.slots"].to(device), state[f"layers.{i}.values.rows"].to(device)
            )

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "layers": list(self.layer_ids),
            "slots_written": [m.written for m in self.memories],
            "calibration_seconds": self.calibration_seconds,
        }

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every learned value; the calibration (of the base model) stays."""
        for memory in self.memories:
            memory.clear()
        self.documents_learned = 0
        self.forget_all()

    def close(self) -> None:
        """Remove the memory branches from the MLPs (the backbone's weights were never changed)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def stats(self) -> StrategyStats:
        tables = sum(m.slots * m.value_dim for m in self.memories)
        fixed = sum(m.sub_keys.numel() + m.query_weight.numel() for m in self.memories)
        return StrategyStats(
            params_added=tables + fixed,
            params_trainable=tables,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )

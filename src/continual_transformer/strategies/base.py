"""The contract every document-learning strategy implements.

A strategy owns some state (new tensors, or a slice of the backbone's weights), learns one document at a time,
and answers through the backbone. The facade (:class:`continual_transformer.ContinualTransformer`) and the
benchmark harness only talk to strategies through this class.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from continual_transformer.backbone import ScoringHooks
from continual_transformer.clock import PhaseClock
from continual_transformer.config import GateArgs
from continual_transformer.errors import ConfigError, ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config
    from continual_transformer.documents import Document
    from continual_transformer.modules.relevance_gate import RelevanceGate
    from continual_transformer.training import Example


DOCUMENT_NLL_TOKENS = 8192
"""Tokens (rows x longest row) per forward pass when many documents' losses are measured."""


@dataclass(frozen=True)
class DecodingInput:
    """What greedy answering of one prompt decodes: the exact model text, and a logit bias added at every step
    (``None``: none)."""

    text: str
    bias: torch.Tensor | None = None
    """(V',) float32 added to the first V' logits of every step (retrieval's bias towards context tokens)."""


@dataclass(frozen=True, kw_only=True)
class LearnReport:
    """What learning one document did."""

    doc_id: str
    """Id of the learned document."""
    tokens: int
    """Tokens of the document that were learned."""
    loss_before: float | None
    """Mean next-token loss on the document before learning (``None`` when the strategy does not compute it).
    """
    loss_after: float | None
    """Mean next-token loss on the document after learning."""
    seconds: float
    """Wall-clock seconds spent learning."""
    step_losses: tuple[float, ...] = ()
    """Loss of every optimisation step, in order (empty for strategies without gradient steps)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific figures (e.g. chunks indexed, neurons updated)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class StrategyStats:
    """Size of what a strategy added to the base model."""

    params_added: int
    """Parameters that exist only because of this strategy (0 when it trains backbone weights in place)."""
    params_trainable: int
    """Parameters the strategy optimises (new or backbone)."""
    state_bytes: int
    """Bytes the strategy's checkpoint state takes (its tensors)."""
    documents: int
    """Documents learned so far."""


class BaseModelRows(ScoringHooks):
    """Scoring hooks of the relevance gate: the rows it closes for run on the base model (``base_model``, a
    strategy's switch-everything-off context); the others are scored with what was learned."""

    def __init__(self, closed: Sequence[bool], base_model: Callable[[], AbstractContextManager[Any]]) -> None:
        self.closed = list(closed)
        self.base_model = base_model

    def touches(self, row: int) -> bool:
        return self.closed[row]

    def forward(self, batch: Any) -> AbstractContextManager[Any]:
        return self.base_model()


class Strategy(ABC):
    """Base class of document-learning strategies.

    Subclasses set ``name`` and ``config_cls`` through
    :func:`continual_transformer.strategies.register_strategy`. ``modifies_backbone`` tells the invariant
    tests whether backbone weights may change while learning (``False`` means: frozen parameters must stay
    bit-identical).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    modifies_backbone: ClassVar[bool] = False
    changes_outputs: ClassVar[bool] = True
    """False only for the ``none`` floor: learning never changes what the model computes."""
    cannot_forget: ClassVar[str] = "what it learned is not kept per document"
    """Why :meth:`forget` is refused (strategies that can forget one document override :meth:`forget`)."""
    reads_context: ClassVar[bool] = False
    """True when answers come from stored text put in the prompt: the document loss then only drops on a model
    that can copy from its context (a pretrained one, not a random test model)."""
    trains_through_backbone: ClassVar[bool] = False
    """True when learning back-propagates through the model's layers: refused on a quantized model
    (``model.quantize``), whose int8 layers have no gradient."""

    def __init__(self, backbone: Backbone, config: Any, *, settings: Config) -> None:
        if self.trains_through_backbone and getattr(backbone, "quantized", None):
            raise ConfigError(
                f"{self.name} learns by gradient descent through the model, which model.quantize="
                f"{backbone.quantized} leaves without gradients; use model.quantize=none, or an answer-only "
                "strategy (retrieval, in_context, knowledge_store, doc2lora, ace, none)"
            )
        self.backbone = backbone
        self.config = config
        self.settings = settings
        self.documents_learned = 0
        self._disabled = False
        gate = getattr(config, "gate", None)  # a GateArgs section (memory_bank's ``gate`` is another thing)
        self.relevance_gate: RelevanceGate | None = None
        """The relevance gate in front of learned weights (``gate.enabled`` in the strategy's config)."""
        if isinstance(gate, GateArgs) and gate.enabled:
            from continual_transformer.modules.relevance_gate import RelevanceGate

            self.relevance_gate = RelevanceGate(gate, backbone.tokenizer, backbone.device)

    # -- learning --------------------------------------------------------------------------------------------
    @abstractmethod
    def learn(self, document: Document) -> LearnReport:
        """Learn one document; return what it cost and what it changed."""

    def learn_documents(self, documents: Sequence[Document]) -> list[LearnReport]:
        """Learn documents that arrive together; one report each. Default: :meth:`learn` one by one;
        strategies that train weights run one training over the examples of all of them (far fewer, fuller
        steps)."""
        return [self.learn(document) for document in documents]

    def _learn_by_adding(
        self, documents: Sequence[Document], add: Callable[[Document], tuple[int, dict[str, Any]]]
    ) -> list[LearnReport]:
        """Learning for strategies that store what they read (an index, a key-value store): every document's
        loss before (in batches), ``add`` each (it returns the tokens stored and figures for the report), the
        loss after; the time is shared out by tokens (``extra["batch_seconds"]``: the whole call)."""
        documents = list(documents)
        start = time.perf_counter()
        scoring = self._scoring(documents)
        loss_before = self._document_nll(documents, *scoring)
        added = [add(document) for document in documents]
        loss_after = self._document_nll(documents, *scoring)
        seconds = time.perf_counter() - start
        tokens, figures = [n for n, _ in added], [f for _, f in added]
        return shared_reports(documents, tokens, loss_before, loss_after, seconds, figures)

    def _scoring(
        self, documents: Sequence[Document], ids: list[list[int]] | None = None
    ) -> tuple[list[list[int]], int]:
        """The documents' token ids (``ids`` when the caller has them) and the positions per scoring batch,
        for :meth:`_document_nll` before and after learning: one tokenisation, and both scored in the same
        batches."""
        ids = self.backbone.token_ids_many([d.text for d in documents]) if ids is None else ids
        return ids, self.backbone.scoring_tokens(DOCUMENT_NLL_TOKENS, hooks=self._may_hook())

    def _document_nll(
        self, documents: Sequence[Document], ids: Sequence[list[int]], budget: int
    ) -> list[float]:
        """Each document's mean NLL as this strategy scores it: documents sorted by length, in batches of up
        to :data:`DOCUMENT_NLL_TOKENS` positions as the batch is padded, more on a GPU with memory to spare
        (``Backbone.scoring_tokens``): few forward passes for many short documents, little padding, and on
        a GPU few shapes (``Backbone.scoring_width``). ``ids`` and ``budget``: the documents' token ids and
        the positions per batch, from :meth:`_scoring` (a report's losses before and after batched alike).
        Where training compiles (``optim.compile``), so does scoring (``Backbone.token_nll``'s
        ``compiled``)."""
        texts = [d.text for d in documents]
        lengths = [len(row) for row in ids]
        optim = getattr(self.config, "optim", None)
        compiled = bool(getattr(optim, "compile", False))
        out: list[float] = [0.0] * len(texts)
        groups: list[list[int]] = [[]]
        width = self.backbone.scoring_width
        for i in sorted(range(len(texts)), key=lambda i: lengths[i]):
            if groups[-1] and (len(groups[-1]) + 1) * width(lengths[i] + 2) > budget:
                groups.append([])
            groups[-1].append(i)
        for group in groups:
            if not group:
                continue
            values = self.backbone.token_nll(
                [texts[i] for i in group],
                hooks=self._hooks,
                batch_size=len(group),
                ids=[ids[i] for i in group],
                compiled=compiled,
            )
            for i, v in zip(group, values):
                out[i] = float(v.mean()) if v.numel() else 0.0
        return out

    # -- answering -------------------------------------------------------------------------------------------
    def shares_decoding(self) -> bool:
        """Whether each greedy answer is plain decoding of a model text (:meth:`decoding_inputs`), so prompts
        can share decoding rows (the service's continuous batching). Not for strategies with their own
        :meth:`generate` (kNN mixing, fused memories, adapters chosen per prompt) or a relevance gate."""
        return type(self).generate is Strategy.generate and self.relevance_gate is None

    def decoding_inputs(
        self, prompts: Sequence[str], *, chat: bool | None = None
    ) -> list[DecodingInput] | None:
        """The model text (and logit bias) whose greedy decoding answers each prompt exactly as
        :meth:`generate` does; ``None`` unless :meth:`shares_decoding`."""
        if not self.shares_decoding():
            return None
        return [DecodingInput(self.backbone.model_text(p, chat=chat)) for p in prompts]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer each prompt with what the strategy has learned (default: generate from the current
        backbone; with the relevance gate, prompts it closes for are answered by the base model).
        ``generate_kwargs`` go to ``model.generate`` (sampling settings, a ``streamer``)."""
        prompts = list(prompts)
        closed = self._gate_closed(prompts)
        if not any(closed):
            with self._answering():
                return self.backbone.generate(
                    prompts, chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs
                )
        answers: list[str] = [""] * len(prompts)
        for shut in (False, True):
            rows = [i for i, c in enumerate(closed) if c == shut]
            if not rows:
                continue
            with self.disabled() if shut else self._answering():
                out = self.backbone.generate(
                    [prompts[i] for i in rows], chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs
                )
            for i, answer in zip(rows, out):
                answers[i] = answer
        return answers

    def _answering(self) -> AbstractContextManager[Any]:
        """The backbone as :meth:`generate` decodes the rows learning applies to (default: as it is). A
        strategy may put an equivalent, faster form of its change in place for the call (``lora``: each
        adapted projection merged into one plain layer)."""
        return nullcontext()

    def _gate_closed(self, queries: Sequence[str]) -> list[bool]:
        """Per query: does the relevance gate keep learned weights away from it (all False without a gate)?"""
        if self.relevance_gate is None or self._disabled:
            return [False] * len(queries)
        return [not is_open for is_open in self.relevance_gate.open(queries)]

    # -- scoring: written once here, on the backbone's scoring; strategies only supply scoring_hooks ---------
    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        """How this strategy changes scoring for rows whose queries are ``queries`` (``None``: not at all).

        Strategies that change the forward pass (memories, captures), put text in front (retrieved context) or
        transform the next-token distribution (kNN mixing, logit bias) return a :class:`ScoringHooks`; those
        whose change lives in the backbone's weights need none.
        """
        return None

    def _may_hook(self) -> bool:
        """Whether :meth:`_hooks` can return hooks at all: the strategy scores with hooks of its own or has a
        relevance gate (which scores the rows it closes for with the base model)."""
        return type(self).scoring_hooks is not Strategy.scoring_hooks or self.relevance_gate is not None

    def _hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        if self._disabled or not self._may_hook():
            return None
        made = self.scoring_hooks(queries)
        if made is None and self.relevance_gate is not None:
            closed = self._gate_closed(queries)
            if any(closed):
                return BaseModelRows(closed, self._base_model)
        return made

    @torch.no_grad()
    def forward_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Next-token scores (B, T, V) float32 for a right-padded batch of raw texts, as this strategy
        computes them."""
        return self.backbone.forward_logits(texts, hooks=self._hooks)

    def token_nll(
        self, texts: Sequence[str], *, contexts: Sequence[str] | None = None, batch_size: int = 8
    ) -> list[torch.Tensor]:
        """Per-token NLL of each text as this strategy scores it (see :meth:`Backbone.token_nll`)."""
        return self.backbone.token_nll(texts, contexts=contexts, batch_size=batch_size, hooks=self._hooks)

    def mean_nll(self, texts: Sequence[str], *, contexts: Sequence[str] | None = None) -> float:
        """Token-weighted mean NLL of the texts as this strategy scores them."""
        return self.backbone.mean_nll(texts, contexts=contexts, hooks=self._hooks)

    def perplexity(
        self, text: str, *, window: int = 512, max_tokens: int | None = None, batch_size: int = 8
    ) -> float:
        """Perplexity of general text as this strategy scores it (general-ability measurements use this)."""
        return self.backbone.perplexity(
            text, window=window, max_tokens=max_tokens, batch_size=batch_size, hooks=self._hooks
        )

    # -- the base model --------------------------------------------------------------------------------------
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, the backbone computes exactly the base model and this strategy scores as the base model
        does.

        Every learned change is off (adapters disabled, trainable copies bypassed, scoring hooks not made,
        in-place trained weights swapped for the originals) and back on exit, whatever happens. Teachers that
        must see the untouched model (e.g. for context distillation) run inside it. Generation through
        :meth:`generate` is not covered: use ``self.backbone.generate`` inside.
        """
        if self._disabled:  # nested: already the base model
            yield
            return
        self._disabled = True
        try:
            with self._base_model():
                yield
        finally:
            self._disabled = False

    def _base_model(self) -> AbstractContextManager[Any]:
        """Switch off every change learning made to the backbone while inside (default: it makes none)."""
        return nullcontext()

    def trained_backbone_parameters(self) -> set[str]:
        """Names (as in ``backbone.model.named_parameters()``) of backbone weights learning may change."""
        return set()

    # -- state -----------------------------------------------------------------------------------------------
    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the strategy owns, by name (what a checkpoint saves)."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore tensors returned by :meth:`trainable_state` (strict: names and shapes must match)."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable non-tensor state saved with checkpoints (e.g. document ids of an index)."""
        state: dict[str, Any] = {"documents_learned": self.documents_learned}
        if self.relevance_gate is not None:
            state["gate_chunks"] = self.relevance_gate.state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.documents_learned = int(state.get("documents_learned", 0))
        if self.relevance_gate is not None:
            self.relevance_gate.load_state(state.get("gate_chunks", []))

    def remember(self, document: Document) -> None:
        """After learning ``document``: let the relevance gate open for prompts about it."""
        if self.relevance_gate is not None:
            self.relevance_gate.add(document.text)

    def forget_all(self) -> None:
        """Part of :meth:`reset`: the relevance gate closes for everything."""
        if self.relevance_gate is not None:
            self.relevance_gate.clear()

    @abstractmethod
    def reset(self) -> None:
        """Forget everything learned: afterwards the model behaves exactly like the base model."""

    @property
    def can_forget(self) -> bool:
        """Whether :meth:`forget` removes one document (else it raises :class:`CannotForgetError`)."""
        return type(self).forget is not Strategy.forget

    def forget(self, doc_id: str) -> None:
        """Remove what one learned document added, as if it had never been learned; ``KeyError`` when no
        document ``doc_id`` is held. Strategies whose documents change shared weights cannot, and refuse
        with :class:`CannotForgetError` (:meth:`reset` forgets everything)."""
        raise CannotForgetError(
            f"strategy {self.name!r} cannot forget a single document ({self.cannot_forget}); a reset forgets "
            "every document"
        )

    @abstractmethod
    def stats(self) -> StrategyStats:
        """Parameters added and bytes of state."""

    def close(self) -> None:
        """Undo any structural change to the backbone (hooks, wrapped modules) and restore its weights.

        After ``close`` the backbone is the base model again and another strategy can be built on it.
        """
        self.reset()


class CannotForgetError(ContinualTransformerError):
    """The strategy cannot remove one document (see :attr:`Strategy.cannot_forget`)."""


class TrainingStrategy(Strategy):
    """A strategy that learns a document by gradient descent (``finetune``, ``lora``, ``ttt`` and those to
    come).

    :meth:`learn` is written once: examples from the document, the loss before, one :func:`training.train` run
    on :meth:`trainable_parameters` with the config's ``optim`` settings, the loss after. Subclasses say what
    trains and may add examples, a regularizer, a gradient hook or another loss (:meth:`training_options`),
    and react to the finished run (:meth:`after_training`). The config must have ``optim`` (OptimArgs) and
    ``windows`` (WindowArgs).
    """

    trains_through_backbone = True
    cannot_forget = (
        "every document's gradient steps changed the same weights, which keep no per-document part"
    )

    _rounded: dict[str, torch.Tensor] | None = None
    """The :func:`delta_state` the trainable parameters were last rounded to (``delta_bits``), or ``None``."""

    @abstractmethod
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters learning optimises, by state name."""

    def delta_base(self) -> dict[str, torch.Tensor] | None:
        """The weights :meth:`trainable_parameters` started from (same names), which a checkpoint stores them
        relative to (:meth:`stored_delta`); ``None`` (the default): they are stored whole."""
        return None

    def weights_changed(self) -> None:
        """Called after the trainable parameters were written outside an optimiser step (rounding)."""

    def stored_delta(self) -> dict[str, torch.Tensor]:
        """The trainable parameters as a checkpoint stores them: what changed from :meth:`delta_base`, exactly
        (``delta_bits`` 0) or as the codes the weights were rounded to after the last learning run."""
        base = self.delta_base()
        assert base is not None, f"{self.name} stores its parameters whole"
        if self._rounded is not None:
            return self._rounded
        return delta_state({k: p.detach() for k, p in self.trainable_parameters().items()}, base)

    def load_stored_delta(self, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """The full trainable tensors of a :meth:`stored_delta` (checked, nothing changed yet); a state with
        rounded codes is remembered as the one a later save writes again."""
        base = self.delta_base()
        assert base is not None, f"{self.name} stores its parameters whole"
        full = apply_delta_state(state, base, what)
        self._rounded = state if any(k.endswith(tuple(CODES.values())) for k in state) else None
        return full

    @torch.no_grad()
    def _round_to_stored(self) -> None:
        """With ``delta_bits`` (config), round what learning changed to the codes a checkpoint stores: the
        weights that answer are then exactly those a reload gives, and a save writes the codes as they are."""
        bits = getattr(self.config, "delta_bits", 0)
        base = self.delta_base()
        self._rounded = None
        if not bits or base is None:
            return
        state: dict[str, torch.Tensor] = {}
        params = self.trainable_parameters()
        for group in _groups(params):
            # a group at a time, on the parameters' device (a base kept on the CPU is not rounded there)
            some_base = {name: base[name].to(params[name].device, non_blocking=True) for name in group}
            some = delta_state({name: params[name].detach() for name in group}, some_base, bits=bits)
            rounded = [name for name in group if name + CODES[bits] in some]
            if rounded:
                full = apply_delta_state(some, some_base, self.name)
                for name in rounded:
                    params[name].detach().copy_(full[name])
            state.update(some)
        self._rounded = state
        self.weights_changed()

    def training_examples(
        self, document: Document, ids: Sequence[int] | None = None
    ) -> tuple[list[Example], dict[str, Any]]:
        """The examples of a document (default: its windows) and figures for the report. ``ids``: the
        document's token ids when the caller has them."""
        from continual_transformer import training

        return training.window_examples(self.backbone, document.text, self.config.windows, ids), {}

    def training_options(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Extra keyword arguments of :func:`training.train` (``regularizer``, ``grad_hook``, ``loss_fn``)."""
        return {}

    def after_training(self, document: Document, losses: list[float]) -> dict[str, Any]:
        """Runs after the optimisation, before the loss after is measured; returns figures for the report."""
        return {}

    def distill_examples(self, documents: Sequence[Document]) -> list[tuple[list[Example], dict[str, Any]]]:
        """The ``context_distill`` objective's examples of each document: queries about it answered by the
        base model with the document in its prompt (every learned change off, :meth:`disabled`), as training
        rows; the teacher runs across the documents in shared batches (``teacher_seconds``: the whole
        set's)."""
        from continual_transformer import distillation

        started = time.perf_counter()
        made = distillation.documents_distill_examples(
            self.backbone, [d.text for d in documents], self.config.distill, teacher_context=self.disabled
        )
        seconds = time.perf_counter() - started
        kinds = distillation.QUERY_KINDS
        return [
            (
                distillation.as_training_examples(examples),
                {
                    "distill_queries": {k: sum(e.kind == k for e in examples) for k in kinds},
                    "teacher_seconds": seconds,
                },
            )
            for examples in made
        ]

    def _examples(
        self, documents: Sequence[Document], ids: Sequence[list[int]] | None = None
    ) -> list[tuple[list[Example], dict[str, Any]]]:
        """The examples of the configured objective (``next_token`` or ``context_distill``) and figures, per
        document (``ids``: the documents' token ids when the caller has them)."""
        if getattr(self.config, "objective", "next_token") == "context_distill":
            return self.distill_examples(documents)
        if ids is None:
            return [self.training_examples(d) for d in documents]
        return [self.training_examples(d, row) for d, row in zip(documents, ids)]

    def _train(self, examples: list[Example], description: str) -> list[float]:
        """One :func:`training.train` run over ``examples`` with the config's ``optim`` and this strategy's
        options (the distillation loss for ``context_distill``)."""
        from continual_transformer import distillation, training

        options = self.training_options(examples)
        if getattr(self.config, "objective", "next_token") == "context_distill":
            options.setdefault("loss_fn", distillation.distill_step_loss)
        return training.train(
            self.backbone,
            examples,
            list(self.trainable_parameters().values()),
            self.config.optim,
            seed=self.settings.seed + self.documents_learned,
            description=description,
            **options,
        )

    def learn(self, document: Document) -> LearnReport:
        clock = PhaseClock()
        ((examples, figures),) = self._examples([document])
        clock.lap("examples")
        loss_before = self.mean_nll([document.text])
        clock.lap("loss_before")
        losses = self._train(examples, f"{self.name} {document.id}")
        clock.lap("train")
        figures = {**figures, **self.after_training(document, losses)}
        self._round_to_stored()
        self.documents_learned += 1
        self.remember(document)
        clock.lap("round")
        loss_after = self.mean_nll([document.text])
        clock.lap("loss_after")
        return LearnReport(
            doc_id=document.id,
            tokens=sum(e.scored_tokens for e in examples),
            loss_before=loss_before,
            loss_after=loss_after,
            seconds=clock.total,
            step_losses=tuple(losses),
            extra={"steps": len(losses), **figures, "phase_seconds": clock.laps},
        )

    def learn_documents(self, documents: Sequence[Document]) -> list[LearnReport]:
        """One training run (:func:`training.train`, the config's ``optim``) over the examples of all
        ``documents``, shuffled together; the strategy's hooks see the whole set (``training_options``) and
        each document (``after_training``, after the run). Reports carry the run's time shared out by scored
        tokens (``extra["batch_seconds"]``: the whole run) and each document's own loss before and after. One
        document is learned by :meth:`learn`, exactly as alone.
        """
        documents = list(documents)
        if len(documents) <= 1:
            return [self.learn(document) for document in documents]
        clock = PhaseClock()
        ids = self.backbone.token_ids_many([d.text for d in documents])  # one tokenisation for both
        made = self._examples(documents, ids)
        examples = [e for ex, _ in made for e in ex]
        scoring = self._scoring(documents, ids)
        clock.lap("examples")
        loss_before = self._document_nll(documents, *scoring)
        clock.lap("loss_before")
        losses = self._train(examples, f"{self.name} {len(documents)} documents")
        clock.lap("train")
        figures = [{**f, **self.after_training(d, losses)} for d, (_, f) in zip(documents, made)]
        self._round_to_stored()
        self.documents_learned += len(documents)
        for document in documents:
            self.remember(document)
        clock.lap("round")
        loss_after = self._document_nll(documents, *scoring)
        clock.lap("loss_after")
        tokens = [sum(e.scored_tokens for e in ex) for ex, _ in made]
        return shared_reports(
            documents,
            tokens,
            loss_before,
            loss_after,
            clock.total,
            [{"steps": len(losses), **f, "phase_seconds": clock.laps} for f in figures],
            step_losses=tuple(losses),
        )


def shared_reports(
    documents: Sequence[Document],
    tokens: Sequence[int],
    loss_before: Sequence[float],
    loss_after: Sequence[float],
    seconds: float,
    figures: Sequence[dict[str, Any]],
    **common: Any,
) -> list[LearnReport]:
    """One report per document learned together: the call's ``seconds`` shared out by tokens (with more than
    one document, ``extra`` also holds ``batch_documents`` and ``batch_seconds``: the whole call)."""
    together = len(documents) > 1
    share = seconds / max(sum(tokens), 1)
    batch = {"batch_documents": len(documents), "batch_seconds": seconds} if together else {}
    return [
        LearnReport(
            doc_id=document.id,
            tokens=n,
            loss_before=before,
            loss_after=after,
            seconds=share * n if together else seconds,
            extra={**f, **batch},
            **common,
        )
        for document, n, before, after, f in zip(documents, tokens, loss_before, loss_after, figures)
    ]


def check_state_names(expected, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``state`` has exactly the tensor names of ``expected``
    (checked before a strategy changes anything)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor``; of a GPU tensor, in pinned memory, which copies back to the GPU at the bus's
    speed (pageable memory is staged through a pinned buffer first)."""
    if tensor.device.type != "cuda":
        return tensor.detach().to("cpu", copy=True)
    return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor.detach())


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pack_ragged(
    rows: Sequence[Sequence[int]], dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of integers (or ``bytes``) of any length as two tensors: the rows concatenated, and each row's
    end.

    The one way variable-length state (texts, token chunks) is stored in safetensors.
    """
    ends = torch.tensor([len(row) for row in rows], dtype=torch.int64).cumsum(0)
    if rows and all(isinstance(row, bytes) for row in rows):
        joined = b"".join(rows)  # type: ignore[arg-type]
        flat = (
            torch.frombuffer(bytearray(joined), dtype=torch.uint8)
            if joined
            else torch.zeros(0, dtype=torch.uint8)
        )
        return flat.to(dtype), ends
    return torch.tensor([x for row in rows for x in row], dtype=dtype), ends


def _spans(ends: torch.Tensor, size: int) -> list[tuple[int, int]]:
    bounds = ends.cpu().tolist()
    starts = [0, *bounds[:-1]]
    if any(b < a for a, b in zip(starts, bounds)) or (bounds[-1] if bounds else 0) != size:
        raise ValueError("packed state: the end offsets do not match the data")
    return list(zip(starts, bounds))


def unpack_ragged(flat: torch.Tensor, ends: torch.Tensor) -> list[list[int]]:
    """The rows :func:`pack_ragged` packed."""
    values = flat.cpu().tolist()
    return [values[a:b] for a, b in _spans(ends, len(values))]


def pack_texts(texts: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
    """Texts as two tensors (UTF-8 bytes, end offsets): text state lives in safetensors and is counted."""
    data, ends = pack_ragged([t.encode("utf-8") for t in texts], torch.uint8)
    return {f"{prefix}.bytes": data, f"{prefix}.ends": ends}


def unpack_texts(state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The texts :func:`pack_texts` packed under ``prefix``."""
    data = state[f"{prefix}.bytes"].cpu().numpy().tobytes()
    return [data[a:b].decode("utf-8") for a, b in _spans(state[f"{prefix}.ends"], len(data))]


# -- state relative to the base model: what learning changed, exactly or rounded -----------------------------
ROWS, ROW_VALUES, COLS, COL_VALUES = "@rows", "@row_values", "@cols", "@col_values"
SCALE = "@scale"
CODES = {8: "@q8", 4: "@q4"}
DELTA_BITS = (0, *CODES)
"""Bits per value a dense change can be stored with (0: exactly, as the tensor itself)."""
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_delta_bits(bits: int, key: str) -> None:
    """Refuse a ``delta_bits`` setting that :func:`delta_state` does not store."""
    if bits not in DELTA_BITS:
        raise ConfigError(f"{key}: must be one of {list(DELTA_BITS)}, got {bits!r}")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (``-0.0`` differs from ``0.0``, a NaN equals itself): comparisons are
    exact."""
    return tensor.contiguous().view(_BIT_VIEWS[tensor.element_size()])


def _quantize(change: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-row scales of a matrix of changes: ``round(change / scale)`` with ``scale`` the row's
    largest change over ``2**(bits-1) - 1`` (8 bits: int8 codes; 4 bits: two codes per uint8, low nibble
    first, stored offset by 8)."""
    top = 2 ** (bits - 1) - 1
    change = change.float()
    scale = change.abs().amax(dim=1, keepdim=True) / top
    codes = torch.round(change / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-top, top)
    if bits == 8:
        return codes.to(torch.int8), scale
    nibbles = (codes + 8).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The float32 changes :func:`_quantize` stored (``codes * scale``, computed the same way everywhere)."""
    if bits == 4:
        low, high = (codes & 15).to(torch.int16) - 8, (codes >> 4).to(torch.int16) - 8
        codes = torch.stack((low, high), dim=2).reshape(codes.shape[0], -1)[:, :columns]
    return codes.to(torch.float32) * scale


def delta_state(
    current: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    *,
    max_share: float = 0.5,
    bits: int = 0,
) -> dict[str, torch.Tensor]:
    """``current`` as what differs from ``base`` (same names and shapes): exactly, or with dense changes of
    matrices rounded to ``bits`` per value.

    A tensor equal to its base is left out; one whose changes sit in a few rows (dim 0) or columns (dim 1) of
    a matrix -- a neuron's weights, an embedding row -- is stored as those indices (``NAME@rows``) and their
    values (``NAME@row_values``), or ``@cols``/``@col_values``, when they are at most ``max_share`` of it.
    Any other changed tensor is stored whole under its name -- or, with ``bits`` (8 or 4) and a floating
    matrix, as its change from the base in ``bits``-bit codes (``NAME@q8``/``NAME@q4``) with one float32
    scale per row (``NAME@scale``): 4x or 8x smaller than float32, each value off by at most half a step
    (1/254 or 1/14 of its row's largest change). :func:`apply_delta_state` inverts it.
    """
    if bits not in DELTA_BITS:
        raise ValueError(f"bits must be one of {DELTA_BITS}, got {bits}")
    out: dict[str, torch.Tensor] = {}
    for group in _groups(current):
        references = {
            name: base[name].to(device=current[name].device, dtype=current[name].dtype) for name in group
        }
        counts = _change_counts({name: current[name] for name in group}, references)
        for name in group:
            tensor, reference = current[name], references[name]
            changed_rows, changed_cols = counts[name]
            if not changed_rows:
                continue
            if tensor.ndim == 0:
                out[name] = tensor
                continue
            limit = max_share * tensor.numel()
            row_cost = changed_rows * (tensor.numel() // max(tensor.shape[0], 1))
            col_cost = changed_cols * tensor.shape[0] if tensor.ndim == 2 else tensor.numel() + 1
            if min(row_cost, col_cost) > limit:
                if bits and tensor.ndim == 2 and tensor.is_floating_point():
                    change = tensor.float() - reference.float()
                    out[name + CODES[bits]], out[name + SCALE] = _quantize(change, bits)
                else:
                    out[name] = tensor
                continue
            changed = _bits(tensor) != _bits(reference)
            if row_cost <= col_cost:
                rows = changed.reshape(changed.shape[0], -1).any(dim=1).nonzero().squeeze(1)
                out[name + ROWS], out[name + ROW_VALUES] = rows.to(torch.int64), tensor[rows]
            else:
                cols = changed.any(dim=0).nonzero().squeeze(1)
                out[name + COLS], out[name + COL_VALUES] = cols.to(torch.int64), tensor[:, cols]
    return out


_GROUP_VALUES = 1 << 26
"""Values per group of tensors that :func:`delta_state` and rounding compare with their base at once (the
base's copies on the tensors' device live as long as the group's work)."""


def _groups(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of ``tensors`` in order, in groups of up to :data:`_GROUP_VALUES` values (a larger tensor
    alone)."""
    most = _GROUP_VALUES
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        if groups[-1] and size + tensor.numel() > most:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += tensor.numel()
    return [group for group in groups if group]


def _change_counts(
    current: dict[str, torch.Tensor], references: dict[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """Per tensor: how many of its rows (dim 0; a scalar is one row) and columns (dim 1 of a matrix; 0
    otherwise) hold a value that differs bit for bit from its reference, computed on the tensors' devices and
    read in one transfer per device (a wait per tensor costs a round of launches each on a GPU)."""
    figures: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in current.items():
        zero = torch.zeros((), dtype=torch.long, device=tensor.device)
        changed = _bits(tensor) != _bits(references[name])
        if tensor.numel() == 0:
            rows, cols = zero, zero
        elif tensor.ndim == 0:
            rows, cols = changed.long(), zero
        else:
            rows = changed.reshape(changed.shape[0], -1).any(dim=1).sum()
            cols = changed.any(dim=0).sum() if tensor.ndim == 2 else zero
        figures.setdefault(tensor.device, []).append((name, torch.stack([rows, cols])))
    out: dict[str, tuple[int, int]] = {}
    for named in figures.values():
        read = torch.stack([counts for _, counts in named]).tolist()  # sync: once per device
        out.update({name: (rows, cols) for (name, _), (rows, cols) in zip(named, read)})
    return out


def apply_delta_state(
    state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """The full tensors of a :func:`delta_state` (a state of full tensors is read as it is): every name of
    ``base``, its stored value, rows or columns written over a copy of the base, or the base itself.
    ``ValueError`` naming ``what`` for names, indices or shapes that do not fit ``base``."""
    full: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, reference in base.items():
        if name in state:
            value = state[name]
            used.add(name)
        elif any(name + code in state for code in CODES.values()):
            bits = next(b for b, code in CODES.items() if name + code in state)
            codes, scale = state[name + CODES[bits]], state.get(name + SCALE)
            used |= {name + CODES[bits], name + SCALE}
            rows, columns = (reference.shape[0], reference.shape[1]) if reference.ndim == 2 else (-1, -1)
            if (
                scale is None
                or codes.dtype != (torch.int8 if bits == 8 else torch.uint8)
                or tuple(codes.shape) != (rows, columns if bits == 8 else (columns + 1) // 2)
                or tuple(scale.shape) != (rows, 1)
                or not scale.is_floating_point()
            ):
                raise ValueError(
                    f"{what}: {name}{CODES[bits]} does not fit a tensor of shape {tuple(reference.shape)}"
                )
            change = _dequantize(
                codes.to(reference.device), scale.to(reference.device, torch.float32), bits, columns
            )
            value = (reference.to(torch.float32) + change).to(reference.dtype)
        elif name + ROWS in state or name + COLS in state:
            kind = ROWS if name + ROWS in state else COLS
            index = state[name + kind].to(device=reference.device, dtype=torch.int64)
            values = state[name + (ROW_VALUES if kind == ROWS else COL_VALUES)]
            used |= {name + kind, name + (ROW_VALUES if kind == ROWS else COL_VALUES)}
            size = reference.shape[0] if kind == ROWS else (reference.shape[1] if reference.ndim == 2 else -1)
            expected = (
                (index.numel(), *reference.shape[1:]) if kind == ROWS else (reference.shape[0], index.numel())
            )
            if (
                index.ndim != 1
                or size < 0
                or tuple(values.shape) != expected
                or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= size))
            ):
                raise ValueError(
                    f"{what}: {name}{kind} does not fit a tensor of shape {tuple(reference.shape)}"
                )
            value = reference.clone()
            if kind == ROWS:
                value[index] = values.to(device=reference.device, dtype=reference.dtype)
            else:
                value[:, index] = values.to(device=reference.device, dtype=reference.dtype)
        else:
            value = reference
        if tuple(value.shape) != tuple(reference.shape):
            raise ValueError(f"{what}: {name}: shape {tuple(value.shape)} != {tuple(reference.shape)}")
        full[name] = value
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ValueError(f"{what}: unexpected {unexpected[:3]}")
    return full

"""``ace``: Agentic Context Engineering (Zhang et al. 2025) — a playbook of bullets grown from feedback.

Documents are stored for context exactly as by ``retrieval`` (this strategy *is* a retrieval strategy: same
chunking, index, embedder and relevance gate, set by the same keys). On top, it keeps a
:class:`~continual_transformer.ace.playbook.Playbook` of itemised bullets. A prompt gets the bullets relevant
to it (gated like the chunks: cosine similarity for the dense retriever, word relevance for the lexical ones;
sections in ``always_sections`` always) beside the relevant chunks, inside the chat template; a prompt for
which neither passes is answered exactly as by the base model.

:meth:`AceStrategy.learn` stores a document for context. :meth:`AceStrategy.learn_with_feedback` also runs
``loops`` Generate-Reflect-Curate rounds over question / answer pairs about it (section 3 of the paper):

1. **Generate**: every question answered through this strategy (documents + playbook), batched; the answer
   is checked against the reference (``contains``: a check that ran), and the bullets it used are the ids it
   cites, or the bullets it was shown when it cites none.
2. **Reflect**: the Reflector (``backend``) critiques each answer against the reference and the check and
   tags the used bullets helpful / harmful / neutral; with ``tag_from_check``, used bullets it did not tag
   validly are tagged by the check (right: helpful, wrong: harmful).
3. **Curate**: for each wrong answer (every answer with ``curate_correct``) the Curator emits small JSON
   operations; the valid ones are merged in order (never a full rewrite), near duplicates folded (MiniLM
   similarity >= ``dedupe_similarity``), the least useful bullets evicted beyond ``max_bullets``. With
   ``fallback_insight``, a wrong answer whose Curator reply held no valid operation adds the reference as a
   bullet (``question -> answer``): a feedback memory that works with any model, off by default because it
   is not the paper's method.

Model output is never trusted: replies are parsed strictly, what is valid is kept, what is not is counted
(the report's ``extra``). The Reflector and Curator talk to ``backend``: the backbone in process (default),
an OpenAI-compatible server or an Ollama server (:mod:`continual_transformer.ace.backends`); the Generator
is always this strategy's own answering path, so the playbook improves what is deployed.

State: the chunks as ``retrieval`` saves them (tensors) and the playbook (JSON, in ``extra_state``). Named
playbooks can be saved to and loaded from a directory (:meth:`save_playbook`, :meth:`load_playbook`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from continual_transformer.ace.backends import BACKENDS, LLMBackend, make_backend
from continual_transformer.ace.operations import Operation, apply_operations, parse_operations
from continual_transformer.ace.playbook import (
    DEFAULT_SECTIONS,
    SECTION_PATTERN,
    Bullet,
    Playbook,
    PlaybookStore,
)
from continual_transformer.ace.roles import (
    QAPair,
    as_qa_pairs,
    curator_messages,
    parse_reflection,
    reflector_messages,
    used_bullets,
)
from continual_transformer.backbone import ScoringHooks
from continual_transformer.config import ConfigError
from continual_transformer.documents import Document
from continual_transformer.evaluation.metrics import contains
from continual_transformer.modules.lexical_index import LexicalIndex
from continual_transformer.modules.logits import TokenBiasProcessor
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import LearnReport
from continual_transformer.strategies.retrieval import (
    Augmentation,
    RetrievalConfig,
    RetrievalStrategy,
    _RetrievedContext,
)

logger = logging.getLogger(__name__)

LOOP_COUNTS = (
    "reflector_replies",
    "reflector_parsed",
    "tags_from_reflector",
    "tags_from_check",
    "curator_replies",
    "curator_parsed",
    "operations_valid",
    "operations_rejected",
    "fallback_adds",
)
"""What each Generate-Reflect-Curate loop counts (summed over the loops in a learn report)."""


@dataclass(frozen=True, kw_only=True)
class AceConfig(RetrievalConfig):
    """``strategies.ace``: the ``retrieval`` keys (how documents are stored and gated) and the playbook's."""

    prompt_template: str = "Use this playbook and information if they help:\n{context}\n\n{prompt}"
    """User message when context is used; ``{context}`` is the playbook bullets then the chunks."""
    loops: int = 3
    """Generate-Reflect-Curate rounds per :meth:`learn_with_feedback` call (the paper's multi-epoch
    adaptation)."""
    backend: str = "backbone"
    """Model of the Reflector and Curator: ``backbone`` (in process), ``openai`` (``/v1/chat/completions``)
    or ``ollama`` (``/api/chat``). Keys come from ``CTT_ACE_API_KEY`` (or ``OPENAI_API_KEY``)."""
    base_url: str | None = None
    """Server of an HTTP backend; ``None``: ``http://127.0.0.1:8000/v1`` (openai) or
    ``http://127.0.0.1:11434`` (ollama)."""
    model: str | None = None
    """Model name the HTTP backend asks for."""
    timeout: float = 60.0
    """Seconds an HTTP backend waits for a reply."""
    role_max_tokens: int = 128
    """Tokens the Reflector and the Curator may write per reply."""
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    """Sections of a new playbook."""
    max_bullets: int = 200
    """Cap on bullets; beyond it the least useful (helpful - harmful, then oldest) are evicted."""
    playbook_top_k: int = 6
    """Bullets put in a prompt at most (each must pass the gate)."""
    always_sections: tuple[str, ...] = ()
    """Sections whose bullets go into every prompt that gets context, gate or not."""
    dedupe_similarity: float | None = 0.9
    """An added bullet at least this similar (MiniLM cosine, ``embedder``) to one of its section is folded
    into it; ``None`` folds exact duplicates only."""
    max_operations: int = 4
    """Curator operations kept per reply (the rest are rejected)."""
    curate_correct: bool = False
    """Also curate after right answers (the paper curates every step; a small model mostly adds noise)."""
    tag_from_check: bool = True
    """Tag used bullets from the check (right: helpful, wrong: harmful) where the Reflector gave no valid
    tag."""
    fallback_insight: bool = False
    """A wrong answer whose Curator reply held no valid operation adds ``question -> reference`` to
    ``facts`` (a feedback memory; not the paper's method)."""
    playbook_dir: str = "playbooks"
    """Directory of named playbooks (:meth:`AceStrategy.save_playbook` / ``load_playbook``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "strategies.ace"
        if self.loops < 1:
            raise ConfigError(f"{key}.loops: must be >= 1, got {self.loops}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{key}.backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend != "backbone" and not self.model:
            raise ConfigError(f"{key}.model: the {self.backend} backend needs a model name")
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ConfigError(f"{key}.timeout: must be > 0, got {self.timeout}")
        for name in ("role_max_tokens", "max_bullets", "playbook_top_k", "max_operations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.sections or len(set(self.sections)) != len(self.sections):
            raise ConfigError(f"{key}.sections: must be distinct and not empty")
        for section in self.sections:
            if not SECTION_PATTERN.match(section):
                raise ConfigError(f"{key}.sections: {section!r} must be lower-case letters, digits, '_'")
        for section in self.always_sections:
            if section not in self.sections:
                raise ConfigError(f"{key}.always_sections: {section!r} is not one of the sections")
        if self.dedupe_similarity is not None and not -1.0 <= self.dedupe_similarity <= 1.0:
            raise ConfigError(f"{key}.dedupe_similarity: must be in [-1, 1] or null")
        if "{context}" not in self.prompt_template or "{prompt}" not in self.prompt_template:
            raise ConfigError(f"{key}.prompt_template: must contain {{context}} and {{prompt}}")


@register_strategy("ace", config_cls=AceConfig)
class AceStrategy(RetrievalStrategy):
    modifies_backbone = False
    reads_context = True
    config: AceConfig

    def __init__(self, backbone, config: AceConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        self.playbook = Playbook(name="playbook", sections=config.sections)
        self.use_playbook = True
        self._backend: LLMBackend | None = None
        self._bullet_index: tuple[int, Any] | None = None  # (playbook version, index)
        self._bullet_vectors: dict[str, torch.Tensor] = {}

    # -- the backend of the Reflector and the Curator --------------------------------------------------------
    @property
    def backend(self) -> LLMBackend:
        if self._backend is None:
            c = self.config
            self._backend = make_backend(
                c.backend,
                backbone=self.backbone,
                base_url=c.base_url,
                model=c.model,
                timeout=c.timeout,
                max_tokens=c.role_max_tokens,
            )
        return self._backend

    @backend.setter
    def backend(self, backend: LLMBackend) -> None:
        self._backend = backend

    # -- which bullets a prompt gets -------------------------------------------------------------------------
    def _embed_bullets(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._bullet_vectors]
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing)):
                self._bullet_vectors[text] = vector
        return torch.stack([self._bullet_vectors[t] for t in texts])

    def select_bullets(self, queries: Sequence[str]) -> list[list[Bullet]]:
        """The playbook bullets each query gets: up to ``playbook_top_k`` that pass the gate, most relevant
        first, then those of ``always_sections``; none while the playbook is off
        (:meth:`without_playbook`)."""
        bullets = list(self.playbook)
        if not bullets or not self.use_playbook or not queries:
            return [[] for _ in queries]
        k = min(self.config.playbook_top_k, len(bullets))
        if self.config.retriever == "dense":
            gate = self.config.min_similarity
            sims = self.embedder.encode(list(queries)) @ self._embed_bullets([b.text for b in bullets]).T
            scores, rows = sims.topk(k, dim=1)  # (Q, k)
            ranked = [
                [(int(r), float(s)) for r, s in zip(row, score)]
                for row, score in zip(rows.cpu().tolist(), scores.cpu().tolist())
            ]
        else:
            gate = self.config.min_relevance
            if self._bullet_index is None or self._bullet_index[0] != self.playbook.version:
                index = LexicalIndex("tfidf" if self.config.retriever == "tfidf" else "bm25")
                index.add(b.text for b in bullets)
                self._bullet_index = (self.playbook.version, index)
            ranked = [
                [(h.index, h.relevance) for h in hits] for hits in self._bullet_index[1].search(queries, k)
            ]
        always = [b for b in bullets if b.section in self.config.always_sections]
        chosen = []
        for row in ranked:
            picked = [bullets[i] for i, relevance in row if relevance >= gate]
            chosen.append(picked + [b for b in always if b not in picked])
        return chosen

    def augment(self, queries: Sequence[str]) -> list[Augmentation]:
        """Retrieval's chunks for each query, with the query's playbook bullets in front of them."""
        plans = super().augment(queries)
        if not len(self.playbook) or not self.use_playbook:
            return plans
        out = []
        for plan, bullets in zip(plans, self.select_bullets(queries)):
            if not bullets:
                out.append(plan)
                continue
            block = "Playbook:\n" + self.playbook.render(bullets)
            context = block if plan.context is None else block + self.config.chunk_separator + plan.context
            bullet_tokens = {t for b in bullets for t in self.backbone.token_ids(b.text)} - self._special
            out.append(Augmentation(plan.hits, context, tuple(sorted(set(plan.bias_tokens) | bullet_tokens))))
        return out

    @contextlib.contextmanager
    def without_playbook(self) -> Iterator[None]:
        """Inside, answers and scores use the documents only (the playbook is kept, just not shown)."""
        previous, self.use_playbook = self.use_playbook, False
        try:
            yield
        finally:
            self.use_playbook = previous

    def _has_context(self) -> bool:
        return bool(self.chunk_ids) or (self.use_playbook and len(self.playbook) > 0)

    # -- answering: retrieval's, also when there is a playbook but no document yet ---------------------------
    def generate(
        self, prompts: Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        if self.chunk_ids or not self._has_context():
            return super().generate(prompts, chat=chat, max_new_tokens=max_new_tokens)
        prompts = list(prompts)
        plans = self.augment(prompts)
        use_chat = self.backbone.uses_chat(chat)
        answers = [""] * len(prompts)
        plain = [i for i, p in enumerate(plans) if p.context is None]
        if plain:
            outs = self.backbone.generate(
                [prompts[i] for i in plain], chat=chat, max_new_tokens=max_new_tokens
            )
            for i, answer in zip(plain, outs):
                answers[i] = answer
        rich = [i for i, p in enumerate(plans) if p.context is not None]
        step = self.backbone.generation.batch_size
        for start in range(0, len(rich), step):
            rows = rich[start : start + step]
            texts = [self._augmented_prompt(prompts[i], plans[i].context or "", use_chat) for i in rows]
            kwargs: dict[str, Any] = {}
            if self.config.bias_strength > 0:
                bias = self._bias_rows([plans[i] for i in rows])
                kwargs["logits_processor"] = LogitsProcessorList([TokenBiasProcessor(bias)])
            for i, answer in zip(
                rows, self.backbone.generate(texts, formatted=True, max_new_tokens=max_new_tokens, **kwargs)
            ):
                answers[i] = answer
        return answers

    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        if not self._has_context():
            return None
        return _RetrievedContext(self, self.augment(list(queries)))

    # -- learning --------------------------------------------------------------------------------------------
    def learn(self, document: Document) -> LearnReport:
        """Store the document for context (retrieval-gated); the playbook is unchanged."""
        return super().learn(document)

    def learn_with_feedback(
        self, document: Document, qa_pairs: Sequence[Any] | None = None, *, loops: int | None = None
    ) -> LearnReport:
        """Store ``document``, then run ``loops`` (default ``config.loops``) Generate-Reflect-Curate rounds
        over ``qa_pairs`` (:class:`QAPair`, ``(question, answer)`` or ``{"question", "answer"}``).

        Without pairs this is :meth:`learn`. The report's ``extra`` holds per-loop accuracy, tokens and
        seconds, and how much of the roles' output parsed.
        """
        start = time.perf_counter()
        stored = self.learn(document)
        pairs = as_qa_pairs(qa_pairs or [])
        if not pairs:
            return stored
        loops = self.config.loops if loops is None else loops
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        records = [self._loop(pairs) for _ in range(loops)]
        totals = {key: sum(r[key] for r in records) for key in (*LOOP_COUNTS, "tokens")}
        return LearnReport(
            doc_id=document.id,
            tokens=stored.tokens,
            loss_before=stored.loss_before,
            loss_after=self.mean_nll([document.text]),
            seconds=time.perf_counter() - start,
            extra={
                **stored.extra,
                "qa_pairs": len(pairs),
                "loops": records,
                **totals,
                "bullets": len(self.playbook),
                "step": self.playbook.step,
            },
        )

    def _loop(self, pairs: Sequence[QAPair]) -> dict[str, Any]:
        """One Generate-Reflect-Curate round over ``pairs``; returns its record."""
        started = time.perf_counter()
        playbook, config = self.playbook, self.config
        playbook.step += 1
        step = playbook.step
        questions = [p.question for p in pairs]
        # -- Generate
        shown = self.select_bullets(questions)
        answers = self.generate(questions, chat=True)
        correct = [bool(contains(a, p.answers)) for a, p in zip(answers, pairs)]
        used = [used_bullets(a, [b.id for b in s]) for a, s in zip(answers, shown)]
        generate_seconds = time.perf_counter() - started
        # -- Reflect
        by_id = {b.id: b for b in playbook}
        reflect_in = [
            reflector_messages(p, a, ok, [by_id[i] for i in ids])
            for p, a, ok, (ids, _) in zip(pairs, answers, correct, used)
        ]
        reflect_out = self.backend.complete_many(reflect_in, max_tokens=config.role_max_tokens)
        reflections = [
            parse_reflection(text, correct=ok, used=ids)
            for text, ok, (ids, _) in zip(reflect_out, correct, used)
        ]
        from_reflector = from_check = 0
        for reflection, (ids, _) in zip(reflections, used):
            for bullet_id in ids:
                tag = reflection.tags.get(bullet_id)
                if tag is not None:
                    from_reflector += 1
                elif config.tag_from_check:
                    tag = "helpful" if reflection.correct else "harmful"
                    from_check += 1
                if tag is not None:
                    playbook.tag(bullet_id, tag, step=step)
        reflect_seconds = time.perf_counter() - started - generate_seconds
        # -- Curate
        targets = [i for i, ok in enumerate(correct) if config.curate_correct or not ok]
        curate_in = [
            curator_messages(pairs[i], answers[i], reflections[i], playbook, shown[i]) for i in targets
        ]
        curate_out = self.backend.complete_many(curate_in, max_tokens=config.role_max_tokens)
        operations: list[Operation] = []
        parsed = rejected = fallback = 0
        for i, text in zip(targets, curate_out):
            result = parse_operations(text, playbook, max_operations=config.max_operations)
            parsed += result.found_json
            rejected += len(result.rejected) if result.found_json else 0
            operations.extend(result.operations)
            if not result.operations and config.fallback_insight and not correct[i]:
                section = "facts" if "facts" in playbook.sections else playbook.sections[0]
                text = f"{pairs[i].question} -> {pairs[i].answer}"
                operations.append(Operation("add", section=section, text=text))
                fallback += 1
        dedupe = config.dedupe_similarity
        merge = apply_operations(
            playbook,
            operations,
            step=step,
            max_bullets=config.max_bullets,
            similarity=self._similarity if dedupe is not None and operations else None,
            dedupe_threshold=dedupe,
        )
        texts = [m["content"] for conv in (*reflect_in, *curate_in) for m in conv]
        texts += [*reflect_out, *curate_out, *answers]
        prompts = [self._augmented_prompt(q, "", True) for q in questions]
        tokens = sum(len(self.backbone.token_ids(t)) for t in (*texts, *prompts))
        return {
            "step": step,
            "accuracy": sum(correct) / len(correct),
            "answers_citing_bullets": sum(cited for _, cited in used),
            "reflector_replies": len(reflect_out),
            "reflector_parsed": sum(r.parsed for r in reflections),
            "tags_from_reflector": from_reflector,
            "tags_from_check": from_check,
            "curator_replies": len(curate_out),
            "curator_parsed": parsed,
            "operations_valid": len(operations) - fallback,
            "operations_rejected": rejected,
            "fallback_adds": fallback,
            "merge": merge.to_dict(),
            "bullets": len(playbook),
            "tokens": tokens,
            "seconds": time.perf_counter() - started,
            "generate_seconds": generate_seconds,
            "reflect_seconds": reflect_seconds,
            "sample_replies": {  # the first of each role, as written (what a small model manages to say)
                "answer": answers[0][:300],
                "reflector": reflect_out[0][:300] if reflect_out else None,
                "curator": curate_out[0][:300] if curate_out else None,
            },
        }

    def _similarity(self, new: Sequence[str], old: Sequence[str]) -> torch.Tensor:
        return self.embedder.encode(list(new)) @ self._embed_bullets(list(old)).T

    # -- named playbooks -------------------------------------------------------------------------------------
    def playbook_store(self, directory: str | None = None) -> PlaybookStore:
        return PlaybookStore(directory or self.config.playbook_dir)

    def save_playbook(self, name: str | None = None, directory: str | None = None):
        """Write the playbook to the playbook directory as ``name`` (default: its own name); the file."""
        return self.playbook_store(directory).save(self.playbook, name)

    def load_playbook(self, name: str, directory: str | None = None) -> Playbook:
        """Replace the playbook by the one stored as ``name`` (validated first; the documents stay)."""
        self.playbook = self.playbook_store(directory).load(name)
        self._bullet_index = None
        return self.playbook

    # -- state -----------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "playbook": self.playbook.to_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        raw = state.get("playbook")
        playbook = (
            Playbook(sections=self.config.sections)
            if raw is None
            else Playbook.from_dict(raw, where="checkpoint playbook")
        )
        super().load_extra_state(state)
        self.playbook = playbook
        self._bullet_index = None

    def reset(self) -> None:
        super().reset()
        self.playbook = Playbook(name=self.playbook.name, sections=self.config.sections)
        self._bullet_index = None

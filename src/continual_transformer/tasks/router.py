"""The task router: one prototype embedding per task in a preallocated (max_tasks, dim) table.

A text is routed to the task whose prototype is nearest by cosine similarity after subtracting the mean of all
prototypes (weighted by example counts): raw LM hidden states share a large common direction (anisotropy), so
uncentred cosines are all close to 1. Embeddings come from the frozen base model (mean of one layer's hidden
states over the text's tokens, no adapter attached) or, as an option, from the MiniLM sentence embedder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.adapters import hidden_size
from continual_transformer.tasks.data import TaskError
from continual_transformer.tasks.prompts import to_device
from continual_transformer.tasks.state import TensorState

if TYPE_CHECKING:
    from continual_transformer.tasks.config import TaskConfig

logger = logging.getLogger(__name__)


class BackboneEmbedder:
    """Mean over text tokens of hidden state ``layer`` of the frozen backbone (float32, CPU)."""

    def __init__(self, backbone: Backbone, *, layer: int, max_tokens: int, batch_size: int) -> None:
        self.backbone, self.layer, self.max_tokens, self.batch_size = backbone, layer, max_tokens, batch_size
        self.dim = hidden_size(backbone)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        tokenizer = self.backbone.tokenizer
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            batch = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                padding_side="right",  # per call: the shared tokenizer is never changed
                truncation=True,
                max_length=self.max_tokens,
                add_special_tokens=False,
            )
            ids, mask = (
                to_device(batch["input_ids"], self.backbone.device),
                to_device(batch["attention_mask"], self.backbone.device),
            )
            output = self.backbone.model(
                input_ids=ids,
                attention_mask=mask,
                output_hidden_states=True,
                use_cache=False,
                **_keep_one(self.backbone.model),
            )
            hidden = output.hidden_states[self.layer].float()  # (B, T, d)
            weights = mask.unsqueeze(-1).float()
            out.append(
                ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu()
            )  # sync: leaves the device
        return torch.cat(out)


def _keep_one(model) -> dict:
    from continual_transformer.tasks.prompts import _forward_params

    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(model)) else {}


class SentenceRouterEmbedder:
    """Sentence embeddings (mean pooling, unit length) from a sentence encoder; ``minilm`` is the packaged
    MiniLM."""

    def __init__(self, name: str, *, device: torch.device, max_tokens: int, batch_size: int) -> None:
        from continual_transformer.modules.embedder import SentenceEmbedder

        self.encoder = SentenceEmbedder.load(
            "minilm-l6" if name == "minilm" else name,
            device=device,
            max_length=min(max_tokens, 256),
            batch_size=batch_size,
        )
        self.dim = self.encoder.dim

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode(list(texts)).cpu()  # sync: leaves the device


def make_embedder(backbone: Backbone, config: TaskConfig) -> BackboneEmbedder | SentenceRouterEmbedder:
    """The embedder ``config.router`` names (with ``backbone``: layer ``router_layer``, default 3/8 of the way
    up)."""
    if config.router != "backbone":
        return SentenceRouterEmbedder(
            config.router,
            device=backbone.device,
            max_tokens=config.max_text_tokens,
            batch_size=config.eval_batch_size,
        )
    layer = config.router_layer if config.router_layer is not None else round(backbone.num_layers * 3 / 8)
    return BackboneEmbedder(
        backbone, layer=layer, max_tokens=config.max_text_tokens, batch_size=config.eval_batch_size
    )


def spread_by_label(labels: Sequence[int], n: int) -> list[int]:
    """Indices of at most ``n`` examples spread over the labels round-robin, so every label gets a
    prototype."""
    queues: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        queues.setdefault(label, []).append(i)
    chosen, order = [], [list(reversed(q)) for q in queues.values()]
    while len(chosen) < n and any(order):
        for queue in order:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return sorted(chosen)


class PrototypeRouter(TensorState):
    """Prototypes (running means of embeddings) in a fixed table; routes by centred cosine similarity.

    ``labels_per_task=None`` keeps one prototype per task, a (max_tasks, dim) table. With ``labels_per_task``
    it keeps one per label, a (max_tasks, labels_per_task, dim) table, and a text goes to the task of its
    nearest label prototype: a task whose labels are far apart (an intent domain) is not blurred into one
    mean.
    """

    def __init__(self, max_tasks: int, dim: int, labels_per_task: int | None = None) -> None:
        self.per_label = labels_per_task is not None
        shape = (max_tasks, labels_per_task) if self.per_label else (max_tasks,)
        self.prototypes = torch.zeros(*shape, dim, dtype=torch.float32)
        self.counts = torch.zeros(*shape, dtype=torch.int64)
        # Below this similarity to its nearest prototype a text belongs to no learned task (-inf: never).
        self.unknown_threshold = torch.full((), float("-inf"), dtype=torch.float32)

    def update(self, task: int, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Fold ``embeddings`` (n, dim) of task ``task`` (with their label indices (n,)) into the
        prototypes."""
        embeddings = embeddings.float()
        if not self.per_label:
            sums = embeddings.sum(0, keepdim=True)  # (1, dim)
            counts = torch.tensor([embeddings.shape[0]])
            protos, n = self.prototypes[task : task + 1], self.counts[task : task + 1]
        else:
            if labels is None:
                raise ValueError("a per-label router needs the label of every embedding")
            width = self.prototypes.shape[1]
            sums = torch.zeros(width, embeddings.shape[1]).index_add_(0, labels, embeddings)  # (L, dim)
            counts = torch.bincount(labels, minlength=width)
            protos, n = self.prototypes[task], self.counts[task]
        total = protos * n[:, None] + sums
        n += counts
        protos.copy_(total / n.clamp(min=1)[:, None])

    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Index of the nearest task for each embedding (B,); only prototypes with examples compete."""
        return self.route_with_similarity(embeddings)[0]

    def route_with_similarity(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest task (B,) and the centred cosine similarity to its nearest prototype (B,)."""
        dim = self.prototypes.shape[-1]
        protos, counts = self.prototypes.reshape(-1, dim), self.counts.reshape(-1)
        known = counts > 0
        if not bool(known.any()):
            raise TaskError("no task has been learned yet: nothing to route to")
        weights = counts.float()
        centre = (protos * weights[:, None]).sum(0) / weights.sum()  # (dim,)
        keys = F.normalize(protos - centre, dim=-1)  # (P, dim)
        queries = F.normalize(embeddings.float() - centre, dim=-1)  # (B, dim)
        similarity = queries @ keys.T  # (B, P)
        similarity[:, ~known] = float("-inf")
        best, nearest = similarity.max(-1)
        return (nearest // self.prototypes.shape[1] if self.per_label else nearest), best

    def calibrate(self, embeddings: torch.Tensor, false_alarm_rate: float) -> float:
        """Set :attr:`unknown_threshold` so that a share ``false_alarm_rate`` of ``embeddings`` (held-out
        inputs of learned tasks) would be flagged unknown: the empirical quantile of their similarity."""
        if not 0.0 <= false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
        if embeddings.shape[0] == 0:
            raise TaskError("calibrating the unknown-task threshold needs held-out in-task texts")
        similarity = self.route_with_similarity(embeddings)[1].sort().values
        k = int(false_alarm_rate * similarity.numel())  # texts strictly below the threshold are flagged
        threshold = float(similarity[k]) if false_alarm_rate > 0 else float(similarity[0]) - 1e-6
        self.unknown_threshold.fill_(threshold)
        return threshold

    def route_or_unknown(self, embeddings: torch.Tensor) -> torch.Tensor:
        """As :meth:`route`, with -1 for a text less similar to every prototype than the calibrated
        threshold."""
        tasks, similarity = self.route_with_similarity(embeddings)
        return torch.where(similarity < self.unknown_threshold, torch.full_like(tasks, -1), tasks)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "prototypes": self.prototypes,
            "counts": self.counts,
            "unknown_threshold": self.unknown_threshold,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "unknown_threshold" not in tensors:  # a checkpoint from before unknown-task detection
            tensors = {**tensors, "unknown_threshold": torch.full((), float("-inf"))}
        for name, own in self.state_tensors().items():
            if name not in tensors or tensors[name].shape != own.shape:
                raise ValueError(f"router tensor {name} is missing or has the wrong shape")
            own.copy_(tensors[name])

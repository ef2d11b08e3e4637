"""The task router: one prototype embedding per task in a preallocated (max_tasks, dim) table.

A text is routed to the task whose prototype is nearest by cosine similarity after subtracting the mean of all
prototypes (weighted by example counts): raw LM hidden states share a large common direction (anisotropy), so
uncentred cosines are all close to 1. Embeddings come from the frozen base model (mean of one layer's hidden
states over the text's tokens, no adapter attached) or, as an option, from the MiniLM sentence embedder.
"""

from __future__ import annotations

import logging
import math
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


BACKBONE_EMBED_BATCH = 64
"""Texts the backbone router embeds per forward pass at least (the pass stops at the router's layer and keeps
no other hidden state, so a larger batch costs little memory)."""


class _LayerReached(Exception):
    """Raised by the hook on the last layer an embedding needs: the rest of the forward pass is not run."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class BackboneEmbedder:
    """Mean over text tokens of hidden state ``layer`` of the frozen backbone (float32, CPU).

    A mid-depth layer's state (``0 < layer < layers``) is taken from the output of decoder layer ``layer - 1``
    and the forward pass stops there (:meth:`embed_through_last_layer` runs the whole model: the reference).
    """

    def __init__(self, backbone: Backbone, *, layer: int, max_tokens: int, batch_size: int) -> None:
        self.backbone, self.layer, self.max_tokens, self.batch_size = backbone, layer, max_tokens, batch_size
        self.dim = hidden_size(backbone)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self._embed(texts, stop_early=0 < self.layer < self.backbone.num_layers)

    def embed_through_last_layer(self, texts: Sequence[str]) -> torch.Tensor:
        """The same embeddings from the full forward pass's hidden states (the reference path)."""
        return self._embed(texts, stop_early=False)

    @torch.no_grad()
    def _embed(self, texts: Sequence[str], *, stop_early: bool) -> torch.Tensor:
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
            hidden = (self._early if stop_early else self._full)(ids, mask).float()  # (B, T, d)
            weights = mask.unsqueeze(-1).float()
            out.append(
                ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu()
            )  # sync: leaves the device
        return torch.cat(out)

    def _full(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        output = self.backbone.model(
            input_ids=ids,
            attention_mask=mask,
            output_hidden_states=True,
            use_cache=False,
            **_keep_one(self.backbone.model),
        )
        return output.hidden_states[self.layer]

    def _early(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        def stop(module, args, output):
            raise _LayerReached(output[0] if isinstance(output, tuple) else output)

        handle = self.backbone.layers[self.layer - 1].register_forward_hook(stop)
        try:
            self.backbone.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _LayerReached as reached:
            return reached.hidden
        finally:
            handle.remove()
        raise RuntimeError("the router's layer was never reached in the forward pass")


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
        backbone,
        layer=layer,
        max_tokens=config.max_text_tokens,
        batch_size=max(config.eval_batch_size, BACKBONE_EMBED_BATCH),
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


UNKNOWN_SCORES = ("cosine", "euclidean", "mahalanobis", "relative_mahalanobis")
"""How the router scores a text's closeness to the learned tasks for unknown-task detection (higher: more like
a learned task), always against the nearest label (or task) prototype: ``cosine``, the centred cosine
similarity the router routes by; ``euclidean``, minus the squared distance; ``mahalanobis``, minus the
squared Mahalanobis distance under the prototypes' shared (tied) covariance (Lee et al. 2018);
``relative_mahalanobis``, that distance less the one to the mean of all examples under their whole covariance
(Ren et al. 2021)."""
COVARIANCE_SCORES = ("mahalanobis", "relative_mahalanobis")
"""The scores that need the shared covariance: the router keeps a (dim, dim) scatter for them."""
ROUTE_RULES = ("cosine", "lda")
"""How the router picks a text's task (:meth:`PrototypeRouter.route`): the nearest prototype by centred cosine
similarity, or by Mahalanobis distance under the shared covariance (linear discriminant analysis)."""


class PrototypeRouter(TensorState):
    """Prototypes (running means of embeddings) in a fixed table; routes by centred cosine similarity.

    ``labels_per_task=None`` keeps one prototype per task, a (max_tasks, dim) table. With ``labels_per_task``
    it keeps one per label, a (max_tasks, labels_per_task, dim) table, and a text goes to the task of its
    nearest label prototype: a task whose labels are far apart (an intent domain) is not blurred into one
    mean.

    A text scoring below :attr:`unknown_threshold` belongs to no learned task; ``unknown_score``
    (:data:`UNKNOWN_SCORES`) names the score. For the Mahalanobis scores the router also keeps the scatter of
    the examples about their prototypes, a (dim, dim) running sum updated with every batch (Chan et al.'s
    pairwise update), so the shared covariance is known without storing any example and the state stays
    fixed in size; ``shrinkage`` pulls that covariance towards a multiple of the identity (a few examples per
    label in a few hundred dimensions leave it singular; 1 is the Euclidean distance).
    """

    def __init__(
        self,
        max_tasks: int,
        dim: int,
        labels_per_task: int | None = None,
        *,
        unknown_score: str = "cosine",
        shrinkage: float = 0.9,
        rule: str = "cosine",
        rule_shrinkage: float = 0.3,
    ) -> None:
        if unknown_score not in UNKNOWN_SCORES:
            raise ValueError(f"unknown_score must be one of {UNKNOWN_SCORES}, got {unknown_score!r}")
        if rule not in ROUTE_RULES:
            raise ValueError(f"rule must be one of {ROUTE_RULES}, got {rule!r}")
        for name, value in (("shrinkage", shrinkage), ("rule_shrinkage", rule_shrinkage)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.unknown_score, self.shrinkage = unknown_score, shrinkage
        self.rule, self.rule_shrinkage = rule, rule_shrinkage
        self.per_label = labels_per_task is not None
        shape = (max_tasks, labels_per_task) if self.per_label else (max_tasks,)
        self.prototypes = torch.zeros(*shape, dim, dtype=torch.float32)
        self.counts = torch.zeros(*shape, dtype=torch.int64)
        # Sum over the examples folded in of (x - its prototype)(x - its prototype)^T (Mahalanobis scores and
        # the lda rule only).
        keeps_scatter = unknown_score in COVARIANCE_SCORES or rule == "lda"
        self.scatter = torch.zeros(dim, dim) if keeps_scatter else None
        # Below this score a text belongs to no learned task (-inf: never).
        self.unknown_threshold = torch.full((), float("-inf"), dtype=torch.float32)

    def update(self, task: int, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Fold ``embeddings`` (n, dim) of task ``task`` (with their label indices (n,)) into the prototypes
        (and the scatter about them)."""
        embeddings = embeddings.float()
        if not self.per_label:
            sums = embeddings.sum(0, keepdim=True)  # (1, dim)
            counts = torch.tensor([embeddings.shape[0]])
            labels = torch.zeros(embeddings.shape[0], dtype=torch.long)
            protos, n = self.prototypes[task : task + 1], self.counts[task : task + 1]
        else:
            if labels is None:
                raise ValueError("a per-label router needs the label of every embedding")
            width = self.prototypes.shape[1]
            sums = torch.zeros(width, embeddings.shape[1]).index_add_(0, labels, embeddings)  # (L, dim)
            counts = torch.bincount(labels, minlength=width)
            protos, n = self.prototypes[task], self.counts[task]
        if self.scatter is not None:
            self._add_scatter(embeddings, labels, protos, n, sums, counts)
        total = protos * n[:, None] + sums
        n += counts
        protos.copy_(total / n.clamp(min=1)[:, None])

    def _add_scatter(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        protos: torch.Tensor,
        n: torch.Tensor,
        sums: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Scatter of a batch about its own label means, plus n_a n_b / (n_a + n_b) (m_b - m_a)(m_b - m_a)^T
        per label for moving the mean m_a of n_a earlier examples (Chan, Golub and LeVeque 1979); float64."""
        batch_means = sums.double() / counts.clamp(min=1)[:, None]  # (L, dim)
        centred = embeddings.double() - batch_means[labels]  # (n, dim)
        shift = batch_means - protos.double()  # (L, dim)
        weight = (n * counts).double() / (n + counts).clamp(min=1).double()  # (L,); 0 for a new label
        delta = centred.T @ centred + shift.T @ (weight[:, None] * shift)  # (dim, dim)
        self.scatter.copy_(self.scatter.double() + delta)

    def _known(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototypes with examples (P, dim) and their counts (P,)."""
        dim = self.prototypes.shape[-1]
        protos, counts = self.prototypes.reshape(-1, dim), self.counts.reshape(-1)
        known = counts > 0
        if not bool(known.any()):
            raise TaskError("no task has been learned yet: nothing to route to")
        return protos[known], counts[known]

    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Index of the task of each embedding (B,) by ``rule``; only prototypes with examples compete.

        ``cosine``: the nearest prototype by centred cosine similarity. ``lda``: the nearest by Mahalanobis
        distance under the shared covariance (shrunk by ``rule_shrinkage``), i.e. linear discriminant
        analysis with equal priors, from the running statistics alone (streaming LDA)."""
        if self.rule == "cosine":
            return self.route_with_similarity(embeddings)[0]
        dim = self.prototypes.shape[-1]
        protos, known = self.prototypes.reshape(-1, dim), self.counts.reshape(-1) > 0
        if not bool(known.any()):
            raise TaskError("no task has been learned yet: nothing to route to")
        self._require_scatter("the lda routing rule", "tasks.router_rule=cosine")
        distance = torch.full((embeddings.shape[0], protos.shape[0]), float("inf"))
        distance[:, known] = _squared_distances(
            embeddings, protos[known], self.covariance(shrinkage=self.rule_shrinkage)
        )
        nearest = distance.argmin(-1)
        return nearest // self.prototypes.shape[1] if self.per_label else nearest

    def _require_scatter(self, what: str, instead: str) -> None:
        if self.scatter is None or bool(self.scatter.isnan().any()):
            raise TaskError(
                f"the router has no covariance statistics for {what} (its state predates them): learn the "
                f"tasks again or set {instead}"
            )

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

    def covariance(self, *, total: bool = False, shrinkage: float | None = None) -> torch.Tensor:
        """The shared covariance of the examples about their prototypes (dim, dim), float64, shrunk
        towards ``trace / dim`` times the identity by ``shrinkage`` (default: the Mahalanobis scores');
        ``total=True``: about the mean of all examples."""
        shrinkage = self.shrinkage if shrinkage is None else shrinkage
        if self.scatter is None:
            raise TaskError(f"the {self.unknown_score} score keeps no covariance statistics")
        protos, counts = self._known()
        scatter = self.scatter.double()
        n = int(counts.sum())
        if total:
            mean = (protos.double() * counts[:, None]).sum(0) / n
            between = protos.double() - mean  # (P, dim)
            scatter = scatter + between.T @ (counts[:, None].double() * between)
        covariance = scatter / max(n - (1 if total else protos.shape[0]), 1)
        identity = torch.eye(covariance.shape[0], dtype=torch.float64)
        scale = float(covariance.diagonal().mean())
        if not scale > 0:  # one example per prototype: no spread measured, the Euclidean distance
            return identity
        # a floor of 1e-6 of the mean variance keeps the Cholesky factorisation defined without shrinkage
        return (1 - shrinkage) * covariance + (shrinkage + 1e-6) * scale * identity

    def unknown_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """How much each embedding looks like the learned tasks (B,), by ``unknown_score``: higher is more
        like them; :meth:`route_or_unknown` flags texts scoring below :attr:`unknown_threshold`."""
        if self.unknown_score == "cosine":
            return self.route_with_similarity(embeddings)[1]
        protos, counts = self._known()
        if self.unknown_score == "euclidean":
            return -torch.cdist(embeddings.float(), protos).square().min(-1).values
        self._require_scatter(f"the {self.unknown_score} score", "tasks.router_unknown_score=euclidean")
        distance = _squared_distances(embeddings, protos, self.covariance()).min(-1).values
        if self.unknown_score == "relative_mahalanobis":
            mean = ((protos.double() * counts[:, None]).sum(0) / counts.sum()).float()[None]  # (1, dim)
            distance = distance - _squared_distances(embeddings, mean, self.covariance(total=True))[:, 0]
        return -distance

    def calibrate(
        self, embeddings: torch.Tensor, false_alarm_rate: float, *, confidence: float | None = None
    ) -> float:
        """Set :attr:`unknown_threshold` from ``embeddings`` (held-out inputs of learned tasks) so that a
        share ``false_alarm_rate`` of such inputs is flagged unknown.

        ``confidence=None`` takes the empirical quantile: the calibration texts meet the rate, new ones only
        on average (the quantile of a few hundred texts is noisy). With a ``confidence`` c, the threshold is
        the highest order statistic whose false-alarm rate on new inputs of the same distribution stays at or
        under the rate with probability c (that rate is Beta-distributed whatever the scores:
        :func:`flagged_for_confidence`)."""
        if not 0.0 <= false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
        if embeddings.shape[0] == 0:
            raise TaskError("calibrating the unknown-task threshold needs held-out in-task texts")
        scores = self.unknown_scores(embeddings).sort().values
        n = scores.numel()
        if confidence is None:
            k = int(false_alarm_rate * n)
        else:
            k = flagged_for_confidence(n, false_alarm_rate, confidence)
            if k < 0:
                logger.warning(
                    "%d held-out texts cannot bound the false-alarm rate at %.3f with confidence %.2f; the "
                    "threshold flags none of them",
                    n,
                    false_alarm_rate,
                    confidence,
                )
        # texts strictly below the threshold are flagged: the k lowest calibration scores
        threshold = float(scores[k]) if k >= 0 and false_alarm_rate > 0 else float(scores[0]) - 1e-6
        self.unknown_threshold.fill_(threshold)
        return threshold

    def route_or_unknown(self, embeddings: torch.Tensor) -> torch.Tensor:
        """As :meth:`route`, with -1 for a text that scores below the calibrated threshold."""
        tasks = self.route(embeddings)
        unknown = self.unknown_scores(embeddings) < self.unknown_threshold
        return torch.where(unknown, torch.full_like(tasks, -1), tasks)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"prototypes": self.prototypes, "counts": self.counts}
        if self.scatter is not None:
            tensors["scatter"] = self.scatter
        return {**tensors, "unknown_threshold": self.unknown_threshold}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        defaults = {"unknown_threshold": torch.full((), float("-inf"))}  # from before unknown-task detection
        if self.scatter is not None:
            # from before the Mahalanobis scores: NaN marks the statistics as unknown (and keeps them so)
            defaults["scatter"] = torch.full_like(self.scatter, float("nan"))
        tensors = {**{k: v for k, v in defaults.items() if k not in tensors}, **tensors}
        for name, own in self.state_tensors().items():
            if name not in tensors or tensors[name].shape != own.shape:
                raise ValueError(f"router tensor {name} is missing or has the wrong shape")
            own.copy_(tensors[name])


def flagged_for_confidence(n: int, false_alarm_rate: float, confidence: float) -> int:
    """How many of ``n`` calibration scores a threshold may flag (the largest k) so that, with probability
    ``confidence``, it flags at most ``false_alarm_rate`` of new inputs from the same distribution; -1 when
    even flagging none cannot (too few texts: fewer than log(1 - confidence) / log(1 - rate)).

    A threshold just above the k-th lowest of n exchangeable scores flags a share Beta(k + 1, n - k) of the
    distribution, so P(share > rate) = P(Binomial(n, rate) <= k) (the conformal bound of Vovk et al.)."""
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if false_alarm_rate <= 0.0:
        return -1
    j = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(j + 1)
        - torch.lgamma(n - j + 1)
        + j * math.log(false_alarm_rate)
        + (n - j) * math.log1p(-false_alarm_rate)
    )
    allowed = (log_pmf.exp().cumsum(0) <= 1.0 - confidence).nonzero()
    return min(int(allowed[-1]), n - 1) if allowed.numel() else -1  # confidence 0: all but one at most


def _squared_distances(
    embeddings: torch.Tensor, centres: torch.Tensor, covariance: torch.Tensor
) -> torch.Tensor:
    """(x - c)^T covariance^-1 (x - c) for every embedding (B, dim) and centre (P, dim): (B, P).

    Both sides are whitened by the covariance's Cholesky factor (float64), then compared in float32."""
    factor = torch.linalg.cholesky(covariance)  # (dim, dim), lower
    queries = torch.linalg.solve_triangular(factor, embeddings.double().T, upper=False).T.float()  # (B, dim)
    keys = torch.linalg.solve_triangular(factor, centres.double().T, upper=False).T.float()  # (P, dim)
    cross = queries @ keys.T  # (B, P)
    return (queries.square().sum(-1, keepdim=True) - 2 * cross + keys.square().sum(-1)).clamp(min=0)

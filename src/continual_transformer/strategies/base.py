"""The contract every document-learning strategy implements.

A strategy owns some state (new tensors, or a slice of the backbone's weights), learns one document at a time,
and answers through the backbone. The facade (:class:`continual_transformer.ContinualTransformer`) and the
benchmark harness only talk to strategies through this class.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config
    from continual_transformer.documents import Document


@dataclass(frozen=True, kw_only=True)
class LearnReport:
    """What learning one document did."""

    doc_id: str
    """Id of the learned document."""
    tokens: int
    """Tokens of the document that were learned."""
    loss_before: float | None
    """Mean next-token loss on the document before learning (``None`` when the strategy does not compute it)."""
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


class Strategy(ABC):
    """Base class of document-learning strategies.

    Subclasses set ``name`` and ``config_cls`` through :func:`continual_transformer.strategies.register_strategy`.
    ``modifies_backbone`` tells the invariant tests whether backbone weights may change while learning
    (``False`` means: frozen parameters must stay bit-identical).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    modifies_backbone: ClassVar[bool] = False
    changes_outputs: ClassVar[bool] = True
    """False only for the ``none`` floor: learning never changes what the model computes."""
    reads_context: ClassVar[bool] = False
    """True when answers come from stored text put in the prompt: the document loss then only drops on a model
    that can copy from its context (a pretrained one, not a random test model)."""

    def __init__(self, backbone: Backbone, config: Any, *, settings: Config) -> None:
        self.backbone = backbone
        self.config = config
        self.settings = settings
        self.documents_learned = 0

    # -- learning --------------------------------------------------------------------------------------------
    @abstractmethod
    def learn(self, document: Document) -> LearnReport:
        """Learn one document; return what it cost and what it changed."""

    # -- answering -------------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], *, chat: bool | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Answer each prompt with what the strategy has learned (default: generate from the current backbone)."""
        return self.backbone.generate(prompts, chat=chat, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def forward_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Next-token logits (B, T, V) for a right-padded batch of raw texts, as this strategy computes them.

        Strategies that change the forward pass (memories, retrieval) override this; invariant tests compare it.
        """
        batch = self.backbone.encode(texts)
        return self.backbone.model(**batch).logits.float()

    def token_nll(self, texts: Sequence[str], *, contexts: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Per-token NLL of each text as this strategy scores it (see :meth:`Backbone.token_nll`)."""
        return self.backbone.token_nll(texts, contexts=contexts)

    def perplexity(self, text: str, *, window: int = 512, max_tokens: int | None = None) -> float:
        """Perplexity of general text as this strategy scores it (general-ability measurements use this)."""
        return self.backbone.perplexity(text, window=window, max_tokens=max_tokens)

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
        return {"documents_learned": self.documents_learned}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.documents_learned = int(state.get("documents_learned", 0))

    @abstractmethod
    def reset(self) -> None:
        """Forget everything learned: afterwards the model behaves exactly like the base model."""

    @abstractmethod
    def stats(self) -> StrategyStats:
        """Parameters added and bytes of state."""

    def close(self) -> None:
        """Undo any structural change to the backbone (hooks, wrapped modules) and restore its weights.

        After ``close`` the backbone is the base model again and another strategy can be built on it.
        """
        self.reset()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pack_texts(texts: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
    """Texts as two tensors (UTF-8 bytes and end offsets), so text state lives in safetensors and is counted."""
    encoded = [t.encode("utf-8") for t in texts]
    data = (
        torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
        if encoded and any(encoded)
        else torch.zeros(0, dtype=torch.uint8)
    )
    ends = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64).cumsum(0)[1:]
    return {f"{prefix}.bytes": data.clone(), f"{prefix}.ends": ends}


def unpack_texts(state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    data = bytes(state[f"{prefix}.bytes"].cpu().numpy().tobytes())
    ends = state[f"{prefix}.ends"].tolist()
    starts = [0, *ends[:-1]]
    return [data[a:b].decode("utf-8") for a, b in zip(starts, ends)]

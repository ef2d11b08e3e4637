"""Snapshot and rollback of a component whose whole state is its tensors (table, router, pool, buffer,
method).

Each component of a :class:`~continual_transformer.tasks.TaskLearner` owns its state: ``state_tensors()``
names every tensor it keeps, ``load_state_tensors()`` copies them back in. A snapshot is a clone of those
tensors, so rolling back is loading them again; a component with state outside its tensors (LoRA layers
injected into the backbone) overrides :meth:`TensorState.rollback`.
"""

from __future__ import annotations

from typing import Any

import torch


class TensorState:
    """Mixin: ``snapshot()`` clones ``state_tensors()``; ``rollback(snapshot)`` loads them back."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A copy of the state, independent of later changes (tensors stay on their device)."""
        return {name: tensor.detach().clone() for name, tensor in self.state_tensors().items()}

    def rollback(self, snapshot: Any) -> None:
        """Return to the state :meth:`snapshot` returned."""
        self.load_state_tensors(snapshot)


def sub_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, with the prefix removed (one part's state)."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

"""Forward hooks that read or shift the hidden states a module outputs, whatever the architecture returns.

Decoder layers return a tensor (recent Llama) or a tuple whose first element is the hidden states (GPT-2 and
older code); both are handled. Hooks are context managers, so they are always removed, even on error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def layer_output(output: Any) -> torch.Tensor:
    """The hidden-states tensor of a module's output (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def shift_output(
    output: Any, delta: torch.Tensor, mask: torch.Tensor | None, *, skip_zero_rows: bool = True
) -> Any:
    """A module's output with ``delta`` (B, H) added to its hidden states at the positions ``mask`` (B, T)
    marks (every position without a mask, or when the mask's width is not the output's: a cached decoding
    step); rows whose delta is all zero are left bit-identical unless ``skip_zero_rows`` is off
    (:class:`ResidualAdder`)."""
    hidden = layer_output(output)
    shift = delta.to(hidden.dtype)[:, None, :]  # (B, 1, H)
    if mask is not None and mask.shape[1] == hidden.shape[1]:
        shift = shift * mask.to(hidden.dtype)[:, :, None]
    if not skip_zero_rows:
        return _replace_output(output, hidden + shift)
    active = (delta != 0).any(-1)  # (B,)
    return _replace_output(output, torch.where(active[:, None, None], hidden + shift, hidden))


class LayerCapture:
    """Keeps the last hidden states ``(B, T, H)`` a module produced (``.hidden``), while the hook is
    installed.

    ``inputs=True`` captures what the module receives instead (e.g. the input of the LM head, which is the
    output of the final norm).
    """

    def __init__(self, module: nn.Module, *, inputs: bool = False) -> None:
        self.module = module
        self.inputs = inputs
        self.hidden: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = layer_output(output)

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self.hidden = args[0]

    def __enter__(self) -> LayerCapture:
        self.hidden = None
        if self.inputs:
            self._handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class ResidualAdder:
    """Adds a per-row vector to a module's output hidden states: ``h[b, t] += delta[b] * mask[b, t]``.

    ``delta`` is ``(B, H)``; ``mask`` is ``None`` (every position) or ``(B, T)`` for the first call, which is
    the full sequence (the prompt during generation); later calls of one sequence each see the newly generated
    token only and always get the delta (``mask`` is ignored when its width does not match, i.e. after the
    prefill of a KV-cached generation). With ``skip_zero_rows`` (the default), rows whose delta is all zero
    are left bit-identical; training turns it off so a delta that starts at zero still receives gradients.
    """

    def __init__(
        self,
        module: nn.Module,
        delta: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        skip_zero_rows: bool = True,
    ) -> None:
        self.module = module
        self.delta = delta
        self.mask = mask
        self.skip_zero_rows = skip_zero_rows
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        return shift_output(output, self.delta, self.mask, skip_zero_rows=self.skip_zero_rows)

    def __enter__(self) -> ResidualAdder:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

"""A decoder layer's MLP paired with a trainable copy: ``base(x) + (1 - alpha) * (trainable(x) - base(x))``.

The copy starts as the base weights, so before learning the delta is exactly zero and the layer computes the
base model's output bit for bit. ``alpha`` (a buffer, saved with the state) damps the learned delta; the
strategy decays it per learned document. At ``alpha == 0`` the output is the trainable copy alone, and the
base MLP is not computed. :meth:`DualMLP.delta_disabled` switches the delta off (the base model again), e.g.
to generate training material or measure neuron usage with the untouched model.

The copy may be kept in a wider dtype than the model (``trainable_dtype``, e.g. float32 under a bfloat16
model): small updates are not rounded away, and the copy's output is cast back to the model's dtype. Such a
copy computes slightly differently from the base even with equal weights, so until it is first changed
(:meth:`mark_changed`) the base MLP computes instead: before learning, the output is still the base model's
bit for bit.

The MLP and its hidden neurons are found by structure, not by architecture name: the MLP is the child of a
decoder layer whose class name ends in ``MLP`` or that is named ``mlp``/``feed_forward``/``ffn``; its last
projection (``down_proj`` / GPT-2 ``c_proj``) reads the hidden neurons, and the projections that write them
(``gate_proj`` and ``up_proj``, GPT-2 ``c_fc``, fused ``gate_up_proj``) are those whose output width is a
multiple of that input width.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as the ``alpha`` buffer holds it."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def find_mlp(layer: nn.Module) -> tuple[str, nn.Module]:
    """(attribute name, module) of the MLP of a decoder layer."""
    found = {
        id(child): (name, child)
        for name, child in layer.named_children()
        if name in MLP_NAMES or type(child).__name__.endswith("MLP")
    }
    if len(found) != 1:
        names = [name for name, _ in found.values()]
        raise ValueError(
            f"expected one MLP child in {type(layer).__name__} (class name ending in 'MLP' or named "
            f"{'/'.join(MLP_NAMES)}), found {names or 'none'}"
        )
    return next(iter(found.values()))


def projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or GPT-2 Conv1D, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)
    return None


@dataclass(frozen=True)
class NeuronAxis:
    """Where the hidden neurons lie in one parameter: along ``axis``, neuron ``j`` owns index ``j % n``
    slices."""

    axis: int | None
    """Axis of the parameter indexed by (a multiple of) the neurons; ``None``: shared by all neurons (e.g. the
    output bias), frozen when updates are sparse."""


@dataclass(frozen=True)
class NeuronLayout:
    """The hidden neurons of an MLP: how many, which projection reads them, their axis in each parameter."""

    neurons: int
    """Hidden (intermediate) units: the input width of the output projection."""
    output_projection: str
    """Name (inside the MLP) of the projection whose input is the neuron activations."""
    axes: dict[str, NeuronAxis]
    """Per parameter name (inside the MLP)."""

    def masks(self, neuron_mask: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """0/1 masks, broadcastable to each parameter, that keep only the chosen neurons' slices.

        ``neuron_mask`` is a bool tensor (neurons,). Parameters shared by all neurons get an all-zero mask.
        """
        masks = {}
        for name, param in params.items():
            axis = self.axes[name].axis
            if axis is None:
                masks[name] = torch.zeros((), dtype=param.dtype, device=param.device)
                continue
            repeats = param.shape[axis] // self.neurons  # fused gate_up_proj: 2 slices per neuron
            keep = neuron_mask.to(param.device).repeat(repeats).to(param.dtype)  # (shape[axis],)
            shape = [1] * param.dim()
            shape[axis] = -1
            masks[name] = keep.view(shape)
        return masks


def neuron_layout(mlp: nn.Module) -> NeuronLayout:
    """Find the hidden neurons of an MLP and their axis in each of its parameters."""
    projections = [(name, module, projection_shape(module)) for name, module in mlp.named_modules()]
    projections = [(name, module, shape) for name, module, shape in projections if shape is not None]
    if len(projections) < 2:
        raise ValueError(
            f"{type(mlp).__name__}: expected an input and an output projection, found {len(projections)}"
        )
    out_name, _, (neurons, width) = projections[-1]  # registration order: the output projection is last
    inputs = {
        name: module
        for name, module, (fan_in, fan_out) in projections[:-1]
        if fan_in == width and fan_out % neurons == 0
    }
    if not inputs:
        raise ValueError(
            f"{type(mlp).__name__}: no projection writes the {neurons} hidden units read by {out_name!r}"
        )
    axes: dict[str, NeuronAxis] = {}
    for name, _ in mlp.named_parameters():
        owner, _, kind = name.rpartition(".")
        module = mlp.get_submodule(owner) if owner else mlp
        conv = isinstance(module, Conv1D)
        if owner in inputs:
            # Linear weight (out, in) / Conv1D weight (in, out); biases run along out.
            axes[name] = NeuronAxis(axis=(1 if conv else 0) if kind == "weight" else 0)
        elif owner == out_name and kind == "weight":
            axes[name] = NeuronAxis(axis=0 if conv else 1)
        else:
            axes[name] = NeuronAxis(axis=None)
    return NeuronLayout(neurons=neurons, output_projection=out_name, axes=axes)


class DualMLP(nn.Module):
    """The frozen original MLP and a trainable copy of it, mixed by ``1 - alpha``."""

    def __init__(self, base: nn.Module, *, alpha: float, trainable_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layout = neuron_layout(base)
        self.base = base
        self.trainable = copy.deepcopy(base)
        base_dtype = next(base.parameters()).dtype
        self.trainable_dtype = trainable_dtype or base_dtype
        if self.trainable_dtype != base_dtype:
            self.trainable.to(self.trainable_dtype)
        for param in self.trainable.parameters():
            param.requires_grad_(False)
        device = next(base.parameters()).device
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32, device=device))
        self._alpha = _as_float32(alpha)  # host copy: forward branches on it without a device sync
        self.delta_enabled = True
        self._exact_copy = self.trainable_dtype == base_dtype  # equal weights then compute equal outputs
        self.changed = self._exact_copy
        """Whether the copy computes; an exact copy always may, a wider one only once it has been changed."""

    def mark_changed(self) -> None:
        """The copy is about to be (or was) changed: compute with it from now on."""
        self.changed = True

    def _trainable(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.trainable_dtype == hidden.dtype:
            return self.trainable(hidden, *args, **kwargs)
        return self.trainable(hidden.to(self.trainable_dtype), *args, **kwargs).to(hidden.dtype)

    def set_alpha(self, value: float) -> None:
        with torch.no_grad():
            self.alpha.fill_(value)
        self._alpha = _as_float32(value)

    @property
    def current_alpha(self) -> float:
        """``alpha`` as the host keeps it: the float32 buffer's value exactly, without a device read
        (:meth:`set_alpha` and :meth:`sync_alpha` keep the two equal)."""
        return self._alpha

    def sync_alpha(self) -> None:
        """Refresh the host copy after the ``alpha`` buffer was overwritten (e.g. by a checkpoint load)."""
        self._alpha = float(self.alpha)  # sync: once per load

    @property
    def neurons(self) -> int:
        return self.layout.neurons

    @property
    def base_output_projection(self) -> nn.Module:
        """The frozen output projection: its input is the base model's neuron activations."""
        return self.base.get_submodule(self.layout.output_projection)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.delta_enabled or not self.changed:
            return self.base(hidden, *args, **kwargs)
        if self._alpha == 0.0:
            # base + 1 * (trainable - base) is the trainable copy: skip the base MLP (half the MLP cost).
            # Before learning the copy computes exactly what the base does, so this too is the base model bit
            # for bit.
            return self._trainable(hidden, *args, **kwargs)
        base_out = self.base(hidden, *args, **kwargs)
        trained_out = self._trainable(hidden, *args, **kwargs)
        scale = (1.0 - self.alpha).to(base_out.dtype)
        # Identical weights give trained_out == base_out exactly, so the sum is base_out bit for bit.
        return base_out + scale * (trained_out - base_out)

    @contextmanager
    def delta_disabled(self) -> Iterator[None]:
        """Compute the base MLP only while inside (restores the previous setting on exit)."""
        previous = self.delta_enabled
        self.delta_enabled = False
        try:
            yield
        finally:
            self.delta_enabled = previous

    @torch.no_grad()
    def reset_trainable(self) -> None:
        """Copy the base weights into the trainable copy (the delta is zero again)."""
        for (_, target), (_, source) in zip(self.trainable.named_parameters(), self.base.named_parameters()):
            target.copy_(source)
        self.changed = self._exact_copy

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable.parameters())


@contextmanager
def deltas_disabled(modules: list[DualMLP]) -> Iterator[None]:
    """Switch off the delta of every module in ``modules`` while inside: the base model."""
    previous = [m.delta_enabled for m in modules]
    for m in modules:
        m.delta_enabled = False
    try:
        yield
    finally:
        for m, value in zip(modules, previous):
            m.delta_enabled = value

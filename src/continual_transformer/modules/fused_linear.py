"""Sibling linear layers that read one input (q/k/v, gate/up) computed as one matrix product while decoding.

A decoding step of a small model on a GPU is bound by kernel launches, not by arithmetic: a Llama layer runs
three products for q, k and v and two for gate and up, each a kernel of a few microseconds on one row. Here
each such group of ``nn.Linear`` siblings is stood in for by :class:`FusedMember` modules sharing one
concatenated weight: the first member called with an input computes the whole group's product and keeps the
other members' slices, which they return when called with the same input. The parent module's code (Hugging
Face's attention and MLP) runs unchanged, and so do hooks on the parent.

:meth:`Fusion.install` swaps the members in and :meth:`Fusion.remove` puts the original layers back. While
they stand in, the model's parameters and ``state_dict`` are unchanged (the members hold the originals'
parameters under their names). The concatenated weights are copies, refreshed from the originals each time
the fusion is installed, so a strategy that trains the base weights in place between calls is seen. A group
is left alone (layer by layer) when a member is not a plain
``nn.Linear`` (a LoRA wrapper, an int8 layer), carries hooks, or its members disagree on input width, bias,
dtype or device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Names of sibling linear layers that read the same input in Llama-style attention and gated MLPs."""

SINGLES: tuple[tuple[str, ...], ...] = (("o_proj",), ("down_proj",))
"""The other linear layers of a Llama-style layer: stood in for as groups of one where products of few rows
are reductions (:func:`reduced_product`), so every product of a decoding step is one."""


def reduced_product(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` written as a multiply and a sum over the input features. Compiled for a few rows, it is
    a reduction kernel the compiler generates, which the elementwise work around it (the norm's scaling
    before, the rotary embedding, activation or residual addition after) can join, where a library product
    of one row is a kernel of its own. The sum accumulates in float32, as the library's does."""
    out = (hidden.unsqueeze(-2).float() * weight.float()).sum(-1).to(hidden.dtype)  # (..., out)
    return out if bias is None else out + bias


class FusedGroup:
    """One group of sibling linear layers: the originals, their concatenated weight (and bias) and the
    slices computed for members not yet called (a plain object: no parameters of its own)."""

    def __init__(self, parent: nn.Module, names: Sequence[str], originals: Sequence[nn.Linear]) -> None:
        self.parent, self.names, self.originals = parent, tuple(names), tuple(originals)
        self.sizes = [layer.out_features for layer in originals]
        # normal tensors even when first made inside inference mode (generate), so a later refresh outside it
        # may write them
        with torch.inference_mode(False), torch.no_grad():
            if len(originals) == 1:  # a group of one reads its layer's own tensors: nothing to copy
                weight = originals[0].weight.detach()
                bias = originals[0].bias.detach() if originals[0].bias is not None else None
            else:
                weight = torch.cat([layer.weight for layer in originals])  # (sum of outputs, in)
                bias = (
                    torch.cat([layer.bias for layer in originals]) if originals[0].bias is not None else None
                )
        self.members = [FusedMember(self, i, layer, weight, bias) for i, layer in enumerate(originals)]
        self.reduced_rows = 0  # products of up to this many rows are reductions (:func:`reduced_product`)
        self._copied: tuple | None = None  # what the concatenated weights were last copied from
        self.input: torch.Tensor | None = None
        self.pending: list[torch.Tensor | None] = [None] * len(originals)

    @property
    def weight(self) -> torch.Tensor:
        return self.members[0].fused_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.members[0].fused_bias

    def installed(self) -> bool:
        return all(self.parent._modules.get(n) is m for n, m in zip(self.names, self.members))

    def current(self) -> bool:
        """Whether the parent still holds the layers this group was built from, unchanged in shape, dtype
        and device (``model.to(...)`` keeps the modules and replaces their tensors). Every decoding call asks:
        tensors are read from the modules' dictionaries, not through ``nn.Module.__getattr__``."""
        weight = self.members[0]._buffers["fused_weight"]
        no_bias = self.members[0]._buffers["fused_bias"] is None
        children = self.parent._modules
        if (
            len(self.originals) == 1
            and self.originals[0]._parameters["weight"].data_ptr() != weight.data_ptr()
        ):
            return False  # the layer's weight was given other storage: a group of one reads the old one
        width, dtype, device = weight.shape[1], weight.dtype, weight.device
        for name, layer, size in zip(self.names, self.originals, self.sizes):
            own = layer._parameters["weight"]
            if (
                children.get(name) is not layer
                or own.shape != (size, width)
                or own.dtype != dtype
                or own.device != device
                or (layer._parameters.get("bias") is None) != no_bias
            ):
                return False
        return True

    def refresh(self, stamp: object = None) -> None:
        """Copy the originals' current weights into the concatenated ones (one kernel per tensor), unless
        they were copied under the same ``stamp`` (the caller's count of trainings: an optimiser step may
        write weights in place without bumping their versions) with every original at the same version and
        storage since; without a stamp, always. A group of one reads its layer's own tensors: never."""
        if len(self.originals) == 1:
            return
        copied = (
            None
            if stamp is None
            else (
                stamp,
                tuple(
                    (t._version, t.data_ptr())
                    for layer in self.originals
                    for t in layer._parameters.values()  # weight and bias, without __getattr__
                    if t is not None
                ),
            )
        )
        if copied is not None and copied == self._copied:
            return
        self._copied = copied
        with torch.no_grad():
            torch.cat([layer.weight for layer in self.originals], out=self.weight)
            if self.bias is not None:
                torch.cat([layer.bias for layer in self.originals], out=self.bias)

    def install(self) -> None:
        # straight into the parent's children (what setattr does for a child already there, without its
        # checks: a decoding call swaps every group in and out)
        for name, member in zip(self.names, self.members):
            self.parent._modules[name] = member

    def remove(self) -> None:
        for name, layer in zip(self.names, self.originals):
            self.parent._modules[name] = layer
        self.input, self.pending = None, [None] * len(self.originals)


class FusedMember(nn.Module):
    """Stands in for member ``index`` of a :class:`FusedGroup`: returns the slice of the group's product kept
    for it when called with the input that product was computed from, else computes the product (one kernel)
    and keeps the other members' slices. It holds the original layer's parameters under their names (the
    model's parameters and ``state_dict`` stay the same while it stands in) and the group's concatenated
    weight and bias as buffers that are not saved (one tensor each, shared by the members)."""

    def __init__(
        self,
        group: FusedGroup,
        index: int,
        original: nn.Linear,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.weight = original.weight
        self.bias = original.bias
        self.register_buffer("fused_weight", weight, persistent=False)
        self.register_buffer("fused_bias", bias, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        group = self.group
        kept = group.pending[self.index]
        if kept is not None and group.input is hidden:
            pending = list(group.pending)
            pending[self.index] = None
            group.pending = pending
            if all(p is None for p in pending):
                group.input = None  # nothing kept past the group's last member
            return kept
        # reductions only where the compiler generates them (uncompiled, they would build (rows, out, in))
        few = hidden.numel() <= group.reduced_rows * hidden.shape[-1] and torch.compiler.is_compiling()
        product = reduced_product if few else F.linear
        outputs = product(hidden, self.fused_weight, self.fused_bias).split(
            group.sizes, dim=-1
        )  # (..., out_i)
        group.input = hidden
        group.pending = [None if i == self.index else out for i, out in enumerate(outputs)]
        return outputs[self.index]

    def extra_repr(self) -> str:
        return f"member {self.index} of {'/'.join(self.group.names)}, out={self.group.sizes[self.index]}"


def _fusable(parent: nn.Module, names: Sequence[str]) -> list[nn.Linear] | None:
    """The members of a group under ``parent`` when they can be fused, else ``None``."""
    layers = [parent._modules.get(name) for name in names]  # children only, without __getattr__
    if not all(type(layer) is nn.Linear for layer in layers):  # a wrapper (LoRA), int8, or missing
        return None
    first = layers[0]._parameters["weight"]  # tensors from the dictionaries: every decoding call asks
    no_bias = layers[0]._parameters.get("bias") is None
    for layer in layers:
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
            return None
        weight = layer._parameters["weight"]
        if weight.shape[1] != first.shape[1] or (layer._parameters.get("bias") is None) != no_bias:
            return None
        if weight.dtype != first.dtype or weight.device != first.device:
            return None
    return layers  # type: ignore[return-value]


def _state(candidates: Sequence[tuple[nn.Module, tuple[str, ...]]]) -> tuple:
    """What :meth:`Fusion.install` checks of the candidate layers, as one comparable tuple: per layer, its
    weight's storage, version, shape and dtype, its bias's storage and version, and whether it has hooks."""
    out = []
    for parent, names in candidates:
        children = parent._modules
        for name in names:
            layer = children[name]
            weight, bias = layer._parameters["weight"], layer._parameters.get("bias")
            out.append(
                (
                    weight.data_ptr(),
                    weight._version,
                    weight.shape,
                    weight.dtype,
                    None if bias is None else (bias.data_ptr(), bias._version),
                    bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks),
                )
            )
    return tuple(out)


class Fusion:
    """The fused groups of one model (built once, kept by the caller and installed per use).

    :meth:`install` swaps in every group that still applies (groups whose layers a strategy replaced or
    hooked since are dropped, new plain groups are built) after refreshing their weights; :meth:`remove`
    puts the original layers back."""

    def __init__(self) -> None:
        self.groups: dict[tuple[int, tuple[str, ...]], FusedGroup] = {}
        # (modules, names looked for, the (parent, names) whose children are all plain linear layers): a
        # walk of the same modules has the same candidates (a child's type cannot change without a new child)
        self._plan: tuple[
            Sequence[nn.Module], tuple[tuple[str, ...], ...], list[tuple[nn.Module, tuple[str, ...]]]
        ]
        self._plan = ((), (), [])
        self._installed: list[FusedGroup] = []
        # the last install with a stamp: (its walk, reduced_rows, stamp, _state of its candidates, the groups
        # it installed), for the next install to repeat when nothing it checked has changed
        self._last: tuple[Sequence[nn.Module], int, object, tuple, list[FusedGroup]] | None = None

    def install(
        self,
        model: nn.Module,
        modules: Iterable[nn.Module] | None = None,
        *,
        reduced_rows: int = 0,
        stamp: object = None,
    ) -> list[FusedGroup]:
        """Swap in the groups of ``model`` (``modules``: its modules when the caller has them listed). With
        ``reduced_rows``, products of up to that many rows are :func:`reduced_product` reductions, and the
        layers of :data:`SINGLES` stand in as groups of one. ``stamp``: see :meth:`FusedGroup.refresh`."""
        if self._installed:
            raise RuntimeError("the fusion is installed already")
        wanted = GROUPS + SINGLES if reduced_rows else GROUPS
        walk, looked_for, candidates = self._plan
        if modules is None or walk is not modules or looked_for != wanted:
            candidates = [
                (parent, names)
                for parent in (model.modules() if modules is None else modules)
                if parent._modules
                for names in wanted
                if all(type(parent._modules.get(name)) is nn.Linear for name in names)
            ]
            self._plan = (modules if modules is not None else (), wanted, candidates)
        # The same walk (the same modules, each with the same children), stamp and rows, with every
        # candidate layer's tensors where and as they were (storage, version, shape, dtype) and no hooks
        # added: the groups the last install checked, built and refreshed are installed as they are.
        state = _state(candidates) if stamp is not None and modules is not None else None
        last, checked = self._last, (reduced_rows, stamp, state)
        if state is not None and last is not None and last[0] is modules and last[1:4] == checked:
            for group in last[4]:
                group.install()
            self._installed = list(last[4])
            return list(last[4])
        self._last = None
        active: dict[tuple[int, tuple[str, ...]], FusedGroup] = {}
        for parent, names in candidates:
            layers = _fusable(parent, names)
            if layers is None:
                continue
            key = (id(parent), names)
            group = self.groups.get(key)
            if group is None or group.parent is not parent or not group.current():
                group = FusedGroup(parent, names, layers)
            active[key] = group
        # groups not installed this time (a group of one where products are not reduced) are kept while their
        # layers stand: a later call builds nothing again, and its recorded graphs see the same modules
        kept = {k: g for k, g in self.groups.items() if k not in active and g.current()}
        self.groups = {**kept, **active}
        installed: list[FusedGroup] = []
        try:
            for group in active.values():
                group.reduced_rows = reduced_rows
                group.refresh(stamp)
                group.install()
                installed.append(group)
        except BaseException:
            for group in installed:
                group.remove()
            raise
        self._installed = installed
        if state is not None:
            self._last = (modules, reduced_rows, stamp, state, list(installed))  # type: ignore[arg-type]
        return list(installed)

    def remove(self) -> None:
        for group in self._installed:
            group.remove()
        self._installed = []

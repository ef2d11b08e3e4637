"""A fixed pool of bottleneck adapters applied after the MLP of chosen decoder layers.

Houlsby/Pfeiffer-style adapter on the feed-forward output: ``y = mlp(x) + up(act(down(mlp(x))))`` with the
up-projection zero-initialised, so a fresh adapter is exactly the identity (Houlsby et al., 2019, Sec. 2.1).

All memory is allocated at construction: ``slots`` stored adapters (buffers, indexed by slot) and one
trainable scratch adapter (parameters). Nothing is added later, whatever the number of tasks. Adapters are
attached with forward hooks only inside :meth:`AdapterPool.use`, so the backbone is untouched outside a
forward pass and several learners can share one backbone. A batch may mix slots: each row gathers its own
slot's weights and the adapter runs as one batched matmul (``baddbmm``), with no Python loop over rows or
slots.

Weights are kept in float32 whatever the backbone dtype (stable optimisation); the adapter's input is upcast
and its output cast back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.prompts import to_device
from continual_transformer.tasks.state import TensorState

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}

_HOOK_KEYS = itertools.count(-3_000_000, -1)
"""Hook-dict keys of the pools' kept hooks (handle ids are positive; the backbone's taps take -1e6 and -2e6
downwards): one per pool and kept selection (the scratch adapter, a slot), one per call for a tensor of
slots; never reused."""

Selection = None | str | int | torch.Tensor
"""``None``: no adapter (base model); ``"scratch"``: the trainable adapter; an int: one slot for every row;
a LongTensor (B,): each row's slot, ``-1`` meaning no adapter for that row."""


def find_mlp(layer: nn.Module) -> nn.Module:
    """The feed-forward block of a decoder layer, found by structure: the direct child with the most
    parameters.

    Holds for dense transformer blocks (Llama, Qwen, Mistral, Gemma, GPT-2: the MLP is 2-3 d x 4d matrices
    against the attention's 2-4 d x d).
    """
    children = [(name, module) for name, module in layer.named_children()]
    sized = [(sum(p.numel() for p in module.parameters()), name, module) for name, module in children]
    sized = [item for item in sized if item[0] > 0]
    if not sized:
        raise ValueError(
            f"{type(layer).__name__} has no child module with parameters to attach an adapter to"
        )
    return max(sized, key=lambda item: item[0])[2]


def hidden_size(backbone: Backbone) -> int:
    return int(backbone.model.get_input_embeddings().embedding_dim)


class AdapterPool(TensorState, nn.Module):
    """``slots`` stored bottleneck adapters plus one trainable scratch adapter, over ``layers``."""

    def __init__(
        self, backbone: Backbone, *, slots: int, bottleneck: int, layers: list[int], activation: str = "gelu"
    ) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"an adapter pool needs at least one slot, got {slots}")
        self.layer_ids = list(layers)
        self.activation = activation
        self._act = _ACTIVATIONS[activation]
        self._mlps = [find_mlp(backbone.layers[i]) for i in self.layer_ids]
        d, r, n, s = hidden_size(backbone), bottleneck, len(self.layer_ids), slots
        self.dim, self.bottleneck, self.num_slots = d, r, s
        kw = {"device": backbone.device, "dtype": torch.float32}
        self.register_buffer("slot_down", torch.zeros(s, n, d, r, **kw))  # (S, L, d, r)
        self.register_buffer("slot_down_bias", torch.zeros(s, n, r, **kw))  # (S, L, r)
        self.register_buffer("slot_up", torch.zeros(s, n, r, d, **kw))  # (S, L, r, d)
        self.register_buffer("slot_up_bias", torch.zeros(s, n, d, **kw))  # (S, L, d)
        # Trainable only while a method trains them (training.fit switches requires_grad on and off).
        self.down = nn.Parameter(torch.zeros(n, d, r, **kw), requires_grad=False)
        self.down_bias = nn.Parameter(torch.zeros(n, r, **kw), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(n, r, d, **kw), requires_grad=False)
        self.up_bias = nn.Parameter(torch.zeros(n, d, **kw), requires_grad=False)
        # the hooks of the scratch adapter and of each slot: one object per (selection, layer), put under one
        # key per selection, so a compiled pass's hook guards hold from call to call
        # (``Backbone.compiled_calls``)
        self._kept_hooks: dict[str | int, tuple[int, list]] = {}

    # -- slots -----------------------------------------------------------------------------------------------
    def scratch_parameters(self) -> list[nn.Parameter]:
        return [self.down, self.down_bias, self.up, self.up_bias]

    @torch.no_grad()
    def fresh_scratch(self, seed: int) -> None:
        """A new adapter in the scratch slot: random down-projection, zero up-projection (the identity)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        init = torch.randn(self.down.shape, generator=generator) / self.dim**0.5
        self.down.copy_(init)
        for param in (self.down_bias, self.up, self.up_bias):
            param.zero_()

    @torch.no_grad()
    def store(self, slot: int) -> None:
        """Copy the scratch adapter into ``slot``."""
        self.slot_down[slot].copy_(self.down)
        self.slot_down_bias[slot].copy_(self.down_bias)
        self.slot_up[slot].copy_(self.up)
        self.slot_up_bias[slot].copy_(self.up_bias)

    @torch.no_grad()
    def fetch(self, slot: int) -> None:
        """Copy ``slot`` into the scratch adapter (e.g. to continue training it)."""
        self.down.copy_(self.slot_down[slot])
        self.down_bias.copy_(self.slot_down_bias[slot])
        self.up.copy_(self.slot_up[slot])
        self.up_bias.copy_(self.slot_up_bias[slot])

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_tensors().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.state_dict().items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(tensors) != set(own):
            raise ValueError(f"adapter pool tensors differ: {sorted(set(tensors) ^ set(own))}")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape:
                raise ValueError(
                    f"adapter pool tensor {name}: shape {tuple(tensor.shape)} != {tuple(own[name].shape)}"
                )
        self.load_state_dict(tensors)

    # -- forward ---------------------------------------------------------------------------------------------
    @contextmanager
    def use(self, selection: Selection) -> Iterator[None]:
        """Attach the selected adapters to the backbone for the duration (nothing attached for ``None``)."""
        if selection is None:
            yield
            return
        if isinstance(selection, torch.Tensor):
            ids = selection.to(torch.long)
            if ids.device.type == "cpu" and ids.numel() and bool((ids == ids[0]).all()):
                selection = int(ids[0])  # one slot for the whole batch: plain matmuls, no gather
            else:
                ids = to_device(ids, self.slot_down.device)
                selection = (ids.clamp(min=0), (ids >= 0).to(torch.float32))
        if isinstance(selection, str) and selection != "scratch":
            raise ValueError(
                f"adapter selection {selection!r}: use None, 'scratch', a slot or a tensor of slots"
            )
        if isinstance(selection, int) and selection < 0:
            yield  # every row asks for no adapter
            return
        if isinstance(selection, (str, int)):
            key, hooks = self._kept(selection)
        else:  # one call's rows: hooks of their own
            key, hooks = next(_HOOK_KEYS), [self._hook(i, selection) for i in range(len(self._mlps))]
        for mlp, hook in zip(self._mlps, hooks):
            mlp._forward_hooks[key] = hook
        try:
            yield
        finally:
            for mlp in self._mlps:
                mlp._forward_hooks.pop(key, None)

    def _kept(self, selection: str | int) -> tuple[int, list]:
        """The hook-dict key and each layer's hook of ``selection`` (the scratch adapter or one slot), made
        once."""
        if selection not in self._kept_hooks:
            hooks = [self._hook(i, selection) for i in range(len(self._mlps))]
            self._kept_hooks[selection] = (next(_HOOK_KEYS), hooks)
        return self._kept_hooks[selection]

    def _hook(self, layer: int, selection):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            delta = self.delta(hidden, layer, selection).to(hidden.dtype)
            return (hidden + delta, *output[1:]) if isinstance(output, tuple) else hidden + delta

        return hook

    def delta(self, hidden: torch.Tensor, layer: int, selection) -> torch.Tensor:
        """The adapter's residual for ``hidden`` (B, T, d), in float32 (bias adds fused into the matmuls)."""
        x = hidden.float()
        if isinstance(selection, str):  # "scratch"
            h = self._act(F.linear(x, self.down[layer].T, self.down_bias[layer]))  # (B, T, r)
            return F.linear(h, self.up[layer].T, self.up_bias[layer])  # (B, T, d)
        if isinstance(selection, int):
            h = self._act(
                F.linear(x, self.slot_down[selection, layer].T, self.slot_down_bias[selection, layer])
            )
            return F.linear(h, self.slot_up[selection, layer].T, self.slot_up_bias[selection, layer])
        ids, keep = selection  # (B,), (B,)
        down = self.slot_down[ids, layer]  # (B, d, r)
        up = self.slot_up[ids, layer]  # (B, r, d)
        h = self._act(torch.baddbmm(self.slot_down_bias[ids, layer].unsqueeze(1), x, down))  # (B, T, r)
        out = torch.baddbmm(self.slot_up_bias[ids, layer].unsqueeze(1), h, up)  # (B, T, d)
        return out * keep[:, None, None]

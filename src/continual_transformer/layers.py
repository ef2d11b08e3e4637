"""Which decoder layers and projections a strategy touches: layer specs, hidden size, LoRA targets.

One place for what every weight-changing strategy asks of the architecture, found by structure (as
:func:`continual_transformer.backbone.find_decoder_layers` finds the layers), never by model name:

* a **layer spec** -- ``all``, a Python slice such as ``-8:`` or ``4:12``, one index such as ``-1``, or a
  share of the top layers such as ``25%`` -- turned into layer indices;
* the model's **hidden size** (``hidden_size`` in Llama-like configs, ``n_embd`` in GPT-2);
* the **projections** inside chosen layers that LoRA can wrap: ``nn.Linear`` and transformers' GPT-2
  ``Conv1D`` (which stores its weight transposed, ``(in, out)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from continual_transformer.errors import ConfigError

LAYER_SPEC = re.compile(r"^(all|-?\d*:-?\d*|-?\d+|\d+(?:\.\d+)?%)$")
"""What a layer spec may look like (range checks come with the number of layers)."""
_SHARE = re.compile(r"^(\d+(?:\.\d+)?)%$")
PROJECTIONS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Module types LoRA can wrap (peft handles both; ``Conv1D`` needs ``fan_in_fan_out``)."""


def check_layer_spec(spec: str, key: str = "layers", *, shares: bool = True) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``spec`` is not a layer spec (no model needed)."""
    spec = spec.strip()
    share = _SHARE.match(spec)
    if not LAYER_SPEC.match(spec) or (share and not shares):
        allowed = "'all', a slice like '-8:' or '4:12', an index" + (
            ", or a share like '25%'" if shares else ""
        )
        raise ConfigError(f"{key}: {spec!r} is not {allowed}")
    if share and not 0 < float(share.group(1)) <= 100:
        raise ConfigError(f"{key}: {spec!r} must be a share in (0%, 100%]")


def select_layers(spec: str, n_layers: int, key: str = "layers") -> list[int]:
    """Layer indices for ``spec``: ``all``, a slice (``-8:``, ``4:12``), one index, or a top share (``25%``).

    A share keeps the last ``round(share * n_layers)`` layers, at least one.
    """
    spec = spec.strip()
    check_layer_spec(spec, key)
    if spec == "all":
        return list(range(n_layers))
    share = _SHARE.match(spec)
    if share:
        count = max(1, min(n_layers, round(float(share.group(1)) / 100 * n_layers)))
        return list(range(n_layers - count, n_layers))
    if ":" not in spec:
        index = int(spec)
        if not -n_layers <= index < n_layers:
            raise ConfigError(f"{key}: index {index} out of range for a model with {n_layers} layers")
        return [index % n_layers]
    start, stop = (int(part) if part else None for part in spec.split(":"))
    chosen = list(range(n_layers))[slice(start, stop)]
    if not chosen:
        raise ConfigError(f"{key}: {spec!r} selects no layer of a model with {n_layers} layers")
    return chosen


def layer_index(value: int, n_layers: int, key: str = "layer") -> int:
    """One layer index (negative counts from the end), checked against the model."""
    if not -n_layers <= value < n_layers:
        raise ConfigError(f"{key}: {value} out of range for {n_layers} layers")
    return value % n_layers


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (``hidden_size``, GPT-2's ``n_embd``, else the embeddings' width)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")
    return int(embeddings.weight.shape[1])


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def projection_targets(model: nn.Module, layers: nn.ModuleList, layer_ids: Sequence[int]) -> list[str]:
    """Names of the ``nn.Linear`` / ``Conv1D`` modules inside the decoder layers ``layer_ids``, in model
    order."""
    prefix = module_name(model, layers)
    wanted = tuple(f"{prefix}.{i}." for i in layer_ids)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, PROJECTIONS) and name.startswith(wanted)
    ]


def is_transposed(model: nn.Module, names: Sequence[str]) -> bool:
    """True when the named projections are GPT-2 ``Conv1D`` (weight stored ``(in, out)``: peft's
    ``fan_in_fan_out``); a mix of ``Conv1D`` and ``nn.Linear`` is refused."""
    kinds = {isinstance(model.get_submodule(name), Conv1D) for name in names}
    if len(kinds) > 1:
        raise ValueError("the chosen layers mix Conv1D and nn.Linear projections; choose layers of one kind")
    return kinds == {True}

"""Doc-to-LoRA: a hypernetwork that turns a document into LoRA weights in one forward pass.

* :mod:`.model` -- the Perceiver hypernetwork, the adapter injection (:class:`GeneratedLoRA`), weight files;
* :mod:`.data` -- the meta-training corpus (generated fact documents, real passages) and its held-out split;
* :mod:`.training` -- amortised context distillation, distributed through HF Accelerate
  (:func:`train_hypernetwork`);
* :mod:`.cli` -- the ``train-hypernetwork`` command (a typer command object; no torch at import).

The strategy that uses it is :mod:`continual_transformer.strategies.doc2lora`. Names are loaded on first
access, so importing this package imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "HyperNetConfig": "model",
    "HyperNetwork": "model",
    "HypernetworkNotTrained": "model",
    "load_hypernetwork": "model",
    "save_hypernetwork": "model",
    "TrainHypernetworkConfig": "training",
    "TrainReport": "training",
    "train_hypernetwork": "training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

"""Weight-only int8 linear layers for answering on a CPU.

A 135M model answering one stream on a CPU reads every weight once per token: float32 weights are 540 MB a
token. Int8 weights with one float scale per output row read a quarter of that, and PyTorch's
``_weight_int8pack_mm`` kernel (the one ``torchao``'s int8 weight-only layout calls) multiplies bfloat16
activations by them without dequantizing the matrix first. Unlike dynamic quantization the activations are
not quantized: only the weights are rounded, once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Int8WeightLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 (n_out, n_in) and one bfloat16 scale per output row
    (symmetric, about ``max |W_row| / 127``); the product is taken in bfloat16 and returned in the input's
    dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        w = weight.detach().float()
        largest = w.abs().amax(1).clamp(min=torch.finfo(torch.bfloat16).tiny * 127)
        scale = (largest / 127.0).to(torch.bfloat16)  # the kernel's scales are bfloat16: round them first,
        low = scale.float() * 127.0 < largest  # up where rounding went down, so no weight is clipped
        scale = torch.where(low, (scale.float() * (1 + 2**-7)).to(torch.bfloat16), scale)
        self.register_buffer(
            "weight_int8", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        return cls(linear.weight, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 (n_out, n_in) weight the int8 one stands for (the slow reference)."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


PACK = 16
"""The kernel reads the int8 matrix in blocks of this many inputs: a layer whose input width is not a multiple
of it gives wrong numbers (or crashes), so such layers keep their float weights."""


def quantize_weights_int8(model: nn.Module) -> int:
    """Every ``nn.Linear`` of ``model`` whose input width is a multiple of :data:`PACK` replaced in place by
    an :class:`Int8WeightLinear` (a head tied to the embeddings gets an int8 copy; the embeddings keep
    theirs); the others stay float, with a log line. Returns how many were replaced."""
    replaced, kept = 0, []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            if child.in_features % PACK:
                kept.append(name)
                continue
            setattr(module, name, Int8WeightLinear.from_linear(child))
            replaced += 1
    if kept:
        logger.info("%d linear layers keep float weights (input width not a multiple of %d)", len(kept), PACK)
    return replaced

"""The Doc-to-LoRA hypernetwork: a small Perceiver that reads the frozen backbone's hidden states of a
document chunk and writes rank-r LoRA factors for chosen projections of every chosen decoder layer
(Doc-to-LoRA, Sakana 2025).

* **Input**: the output of every chosen decoder layer for each token of a chunk, ``(C, L, T, F)``, each token
  vector layer-normalised (no affine: the residual stream's scale differs wildly between layers) and projected
  to the hypernetwork width ``H``.
* **Latents**: ``rank`` learned latent queries, plus a learned embedding of the target's layer and of its
  module type, so one set of weights (shared across layers) serves every target. Each latent becomes one rank
  component of the emitted adapter.
* **Blocks**: ``blocks`` x (cross-attention of the latents to their layer's tokens, self-attention among the
  latents of one target, MLP), pre-norm.
* **Heads**: per module type, ``A = normalize(head_a(z))`` (r, in), rows of unit norm, and
  ``B = head_b(z)`` (out, r). ``head_b`` starts at zero, so an untrained network emits a zero delta: the
  adapted model is the base model bit for bit.

The adapter of a chunk is applied as ``y = W x + scale * B (A x)``; chunks compose by concatenating their rank
components (the sum of their deltas). :class:`GeneratedLoRA` applies generated factors inside the backbone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from continual_transformer.errors import ConfigError, StrategyError
from continual_transformer.layers import PROJECTIONS, check_layer_spec, select_layers

logger = logging.getLogger(__name__)

FORMAT = "ctt-doc2lora-hypernetwork/1"
"""Format tag stored in the metadata of a hypernetwork file."""


class HypernetworkNotTrained(StrategyError):
    """No trained hypernetwork weights are available (missing file, or a file marked untrained)."""


@dataclass(frozen=True, kw_only=True)
class HyperNetConfig:
    """Architecture of the hypernetwork (stored with its weights)."""

    modules: tuple[str, ...] = ("down_proj",)
    """Projections that get generated adapters, by their name inside a decoder layer (``down_proj``,
    ``o_proj``, ``mlp.c_proj`` in GPT-2)."""
    layers: str = "all"
    """Decoder layers whose projections get adapters (a layer spec: ``all``, ``-8:``, ``25%``)."""
    rank: int = 4
    """Rank of the adapter of one chunk (one latent query per rank component)."""
    hidden: int = 256
    """Width of the Perceiver."""
    heads: int = 4
    """Attention heads of the Perceiver."""
    blocks: int = 2
    """Cross-attention blocks."""
    scale: float = 1.0
    """Factor on the generated delta ``B A``."""
    chunk_tokens: int = 256
    """Tokens of a document the backbone reads per chunk (longer documents are split; chunks concatenate)."""
    gate_layer: float = 0.5
    """Depth (0: embeddings, 1: last layer) of the hidden states mean-pooled into the relevance-gate embedding
    of documents and queries."""

    def __post_init__(self) -> None:
        key = "hypernetwork"
        object.__setattr__(self, "modules", tuple(self.modules))
        if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
            raise ConfigError(f"{key}.modules: need one or more module names")
        check_layer_spec(self.layers, f"{key}.layers")
        for name in ("rank", "hidden", "heads", "blocks", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ConfigError(f"{key}.hidden: {self.hidden} is not divisible by heads={self.heads}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"{key}.scale: must be a positive number")
        if not 0.0 <= self.gate_layer <= 1.0:
            raise ConfigError(f"{key}.gate_layer: must be in [0, 1], got {self.gate_layer}")


@dataclass(frozen=True)
class Target:
    """One projection that receives a generated adapter."""

    name: str
    """Dotted name inside the model."""
    layer: int
    """Decoder layer index."""
    module: str
    """Module type (an entry of :attr:`HyperNetConfig.modules`)."""
    in_features: int
    out_features: int


def find_targets(backbone, config: HyperNetConfig) -> list[Target]:
    """The projections named by ``config.modules`` in the chosen decoder layers, in layer order."""
    from continual_transformer.layers import module_name

    layer_ids = select_layers(config.layers, backbone.num_layers, "hypernetwork.layers")
    prefix = module_name(backbone.model, backbone.layers)
    targets = []
    for layer in layer_ids:
        block = backbone.layers[layer]
        for wanted in config.modules:
            found = [
                (name, module)
                for name, module in block.named_modules()
                if (name == wanted or name.endswith("." + wanted))
                and isinstance(module, (*PROJECTIONS, GeneratedLoRA))
            ]
            if len(found) != 1:
                raise ConfigError(
                    f"hypernetwork.modules: {wanted!r} names {len(found)} projections in decoder layer "
                    f"{layer} (need exactly one; e.g. 'down_proj' in Llama-like models, 'mlp.c_proj' in "
                    "GPT-2)"
                )
            name, module = found[0]
            name = name.removesuffix(".base") if isinstance(module, GeneratedLoRA) else name
            base = module.base if isinstance(module, GeneratedLoRA) else module
            if isinstance(base, Conv1D):
                n_in, n_out = base.weight.shape
            else:
                n_in, n_out = base.in_features, base.out_features
            targets.append(Target(f"{prefix}.{layer}.{name}", layer, wanted, int(n_in), int(n_out)))
    return targets


@dataclass(frozen=True, kw_only=True)
class HyperNetSpec:
    """Everything needed to rebuild a hypernetwork: its config and the backbone shapes it was built for."""

    config: HyperNetConfig
    feature_dim: int
    """Width of the backbone's hidden states."""
    n_layers: int
    """Decoder layers of the backbone."""
    targets: tuple[Target, ...]
    gate_index: int
    """Index into the backbone's ``hidden_states`` (0: embeddings) of the gate embedding."""
    base_model: str = ""
    """Name of the backbone it was built for (information)."""
    base_fingerprint: str = ""
    """Fingerprint of that backbone (a mismatch is logged)."""

    @classmethod
    def for_backbone(cls, backbone, config: HyperNetConfig) -> HyperNetSpec:
        from continual_transformer.layers import hidden_size

        n = backbone.num_layers
        return cls(
            config=config,
            feature_dim=hidden_size(backbone.model),
            n_layers=n,
            targets=tuple(find_targets(backbone, config)),
            gate_index=round(config.gate_layer * n),
            base_model=backbone.name,
            base_fingerprint=backbone.fingerprint,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HyperNetSpec:
        data = json.loads(text)
        data["config"] = HyperNetConfig(**data["config"])
        data["targets"] = tuple(Target(**t) for t in data["targets"])
        return cls(**data)

    def check_backbone(self, backbone) -> None:
        """Refuse a backbone of other shapes; log one of other weights."""
        here = HyperNetSpec.for_backbone(backbone, self.config)
        if (here.feature_dim, here.n_layers, here.targets) != (self.feature_dim, self.n_layers, self.targets):
            raise StrategyError(
                f"the hypernetwork was built for {self.base_model or 'another model'} "
                f"({self.n_layers} layers, width {self.feature_dim}); this backbone differs"
            )
        if self.base_fingerprint and self.base_fingerprint != backbone.fingerprint:
            logger.warning(
                "hypernetwork trained on %s (fingerprint %s), used on %s (%s)",
                self.base_model,
                self.base_fingerprint,
                backbone.name,
                backbone.fingerprint,
            )


class _Block(nn.Module):
    """Cross-attention of the latents to the tokens, self-attention among latents, MLP (pre-norm)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_self = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, z: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # z (N, r, H); kv (N, T, H); pad (N, T) True where padding
        kv = self.norm_kv(kv)
        q = self.norm_q(z)
        z = z + self.cross(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        s = self.norm_self(z)
        z = z + self.self_attn(s, s, s, need_weights=False)[0]
        return z + self.mlp(self.norm_mlp(z))


class HyperNetwork(nn.Module):
    """Hidden states of document chunks -> LoRA factors of every target (see the module docstring)."""

    def __init__(self, spec: HyperNetSpec) -> None:
        super().__init__()
        self.spec = spec
        c = spec.config
        self.module_types = list(c.modules)
        layers = sorted({t.layer for t in spec.targets})
        self.layer_ids = layers
        # which position of the selected layers, and which module type, each target reads / is
        self.register_buffer(
            "target_layer", torch.tensor([layers.index(t.layer) for t in spec.targets]), persistent=False
        )
        self.register_buffer(
            "target_type",
            torch.tensor([self.module_types.index(t.module) for t in spec.targets]),
            persistent=False,
        )
        self.input = nn.Linear(spec.feature_dim, c.hidden)
        self.latents = nn.Parameter(torch.randn(c.rank, c.hidden) * 0.02)
        self.layer_embedding = nn.Parameter(torch.randn(spec.n_layers, c.hidden) * 0.02)
        self.module_embedding = nn.Parameter(torch.randn(len(self.module_types), c.hidden) * 0.02)
        self.blocks = nn.ModuleList(_Block(c.hidden, c.heads) for _ in range(c.blocks))
        self.norm_out = nn.LayerNorm(c.hidden)
        dims = {t.module: (t.in_features, t.out_features) for t in spec.targets}
        self.head_a = nn.ModuleDict({m: nn.Linear(c.hidden, dims[m][0]) for m in self.module_types})
        self.head_b = nn.ModuleDict({m: nn.Linear(c.hidden, dims[m][1]) for m in self.module_types})
        for head in self.head_b.values():  # the emitted delta starts at exactly zero
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.register_buffer("gate_center", torch.zeros(spec.feature_dim))

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``features`` (C, L, T, F): outputs of the selected layers (:attr:`layer_ids`) for C chunks;
        ``mask`` (C, T) True on tokens. Returns ``{module type: (A (C, n, r, in), B (C, n, out, r))}`` over
        that type's targets, in target order."""
        C, L, T, _ = features.shape
        h = self.input(F.layer_norm(features.float(), features.shape[-1:]))  # (C, L, T, H)
        n = len(self.spec.targets)
        kv = h[:, self.target_layer]  # (C, n, T, H)
        layer_of = torch.tensor([t.layer for t in self.spec.targets], device=h.device)
        z = (
            self.latents[None, None]
            + self.layer_embedding[layer_of][None, :, None]
            + self.module_embedding[self.target_type][None, :, None]
        ).expand(C, n, -1, -1)  # (C, n, r, H)
        r, H = z.shape[-2:]
        z = z.reshape(C * n, r, H)
        kv = kv.reshape(C * n, T, H)
        pad = (~mask.bool())[:, None].expand(C, n, T).reshape(C * n, T)
        for block in self.blocks:
            z = block(z, kv, pad)
        z = self.norm_out(z).reshape(C, n, r, H)
        out = {}
        for index, module in enumerate(self.module_types):
            chosen = (self.target_type == index).nonzero().squeeze(-1)
            zm = z[:, chosen]  # (C, n_m, r, H)
            # unit rows: the size of the delta is carried by B alone, which keeps early steps stable on
            # projections whose inputs have outlier dimensions (down_proj)
            a = F.normalize(self.head_a[module](zm), dim=-1)  # (C, n_m, r, in)
            b = self.head_b[module](zm).transpose(-1, -2)  # (C, n_m, out, r)
            out[module] = (a, b)
        return out

    def per_target(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``forward``'s output as one (A (C, r, in), B (C, out, r)) per target, in target order."""
        seen = {m: 0 for m in self.module_types}
        result = []
        for target in self.spec.targets:
            a, b = factors[target.module]
            i = seen[target.module]
            seen[target.module] += 1
            result.append((a[:, i], b[:, i]))
        return result


# ------------------------------------------------------------------------------------------------------------
# Backbone features


def chunk_features(
    backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer_ids: Sequence[int], gate_index: int
):
    """One forward pass of the backbone as it is (call it with learned changes off): the outputs of decoder
    layers ``layer_ids`` (C, L, T, F) and the gate embeddings (C, F) of the rows."""
    out = backbone.model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
    )
    states = out.hidden_states  # L + 1 of (C, T, F)
    features = torch.stack([states[i + 1] for i in layer_ids], dim=1)  # (C, L, T, F)
    return features, pooled_embedding(states[gate_index], attention_mask)


def pooled_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (the first excluded when there are more: it is an attention sink with outsized
    activations) of layer-normalised hidden states (C, T, F) -> (C, F) float32."""
    h = F.layer_norm(hidden.float(), hidden.shape[-1:])
    weights = attention_mask.float().clone()
    longer = weights.sum(1) > 1
    weights[longer, 0] = 0.0
    return (h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)


# ------------------------------------------------------------------------------------------------------------
# Injection


class GeneratedLoRA(nn.Module):
    """A projection plus generated low-rank factors: ``base(x) + scale * ((x A^T) * gate) B^T``.

    ``A`` (N|1, R, in), ``B`` (N|1, out, R) and ``gate`` (N|1, R) or ``None`` are set from outside (per batch
    row N, or shared); with ``A`` unset or :attr:`enabled` false the output is the base layer's exactly.
    """

    def __init__(self, base: nn.Module, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.enabled = True
        self.factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled or self.factors is None:
            return out
        a, b, gate = self.factors
        z = x @ a.to(x.dtype).transpose(-1, -2)  # (N, T, R)
        if gate is not None:
            z = z * gate.to(x.dtype)[:, None, :]
        return out + (z @ b.to(x.dtype).transpose(-1, -2)) * self.scale  # (N, T, out)


def wrap_targets(model: nn.Module, targets: Sequence[Target], scale: float) -> list[GeneratedLoRA]:
    """Replace each target projection by a :class:`GeneratedLoRA` around it (idempotent)."""
    wrappers = []
    for target in targets:
        module = model.get_submodule(target.name)
        if not isinstance(module, GeneratedLoRA):
            parent, _, child = target.name.rpartition(".")
            module = GeneratedLoRA(module, scale)
            setattr(model.get_submodule(parent), child, module)
        wrappers.append(module)
    return wrappers


def unwrap_targets(model: nn.Module) -> None:
    """Put every :class:`GeneratedLoRA`'s base projection back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GeneratedLoRA):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base)


# ------------------------------------------------------------------------------------------------------------
# Files


def save_hypernetwork(
    network: HyperNetwork,
    path: str | Path,
    *,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the weights as safetensors (atomically), with the spec and the training record in the metadata.

    ``training=None`` marks the file untrained: the strategy refuses it unless told to accept it (tests).
    ``dtype`` is the stored precision (``torch.float16`` halves the file); the network always computes in
    float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in network.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "spec": network.spec.to_json(),
        "trained": "true" if training is not None else "false",
        "training": json.dumps(training or {}, sort_keys=True),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


@dataclass(frozen=True, kw_only=True)
class LoadedHypernetwork:
    network: HyperNetwork
    trained: bool
    training: dict[str, Any] = field(default_factory=dict)


def load_hypernetwork(path: str | Path, device: torch.device | str = "cpu") -> LoadedHypernetwork:
    """Read a file written by :func:`save_hypernetwork` (format and tensor names checked)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HypernetworkNotTrained(f"no hypernetwork weights at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise StrategyError(f"{path}: not a hypernetwork file (format {metadata.get('format')!r})")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    network = HyperNetwork(HyperNetSpec.from_json(metadata["spec"]))
    network.load_state_dict(tensors, strict=True)
    return LoadedHypernetwork(
        network=network.to(device).eval(),
        trained=metadata.get("trained") == "true",
        training=json.loads(metadata.get("training", "{}")),
    )

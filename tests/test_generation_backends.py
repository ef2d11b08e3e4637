"""The fast decoding paths (``generation.backend``) answer as the eager reference does, for every strategy."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.config import GenerationConfig
from continual_transformer.errors import ConfigError
from continual_transformer.modules.hooks import ResidualAdder
from continual_transformer.strategies import registry

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
PROMPTS = ["The capital of Veloria is", "Where does the Orvalis river flow?", "Tarnhelm"]


def with_backend(backbone, backend: str, **changes) -> None:
    backbone.generation = dataclasses.replace(backbone.generation, backend=backend, **changes)


def answers(ct: ContinualTransformer, backend: str) -> list[str]:
    with_backend(ct.backbone, backend)
    return ct.generate(PROMPTS, chat=True)


@pytest.mark.parametrize("name", registry.names())
def test_static_cache_answers_as_eager_for_every_strategy(tokenizer, name):
    ct = ContinualTransformer(make_backbone(tokenizer), strategy=name, config=fast_config())
    ct.learn_document(DOC)
    eager = answers(ct, "eager")
    assert answers(ct, "static") == eager
    assert answers(ct, "eager") == eager, "switching back gives the reference again"


def test_backend_is_validated():
    with pytest.raises(ConfigError, match="generation.backend"):
        GenerationConfig(backend="turbo")
    with pytest.raises(ConfigError, match="generation.threads"):
        GenerationConfig(threads=-1)


def test_generate_kwargs_and_streamer_reach_model_generate(tokenizer):
    backbone = make_backbone(tokenizer, max_new_tokens=6)
    seen: list[int] = []

    class Collect:
        def put(self, value: torch.Tensor) -> None:
            seen.extend(value.reshape(-1).tolist())

        def end(self) -> None:
            seen.append(-1)

    for backend in ("eager", "static"):
        with_backend(backbone, backend)
        seen.clear()
        out = backbone.generate(["The capital of Veloria is"], streamer=Collect(), max_new_tokens=4)
        assert seen[-1] == -1 and len(seen) > 4, "the streamer saw the prompt, each new token and the end"
        assert out == backbone.generate(["The capital of Veloria is"], max_new_tokens=4)


def test_threads_setting_is_restored(tokenizer):
    backbone = make_backbone(tokenizer)
    before = torch.get_num_threads()
    with_backend(backbone, "static", threads=1)
    backbone.generate(["The capital of Veloria is"])
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("name", ["none", "memory_layer", "memory_bank", "knowledge_store", "ttt"])
def test_compiled_decoding_answers_as_eager(tokenizer, name):
    """Persistent hooks (memory_layer), per-call hooks (memory_bank), logits processors (knowledge_store) and
    a swapped MLP (ttt) on the compiled path; torch.compile on the CPU takes a few seconds per graph."""
    ct = ContinualTransformer(make_backbone(tokenizer), strategy=name, config=fast_config())
    ct.learn_document(DOC)
    eager = answers(ct, "eager")
    for _ in range(3):  # persistent hooks compile from their second call on
        assert answers(ct, "compiled") == eager
    assert not ct.backbone._compile_failed


def test_compiled_decoding_sees_hooks_added_after_compiling(tokenizer):
    """A graph traced without a hook must not run once a hook is installed (dynamo's hook guards are on)."""
    backbone = make_backbone(tokenizer)
    with_backend(backbone, "compiled")
    plain = backbone.generate(PROMPTS)
    assert backbone.generate(PROMPTS) == plain
    delta = torch.randn(len(PROMPTS), backbone.model.config.hidden_size) * 5
    with_backend(backbone, "eager")
    with ResidualAdder(backbone.layers[1], delta):
        shifted = backbone.generate(PROMPTS)
    assert shifted != plain
    with_backend(backbone, "compiled")
    with ResidualAdder(backbone.layers[1], delta):
        for _ in range(2):  # the first call with a new hook runs uncompiled, the second through the compiler
            assert backbone.generate(PROMPTS) == shifted
    with ResidualAdder(backbone.layers[1], delta):  # a hook for one call only: decoded uncompiled
        assert backbone.generate(PROMPTS) == shifted
    assert backbone.generate(PROMPTS) == plain


def test_knowledge_store_capture_decodes_compiled_without_retracing(tokenizer, monkeypatch):
    """knowledge_store enters a new capture hook per call: the backbone's tap stands in for it, so compiled
    decoding is used from the second call on and not traced again, with the eager answers."""
    import continual_transformer.backbone as backbone_module

    ct = ContinualTransformer(make_backbone(tokenizer), strategy="knowledge_store", config=fast_config())
    ct.learn_document(DOC)
    eager = answers(ct, "eager")
    uncompiled: list[int] = []
    real = backbone_module._without_compile
    monkeypatch.setattr(
        backbone_module, "_without_compile", lambda config: uncompiled.append(1) or real(config)
    )
    assert answers(ct, "compiled") == eager  # the first call with the tap decodes uncompiled
    assert answers(ct, "compiled") == eager
    first = len(uncompiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert answers(ct, "compiled") == eager
    assert len(uncompiled) == first, "the compiled step ran"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "no new graph was traced"
    assert not ct.backbone._compile_failed
    assert not any(h for m in ct.backbone.model.modules() for h in m._forward_hooks.values()), "restored"


def test_fast_backends_pad_prompts_to_a_bucket(tokenizer):
    """On the compiled backend prompts of different lengths share one static-cache length (one compiled step)
    and answer as eager."""
    from continual_transformer.backbone import PROMPT_BUCKET, _pad_left

    backbone = make_backbone(tokenizer)
    batch = backbone.encode(PROMPTS, padding_side="left")
    padded = _pad_left(batch, backbone.tokenizer.pad_token_id, PROMPT_BUCKET)
    assert padded["input_ids"].shape[1] % PROMPT_BUCKET == 0
    assert padded["attention_mask"].sum() == batch["attention_mask"].sum()
    with_backend(backbone, "eager")
    eager = [backbone.generate([p]) for p in PROMPTS]
    with_backend(backbone, "compiled")
    assert [backbone.generate([p]) for p in PROMPTS] == eager

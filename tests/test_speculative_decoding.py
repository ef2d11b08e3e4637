"""Prompt-lookup decoding (``generation.speculative_tokens``): drafts copied from the prompt or the answer so
far, checked by one forward pass; the answers stay the greedy answers of one token per step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import fast_config, make_backbone, record_on_the_cpu

from continual_transformer import ContinualTransformer
from continual_transformer.backbone import Backbone, _Chunk
from continual_transformer.config import GenerationConfig
from continual_transformer.errors import ConfigError

# the second prompt repeats itself: a greedy answer that copies it accepts drafts
PROMPTS = [
    "The capital of Veloria is",
    "Tarnhelm river Quenmark Tarnhelm river Quenmark Tarnhelm river Quenmark Tarnhelm river",
    "Where does the Orvalis river flow?",
]


def speculating(backbone: Backbone, backend: str = "static", drafts: int = 4) -> None:
    backbone.generation = dataclasses.replace(backbone.generation, backend=backend, speculative_tokens=drafts)


def reference(backbone: Backbone, batch, **kwargs) -> torch.Tensor:
    return backbone.model.generate(**batch, generation_config=backbone.hf_generation_config(), **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", ["plain", "min_new_tokens", "early_eos", "one_token"])
def test_prompt_lookup_decoding_gives_generate_tokens(tokenizer, arch, case):
    """Each prompt alone, through the public path: the very token ids of Hugging Face's greedy generate, with
    EOS barred before min_new_tokens, answers ending early on an EOS met inside an accepted run, and one new
    token. On the repetitive prompt drafts are accepted: fewer steps than tokens."""
    new = 1 if case == "one_token" else 21
    backbone = make_backbone(tokenizer, arch=arch, max_new_tokens=new)
    speculating(backbone)
    kwargs = {"min_new_tokens": new} if case == "min_new_tokens" else {}
    for text in PROMPTS:
        batch = backbone.encode([text], padding_side="left")
        width = batch["input_ids"].shape[1]
        config = backbone.hf_generation_config()
        if case in ("early_eos", "min_new_tokens"):  # a token the answer does produce ends it (two EOS ids)
            free = backbone.model.generate(
                **batch, generation_config=config, eos_token_id=None, min_new_tokens=new
            )
            config.eos_token_id = [int(free[0, width + 6]), int(free[0, width + 9])]
        expected = backbone.model.generate(**batch, generation_config=config, **kwargs)
        before = dict(backbone.speculation)
        got = backbone._lean_generate(batch, config, kwargs, compiled=False)
        assert torch.equal(got, expected), text
        made = expected.shape[1] - width  # the prompt pass picks the first
        assert backbone.speculation["steps"] > before["steps"] or made == 1, "the call speculated"
        if case == "early_eos":
            assert expected.shape[1] < width + new, "generate stopped early"
    if case == "plain":
        assert backbone.speculation["tokens"] > backbone.speculation["steps"], "drafts were accepted"


def test_prompt_lookup_decoding_through_generate_answers_as_eager(tokenizer):
    """``Backbone.generate`` with drafts answers every prompt as the eager reference does; a call of several
    prompts decodes one token per step (each row would accept its own count from one shared cache)."""
    backbone = make_backbone(tokenizer, max_new_tokens=16)
    eager = [backbone.generate([p])[0] for p in PROMPTS]
    together = backbone.generate(PROMPTS)
    speculating(backbone)
    assert [backbone.generate([p])[0] for p in PROMPTS] == eager
    steps = backbone.speculation["steps"]
    assert steps > 0
    assert backbone.generate(PROMPTS) == together
    assert backbone.speculation["steps"] == steps, "several rows: no drafts"


def test_no_drafts_with_processors_or_hooks(tokenizer):
    """What may not decode in recorded chunks does not speculate either: a logits processor, a forward
    hook."""
    backbone = make_backbone(tokenizer, max_new_tokens=8)
    speculating(backbone)
    config = backbone.hf_generation_config()
    assert backbone._speculates(1, config, {}) == 4
    assert backbone._speculates(2, config, {}) == 0
    assert backbone._speculates(1, config, {"logits_processor": [lambda ids, scores: scores]}) == 0
    handle = backbone.layers[0].register_forward_hook(lambda module, args, output: output)
    assert backbone._speculates(1, config, {}) == 0
    handle.remove()
    speculating(backbone, drafts=0)
    assert backbone._speculates(1, config, {}) == 0


def _chunk(tokens: list[int], column: int, *, eos: tuple[int, ...] = (), min_column: int = 0) -> _Chunk:
    chunk = _Chunk(1, 16, list(eos), 0, 32, torch.device("cpu"), torch.long, speculate=3)
    chunk.out[0, : len(tokens)] = torch.tensor(tokens)
    chunk.end_column.fill_(16)
    chunk.column.fill_(column)
    chunk.min_column.fill_(min_column)
    chunk.token.fill_(tokens[column - 1])
    return chunk


def test_drafts_follow_the_latest_longest_match():
    """The drafts are what followed the latest earlier occurrence of the last three tokens; where those do
    not recur, of the last two, then of the last one; never the unknown columns past the answer."""
    #            0  1  2  3  4  5  6  7  8  9
    chunk = _chunk([5, 6, 7, 8, 1, 6, 7, 9, 5, 6, 7], column=11)
    assert chunk.draft(3, 3).tolist() == [[8, 1, 6]]  # "5 6 7" recurs at 0: then 8 1 6
    chunk = _chunk([4, 6, 7, 8, 1, 6, 7, 9, 5, 6, 7], column=11)
    assert chunk.draft(2, 3).tolist() == [[9, 5]]  # "6 7" last seen at 5: then 9 5
    chunk = _chunk([3, 7, 2, 2, 7, 4, 1], column=7)
    assert chunk.draft(2, 3).tolist() == [[3, 7]], "no earlier '1': whatever the buffer holds (from 0)"
    chunk = _chunk([3, 1, 2, 9, 1], column=5)
    assert chunk.draft(2, 2).tolist() == [[2, 9]]  # the last one token, "1", at 1


def test_accept_keeps_the_drafts_the_model_would_pick():
    """Drafts equal to the model's picks are accepted up to the first that is not; the pick after them is
    written too; the cache is told how many drafts to drop. An EOS ends the answer inside an accepted run;
    EOS is barred before min_column."""
    vocab = 32

    def logits(picks: list[int]) -> torch.Tensor:
        out = torch.zeros(1, len(picks), vocab)
        for i, token in enumerate(picks):
            out[0, i, token] = 1.0
        return out

    chunk = _chunk([5, 6, 7], column=3)
    rejected = chunk.accept(logits([8, 9, 4, 2]), torch.tensor([[8, 9, 3]]))
    assert int(rejected) == 1 and chunk.column.item() == 6 and chunk.position.item() == 3
    assert chunk.out[0, :6].tolist() == [5, 6, 7, 8, 9, 4] and chunk.token.item() == 4
    assert bool(chunk.unfinished.all())

    chunk = _chunk([5, 6, 7], column=3, eos=(9,))
    rejected = chunk.accept(logits([8, 9, 4, 2]), torch.tensor([[8, 9, 4]]))
    assert int(rejected) == 2, "no draft accepted after the EOS"
    assert chunk.out[0, :6].tolist() == [5, 6, 7, 8, 9, 0] and not bool(chunk.unfinished.any())
    chunk.accept(logits([8, 9, 4, 2]), torch.tensor([[8, 9, 4]]))
    assert chunk.steps_counted() == 1, "a step after every row's EOS makes no token and is not counted"

    chunk = _chunk([5, 6, 7], column=3, eos=(9,), min_column=5)
    scores = logits([8, 9, 9, 2])
    scores[0, 1, 4] = 0.5  # the best token but EOS where EOS is barred
    rejected = chunk.accept(scores, torch.tensor([[8, 4, 9]]))
    assert int(rejected) == 1, "the draft after the EOS is dropped"
    assert chunk.out[0, :7].tolist() == [5, 6, 7, 8, 4, 9, 0]
    assert not bool(chunk.unfinished.any())


@pytest.mark.parametrize("new", [1, 4, 13, 30])
def test_recorded_speculative_chunks_stay_inside_their_buffers(tokenizer, monkeypatch, new):
    """The capture path with the CUDA calls stood in for: the warm-up and the recorded chunks of drafting
    steps stay inside the buffers and the cache (their length leaves room for a chunk's steps past the last
    token), and the first call (recording) and a second (replaying) return generate's token ids."""
    backbone = make_backbone(tokenizer, max_new_tokens=new)
    speculating(backbone)
    real_step = backbone._lean_step
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: real_step("plain", **kw))
    recorded = record_on_the_cpu(backbone, monkeypatch)
    config = backbone.hf_generation_config()
    for text in PROMPTS[:2]:
        batch = backbone.encode([text], padding_side="left")
        expected = reference(backbone, batch, min_new_tokens=new)
        for call in range(2):
            got = backbone._chunked_decode(batch, config, {"min_new_tokens": new}, capture=True, speculate=4)
            assert torch.equal(got, expected)
            if call == 0:
                made = len(recorded)
        assert len(recorded) == made, "the second call replays what the first recorded"
    assert recorded, "the drafting chunk was recorded"


@pytest.mark.parametrize("speculate", [0, 4])
def test_steps_past_the_end_stay_inside_learned_positions(tokenizer, monkeypatch, speculate):
    """A GPT-2 prompt whose answer ends at the model's last position (learned position embeddings): the
    steps a recorded chunk runs past the last new token do not index past the embeddings, the answer is
    generate's and drafting stays on."""
    new = 13
    backbone = make_backbone(tokenizer, arch="gpt2", max_new_tokens=new)
    speculating(backbone, drafts=speculate)
    real_step = backbone._lean_step
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: real_step("plain", **kw))
    record_on_the_cpu(backbone, monkeypatch)
    limit = backbone.max_length
    ids = backbone.encode([" ".join([PROMPTS[1]] * 40)], padding_side="left")["input_ids"][:, : limit - new]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = reference(backbone, batch, min_new_tokens=new)
    assert expected.shape[1] == limit
    got = backbone._chunked_decode(
        batch, backbone.hf_generation_config(), {"min_new_tokens": new}, capture=True, speculate=speculate
    )
    assert torch.equal(got, expected)
    assert not backbone._speculation_failed


@pytest.mark.parametrize("speculate", [0, 4])
def test_rotary_positions_past_the_configured_maximum_are_kept(tokenizer, speculate):
    """A rotary model has no position table: an answer running past max_position_embeddings keeps its real
    positions, as generate does (only the steps past the last wanted token are clamped)."""
    new = 30
    backbone = make_backbone(tokenizer, max_new_tokens=new)
    backbone.model.config.max_position_embeddings = 64
    speculating(backbone, drafts=speculate)
    ids = torch.randint(5, len(tokenizer), (1, 60), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = backbone.hf_generation_config()
    expected = reference(backbone, batch, min_new_tokens=new)
    got = backbone._chunked_decode(batch, config, {"min_new_tokens": new}, capture=False, speculate=speculate)
    assert torch.equal(got, expected)


def test_speculative_settings_are_validated():
    with pytest.raises(ConfigError):
        GenerationConfig(speculative_tokens=-1)
    with pytest.raises(ConfigError):
        GenerationConfig(speculative_ngram=0)


@pytest.mark.real_model
def test_prompt_lookup_decoding_on_the_packaged_model():
    """SmolLM2-135M-Instruct answering about a passage in its prompt: the answers equal one-token-per-step
    decoding's, in fewer steps than tokens."""
    from continual_transformer.config import load_config

    config = load_config(
        set_items=["model.device=cpu", "generation.max_new_tokens=32", "generation.backend=static"]
    )
    backbone = Backbone.load(config.model, config.generation)
    passage = (
        "The Trilpo barometer is built from bamboo. It is sold with a two-year guarantee and was first "
        "sold in 1929 in the town of Marrowgate."
    )
    prompts = [f"{passage}\n\nAnswer from the text above: what is the Trilpo barometer built from?"]
    prompts.append(f"{passage}\n\nRepeat the text above word for word.")
    plain = [backbone.generate([p])[0] for p in prompts]
    speculating(backbone)
    assert [backbone.generate([p])[0] for p in prompts] == plain
    counts = backbone.speculation
    assert counts["tokens"] / counts["steps"] > 1.5, counts
    assert not math.isnan(counts["tokens"])


def test_a_failing_speculative_step_gives_up_drafts_only(tokenizer, monkeypatch, caplog):
    """If a drafting step fails (on a GPU: recording it), the call decodes one token per step with the same
    step mode (a warning, once), and later calls too; the answers are unchanged."""
    backbone = make_backbone(tokenizer, max_new_tokens=12)
    eager = backbone.generate([PROMPTS[1]])
    speculating(backbone)

    def broken(self, count, ngram):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_Chunk, "draft", broken)
    with caplog.at_level("WARNING"):
        assert backbone.generate([PROMPTS[1]]) == eager
        assert backbone.generate([PROMPTS[1]]) == eager
    assert backbone._speculation_failed
    assert caplog.text.count("prompt-lookup decoding failed") == 1
    assert not backbone._lean_failed


@pytest.mark.parametrize("name", ["none", "lora"])
def test_prompt_lookup_decoding_on_the_compiled_step(tokenizer, name):
    """The compiled backend's step over the drafts (torch.compile on the CPU: the step that returns every
    place's logits) answers each prompt as eager does, for the base model and for lora's merged layers."""
    ct = ContinualTransformer(
        make_backbone(tokenizer, max_new_tokens=12), strategy=name, config=fast_config()
    )
    ct.learn_document(PROMPTS[1])
    eager = [ct.generate([p])[0] for p in PROMPTS]
    speculating(ct.backbone, "compiled")
    for _ in range(2):
        assert [ct.generate([p])[0] for p in PROMPTS] == eager
    assert not ct.backbone._compile_failed and not ct.backbone._speculation_failed
    assert ct.backbone.speculation["steps"] > 0

"""The fast decoding paths (``generation.backend``) answer as the eager reference does, for every strategy."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import ReplayedRun, fast_config, make_backbone, record_on_the_cpu, uncompiled_recording
from peft.tuners.lora import LoraLayer

from continual_transformer import ContinualTransformer
from continual_transformer.backbone import Backbone
from continual_transformer.config import GenerationConfig
from continual_transformer.errors import ConfigError
from continual_transformer.modules.fused_linear import FusedMember
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
    with pytest.raises(ConfigError, match="generation.decode_attention"):
        GenerationConfig(decode_attention="flash")


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


@pytest.mark.parametrize("fused", ["never", "always"])
@pytest.mark.parametrize("name", ["none", "memory_layer", "memory_bank", "knowledge_store", "ttt", "lora"])
def test_compiled_decoding_answers_as_eager(tokenizer, name, fused):
    """Persistent hooks (memory_layer), per-call hooks (memory_bank), logits processors (knowledge_store), a
    swapped MLP (ttt) and peft's wrapped projections (lora, decoded merged into plain layers) on the compiled
    path, with and without fused q/k/v and gate/up products (a GPU's default; layers a strategy wrapped or
    hooked keep their own); torch.compile on the CPU takes a few seconds per graph."""
    ct = ContinualTransformer(make_backbone(tokenizer), strategy=name, config=fast_config())
    ct.backbone.generation = dataclasses.replace(ct.backbone.generation, fused_projections=fused)
    ct.learn_document(DOC)
    eager = answers(ct, "eager")
    for _ in range(3):  # persistent hooks compile from their second call on
        assert answers(ct, "compiled") == eager
    assert not ct.backbone._compile_failed
    if fused == "always":  # every plain q/k/v and gate/up group was fused; the model's own layers are back
        groups = ct.backbone._fusion.groups.values()

        def plain(layer) -> bool:  # lora answers with its projections merged into plain layers
            return type(layer) is torch.nn.Linear or (name == "lora" and isinstance(layer, LoraLayer))

        assert len(groups) == sum(
            all(plain(getattr(parent, n, None)) for n in names)
            for parent in ct.backbone.model.modules()
            for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
        )
        assert not any(isinstance(m, FusedMember) for m in ct.backbone.model.modules())


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


def _decodes_compiled_from_the_second_call(ct: ContinualTransformer, monkeypatch) -> None:
    """The strategy's per-call hook is served by a backbone tap: the first compiled call decodes uncompiled
    (new hooks), the next ones through the compiled step without a new trace, all with the eager answers;
    the model's hooks are as they were after each call."""
    eager = answers(ct, "eager")
    modes: list[str] = []
    real = ct.backbone._lean_decode
    monkeypatch.setattr(ct.backbone, "_lean_decode", lambda *a: modes.append(a[-1]) or real(*a))
    assert answers(ct, "compiled") == eager
    assert answers(ct, "compiled") == eager
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert answers(ct, "compiled") == eager
    assert modes == ["plain", "default", "default"], "the compiled step ran from the second call on"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "no new graph was traced"
    assert not ct.backbone._compile_failed and not ct.backbone._lean_failed
    assert not any(h for m in ct.backbone.model.modules() for h in m._forward_hooks.values()), "restored"


def test_memory_bank_fusion_decodes_compiled_without_retracing(tokenizer, monkeypatch):
    """memory_bank adds its retrieved memories through a new residual hook per call: the backbone's adder
    tap stands in for it."""
    ct = ContinualTransformer(make_backbone(tokenizer), strategy="memory_bank", config=fast_config())
    ct.learn_document(DOC)
    assert ct.strategy.deltas(PROMPTS, reinforce=False) is not None, "memories are fused for these prompts"
    _decodes_compiled_from_the_second_call(ct, monkeypatch)


def test_knowledge_store_capture_decodes_compiled_without_retracing(tokenizer, monkeypatch):
    """knowledge_store enters a new capture hook per call: the backbone's capture tap stands in for it."""
    ct = ContinualTransformer(make_backbone(tokenizer), strategy="knowledge_store", config=fast_config())
    ct.learn_document(DOC)
    _decodes_compiled_from_the_second_call(ct, monkeypatch)


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


class _EndRows:
    """A logits processor that forces EOS on row r once it has ``stops[r]`` new tokens (early stopping)."""

    def __init__(self, width: int, stops: list[int], eos: int) -> None:
        self.width, self.stops, self.eos = width, stops, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        made = input_ids.shape[1] - self.width
        for row, stop in enumerate(self.stops):
            if made == stop:
                scores[row] = -1e9
                scores[row, self.eos] = 0.0
        return scores


@pytest.mark.parametrize("backend", ["static", "compiled"])
@pytest.mark.parametrize("case", ["plain", "min_new_tokens", "early_eos"])
def test_lean_loop_gives_generate_tokens(tokenizer, backend, case):
    """The lean decoding loop returns the very token ids Hugging Face's eager generate returns (prompt, new
    tokens, the columns after every row ended), with processors and min_new_tokens."""
    backbone = make_backbone(tokenizer, max_new_tokens=12)
    with_backend(backbone, "eager")
    batch = backbone.encode(PROMPTS, padding_side="left")
    eos = backbone.tokenizer.eos_token_id
    kwargs = {
        "plain": {},
        "min_new_tokens": {"min_new_tokens": 12},
        "early_eos": {"logits_processor": [_EndRows(batch["input_ids"].shape[1], [2, 5, 7], eos)]},
    }[case]
    reference = backbone.model.generate(**batch, generation_config=backbone.hf_generation_config(), **kwargs)
    with_backend(backbone, backend)
    lean = backbone._lean_generate(
        batch, backbone.hf_generation_config(), kwargs, compiled=backend == "compiled"
    )
    assert not backbone._lean_failed
    assert torch.equal(lean, reference)
    if case == "early_eos":
        assert reference.shape[1] < batch["input_ids"].shape[1] + 12, "generate stopped early"


def test_lean_loop_is_the_fast_backends_path_and_falls_back(tokenizer, monkeypatch, caplog):
    """static and compiled decode through the lean loop; a failing step degrades with a log line (recorded
    chunks -> CUDA graphs per step -> compiled -> plain -> generate), answers unchanged."""
    backbone = make_backbone(tokenizer)
    with_backend(backbone, "eager")
    eager = backbone.generate(PROMPTS)
    calls: list[str] = []
    real = backbone._lean_decode
    monkeypatch.setattr(backbone, "_lean_decode", lambda *a: calls.append(a[-1]) or real(*a))
    with_backend(backbone, "static")
    assert backbone.generate(PROMPTS) == eager and calls == ["plain"]

    fused: list[bool] = []

    def broken(*args):
        calls.append(args[-1])
        fused.append(isinstance(backbone.layers[0].mlp.up_proj, FusedMember))
        raise RuntimeError("no graphs here")

    monkeypatch.setattr(backbone, "_lean_decode", broken)
    backbone._lean_mode = "graphs"  # as on a GPU
    with_backend(backbone, "compiled", fused_projections="always")  # as on a GPU
    calls.clear()
    layers = dict(backbone.model.named_modules())
    with caplog.at_level("WARNING"):
        assert backbone.generate(PROMPTS) == eager
    assert calls == ["graphs", "reduce-overhead", "default", "plain"]
    assert fused == [True, True, True, False], "compiled steps fused, the plain step as the model is"
    assert dict(backbone.model.named_modules()) == layers, "the model's own layers are back"
    assert backbone._lean_failed and "decoding with generate" in caplog.text


@pytest.mark.parametrize("case", ["plain", "min_new_tokens", "early_eos", "one_token"])
def test_chunked_decoding_gives_generate_tokens(tokenizer, case):
    """Chunked decoding (what a GPU records as CUDA graphs, run here step by step) returns generate's token
    ids: tokens picked on the device, EOS barred before min_new_tokens, padding after a row ends, the columns
    cut where the last row ended, the steps a last chunk runs past max_new_tokens dropped."""
    backbone = make_backbone(tokenizer, max_new_tokens=1 if case == "one_token" else 13)
    with_backend(backbone, "eager")
    batch = backbone.encode(PROMPTS, padding_side="left")
    width = batch["input_ids"].shape[1]
    config = backbone.hf_generation_config()
    kwargs = {"min_new_tokens": 13} if case == "min_new_tokens" else {}
    if case in ("early_eos", "min_new_tokens"):  # tokens the rows do produce end them early (several EOS ids)
        free = backbone.model.generate(
            **batch, generation_config=config, eos_token_id=None, min_new_tokens=13
        )
        config.eos_token_id = [int(free[row, width + 2 + row]) for row in range(len(PROMPTS))]
    reference = backbone.model.generate(**batch, generation_config=config, **kwargs)
    chunked = backbone._chunked_decode(batch, config, kwargs, capture=False)
    assert torch.equal(chunked, reference)
    if case == "early_eos":
        assert reference.shape[1] < width + 13, "generate stopped early"
    if case == "min_new_tokens":
        barred = torch.isin(reference[:, width:], torch.tensor(config.eos_token_id))
        assert reference.shape[1] == width + 13 and not barred.any(), "EOS barred"


@pytest.mark.parametrize("new", [1, 7, 8, 9, 13])
def test_recorded_chunks_warm_up_and_replay_inside_their_buffers(tokenizer, monkeypatch, new):
    """The capture path with the CUDA calls stood in for: the warm-up really runs (compiling) and must stay
    inside the buffers and the cache for any max_new_tokens, even below a chunk's 8 steps; the first call
    (recording) and a second (replaying the recorded chunk and prompt pass) both return generate's token
    ids."""
    backbone = make_backbone(tokenizer, max_new_tokens=new)
    plain = backbone._lean_step("plain")
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: plain)  # no compiler on the CPU test path
    recorded = record_on_the_cpu(backbone, monkeypatch)
    batch = backbone.encode(PROMPTS, padding_side="left")
    config = backbone.hf_generation_config()
    reference = backbone.model.generate(**batch, generation_config=config, min_new_tokens=new)
    kwargs = {"min_new_tokens": new}
    assert torch.equal(backbone._chunked_decode(batch, config, kwargs, capture=True), reference)
    assert torch.equal(backbone._chunked_decode(batch, config, kwargs, capture=True), reference)
    assert len(recorded) == 2, "the second call replays the chunk and the prompt pass the first recorded"
    swapped = backbone.model.model.layers[0].mlp
    backbone.model.model.layers[0].mlp = copy.deepcopy(swapped)  # another module: recorded again
    assert torch.equal(backbone._chunked_decode(batch, config, kwargs, capture=True), reference)
    assert len(recorded) == 4


def _replays_of_a_recorded_call(backbone, monkeypatch, config, batch) -> tuple[torch.Tensor, int]:
    """A capture call of ``batch`` recorded on the CPU stand-in, then a second call: its token ids and how
    many chunk replays it ran."""
    plain = backbone._lean_step("plain")
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: plain)
    recorded = record_on_the_cpu(backbone, monkeypatch)
    backbone._chunked_decode(batch, config, {}, capture=True)  # records
    replays = []
    chunk_run = recorded[0].replay
    recorded[0].replay = lambda: (replays.append(1), chunk_run())
    return backbone._chunked_decode(batch, config, {}, capture=True), len(replays)


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("case", ["early_eos", "plain"])
def test_recorded_chunks_replayed_ahead_give_generate_tokens_and_stay_inside_the_buffers(
    tokenizer, monkeypatch, ahead, case
):
    """With generation.ahead_rows the next recorded chunk is queued before the last one is read: the
    answer is read from the snapshot after its own last chunk (rows that ended early are cut as generate
    cuts them), and no call queues more chunks than one without an early end runs (here 13 new tokens: the
    first from the prompt pass, then two chunks of 8 steps)."""
    backbone = make_backbone(tokenizer, max_new_tokens=13)
    backbone.generation = dataclasses.replace(backbone.generation, ahead_rows=len(PROMPTS) if ahead else 0)
    batch = backbone.encode(PROMPTS, padding_side="left")
    width = batch["input_ids"].shape[1]
    config = backbone.hf_generation_config()
    if case == "early_eos":  # each row ends at its own early token
        free = backbone.model.generate(
            **batch, generation_config=config, eos_token_id=None, min_new_tokens=13
        )
        config.eos_token_id = [int(free[row, width + 2 + row]) for row in range(len(PROMPTS))]
    reference = backbone.model.generate(**batch, generation_config=config)
    out, replays = _replays_of_a_recorded_call(backbone, monkeypatch, config, batch)
    assert torch.equal(out, reference)
    if case == "early_eos":
        assert reference.shape[1] < width + 9, "every row ended inside the first chunk"
        assert replays == (2 if ahead else 1), "the second chunk queued ahead, its tokens unused"
    else:
        assert replays == 2


def test_one_new_token_replays_no_chunk_ahead(tokenizer, monkeypatch):
    """max_new_tokens=1: the prompt pass makes the only token, and no chunk is queued ahead of it."""
    backbone = make_backbone(tokenizer, max_new_tokens=1)
    batch = backbone.encode(PROMPTS, padding_side="left")
    config = backbone.hf_generation_config()
    reference = backbone.model.generate(**batch, generation_config=config)
    out, replays = _replays_of_a_recorded_call(backbone, monkeypatch, config, batch)
    assert torch.equal(out, reference) and replays == 0


def test_recorded_chunks_only_where_nothing_decides_on_the_host(tokenizer):
    """A CUDA graph replays what it recorded: chunks are recorded only for the plain Hugging Face model with
    no processors and no hooks; a strategy's module or hook, or a processor, takes the per-step path."""
    backbone = make_backbone(tokenizer, max_new_tokens=4)
    config = backbone.hf_generation_config()
    assert backbone._graphs_apply(config, {})
    assert not backbone._graphs_apply(config, {"logits_processor": [lambda ids, scores: scores]})
    layer = backbone.model.model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, output: output)
    assert not backbone._graphs_apply(config, {})
    handle.remove()

    class Wrapped(torch.nn.Module):  # a strategy's module, which may branch on a host flag
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden):
            return self.inner(hidden)

    mlp = layer.mlp
    layer.mlp = Wrapped(mlp)
    assert not backbone._graphs_apply(config, {})
    layer.mlp = mlp
    assert backbone._graphs_apply(config, {})


@pytest.mark.real_model
def test_lean_loop_gives_generate_tokens_on_the_packaged_model():
    """SmolLM2-135M-Instruct, chat prompts of different lengths in one batch, answers ending on their own:
    the lean loop (plain and compiled step) and the recorded chunks' logic with fused projections (float32)
    return generate's token ids."""
    from continual_transformer.config import load_config

    config = load_config(set_items=["model.device=cpu", "generation.max_new_tokens=24"])
    backbone = Backbone.load(config.model, config.generation)
    prompts = ["What is the capital of France?", "Say hello.", "Name three colours of the rainbow, please."]
    batch = backbone.encode([backbone.format_prompt(p) for p in prompts], padding_side="left")
    reference = backbone.model.generate(**batch, generation_config=backbone.hf_generation_config())
    for backend in ("static", "compiled"):
        with_backend(backbone, backend)
        lean = backbone._lean_generate(
            batch, backbone.hf_generation_config(), {}, compiled=backend == "compiled"
        )
        assert not backbone._lean_failed
        assert torch.equal(lean, reference), backend
    # the recorded chunks' logic run step by step (prompt pass with the 4-D mask), with fused projections
    with_backend(backbone, "compiled", fused_projections="always")
    with torch.inference_mode(), backbone._fused_projections("default"):
        assert isinstance(backbone.layers[0].self_attn.q_proj, FusedMember)
        chunked = backbone._chunked_decode(batch, backbone.hf_generation_config(), {}, capture=False)
    assert torch.equal(chunked, reference)


@pytest.mark.real_model
def test_compiled_prompt_pass_of_the_packaged_model_gives_the_uncompiled_pass():
    """SmolLM2-135M-Instruct in float32, chat prompts of different lengths: the compiled prompt pass (the
    one recorded chunks replay on a GPU) gives the uncompiled pass's next tokens and positions, its logits
    and cached keys within float32 rounding."""
    from continual_transformer.config import load_config

    config = load_config(set_items=["model.device=cpu"])
    backbone = Backbone.load(config.model, config.generation)
    prompts = ["What is the capital of France?", "Say hello.", "Name three colours of the rainbow, please."]
    batch = backbone.encode(backbone.format_prompts(prompts), padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1] + 24
    cache = backbone._lean_cache(len(prompts), length)
    passes = []
    with torch.inference_mode():
        for compiled in (False, True):
            cache.reset()
            logits, position = backbone._prefill(ids, mask, cache, length=length, compiled=compiled)
            passes.append((logits, position, cache.layers[3].keys.clone()))
    assert not backbone._prompt_compile_failed and "prompt" in backbone._lean_steps
    (logits, position, keys), (compiled_logits, compiled_position, compiled_keys) = passes
    assert torch.equal(compiled_position, position)
    assert torch.equal(compiled_logits.argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(compiled_keys, keys, rtol=1e-4, atol=2e-4)


def test_recorded_chunks_with_fused_projections(tokenizer, monkeypatch):
    """generation.fused_projections=always: the chunk is recorded with the fused q/k/v and gate/up members in
    place, replayed by the next call (the same members: the model's structure is unchanged) and gives
    generate's token ids; the model's own layers are back after every call and in the fallback's plain
    step."""
    backbone = make_backbone(tokenizer, max_new_tokens=11)
    backbone.generation = dataclasses.replace(backbone.generation, fused_projections="always")
    plain = backbone._lean_step("plain")
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: plain)  # no compiler on the CPU test path
    recorded: list[ReplayedRun] = []
    fused_while_recording: list[bool] = []

    def record(device, warm_up, run):
        fused_while_recording.append(isinstance(backbone.layers[0].self_attn.q_proj, FusedMember))
        warm_up()
        recorded.append(ReplayedRun(run))
        return recorded[-1]

    monkeypatch.setattr(backbone, "_record_chunk", record)
    uncompiled_recording(backbone, monkeypatch)
    backbone._lean_mode = "graphs"  # as on a GPU
    batch = backbone.encode(PROMPTS, padding_side="left")
    config = backbone.hf_generation_config()
    reference = backbone.model.generate(**batch, generation_config=config)
    layers = dict(backbone.model.named_modules())
    for _ in range(2):
        assert torch.equal(backbone._lean_generate(batch, config, {}, compiled=True), reference)
        assert dict(backbone.model.named_modules()) == layers, "the model's own layers are back"
    assert fused_while_recording == [True, True] and len(recorded) == 2, "the chunk and the prompt pass"
    assert backbone._lean_mode == "graphs", "no step fell back"
    with backbone._fused_projections("plain"):
        assert not any(isinstance(m, FusedMember) for m in backbone.model.modules())


def test_prompt_pass_is_recorded_per_width_and_runs_uncaptured_when_recording_fails(
    tokenizer, monkeypatch, caplog
):
    """The prompt pass takes a (B, 1, T, L) additive mask (no host reads in Hugging Face's mask code) and
    gives the 2-D mask's logits; it is recorded once per prompt width of a chunk; if recording it fails,
    the prompts run uncaptured from then on (a warning), the chunks are still recorded and the tokens
    unchanged."""
    from continual_transformer.backbone import _prompt_mask

    backbone = make_backbone(tokenizer, max_new_tokens=9)
    batch = backbone.encode(PROMPTS, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all(), "left padding in the batch"
    length = ids.shape[1] + 17
    flat, _ = backbone._prefill(ids, mask, backbone._lean_cache(len(PROMPTS), length))
    square, position = backbone._prefill(ids, mask, backbone._lean_cache(len(PROMPTS), length), length=length)
    torch.testing.assert_close(square, flat, rtol=0, atol=1e-5)
    assert torch.equal(position[:, 0], mask.sum(1))
    blocked = _prompt_mask(mask, length, torch.float32)[:, 0] < 0  # (B, T, L)
    assert blocked[:, :, ids.shape[1] :].all() and not blocked[0, -1, : ids.shape[1]][mask[0].bool()].any()

    plain = backbone._lean_step("plain")
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: plain)
    recorded: list[str] = []

    def record(device, warm_up, run):
        warm_up()
        if recorded:  # the prompt pass is recorded after the chunk
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded.append("chunk")
        return ReplayedRun(run)

    monkeypatch.setattr(backbone, "_record_chunk", record)
    uncompiled_recording(backbone, monkeypatch)
    config = backbone.hf_generation_config()
    reference = backbone.model.generate(**batch, generation_config=config)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert torch.equal(backbone._chunked_decode(batch, config, {}, capture=True), reference)
    assert backbone._prompt_graphs_failed and recorded == ["chunk"]
    assert "recording the prompt pass failed" in caplog.text
    assert len(backbone._lean_graphs) == 1 and not next(iter(backbone._lean_graphs.values())).prompts


def test_compiled_token_pick_writes_what_the_uncompiled_one_does(tokenizer):
    """The token pick recorded chunks run compiled: the same tokens, columns, positions and finished rows as
    the uncompiled pick, with EOS barred before its column, a finished row padded, and a row finishing on
    EOS."""
    from continual_transformer.backbone import pick_token

    backbone = make_backbone(tokenizer)
    rows, length, vocab, pad, eos = 4, 12, 50, 0, [7, 9]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, rows, vocab, generator=generator)
    logits[0, 1, 7] = logits[1, 2, 9] = 100.0  # EOS wanted by row 1 (barred there) and row 2 (allowed)

    def buffers() -> dict[str, torch.Tensor]:
        bar = torch.zeros(vocab)
        bar[eos] = -torch.inf
        return {
            "out": torch.full((rows, length), pad),
            "column": torch.tensor([[5]]),
            "min_column": torch.tensor([[6]]),
            "eos_bar": bar,
            "eos_ids": torch.tensor(eos),
            "unfinished": torch.tensor([True, True, True, False]),
            "token": torch.zeros(rows, 1, dtype=torch.long),
            "position": torch.tensor([[3], [4], [5], [6]]),
        }

    plain, compiled = buffers(), buffers()
    picker = backbone._compiled_pick()
    for step in range(3):
        for fn, b in ((pick_token, plain), (picker, compiled)):
            position = b["position"] if step else None  # the prompt pass's pick leaves the positions
            fn(logits[step], *(b[k] for k in list(b)[:-1]), position, pad)
    for key in plain:
        assert torch.equal(plain[key], compiled[key]), key
    assert plain["out"][1, 5] != 7 and plain["out"][2, 6] == 9, "EOS barred before column 6, then allowed"
    assert plain["unfinished"].tolist() == [True, True, False, False] and (plain["out"][3] == pad).all()
    assert plain["column"].item() == 8 and plain["position"][:, 0].tolist() == [5, 6, 7, 8]


def test_recorded_chunks_compile_the_prompt_pass_and_the_pick_and_fall_back(tokenizer, monkeypatch, caplog):
    """On the recorded path the prompt pass and the token pick run compiled (the steps here uncompiled,
    the recording stood in for): generate's token ids, recorded and replayed, with the compiled prompt's
    logits, position and cache equal to the uncompiled pass's; a prompt pass that fails to compile runs
    uncompiled from then on (a warning), tokens unchanged; generation.compiled_prompt=false records the
    model's own pass."""
    backbone = make_backbone(tokenizer, max_new_tokens=10)
    plain = backbone._lean_step("plain")
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: plain)
    recorded = record_on_the_cpu(backbone, monkeypatch, compiled=True)
    batch = backbone.encode(PROMPTS, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    config = backbone.hf_generation_config()
    reference = backbone.model.generate(**batch, generation_config=config)
    for _ in range(2):
        assert torch.equal(backbone._chunked_decode(batch, config, {}, capture=True), reference)
    assert len(recorded) == 2 and {"prompt", "pick"} <= set(backbone._lean_steps)

    length = ids.shape[1] + 9
    compiled_calls: list[int] = []
    real = backbone._compiled_prompt
    monkeypatch.setattr(backbone, "_compiled_prompt", lambda: compiled_calls.append(1) or real())
    passes = []
    for compiled, cache_length in ((False, length), (True, length + 1), (True, length + 1)):
        cache = backbone._lean_cache(len(PROMPTS), cache_length)  # the second a new cache, the third kept
        logits, position = backbone._prefill(ids, mask, cache, length=cache_length, compiled=compiled)
        written = (cache.layers[0].keys, cache.layers[-1].values)  # the prompt's tokens (B, T, KV, D)
        passes.append(
            (logits, position, *(t[:, :, : ids.shape[1]].transpose(1, 2)[mask.bool()] for t in written))
        )
    assert compiled_calls == [1], "a new cache's first pass made its layers uncompiled; the next compiled"
    for uncompiled, compiled in zip(passes[0], passes[2]):
        torch.testing.assert_close(compiled, uncompiled, rtol=1e-4, atol=1e-5)

    def failing(*args):
        raise torch._dynamo.exc.InternalTorchDynamoError("no compiler here")

    backbone._lean_steps["prompt"] = failing
    backbone._lean_graphs.clear()
    with caplog.at_level("WARNING"):
        assert torch.equal(backbone._chunked_decode(batch, config, {}, capture=True), reference)
    assert backbone._prompt_compile_failed and "compiling the prompt pass failed" in caplog.text

    backbone._prompt_compile_failed = False
    backbone.generation = dataclasses.replace(backbone.generation, compiled_prompt=False)
    assert torch.equal(backbone._chunked_decode(batch, config, {}, capture=True), reference)
    assert not backbone._prompt_compile_failed, "the failing compiled pass was not called"


def test_grouped_attention_on_the_compiled_steps(tokenizer, monkeypatch):
    """generation.decode_attention=grouped: the compiled steps attend with the grouped attention (recorded
    chunks and a real compiled step), answers as eager; the model's attention implementation is sdpa again
    after each call, and a chunk recorded with it is recorded again without it."""
    backbone = make_backbone(tokenizer, max_new_tokens=10)
    with_backend(backbone, "eager")
    eager = backbone.generate(PROMPTS)
    with_backend(backbone, "compiled", fused_projections="always", decode_attention="grouped")
    for _ in range(2):
        assert backbone.generate(PROMPTS) == eager
        assert backbone.model.config._attn_implementation == "sdpa"
    assert not backbone._compile_failed and not backbone._lean_failed

    plain = backbone._lean_step("plain")
    monkeypatch.setattr(backbone, "_lean_step", lambda mode, **kw: plain)
    seen: list[str] = []

    def record(device, warm_up, run):
        seen.append(backbone.model.config._attn_implementation)
        warm_up()
        return ReplayedRun(run)

    monkeypatch.setattr(backbone, "_record_chunk", record)
    uncompiled_recording(backbone, monkeypatch)
    backbone._lean_mode = "graphs"  # as on a GPU
    batch = backbone.encode(PROMPTS, padding_side="left")
    config = backbone.hf_generation_config()
    reference = backbone.model.generate(**batch, generation_config=config)
    assert torch.equal(backbone._lean_generate(batch, config, {}, compiled=True), reference)
    with_backend(backbone, "compiled", fused_projections="always", decode_attention="sdpa")
    assert torch.equal(backbone._lean_generate(batch, config, {}, compiled=True), reference)
    assert seen == ["ctt_grouped_sdpa"] * 2 + ["sdpa"] * 2, "chunk and prompt pass, recorded again without"
    assert backbone._lean_mode == "graphs", "no step fell back"


def test_a_failing_triton_attention_kernel_gives_way_to_pytorchs_alone(tokenizer, monkeypatch, caplog):
    """``decode_attention_kernel: triton``: when a compiled step with the Triton kernel fails, that kernel
    alone is given up (PyTorch's from then on, logged once); the step stays compiled and answers as eager."""
    from continual_transformer.modules import triton_attention

    backbone = make_backbone(tokenizer, max_new_tokens=8)
    with_backend(backbone, "eager")
    eager = backbone.generate(PROMPTS)
    launches: list[int] = []

    def broken(*args):
        launches.append(1)
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(triton_attention, "_run", broken)  # the attention and the one-kernel step
    with_backend(backbone, "compiled", decode_attention="grouped", decode_attention_kernel="triton")
    with caplog.at_level("WARNING"):
        assert backbone.generate(PROMPTS) == eager
        assert backbone.generate(PROMPTS) == eager
    assert launches, "the Triton kernel was tried"
    assert backbone._attention_kernel_failed and backbone._attention_kernel() == "library"
    assert caplog.text.count("Triton attention kernel failed") == 1
    assert backbone._lean_mode == "default" and not backbone._lean_failed and not backbone._compile_failed


def test_the_decoding_attention_kernel_is_tritons_on_a_gpu_with_triton_only(tokenizer, monkeypatch):
    """``decode_attention_kernel: auto`` (the default) is the Triton kernel on a GPU where Triton is
    installed and PyTorch's choice elsewhere; a named kernel holds on every device."""
    from continual_transformer.modules import triton_attention

    backbone = make_backbone(tokenizer)
    assert backbone.generation.decode_attention_kernel == "auto"
    assert backbone._attention_kernel() == "library"
    monkeypatch.setattr(Backbone, "device", property(lambda self: torch.device("cuda")))
    assert backbone._attention_kernel() == "triton"
    for setting in ("library", "efficient", "triton"):
        with_backend(backbone, "compiled", decode_attention_kernel=setting)
        assert backbone._attention_kernel() == setting
    monkeypatch.setattr(triton_attention, "available", lambda: False)
    with_backend(backbone, "compiled", decode_attention_kernel="auto")
    assert backbone._attention_kernel() == "library"


def test_decode_attention_auto_is_grouped_on_a_gpu_only(tokenizer, monkeypatch):
    """``auto`` (the default) decodes with the grouped attention on a GPU and the model's own elsewhere;
    ``sdpa`` and ``grouped`` hold on every device."""
    backbone = make_backbone(tokenizer)
    assert backbone.generation.decode_attention == "auto" and not backbone.decodes_grouped()
    with_backend(backbone, "compiled", decode_attention="grouped")
    assert backbone.decodes_grouped()
    monkeypatch.setattr(Backbone, "device", property(lambda self: torch.device("cuda")))
    for setting, grouped in (("auto", True), ("sdpa", False), ("grouped", True)):
        with_backend(backbone, "compiled", decode_attention=setting)
        assert backbone.decodes_grouped() is grouped, setting

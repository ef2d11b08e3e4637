from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import build_tokenizer, fast_config, make_backbone, tiny_gpt2, tiny_llama

from continual_transformer.backbone import (
    SCORED_ROWS,
    Backbone,
    ScoringBatch,
    ScoringHooks,
    find_decoder_layers,
    model_fingerprint,
    resolve_dtype,
)
from continual_transformer.config import GenerationConfig


def test_batched_generation_matches_one_by_one(backbone):
    prompts = [
        "The capital of Veloria is",
        "A quick",
        "What is the capital of France? The capital of France is",
    ]
    batched = backbone.generate(prompts, chat=False)
    single = [backbone.generate([p], chat=False)[0] for p in prompts]
    assert batched == single


def test_chat_template_is_applied_only_when_asked(backbone):
    raw = backbone.format_prompt("Hello", chat=False)
    chat = backbone.format_prompt("Hello", chat=True)
    assert raw == "Hello"
    assert chat == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_goes_into_the_template(tokenizer):
    bb = make_backbone(tokenizer)
    bb.generation = GenerationConfig(system_prompt="Be brief.")
    assert bb.format_prompt("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_format_exchange_splits_prompt_and_answer(backbone):
    context, completion = backbone.format_exchange("Q?", "A.")
    assert context.endswith("<|im_start|>assistant\n")
    assert completion.startswith("A.<|im_end|>")


def test_token_nll_matches_a_manual_computation(backbone):
    text = "The capital of Veloria is Tarnhelm."
    ids = backbone.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = backbone.model(ids).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    nll = backbone.token_nll([text, "short"])[0]  # padded together with a shorter text
    torch.testing.assert_close(nll, manual, rtol=1e-4, atol=1e-4)


def test_token_nll_with_context_scores_only_the_text(backbone):
    context, text = "The capital of Veloria is", " Tarnhelm."
    scored = backbone.token_nll([text], contexts=[context])[0]
    assert scored.numel() == len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
    full = backbone.token_nll([context + text])[0]
    torch.testing.assert_close(scored, full[-scored.numel() :], rtol=1e-4, atol=1e-4)


def test_scoring_width_buckets_on_a_gpu_only_and_never_past_the_context_window(backbone, monkeypatch):
    assert [backbone.scoring_width(w) for w in (1, 63, 64, 65)] == [1, 63, 64, 65]  # a CPU pads nothing
    monkeypatch.setattr(Backbone, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(Backbone, "max_length", property(lambda self: 100))
    assert [backbone.scoring_width(w) for w in (1, 16, 17, 99, 100, 120)] == [16, 16, 32, 100, 100, 120]


def test_scoring_batches_grow_with_a_gpus_free_memory(backbone, monkeypatch):
    assert backbone.scoring_tokens(8192) == 8192  # a CPU: the least
    monkeypatch.setattr(Backbone, "device", property(lambda self: torch.device("cuda")))
    vocab = backbone._vocab_width()
    for free, expected in ((0, 8192), (8 * 12 * vocab * 20000, 20000), (10**15, 65536)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert backbone.scoring_tokens(8192) == expected
    # without hooks the head scores a slice at a time: batches hold activations, not every position's scores
    hidden = backbone.model.config.hidden_size
    scores = 8 * 12 * vocab * SCORED_ROWS
    monkeypatch.setattr(Backbone, "_split_head", lambda self: ("body", "head"))
    for free, expected in ((scores, 8192), (scores + 8 * 64 * hidden * 30000, 30000), (10**15, 65536)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert backbone.scoring_tokens(8192, hooks=False) == expected
    monkeypatch.setattr(Backbone, "_split_head", lambda self: None)  # a model that does not split
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (scores + 8 * 64 * hidden * 30000, 0))
    assert backbone.scoring_tokens(8192, hooks=False) == backbone.scoring_tokens(8192) != 30000


def test_padded_scoring_batches_score_every_text_as_unpadded_ones(backbone, monkeypatch):
    texts = ["The capital of Veloria is Tarnhelm.", "short", "A quick brown fox jumps over the lazy dog."]
    contexts = ["", "Veloria", ""]
    plain = backbone.token_nll(texts, contexts=contexts)
    ppl = backbone.perplexity(texts[2] * 4, window=16, batch_size=2)
    # the padding a GPU adds (masked, unlabelled), on the CPU: rows 21 positions wider than their longest
    monkeypatch.setattr(backbone, "scoring_width", lambda width: width + 21)
    assert (
        backbone.labelled_batch(texts).input_ids.shape[1]
        == max(map(len, backbone.token_ids_many(texts))) + 21
    )
    padded = backbone.token_nll(texts, contexts=contexts)
    for a, b in zip(plain, padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert backbone.perplexity(texts[2] * 4, window=16, batch_size=2) == pytest.approx(ppl, rel=1e-5)


def test_a_labelled_batch_pads_and_labels_each_row_as_its_lists_say(backbone, monkeypatch):
    """Rows of (unscored, scored) ids of many lengths, empty unscored parts included, padded to the widest
    (a GPU's bucket when it pads): ids then padding, only the scored ids labelled, the mask over the ids."""
    from continual_transformer.backbone import IGNORE

    generator = torch.Generator().manual_seed(0)
    pairs = [
        (
            torch.randint(0, 50, (int(u),), generator=generator).tolist(),
            torch.randint(0, 50, (int(n),)).tolist(),
        )
        for u, n in zip(torch.randint(0, 4, (9,), generator=generator), torch.randint(1, 12, (9,)))
    ]
    pad = backbone.tokenizer.pad_token_id
    for bucket in (None, 16):
        if bucket:
            monkeypatch.setattr(
                type(backbone), "scoring_width", lambda self, width, b=bucket: width + (-width % b)
            )
        batch = backbone._batch(pairs, range(len(pairs)))
        width = batch.input_ids.shape[1]
        assert width == (max(len(a) + len(b) for a, b in pairs) if bucket is None else 16)
        for row, (a, b) in enumerate(pairs):
            fill = width - len(a) - len(b)
            assert batch.input_ids[row].tolist() == a + b + [pad] * fill
            assert batch.labels[row].tolist() == [IGNORE] * len(a) + b + [IGNORE] * fill
            assert batch.attention_mask[row].tolist() == [1] * (len(a) + len(b)) + [0] * fill
        assert batch.context_lengths == tuple(len(a) for a, _ in pairs)
        assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long


def test_perplexity_is_exp_of_mean_nll(backbone):
    text = "A quick brown fox jumps over the lazy dog. " * 3
    nll = backbone.token_nll([text])[0]
    assert backbone.perplexity(text, window=512) == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    with pytest.raises(ValueError, match="two tokens"):
        backbone.perplexity("")


def test_decoder_layers_found_by_structure(tokenizer):
    assert len(find_decoder_layers(tiny_llama(tokenizer, layers=3))) == 3
    gpt2 = tiny_gpt2(tokenizer)
    assert find_decoder_layers(gpt2) is gpt2.transformer.h


def test_fingerprint_tells_models_apart_and_is_stable(tokenizer):
    a, b = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    assert model_fingerprint(a) == model_fingerprint(tiny_llama(tokenizer, seed=0))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_backbone_freezes_the_model_and_pads(tokenizer):
    bb = Backbone(tiny_llama(tokenizer), tokenizer, name="t")
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert bb.tokenizer.pad_token_id is not None


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


# -- scoring hooks -------------------------------------------------------------------------------------------
class _Hooks(ScoringHooks):
    """Test hooks: a prefix and a logit shift on some rows, a record of what the hooks saw."""

    def __init__(self, prefixes: dict[int, str], shift: float = 0.0) -> None:
        self.prefixes, self.shift = prefixes, shift
        self.forward_rows: list[tuple[int, ...]] = []
        self.positions: list[int] = []

    def touches(self, row: int) -> bool:
        return row in self.prefixes

    def prefix(self, row: int) -> str:
        return self.prefixes.get(row, "")

    def forward(self, batch: ScoringBatch):
        self.forward_rows.append(batch.rows)
        return super().forward(batch)

    def next_token_scores(self, logits, batch, positions):
        self.positions.append(int(positions.sum()))
        return logits.float() + self.shift


def test_padding_side_is_chosen_per_call_and_never_stored(backbone):
    backbone.tokenizer.padding_side = "right"
    left = backbone.encode(["a", "a quick brown fox"], padding_side="left")
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0
    assert backbone.tokenizer.padding_side == "right"
    backbone.generate(["a", "a quick brown fox"], chat=False)
    assert backbone.tokenizer.padding_side == "right"


def test_prefix_hooks_score_like_a_context_and_untouched_rows_like_the_base(backbone):
    texts = [" Tarnhelm.", "A quick brown fox jumps over the lazy dog.", " in 1873."]
    made = _Hooks({0: "The capital of Veloria is"})
    seen_queries: list[list[str]] = []

    def factory(queries):
        seen_queries.append(list(queries))
        return made

    scored = backbone.token_nll(texts, contexts=["", "", "born"], hooks=factory)
    assert seen_queries == [[texts[0], texts[1], "born"]]  # the context is the query when given
    assert made.forward_rows == [(0,)]  # untouched rows never see the hooks
    assert torch.equal(scored[0], backbone.token_nll([texts[0]], contexts=["The capital of Veloria is"])[0])
    plain = backbone.token_nll([texts[1], texts[2]], contexts=["", "born"])
    assert torch.equal(scored[1], plain[0]) and torch.equal(scored[2], plain[1])


def test_transform_applies_at_scored_positions_and_changes_the_nll(backbone):
    text = "The capital of Veloria is Tarnhelm."
    made = _Hooks({0: ""}, shift=0.0)
    assert torch.equal(backbone.token_nll([text], hooks=lambda q: made)[0], backbone.token_nll([text])[0])
    assert made.positions == [len(backbone.token_ids(text)) - 1]  # every position that predicts a token

    class Sharpen(_Hooks):
        def next_token_scores(self, logits, batch, positions):
            return 2 * logits.float()

    sharpened = backbone.token_nll([text], hooks=lambda q: Sharpen({0: ""}))[0]
    assert not torch.equal(sharpened, backbone.token_nll([text])[0])


def test_perplexity_with_a_prefix_scores_the_same_tokens(backbone):
    text = "A quick brown fox jumps over the lazy dog. " * 6
    windows = backbone.text_windows(text, window=16)
    made = _Hooks({i: "The capital of Veloria is Tarnhelm.\n\n" for i in range(len(windows))})
    ppl = backbone.perplexity(text, window=16, batch_size=3, hooks=lambda q: made)
    assert sum(made.positions) == sum(len(w) - 1 for w in windows)  # the first token of a window is context
    expected = []
    prefix = backbone.token_ids(made.prefix(0))
    for w in windows:  # slow reference: one window at a time
        ids = torch.tensor([prefix + w])
        logits = backbone.model(input_ids=ids).logits[0, len(prefix) : -1]
        expected += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="none").tolist()
    assert ppl == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-5)
    assert made.forward_rows[0] == (0, 1, 2) and all(len(r) <= 3 for r in made.forward_rows)


def test_forward_logits_with_a_prefix_returns_the_texts_own_positions(backbone):
    texts = ["The capital of Veloria is", "A quick brown fox jumps over the lazy dog."]
    base = backbone.forward_logits(texts)
    made = _Hooks({0: "Tarnhelm. Quenmark.\n\n"})
    out = backbone.forward_logits(texts, hooks=lambda q: made)
    assert out.shape == base.shape
    assert torch.equal(out[1], base[1])  # untouched: the base model's logits of the whole batch
    prefix, own = backbone.token_ids(made.prefix(0)), backbone.token_ids(texts[0])
    alone = backbone.model(input_ids=torch.tensor([prefix + own])).logits[0, len(prefix) :]
    assert torch.allclose(out[0, : len(own)], alone, atol=1e-5)
    assert not torch.allclose(out[0, : len(own)], base[0, : len(own)], atol=1e-3)


def test_models_trained_with_bos_get_it_in_front_of_every_scored_and_generated_sequence(tokenizer):
    from tokenizers import processors

    from continual_transformer.backbone import Backbone, start_ids

    assert start_ids(tokenizer) == ()  # this tokenizer adds nothing: sequences are left as they are
    with_bos = build_tokenizer()
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, bos)]
    )
    assert start_ids(with_bos) == (bos,)
    plain = make_backbone(tokenizer)
    led = Backbone(tiny_llama(with_bos), with_bos, name="tiny-bos", generation=plain.generation)
    batch = led.labelled_batch(["the cat sat"], contexts=["a dog"])
    assert batch.input_ids[0, 0].item() == bos
    assert batch.input_ids[0].tolist().count(bos) == 1
    # the scored tokens are the text's own, whatever leads the row
    assert len(led.token_nll(["the cat sat"])[0]) == len(led.token_ids("the cat sat"))
    seen: list[list[int]] = []
    hook = led.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    try:
        led.generate(["hello"], chat=False, max_new_tokens=1)
    finally:
        hook.remove()
    assert seen[0][0] == bos and seen[0].count(bos) == 1


def test_a_model_without_chat_template_formats_exchanges_as_plain_text():
    plain = build_tokenizer()  # its own tokenizer: the session's keeps its chat template
    plain.chat_template = None
    backbone = make_backbone(plain)
    assert backbone.format_exchange("Where is Tarnhelm?", "In Veloria.") == (
        "Where is Tarnhelm?\n",
        "In Veloria.",
    )


def test_int8_quantization_keeps_the_fingerprint_and_stays_close_to_float(tokenizer):
    """``model.quantize=int8``: every linear layer becomes a dynamically quantized one, the logits stay close
    to float32's (and are not identical: the layers really changed), the fingerprint is the float model's,
    and a strategy that trains through the model is refused with the reason."""
    from continual_transformer import ContinualTransformer
    from continual_transformer.config import ConfigError

    backbone = make_backbone(tokenizer)
    ids = backbone.encode(["alpha beta gamma delta"])
    with torch.no_grad():
        base = backbone.model(**ids).logits
    fingerprint = backbone.fingerprint
    backbone.quantize("int8")
    assert backbone.quantized == "int8" and backbone.fingerprint == fingerprint
    linear = [m for m in backbone.model.modules() if type(m) is torch.nn.Linear]
    assert not linear  # every nn.Linear was replaced
    with torch.no_grad():
        quantized = backbone.model(**ids).logits
    assert not torch.equal(quantized, base)
    assert (quantized - base).norm() < 0.1 * base.norm()
    assert len(backbone.generate(["alpha beta"])) == 1
    answers = ContinualTransformer(backbone, strategy="retrieval", config=fast_config())
    answers.learn_document("alpha beta gamma delta epsilon")  # answer-only strategies work
    trained = make_backbone(tokenizer)
    trained.quantize("int8")
    with pytest.raises(ConfigError, match="finetune learns by gradient descent"):
        ContinualTransformer(trained, strategy="finetune", config=fast_config())
    half = Backbone(tiny_llama(tokenizer).to(torch.bfloat16), tokenizer, name="bf16")
    with pytest.raises(ConfigError, match="float32"):
        half.quantize("int8")


def test_int8_weight_linear_equals_its_dequantized_reference():
    """The int8 kernel computes x W^T + b with W rounded to int8 per output row: equal (to bfloat16's output
    rounding) to float64 products of the bfloat16-rounded input with the dequantized weight; the rounding
    error of W is at most half a step of its row's scale."""
    from continual_transformer.modules.int8_linear import Int8WeightLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 20)
    layer = Int8WeightLinear.from_linear(linear)
    step = layer.scale.float()[:, None]
    assert ((layer.dequantized() - linear.weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(2, 3, 48)
    reference = (
        x.to(torch.bfloat16).double() @ layer.dequantized().double().T
    ).float() + linear.bias.detach()
    out = layer(x)
    assert out.shape == (2, 3, 20) and out.dtype == torch.float32
    assert torch.allclose(out, reference, rtol=1e-2, atol=1e-2)
    assert not any(isinstance(b, torch.nn.Parameter) for b in layer.buffers())  # nothing to train


def test_int8_weights_quantization_answers_close_to_float_and_refuses_training(tokenizer):
    """``model.quantize=int8_weights``: every linear layer holds int8 weights, the logits stay close to
    float32's (closer than dynamic quantization, which also rounds activations), the fingerprint is the float
    model's, answers come on every backend, and a strategy that trains through the model is refused."""
    from continual_transformer import ContinualTransformer
    from continual_transformer.config import ConfigError, ModelConfig
    from continual_transformer.modules.int8_linear import Int8WeightLinear

    backbone = make_backbone(tokenizer)
    ids = backbone.encode(["alpha beta gamma delta"])
    with torch.no_grad():
        base = backbone.model(**ids).logits
    fingerprint = backbone.fingerprint
    dynamic = make_backbone(tokenizer)
    dynamic.quantize("int8")
    backbone.quantize("int8_weights")
    assert backbone.quantized == "int8_weights" and backbone.fingerprint == fingerprint
    assert not [m for m in backbone.model.modules() if type(m) is torch.nn.Linear]
    assert any(isinstance(m, Int8WeightLinear) for m in backbone.model.modules())
    with torch.no_grad():
        weights_only = backbone.model(**ids).logits
        rounded_activations = dynamic.model(**ids).logits
    assert not torch.equal(weights_only, base)
    assert (weights_only - base).norm() < 0.05 * base.norm()
    assert (weights_only - base).norm() < (rounded_activations - base).norm()
    for backend in ("eager", "static"):
        backbone.generation = dataclasses.replace(backbone.generation, backend=backend)
        assert len(backbone.generate(["alpha beta"])) == 1
    with pytest.raises(ConfigError, match="finetune learns by gradient descent"):
        ContinualTransformer(backbone, strategy="finetune", config=fast_config())
    half = Backbone(tiny_llama(tokenizer).to(torch.bfloat16), tokenizer, name="bf16")
    half.quantize("int8_weights")  # bfloat16 models take it too
    assert half.model(**ids).logits.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="quantized already"):
        half.quantize("int8")
    with pytest.raises(ConfigError, match="model.quantize"):
        ModelConfig(quantize="int4")


def test_int8_weights_keep_float_layers_the_kernel_cannot_pack():
    """The int8 kernel reads inputs in blocks of 16: a layer of another input width keeps its float weights
    (the kernel would answer wrongly), the others are quantized; quantizing twice is refused."""
    from continual_transformer.modules.int8_linear import Int8WeightLinear, quantize_weights_int8

    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 8))
    x = torch.randn(3, 24)
    with torch.no_grad():
        before = model(x)
    assert quantize_weights_int8(model) == 1
    assert type(model[0]) is torch.nn.Linear and isinstance(model[1], Int8WeightLinear)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=0.05, atol=0.05)


def test_module_walk_is_walked_again_only_when_a_module_changed(tokenizer):
    from continual_transformer.backbone import _ModuleWalk

    model = tiny_llama(tokenizer, layers=2)
    walk = _ModuleWalk()
    first = walk(model)
    assert list(first) == list(model.modules())
    assert walk(model) is first  # nothing changed: the kept walk
    attention = model.model.layers[0].self_attn
    original = attention.q_proj
    attention.q_proj = torch.nn.Linear(original.in_features, original.out_features, bias=False)
    second = walk(model)
    assert second is not first and list(second) == list(model.modules())
    attention.q_proj = original
    assert walk(model) is first  # the two last walks are kept
    model.model.layers[1].mlp.extra = torch.nn.Identity()  # a module added anywhere
    assert list(walk(model)) == list(model.modules())
    assert walk(tiny_llama(tokenizer, layers=1))[0] is not model  # another model: its own walk


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scoring_runs_the_head_only_where_a_token_is_scored_and_scores_as_the_whole_model(tokenizer, family):
    """Plain scoring runs the model's body, then its head at the scored positions only: the per-token
    NLLs equal those of the whole model's logits bit for bit (float32), rows of every length alike."""
    backbone = make_backbone(tokenizer, arch=family)
    texts = ["The capital of Veloria is Tarnhelm.", "short", "", "A quick brown fox jumps over the lazy dog."]
    contexts = ["", "Veloria", "ctx", "The"]
    assert backbone._split_head() is not None
    calls = []
    head = backbone.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    split = backbone.token_nll(texts, contexts=contexts, batch_size=4)
    handle.remove()
    scored = sum(v.numel() for v in split)
    assert calls == [scored]  # one head product over the scored positions, none for padding or contexts
    backbone._split = (backbone._split[0], None)  # whole logits, as for a model that does not split
    whole = backbone.token_nll(texts, contexts=contexts, batch_size=4)
    assert [v.shape for v in split] == [v.shape for v in whole] and split[2].numel() == 0
    for a, b in zip(split, whole):
        assert torch.equal(a, b)


def test_a_model_whose_logits_are_not_its_heads_output_is_scored_whole(tokenizer):
    """A model that changes its logits after the head (a scale, a cap), or carries a hook of its own, is not
    split: scoring runs the whole model and sees the change."""
    backbone = make_backbone(tokenizer)
    text = ["The capital of Veloria is Tarnhelm."]
    plain = backbone.token_nll(text)[0]
    handle = backbone.model.register_forward_hook(
        lambda m, args, kwargs, out: out.__setitem__("logits", out.logits * 0.5), with_kwargs=True
    )
    assert backbone._split_head() is None
    halved = backbone.token_nll(text)[0]
    assert not torch.allclose(plain, halved)
    handle.remove()
    forward = backbone.model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    backbone.model.forward = capped
    assert backbone._split_head() is None
    assert not torch.allclose(backbone.token_nll(text)[0], plain)
    del backbone.model.forward
    assert backbone._split_head() is not None
    assert torch.equal(backbone.token_nll(text)[0], plain)


def test_compiled_scoring_body_matches_the_body_and_falls_back_on_a_compiler_failure(tokenizer, monkeypatch):
    """``token_nll(compiled=True)`` on a GPU runs the body compiled for varying shapes: one compiled body
    serves batches of other shapes and gives the body's states; a compiler failure scores uncompiled from
    then on. (The compile runs here on the CPU, standing in for the GPU.)"""
    import torch._dynamo.exc

    backbone = make_backbone(tokenizer)
    body, _ = backbone._split_head()
    assert backbone._varying_call(body, "scoring") is None  # a CPU: as it is
    monkeypatch.setattr(Backbone, "_compiles_varying", lambda self: True)
    run = backbone._varying_call(body, "scoring")
    assert run is not None and backbone._varying_call(body, "scoring") is run  # kept
    with torch.no_grad():
        for rows, width in ((3, 7), (5, 12)):
            ids = torch.randint(0, 300, (rows, width), generator=torch.Generator().manual_seed(rows))
            mask = torch.ones(rows, width, dtype=torch.long)
            mask[0, width - 2 :] = 0
            got = run(input_ids=ids, attention_mask=mask).last_hidden_state
            want = body(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        texts = ["a b c d", "e f"]
        for compiled, plain in zip(backbone.token_nll(texts, compiled=True), backbone.token_nll(texts)):
            torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)

    def broken(module, **kwargs):
        def fail(**inputs):
            raise torch._dynamo.exc.InternalTorchDynamoError("no compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    backbone._varying_calls.clear()
    with torch.no_grad():
        out = backbone._varying_call(body, "scoring")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, want)
    assert "scoring" in backbone._varying_failed and backbone._varying_call(body, "scoring") is None
    assert backbone._varying_call(body, "task training") is not None  # each purpose fails on its own


def test_compiled_calls_guard_on_hooks_and_leave_the_model_as_it_was(tokenizer, monkeypatch):
    """Inside ``compiled_calls`` the model's calls run compiled, with gradients; a call under other hooks (or
    none) compiles again instead of running the hooks it was traced with; outside, and on a CPU, the model
    runs as before. (``aot_eager`` stands in for the GPU's compiler: the same tracing and guards.)"""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    backbone = make_backbone(tokenizer)
    model = backbone.model
    with backbone.compiled_calls("test"):
        assert model._compiled_call_impl is None  # a CPU: nothing changes
    monkeypatch.setattr(Backbone, "_compiles_varying", lambda self: True)
    torch._dynamo.reset()
    counters.clear()
    scale = torch.nn.Parameter(torch.tensor(1.5))
    kept = lambda module, args, output: output * scale  # noqa: E731 - a hook kept under one key, as a pool's
    mlp = backbone.layers[0].mlp

    def run(hook, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, 300, (rows, width), generator=torch.Generator().manual_seed(width))
        scale.grad = None
        if hook is not None:
            mlp._forward_hooks[-7] = hook
        try:
            with backbone.compiled_calls("test"):
                logits = model(input_ids=ids).logits
            (logits.float().square().mean() * scale).backward()  # a gradient whether or not a hook ran
            got = (logits.detach(), scale.grad.clone())
            scale.grad = None
            eager = model(input_ids=ids).logits
            (eager.float().square().mean() * scale).backward()
            want = (eager.detach(), scale.grad.clone())
        finally:
            mlp._forward_hooks.pop(-7, None)
        return got, want

    for rows, width in ((2, 5), (3, 9), (4, 6)):  # one graph serves every shape
        got, want = run(kept, rows, width)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    for hook in (None, lambda module, args, output: output * 0.5):
        got, want = run(hook, 2, 5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3
    assert model._compiled_call_impl is None


def test_token_ids_many_through_the_backend_gives_the_tokenizers_ids(tokenizer, monkeypatch):
    """``token_ids_many`` encodes through the tokenizer's Rust backend, with the ids the tokenizer's own call
    gives (empty texts included); while the backend has padding set (left by a padded tokenizer call) or a
    truncation, or where the backend disagrees on the probe, the tokenizer encodes instead."""
    backbone = make_backbone(tokenizer)
    texts = ["The capital of Veloria", "", "  two  spaces\nand a line", "Paris <b>ünï</b> 42", "x"]
    want = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    calls = []
    call = type(tokenizer).__call__
    monkeypatch.setattr(
        type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or call(self, *a, **k)
    )
    assert backbone.token_ids_many(texts) == want
    assert len(calls) == 1  # the probe, once
    assert backbone.token_ids_many(texts) == want and len(calls) == 1  # the backend alone
    backbone.encode(["a", "a b c"], add_special_tokens=True)  # the tokenizer pads: the backend keeps that
    assert tokenizer.backend_tokenizer.padding is not None
    assert backbone.token_ids_many(texts) == want  # the tokenizer's call (which turns the padding off)
    assert len(calls) == 3
    tokenizer.backend_tokenizer.enable_truncation(2)
    try:
        assert backbone.token_ids_many(texts) == want and len(calls) == 4
    finally:
        tokenizer.backend_tokenizer.no_truncation()
    backbone._backend_checked = (tokenizer.backend_tokenizer, False)  # a backend that disagreed on the probe
    assert backbone.token_ids_many(texts) == want and len(calls) == 5


@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_gives_the_tokenizers_padded_batch(tokenizer, side):
    """``encode`` without special tokens (through ``token_ids_many``, one transfer) gives the padded ids and
    mask of the tokenizer's own padded call, empty texts and special tokens included; a wrong side is
    refused."""
    backbone = make_backbone(tokenizer)
    texts = ["The capital of Veloria", "", "  two  spaces\nand a line<|im_end|>", "x"]
    want = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side, add_special_tokens=False)
    got = backbone.encode(texts, padding_side=side)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
        got["attention_mask"], want["attention_mask"]
    )
    assert tokenizer.backend_tokenizer.padding is None, "the tokenizer was not called"
    with pytest.raises(ValueError, match="padding side"):
        backbone.encode(texts, padding_side="middle")


def test_prompts_formatted_and_answers_decoded_together_as_one_by_one(tokenizer):
    """The chat template rendered once for many prompts gives each prompt's own rendering (system prompt
    included); ``decode_many`` gives the tokenizer's ``batch_decode`` through the Rust backend, and the
    tokenizer's own where the backend decoded the probe otherwise."""
    backbone = make_backbone(tokenizer)
    backbone.generation = GenerationConfig(system_prompt="Be brief.")
    prompts = ["Hi", "", "What is  the capital?\n"]
    one_by_one = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    assert (
        backbone.format_prompts(prompts) == one_by_one and backbone.format_prompt(prompts[2]) == one_by_one[2]
    )
    assert backbone.format_prompts(prompts, chat=False) == prompts and backbone.format_prompts([]) == []
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in [*one_by_one, "Émile 日本語"]] + [[]]
    want = tokenizer.batch_decode(rows, skip_special_tokens=True)
    assert backbone.decode_many(rows) == want and backbone._decoder_checked[1]
    pair = [rows[0][:3], rows[1][:3]]
    assert backbone.decode_many(torch.tensor(pair)) == [
        tokenizer.decode(r, skip_special_tokens=True) for r in pair
    ]
    backbone._decoder_checked = (tokenizer.backend_tokenizer, False)  # a backend that decoded otherwise
    assert backbone.decode_many(rows) == want

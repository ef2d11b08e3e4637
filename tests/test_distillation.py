"""Context distillation: text analysis on fixed inputs, teacher signals against a slow per-example reference,
the loss against a per-position reference, and training a student on tiny random models."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random

import pytest
import torch
from conftest import CORPUS, make_backbone

from continual_transformer.distillation import (
    ContextDistillConfig,
    DistillExample,
    build_distill_examples,
    collate_distill,
    distill_loss,
    document_distill_examples,
    documents_distill_examples,
    extract_entities,
    make_queries,
    parse_questions,
    sentence_prefixes,
    split_sentences,
    teacher_signals,
)
from continual_transformer.errors import ConfigError

DOCUMENT = CORPUS[1] + " " + CORPUS[0]
# questions are off in model tests: a random model writes none, and generating them only costs time
NO_QUESTIONS = {"question_queries": False, "teacher_max_new_tokens": 6, "top_k": 16, "teacher_batch_size": 4}


# -- text analysis -------------------------------------------------------------------------------------------


def test_split_sentences_keeps_abbreviations_and_initials():
    text = (
        "Dr. Mirela Voskuijlen was born in Brastow in 1873. J. R. Smith wrote it!  Was it true? "
        'Yes, said St. Clair. "Quite so." 1873 was a dry year. e.g. lower case does not start one.'
    )
    assert split_sentences(text) == [
        "Dr. Mirela Voskuijlen was born in Brastow in 1873.",
        "J. R. Smith wrote it!",
        "Was it true?",
        "Yes, said St. Clair.",
        '"Quite so."',
        "1873 was a dry year. e.g. lower case does not start one.",
    ]
    assert split_sentences("  one   line\nwithout end ") == ["one line without end"]
    assert split_sentences("   ") == []


def test_extract_entities_names_and_numbers_in_order():
    text = (
        "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873. The Orvalis river flows through "
        "Quenmark. For many years she worked for the Bank of Veloria, which has 1,250 staff. Voskuijlen "
        "left in 1873. Colleagues describe Mirela Voskuijlen as patient."
    )
    assert extract_entities(text) == [
        "Dr. Mirela Voskuijlen",
        "Brastow",
        "1873",
        "Orvalis",
        "Quenmark",
        "Bank of Veloria",
        "1,250",
        "Mirela Voskuijlen",
    ]
    # a single capitalised word opening a sentence is not a name; nor is a leading function word
    assert extract_entities("Colleagues agree. It rained. The river is wide.") == []


def test_parse_questions_strips_markers_and_deduplicates():
    output = (
        "Here are some questions:\n1. Where was Mirela born?\n- Who founded it? (extra text)\n"
        "Q: What river flows through Quenmark?\n**Question 2:** Where was Mirela born?\nWhy?\n"
        "No question here."
    )
    assert parse_questions(output) == [
        "Where was Mirela born?",
        "Who founded it?",
        "What river flows through Quenmark?",
    ]


def test_sentence_prefixes_cut_at_fractions():
    sentences = ["The Orvalis river flows through the city of Quenmark.", "It rained.", "It rained all day."]
    assert sentence_prefixes(sentences, (0.25, 0.5)) == [
        "The Orvalis",
        "The Orvalis river flows",
        "It rained",
    ]


def test_config_validates():
    with pytest.raises(ConfigError, match="top_k"):
        ContextDistillConfig(top_k=0)
    with pytest.raises(ConfigError, match="prefix_fractions"):
        ContextDistillConfig(prefix_fractions=(0.5, 1.0))
    with pytest.raises(ConfigError, match="temperature"):
        ContextDistillConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="entity_template"):
        ContextDistillConfig(entity_template="Tell me about it.")
    with pytest.raises(ConfigError, match="one query kind"):
        ContextDistillConfig(prefix_queries=False, question_queries=False, entity_queries=False)
    with pytest.raises(TypeError):
        ContextDistillConfig(16)  # keyword-only


def test_queries_by_kind_are_capped(tokenizer):
    backbone = make_backbone(tokenizer)
    config = ContextDistillConfig(question_queries=False, max_prefix_queries=3, max_entity_queries=2)
    queries = make_queries(backbone, DOCUMENT, config)
    assert [q.kind for q in queries] == ["prefix"] * 3 + ["entity"] * 2
    prefix, entity = queries[0], queries[3]
    assert prefix.student_prompt == prefix.text and prefix.teacher_prompt.endswith("\n\n" + prefix.text)
    assert DOCUMENT in prefix.teacher_prompt and DOCUMENT not in prefix.student_prompt
    assert entity.text == "Tell me about Dr. Mirela Voskuijlen."
    assert entity.student_prompt == backbone.format_prompt(entity.text, chat=True)
    assert DOCUMENT in entity.teacher_prompt and DOCUMENT not in entity.student_prompt


# -- teacher signals -----------------------------------------------------------------------------------------


def reference_signals(backbone, queries, config: ContextDistillConfig) -> list[DistillExample]:
    """Slow reference: one query at a time, no padding, greedy decoding by hand with full forward passes."""
    tokenizer, model = backbone.tokenizer, backbone.model
    eos = tokenizer.eos_token_id
    examples = []
    for query in queries:
        prompt = tokenizer(query.teacher_prompt, add_special_tokens=False)["input_ids"]
        cont: list[int] = []
        with torch.no_grad():
            while len(cont) < config.teacher_max_new_tokens and (not cont or cont[-1] != eos):
                logits = model(input_ids=torch.tensor([prompt + cont])).logits[0, -1]
                cont.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([prompt + cont])).logits[0]
        scored = logits[len(prompt) - 1 : len(prompt) - 1 + len(cont)].float() / config.temperature
        logprobs, ids = torch.log_softmax(scored, dim=-1).topk(config.top_k, dim=-1)
        student = tokenizer(query.student_prompt, add_special_tokens=False)["input_ids"]
        examples.append(
            DistillExample(
                input_ids=tuple(student + cont),
                positions=tuple(range(len(student) - 1, len(student) - 1 + len(cont))),
                teacher_ids=ids,
                teacher_logprobs=logprobs,
                kind=query.kind,
                query=query.text,
                continuation=tokenizer.decode(cont, skip_special_tokens=True).strip(),
            )
        )
    return examples


def assert_same_signals(got: list[DistillExample], want: list[DistillExample], *, atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.kind, a.query, a.input_ids, a.positions) == (b.kind, b.query, b.input_ids, b.positions)
        assert a.continuation == b.continuation
        assert a.teacher_logprobs.dtype == torch.float32 and a.teacher_ids.dtype == torch.long
        torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs.float(), atol=atol, rtol=0)
        assert torch.equal(a.teacher_ids, b.teacher_ids)


def test_batched_teacher_signals_equal_per_example_reference(tokenizer):
    backbone = make_backbone(tokenizer)
    config = ContextDistillConfig(**NO_QUESTIONS, temperature=2.0)
    queries = make_queries(backbone, DOCUMENT, config)
    assert len(queries) > config.teacher_batch_size  # several batches, prompts of different lengths
    assert len({len(q.teacher_prompt) for q in queries}) > 1
    got = teacher_signals(backbone, queries, config)
    assert_same_signals(got, reference_signals(backbone, queries, config))
    for example in got:
        assert example.teacher_ids.shape == (len(example.positions), config.top_k)
        assert bool((example.teacher_logprobs[:, :-1] >= example.teacher_logprobs[:, 1:]).all())


class BiasHook:
    """Stands in for a learned change: a big bias on the last layer's output, removed by :meth:`disabled`."""

    def __init__(self, backbone) -> None:
        generator = torch.Generator().manual_seed(1)
        self.bias = 5.0 * torch.randn(backbone.model.config.hidden_size, generator=generator)
        self.active = True
        self.handle = backbone.layers[-1].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.active:
            return output
        if isinstance(output, tuple):
            return (output[0] + self.bias, *output[1:])
        return output + self.bias

    @contextlib.contextmanager
    def disabled(self):
        self.active = False
        try:
            yield
        finally:
            self.active = True


def test_teacher_runs_with_every_learned_change_off(tokenizer):
    config = ContextDistillConfig(**NO_QUESTIONS)
    base = build_distill_examples(make_backbone(tokenizer), DOCUMENT, config)

    changed = make_backbone(tokenizer)
    hook = BiasHook(changed)
    with_change = build_distill_examples(changed, DOCUMENT, config)
    teacher_off = build_distill_examples(changed, DOCUMENT, config, teacher_context=hook.disabled)
    assert hook.active  # the context was left
    assert_same_signals(teacher_off, base)
    # the change does alter the model, so equality above means the teacher ran without it
    assert any(
        a.input_ids != b.input_ids or not torch.allclose(a.teacher_logprobs, b.teacher_logprobs, atol=1e-3)
        for a, b in zip(with_change, base)
    )


# -- the loss ------------------------------------------------------------------------------------------------


def reference_loss(logits: torch.Tensor, examples: list[DistillExample]) -> torch.Tensor:
    """KL over the teacher's top-k plus one "other" outcome, in float64, one position at a time."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row, example in enumerate(examples):
        for i, position in enumerate(example.positions):
            student = torch.log_softmax(logits[row, position].double(), dim=-1)
            ids, teacher = example.teacher_ids[i], example.teacher_logprobs[i].double()
            kl = (teacher.exp() * (teacher - student[ids])).sum()
            other_t = 1 - teacher.exp().sum()
            rest = torch.ones_like(student, dtype=torch.bool)
            rest[ids] = False
            other_s = student[rest].exp().sum()
            if other_t > 0:
                kl = kl + other_t * (other_t.log() - other_s.log())
            total, count = total + kl, count + 1
    return total / count


def synthetic_examples(vocab: int, k: int, seed: int) -> tuple[list[DistillExample], list[torch.Tensor]]:
    """Examples of different lengths with teacher top-k from random teacher logits (returned too)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    examples, teacher_logits = [], []
    for length, scored in ((9, 4), (6, 2), (12, 7)):
        logits = 3 * torch.randn(scored, vocab, generator=generator)
        logprobs, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        examples.append(
            DistillExample(
                input_ids=tuple(rng.randrange(vocab) for _ in range(length)),
                positions=tuple(range(length - scored - 1, length - 1)),
                teacher_ids=ids,
                teacher_logprobs=logprobs,
                kind="entity",
                query="q",
                continuation="c",
            )
        )
        teacher_logits.append(logits)
    return examples, teacher_logits


@pytest.mark.parametrize("k", [5, 40])
def test_loss_equals_per_position_reference(k):
    vocab = 40
    examples, _ = synthetic_examples(vocab, k, seed=k)
    batch = collate_distill(examples, pad_id=0, device=torch.device("cpu"))
    assert batch["teacher_ids"].shape == (3, 7, k) and int(batch["position_mask"].sum()) == 13
    logits = torch.randn(3, batch["input_ids"].shape[1], vocab, generator=torch.Generator().manual_seed(0))
    logits[0, -1] = math.nan  # a padded position: must not reach the loss
    logits.requires_grad_(True)
    loss = distill_loss(logits, batch)
    torch.testing.assert_close(loss.double(), reference_loss(logits.detach(), examples), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_per_row_loss_is_each_rows_own_mean():
    vocab = 40
    examples, _ = synthetic_examples(vocab, 8, seed=5)
    batch = collate_distill(examples, pad_id=0, device=torch.device("cpu"))
    logits = torch.randn(3, batch["input_ids"].shape[1], vocab, generator=torch.Generator().manual_seed(1))
    rows = distill_loss(logits, batch, per_row=True)
    assert rows.shape == (3,)
    for row, example in enumerate(examples):
        expected = reference_loss(logits[row : row + 1], [example])
        torch.testing.assert_close(rows[row].double(), expected, atol=1e-5, rtol=1e-5)


def test_loss_is_zero_when_the_student_is_the_teacher():
    vocab = 40
    examples, teacher_logits = synthetic_examples(vocab, 8, seed=3)
    batch = collate_distill(examples, pad_id=0, device=torch.device("cpu"))
    logits = torch.zeros(3, batch["input_ids"].shape[1], vocab)
    for row, (example, teacher) in enumerate(zip(examples, teacher_logits)):
        logits[row, list(example.positions)] = teacher
    assert float(distill_loss(logits, batch)) == pytest.approx(0.0, abs=1e-5)
    assert float(distill_loss(logits.flip(-1), batch)) > 0.1


# -- training a student -------------------------------------------------------------------------------------


def train_student(backbone, examples, params, *, steps: int, lr: float, stop: float = 0.0) -> list[float]:
    """A minimal loop: full batch, Adam, the distillation loss alone."""
    optimizer = torch.optim.Adam(params, lr=lr)
    batch = collate_distill(examples, backbone.tokenizer.pad_token_id, backbone.device)
    losses = []
    for param in params:
        param.requires_grad_(True)
    for _ in range(steps):
        logits = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = distill_loss(logits, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if losses[-1] < stop:
            break
    for param in params:
        param.requires_grad_(False)
    return losses


def test_training_the_last_mlp_lowers_the_kl_to_the_teacher(tokenizer):
    backbone = make_backbone(tokenizer)
    examples = build_distill_examples(backbone, DOCUMENT, ContextDistillConfig(**NO_QUESTIONS))
    assert {e.kind for e in examples} == {"prefix", "entity"}
    params = list(backbone.layers[-1].mlp.parameters())
    frozen = {n: p.clone() for n, p in backbone.model.named_parameters() if ".mlp." not in n}
    losses = train_student(backbone, examples, params, steps=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in backbone.model.named_parameters() if n in frozen)


def test_trained_student_answers_like_the_teacher_without_the_document(tokenizer):
    backbone = make_backbone(tokenizer)
    # a low temperature makes each target nearly one-hot at the teacher's greedy token
    config = ContextDistillConfig(
        prefix_queries=False, question_queries=False, max_entity_queries=1, teacher_max_new_tokens=6,
        temperature=0.1,
    )  # fmt: skip
    (example,) = build_distill_examples(backbone, DOCUMENT, config)
    prompt_length = example.positions[0] + 1
    prompt = torch.tensor([example.input_ids[:prompt_length]])
    continuation = list(example.input_ids[prompt_length:])

    def greedy() -> list[int]:
        out = backbone.model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(continuation),
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        return out[0, prompt_length:].tolist()

    assert greedy() != continuation  # without the document, the untrained model answers otherwise
    losses = train_student(
        backbone, [example], list(backbone.model.parameters()), steps=300, lr=3e-3, stop=0.01
    )
    assert losses[-1] < 0.01
    assert greedy() == continuation


@pytest.mark.parametrize("questions", [False, True])
def test_documents_distilled_together_give_each_its_examples_as_alone(tokenizer, questions):
    """Documents that arrive together: their questions are written and their queries answered by the teacher
    in shared batches (5 rows here, spanning the documents), each document's examples as when alone."""
    backbone = make_backbone(tokenizer)
    config = ContextDistillConfig(
        **{
            **NO_QUESTIONS,
            "question_queries": questions,
            "question_max_new_tokens": 12,
            "teacher_batch_size": 5,
        }
    )
    texts = [DOCUMENT, CORPUS[2], CORPUS[3]]
    together = documents_distill_examples(backbone, texts, config)
    assert len(together) == len(texts) and all(together)
    ends = [sum(len(t) for t in together[: i + 1]) for i in range(len(texts) - 1)]
    assert any(end % config.teacher_batch_size for end in ends), "a batch spans two documents"
    for got, text in zip(together, texts):
        assert_same_signals(got, document_distill_examples(backbone, text, config))
    with pytest.raises(ValueError, match="empty"):
        documents_distill_examples(backbone, [DOCUMENT, "  "], config)


def test_teacher_decodes_greedily_on_the_backbones_decoding_path(tokenizer, monkeypatch):
    """The teacher's continuations come from the backbone's configured decoding path (the lean loop on the
    static backend here) and are greedy even when answers are sampled: the eager path's signals."""
    config = ContextDistillConfig(**NO_QUESTIONS)
    eager = make_backbone(tokenizer)
    eager.generation = dataclasses.replace(eager.generation, backend="eager")
    static = make_backbone(tokenizer)
    static.generation = dataclasses.replace(static.generation, backend="static", do_sample=True)
    lean = []
    original = static._lean_generate
    monkeypatch.setattr(static, "_lean_generate", lambda *a, **k: lean.append(1) or original(*a, **k))
    assert_same_signals(
        build_distill_examples(static, DOCUMENT, config), build_distill_examples(eager, DOCUMENT, config)
    )
    assert lean, "decoded by the lean loop"
    with pytest.raises(ValueError, match="at least one token"):
        static.generate_ids([[1, 2], []], 4)

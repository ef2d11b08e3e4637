"""``memory_bank`` with the ``context_distill`` objective on the tiny test models."""

from __future__ import annotations

import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.distillation import ContextDistillConfig, document_distill_examples

DOC = "Veloria is a small republic. Its capital is Tarnhelm. Tarnhelm was founded in 1873 by Ada Quell."
UNRELATED = "A quick brown fox jumps over the lazy dog."
DISTILL = {"question_queries": False, "teacher_max_new_tokens": 6, "top_k": 8, "max_prefix_queries": 6}


def build(tokenizer, **settings) -> ContinualTransformer:
    section = {
        "objective": "context_distill",
        "distill": DISTILL,
        "distill_steps": 15,
        "distill_learning_rate": 0.2,
        # tiny random models: backbone keys separate little, so every query may retrieve every memory
        "min_similarity": -1.0,
        "min_gain": -1.0,
        "top_k": 3,
        **settings,
    }
    config = fast_config(strategies={"memory_bank": section})
    return ContinualTransformer(make_backbone(tokenizer), strategy="memory_bank", config=config)


def test_student_kl_to_the_teacher_falls_and_memories_are_kept(tokenizer):
    ct = build(tokenizer)
    report = ct.learn_document(DOC)
    extra = report.extra
    assert extra["distill_queries"] > 0 and extra["distill_queries_fused"] == extra["distill_queries"]
    assert extra["distill_kl_after"] < 0.7 * extra["distill_kl_before"], extra
    assert extra["kept"] == ct.strategy.store.size > 0
    # the bank, as it answers, gives the lowered KL on the training queries
    strategy = ct.strategy
    examples = document_distill_examples(
        ct.backbone, DOC, ContextDistillConfig(**DISTILL), teacher_context=strategy.disabled
    )
    keys = strategy.keys(strategy.examples(DOC))
    trained = strategy.distill_values(keys, examples)  # stored memories are fused as "before"
    assert float(trained["kl_before"].mean()) < 0.7 * extra["distill_kl_before"]


def test_keep_rule_is_the_gain_on_the_distillation_loss(tokenizer):
    ct = build(tokenizer, min_gain=0.999)
    base = ct.strategy.forward_logits([DOC])
    report = ct.learn_document(DOC)
    assert report.extra["kept"] == 0 and report.extra["rejected"] == report.extra["examples"]
    assert torch.equal(ct.strategy.forward_logits([DOC]), base)


def test_teacher_runs_with_the_bank_off(tokenizer):
    ct = build(tokenizer)
    ct.learn_document(DOC)
    assert ct.strategy.store.size > 0
    nxt = "The Zentrik river flows through Tarnhelm. Its source is the Morrow glacier."
    config = ContextDistillConfig(**DISTILL)
    seen: list[bool] = []
    original = ct.strategy.deltas

    def spy(queries, **kwargs):
        seen.append(ct.strategy._disabled)
        return original(queries, **kwargs)

    ct.strategy.deltas = spy
    learned = document_distill_examples(ct.backbone, nxt, config, teacher_context=ct.strategy.disabled)
    fresh = document_distill_examples(make_backbone(tokenizer), nxt, config)
    assert [e.input_ids for e in learned] == [e.input_ids for e in fresh]
    for a, b in zip(learned, fresh):
        torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs, rtol=1e-5, atol=1e-5)
    assert not any(seen)  # the teacher never asked the bank for a memory
    # the student of the same queries does retrieve (min_similarity -1: every query)
    assert ct.strategy.deltas([e.query for e in learned]) is not None


def test_unrelated_prompts_stay_bit_identical(tokenizer):
    ct = build(tokenizer, min_similarity=None)  # the default gate of backbone keys
    base_logits = ct.strategy.forward_logits([UNRELATED])
    base_answer = ct.generate([UNRELATED])
    ct.learn_document(DOC)
    assert ct.strategy.store.size > 0
    assert ct.strategy.deltas([UNRELATED]) is None
    assert torch.equal(ct.strategy.forward_logits([UNRELATED]), base_logits)
    assert ct.generate([UNRELATED]) == base_answer


def test_save_and_load_give_identical_outputs(tokenizer, tmp_path):
    ct = build(tokenizer)
    ct.learn_document(DOC)
    prompts = ["Its capital is", "Tell me about Tarnhelm."]
    logits = ct.strategy.forward_logits(prompts)
    answers = ct.generate(prompts)
    ct.save(tmp_path / "ckpt")
    loaded = build(tokenizer)
    loaded.load(tmp_path / "ckpt")
    assert torch.equal(loaded.strategy.store.values, ct.strategy.store.values)
    assert torch.equal(loaded.strategy.forward_logits(prompts), logits)
    assert loaded.generate(prompts) == answers

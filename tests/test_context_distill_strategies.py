"""The ``context_distill`` objective on every weight-changing strategy (tiny models).

The student's KL to the teacher falls while a document is learned, and the teacher of the next document is the
base model: its signals equal those of a fresh, untouched backbone although the strategy has learned.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.distillation import ContextDistillConfig, document_distill_examples

DOC = "Veloria is a small republic. Its capital is Tarnhelm. Tarnhelm was founded in 1873 by Ada Quell."
NEXT = "The Zentrik river flows through Tarnhelm. Its source is the Morrow glacier."
DISTILL = {"question_queries": False, "teacher_max_new_tokens": 6, "top_k": 8, "max_prefix_queries": 6}
STRATEGIES = {
    "finetune": {"optim": {"learning_rate": 1e-2, "epochs": 15, "stop_loss": 0.0}},
    "lora": {"optim": {"learning_rate": 1e-2, "epochs": 15, "stop_loss": 0.0}},
    "ttt": {"optim": {"learning_rate": 1e-2, "epochs": 15, "stop_loss": 0.0}, "anchor_weight": 0.0},
    "memory_layer": {"optim": {"learning_rate": 300.0, "epochs": 15, "stop_loss": 0.0}},
}


def build(tokenizer, name: str) -> ContinualTransformer:
    section = {**STRATEGIES[name], "objective": "context_distill", "distill": DISTILL}
    return ContinualTransformer(
        make_backbone(tokenizer), strategy=name, config=fast_config(strategies={name: section})
    )


def epoch_means(losses: tuple[float, ...], epochs: int) -> list[float]:
    per = len(losses) // epochs
    return [sum(losses[i * per : (i + 1) * per]) / per for i in range(epochs)]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_student_kl_to_the_teacher_falls(tokenizer, name):
    ct = build(tokenizer, name)
    report = ct.learn_document(DOC)
    means = epoch_means(report.step_losses, 15)
    assert means[-1] < 0.7 * means[0], means
    assert report.tokens > 0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_teacher_of_the_next_document_is_the_base_model(tokenizer, name):
    ct = build(tokenizer, name)
    ct.learn_document(DOC)
    config = ContextDistillConfig(**{**DISTILL, "prefix_fractions": (0.25, 0.5)})
    learned = document_distill_examples(ct.backbone, NEXT, config, teacher_context=ct.strategy.disabled)
    fresh = document_distill_examples(make_backbone(tokenizer), NEXT, config)
    assert [e.input_ids for e in learned] == [e.input_ids for e in fresh]
    for a, b in zip(learned, fresh):
        torch.testing.assert_close(a.teacher_logprobs, b.teacher_logprobs, rtol=1e-5, atol=1e-5)
    # outside the teacher's context the learned change is back
    with torch.no_grad():
        ids = torch.tensor([learned[0].input_ids])
        base = make_backbone(tokenizer).model(input_ids=ids).logits
        assert not torch.allclose(ct.backbone.model(input_ids=ids).logits, base)

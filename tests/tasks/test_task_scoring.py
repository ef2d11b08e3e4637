"""Generative scoring against a slow per-label reference; adapters: fresh = identity, mixed = per-row."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer.tasks import TaskLearner


def reference_scores(backbone, prompt: tuple[int, ...], answers) -> torch.Tensor:
    """One full forward per (example, label): mean log-probability of the answer tokens after the prompt."""
    scores = []
    for answer in answers:
        ids = torch.tensor([list(prompt) + list(answer)])
        logp = backbone.model(input_ids=ids).logits[0].float().log_softmax(-1)
        start = len(prompt) - 1
        scores.append(sum(float(logp[start + j, tok]) for j, tok in enumerate(answer)) / len(answer))
    return torch.tensor(scores)


def randomize_slots(learner, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    pool = learner.method.pool
    for buffer in (pool.slot_down, pool.slot_down_bias, pool.slot_up, pool.slot_up_bias):
        buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scores_match_per_label_loop_and_pick_the_most_likely_label(tokenizer, arch):
    backbone = make_backbone(tokenizer, arch=arch)
    learner = TaskLearner(backbone, tiny_config())
    three_labels = [("capital Veloria", "capital_x"), ("river Orvalis", "river_y"), ("fox dog", "fox_z")]
    learner.learn_task("a", synthetic_task(0), epochs=0)
    learner.learn_task("b", three_labels, epochs=0)
    learner.method.slot_of_task[1] = 1
    randomize_slots(learner)  # non-identity adapters, different per task: the adapter path is exercised too
    texts = [
        "capital Veloria Tarnhelm",
        "fox lazy dog",
        "river",
        "questions answers documents memory learning",
    ]
    task_ids = ["a", "b", "b", "a"]  # one batch mixes tasks, slots and label sets

    with torch.no_grad():
        for text, task in zip(texts, task_ids):
            fast = learner.scores([text], task)[0]
            index = learner.tasks.index(task)
            prompt = learner.prompts.task_prompt(learner.labels(task))
            with learner.method.activate(torch.tensor([index])):
                slow = reference_scores(
                    backbone, prompt.prompt(learner.prompts.encode_texts([text])[0]), prompt.answers
                )
            torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
            assert learner.predict(text, task) == learner.labels(task)[int(slow.argmax())]
        mixed = learner.predict_batch(texts, task_ids)
    assert mixed == [learner.predict(t, k) for t, k in zip(texts, task_ids)]


def test_fresh_adapter_is_the_identity(tokenizer):
    backbone = make_backbone(tokenizer)
    learner = TaskLearner(backbone, tiny_config())
    pool = learner.method.pool
    pool.fresh_scratch(seed=3)
    assert pool.down.abs().sum() > 0  # the down-projection is random, only the up-projection is zero
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    with torch.no_grad():
        base = backbone.model(input_ids=ids).logits
        with pool.use("scratch"):
            fresh = backbone.model(input_ids=ids).logits
        pool.store(0)
        with pool.use(torch.tensor([0, -1])):
            stored = backbone.model(input_ids=ids).logits
    assert torch.equal(fresh, base)
    assert torch.equal(stored, base)


def test_mixed_slot_batch_equals_each_row_alone(tokenizer):
    backbone = make_backbone(tokenizer)
    learner = TaskLearner(backbone, tiny_config())
    randomize_slots(learner, seed=1)
    pool = learner.method.pool
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    slots = torch.tensor([1, -1, 0])
    with torch.no_grad():
        with pool.use(slots):
            mixed = backbone.model(input_ids=ids).logits
        for row, slot in enumerate(slots.tolist()):
            with pool.use(slot if slot >= 0 else None):
                alone = backbone.model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
        base = backbone.model(input_ids=ids[1:2]).logits
    assert not torch.allclose(
        mixed[0:1], backbone.model(input_ids=ids[0:1]).logits
    )  # the adapter does something
    torch.testing.assert_close(mixed[1:2], base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_forward_matches_plain_forward_in_values_and_gradients(tokenizer, arch):
    from continual_transformer.tasks.prompts import TrainRow, answer_batch, answer_logits
    from continual_transformer.tasks.training import answer_nll

    backbone = make_backbone(tokenizer, arch=arch)
    learner = TaskLearner(backbone, tiny_config())
    learner.learn_task("a", synthetic_task(0), epochs=1)
    pool = learner.method.pool
    pool.fresh_scratch(seed=5)
    with torch.no_grad():
        pool.up.normal_(std=0.1)  # a non-identity trainable adapter
    prompt = learner.prompts.task_prompt(learner.labels("a"))
    texts = learner.prompts.encode_texts(["capital Veloria", "river Orvalis Quenmark fox", "dog"])
    rows = [TrainRow(prompt.prompt(t), prompt.answers[i % 2], 0) for i, t in enumerate(texts)]
    results = []
    for share in (True, False):
        batch = answer_batch(rows, learner.prompts.pad_id, backbone.device, share_prefix=share)
        assert (batch.shared > 0) == share
        pool.up.requires_grad_(True)
        with pool.use("scratch"):
            logits = answer_logits(backbone.model, batch)
        loss = answer_nll(logits, batch)
        (grad,) = torch.autograd.grad(loss, [pool.up])
        pool.up.requires_grad_(False)
        results.append((logits.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-3)


def test_teacher_logits_per_teacher_group_match_one_pass_with_per_row_slots(tokenizer):
    from continual_transformer.tasks.prompts import TrainRow, answer_batch, answer_logits

    backbone = make_backbone(tokenizer)
    learner = TaskLearner(backbone, tiny_config(share_prefix=True))
    learner.learn_task("a", synthetic_task(0), epochs=1)
    randomize_slots(learner, seed=2)
    prompt = learner.prompts.task_prompt(learner.labels("a"))
    texts = learner.prompts.encode_texts(
        ["capital Veloria", "river Orvalis Quenmark fox", "dog", "lynx silver"]
    )
    rows = [TrainRow(prompt.prompt(t), prompt.answers[i % 2], 0, teacher=i % 2) for i, t in enumerate(texts)]
    pad = learner.prompts.pad_id
    grouped = learner.method._teacher_logits(
        answer_batch(rows, pad, backbone.device, share_prefix=True), rows
    )
    with torch.no_grad(), learner.method.pool.use(torch.tensor([r.teacher for r in rows])):
        plain_batch = answer_batch(rows, pad, backbone.device, share_prefix=False)
        plain = answer_logits(backbone.model, plain_batch)
    mask = plain_batch.target_mask
    torch.testing.assert_close(grouped[mask], plain[mask], atol=1e-4, rtol=1e-4)


def test_non_finite_padding_does_not_poison_the_loss_and_a_nan_step_is_skipped(tokenizer):
    from conftest import make_backbone

    from continual_transformer.tasks.prompts import TrainRow, answer_batch
    from continual_transformer.tasks.training import answer_nll, answer_nll_per_row, fit

    rows = [TrainRow(prompt=(5, 6, 7), answer=(8, 9), task=0), TrainRow(prompt=(5, 6), answer=(9,), task=0)]
    batch = answer_batch(rows, 0, torch.device("cpu"))
    logits = torch.zeros(2, 2, 32)
    logits[1, 0] = float("nan")  # the padded answer position of the shorter row
    assert torch.isfinite(answer_nll(logits, batch))
    assert torch.isfinite(answer_nll_per_row(logits, batch)).all()

    backbone = make_backbone(tokenizer)
    weight = torch.nn.Parameter(torch.ones(3))
    calls = []

    def step_loss(batch, chosen):
        calls.append(1)
        return (weight * (float("nan") if len(calls) == 1 else 1.0)).sum()

    losses = fit(backbone, [weight], rows, step_loss, epochs=2, batch_size=2, learning_rate=0.1)
    assert len(calls) == 2 and len(losses) == 1  # the nan step was skipped, the next one trained
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), torch.ones(3))

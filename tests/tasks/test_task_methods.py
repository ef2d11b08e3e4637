"""Invariants every registered task method keeps (parametrised over the registry, so new methods inherit them)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer.tasks import TaskLearner, method_names

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@pytest.mark.parametrize("method", method_names())
def test_method_learns_keeps_backbone_frozen_and_closes_cleanly(tokenizer, method, tmp_path):
    backbone = make_backbone(tokenizer)
    weights = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    with torch.no_grad():
        base_logits = backbone.model(input_ids=IDS).logits
    learner = TaskLearner(backbone, tiny_config(method=method))
    sizes = []
    for index in range(3):
        report = learner.learn_task(f"t{index}", synthetic_task(index), epochs=1)
        assert report.final_loss is not None and report.final_loss == report.final_loss  # trained, not NaN
        sizes.append((learner.num_parameters(), learner.state_bytes()))
    if learner.method.grows_with_tasks:
        assert sizes[-1][1] > sizes[0][1]  # the contrast baselines do grow
    else:
        assert len(set(sizes)) == 1
    texts = [text for text, _ in synthetic_task(1, per_label=2)]
    predictions = learner.predict_batch(texts, "t1")
    learner.save(tmp_path / "state")
    learner.close()

    for name, param in backbone.model.named_parameters():  # the base weights never changed...
        assert torch.equal(param, weights[name]), name
    with torch.no_grad():  # ...and nothing is left attached: the backbone is the base model again
        assert torch.equal(backbone.model(input_ids=IDS).logits, base_logits)

    restored = TaskLearner(backbone, tiny_config())
    restored.load(tmp_path / "state")
    assert restored.method.name == method
    assert restored.predict_batch(texts, "t1") == predictions
    restored.close()


def test_lora_per_task_adds_one_adapter_per_task(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method="lora_per_task"))
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    one = learner.num_parameters()
    learner.learn_task("t1", synthetic_task(1), epochs=1)
    assert learner.num_parameters() == 2 * one > 0
    learner.close()


def test_fit_skips_steps_whose_gradient_is_not_finite(tokenizer):
    """A finite loss can still carry a nan gradient (a masked branch that overflowed): the weights stay finite."""
    from continual_transformer.tasks.prompts import TrainRow
    from continual_transformer.tasks.training import fit

    backbone = make_backbone(tokenizer)
    weight = torch.nn.Parameter(torch.ones(3))
    rows = [TrainRow(prompt=(5, 6, 7), answer=(8,), task=0) for _ in range(4)]
    calls = []

    def step_loss(batch, chosen):
        calls.append(len(chosen))
        poisoned = len(calls) % 2 == 1  # every other step: the unselected branch's gradient is nan
        masked = torch.where(torch.tensor(False), torch.sqrt(weight - 10).sum(), torch.zeros(()))
        return (weight - 2).pow(2).sum() + (masked if poisoned else 0.0)

    losses = fit(backbone, [weight], rows, step_loss, epochs=2, batch_size=2, learning_rate=0.1)
    assert len(calls) == 4 and len(losses) == 2  # two steps skipped, two taken
    assert torch.isfinite(weight).all()
    assert (weight > 1).all()  # the steps taken moved the weights toward 2


def test_lora_per_task_switches_adapters_and_leaves_the_base_model_outside_them(tokenizer):
    backbone = make_backbone(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base = backbone.model(ids).logits
    learner = TaskLearner(backbone, tiny_config(method="lora_per_task"))
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    learner.learn_task("t1", synthetic_task(1), epochs=1)
    method, outputs = learner.method, []
    with torch.no_grad():
        for task in (0, 1):
            with method.activate(torch.tensor([task])):
                layers = method._lora_layers()
                assert layers and all(layer.active_adapters == [f"task{task}"] for layer in layers)
                assert not any(layer.disable_adapters for layer in layers)
                outputs.append(backbone.model(ids).logits)
        assert all(layer.disable_adapters for layer in method._lora_layers())
        assert torch.equal(backbone.model(ids).logits, base)  # outside activate: exactly the base model
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], base)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    learner.close()

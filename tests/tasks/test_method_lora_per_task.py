"""lora_per_task: one peft LoRA per task, switched by task id, and taken off the backbone again."""

from __future__ import annotations

import torch
from conftest import make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer.tasks import TaskLearner

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def test_lora_per_task_adds_one_adapter_per_task(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method="lora_per_task"))
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    one = learner.num_parameters()
    learner.learn_task("t1", synthetic_task(1), epochs=1)
    assert learner.num_parameters() == 2 * one > 0
    learner.close()


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

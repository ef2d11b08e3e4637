"""Invariants every registered task method keeps (parametrised over the registry, so new methods inherit
them)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer import checkpoint
from continual_transformer.errors import CheckpointError
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


def structure(backbone) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in backbone.model.named_modules()]


@pytest.mark.parametrize("first_task", [False, True], ids=["later_task", "first_task"])
@pytest.mark.parametrize("method", method_names())
def test_a_failed_task_leaves_predictions_and_state_exactly_as_before(
    tokenizer, method, first_task, monkeypatch
):
    """learn_task fails after the method has trained (the router update raises): every part rolls back."""
    backbone = make_backbone(tokenizer)
    learner = TaskLearner(backbone, tiny_config(method=method))
    for index in range(0 if first_task else 2):
        learner.learn_task(f"t{index}", synthetic_task(index), epochs=1)
    texts = [text for text, _ in synthetic_task(1, per_label=2)]
    predictions = learner.predict_batch(texts, "t1") if not first_task else None
    state = {name: tensor.clone() for name, tensor in learner.state_tensors().items()}
    before = (learner.tasks, list(learner.history), learner.num_parameters(), structure(backbone))
    with torch.no_grad():
        base_logits = backbone.model(input_ids=IDS).logits

    def fail(*args, **kwargs):
        raise RuntimeError("router update failed")

    monkeypatch.setattr(learner.router, "update", fail)
    new = "t0" if not first_task else "t9"  # relearning a task, or a first task on an empty learner
    with pytest.raises(RuntimeError, match="router update failed"):
        learner.learn_task(new, synthetic_task(3), epochs=1)
    monkeypatch.undo()

    assert (learner.tasks, learner.history, learner.num_parameters(), structure(backbone)) == before
    after = learner.state_tensors()
    assert after.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(after[name], tensor), name
    if predictions is not None:
        assert learner.predict_batch(texts, "t1") == predictions
    with torch.no_grad():
        assert torch.equal(backbone.model(input_ids=IDS).logits, base_logits)  # nothing left attached
    learner.learn_task("t5", synthetic_task(5), epochs=1)  # and the learner still learns
    learner.close()
    with torch.no_grad():
        assert torch.equal(backbone.model(input_ids=IDS).logits, base_logits)


@pytest.mark.parametrize("method", method_names())
def test_a_refused_checkpoint_keeps_the_learner_and_its_adapters(tokenizer, method, tmp_path):
    """load() of a state that does not fit (here: another max_tasks) changes nothing, LoRA layers included."""
    backbone = make_backbone(tokenizer)
    other = TaskLearner(backbone, tiny_config(method=method))
    other.learn_task("u0", synthetic_task(2), epochs=1)
    other.save(tmp_path / "state")
    other.close()
    learner = TaskLearner(backbone, tiny_config(method=method))
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    learner.learn_task("t1", synthetic_task(1), epochs=1)
    texts = [text for text, _ in synthetic_task(1, per_label=2)]
    predictions = learner.predict_batch(texts, "t1")
    tensors = dict(checkpoint.read_tensors(tmp_path / "state"))
    tensors["table.ids"] = tensors["table.ids"][:1]  # a table of the wrong size
    manifest = checkpoint.read_manifest(tmp_path / "state")
    before = (learner.config, learner.tasks, learner.num_parameters(), structure(backbone))
    with pytest.raises(CheckpointError, match="does not fit"):
        learner.restore(tensors, manifest)
    assert (learner.config, learner.tasks, learner.num_parameters(), structure(backbone)) == before
    assert learner.predict_batch(texts, "t1") == predictions
    learner.close()


@pytest.mark.parametrize("method", method_names())
def test_learning_does_not_touch_the_global_random_generator(tokenizer, method):
    """Every draw is seeded explicitly (or under a restored fork): the caller's random stream is not moved."""
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method=method))
    torch.manual_seed(321)
    before = torch.random.get_rng_state()
    for index in range(3):
        learner.learn_task(f"t{index}", synthetic_task(index), epochs=1)
    learner.predict_batch(["capital river"])
    assert torch.equal(torch.random.get_rng_state(), before)
    learner.close()


@pytest.mark.parametrize("method", ["sequential", "joint", "ewc", "lwf", "replay"])
def test_the_shared_adapter_trains_its_whole_bottleneck_from_the_first_task(tokenizer, method):
    """Started from an all-zero adapter, only the output bias would receive gradient (a constant offset per
    layer): the first task starts the shared adapter fresh, so its projections train."""
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method=method))
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    pool = learner.method.pool
    assert pool.slot_up[0].abs().sum() > 0 and pool.slot_down[0].abs().sum() > 0
    learner.close()


def test_joint_adapter_is_as_wide_as_the_pool_unless_told(tokenizer):
    config = tiny_config(method="joint")
    learner = TaskLearner(make_backbone(tokenizer), config)
    assert learner.method.pool.bottleneck == config.pool_size * config.adapter_dim
    learner.close()
    import dataclasses

    narrow = TaskLearner(make_backbone(tokenizer), dataclasses.replace(config, joint_adapter_dim=3))
    assert narrow.method.pool.bottleneck == 3
    narrow.close()

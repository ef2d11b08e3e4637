"""The original API on the facade: ContinualTransformer(...).learn_task / predict / evaluate."""

from __future__ import annotations

from conftest import fast_config, make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer import ContinualTransformer


def test_facade_learns_tasks_with_constant_size_and_predicts_their_labels(tokenizer):
    ct = ContinualTransformer(
        make_backbone(tokenizer), config=fast_config(), task_config=tiny_config(), max_tasks=6
    )
    assert ct.tasks.config.max_tasks == 6
    first = ct.learn_task("t0", synthetic_task(0), epochs=2)
    for index in range(1, 4):
        ct.learn_task(f"t{index}", synthetic_task(index), epochs=2)
    assert ct.tasks.num_parameters() == first.parameters
    assert ct.tasks.state_bytes() == first.state_bytes
    labels = {label for _, label in synthetic_task(2)}
    assert ct.predict(synthetic_task(2)[0][0], task_id="t2") in labels
    assert 0.0 <= ct.evaluate("t2", synthetic_task(2)) <= 1.0


def test_a_task_report_times_its_phases(tokenizer):
    """``learn_task`` reports where its time went: reading, the rollback snapshot, tokenising, the method's
    training, the router's update and the sizes, in order, together no more than the whole call."""
    ct = ContinualTransformer(make_backbone(tokenizer), config=fast_config(), task_config=tiny_config())
    report = ct.learn_task("t0", synthetic_task(0), epochs=1)
    phases = report.extra["phase_seconds"]
    assert list(phases) == ["read", "snapshot", "encode", "method", "router", "sizes"]
    assert all(value >= 0 for value in phases.values())
    assert phases["method"] >= report.train_seconds - 1e-3
    assert sum(phases.values()) <= report.seconds + 1e-3

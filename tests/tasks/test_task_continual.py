"""Behaviours of a long task stream: merges that keep earlier tasks, online updates, unknown-task detection,
100+ tasks at a fixed size, and the balanced replay buffer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_backbone
from task_helpers import WORD_GROUPS, single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer.tasks import UNKNOWN_TASK, TaskError, TaskLearner
from continual_transformer.tasks.buffer import ReplayBuffer
from continual_transformer.tasks.prompts import Encoded

ORIGINAL = {"merge_data": "new", "buffer_policy": "reservoir"}
DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def gold_log_likelihood(learner: TaskLearner, task_id: str, data) -> float:
    """Mean score of the gold label (length-normalised log-likelihood) over ``data``."""
    labels = learner.labels(task_id)
    scores = learner.scores([text for text, _ in data], task_id)
    return float(sum(s[labels.index(label)] for s, (_, label) in zip(scores, data)) / len(data))


def test_balanced_buffer_keeps_an_equal_share_per_task_over_its_labels():
    buffer = ReplayBuffer(12, 4, balanced=True)
    buffer.add([Encoded((1, 2), 0, n % 2) for n in range(20)])
    assert len(buffer) == 12  # the first task may use the whole buffer
    buffer.add([Encoded((3,), 1, n % 3) for n in range(30)])
    buffer.add([Encoded((4,), 2, 0), Encoded((4,), 2, 1)])
    tasks = buffer.tasks[: len(buffer)].tolist()
    assert tasks.count(0) == tasks.count(1) == 4 and tasks.count(2) == 2  # shares of 12 // 3
    kept = buffer.examples([1])
    assert {e.label for e in kept} == {0, 1, 2}  # a task's rows stay spread over its labels
    reservoir = ReplayBuffer(12, 4)
    reservoir.add([Encoded((1,), 0, 0)] * 20)
    reservoir.add([Encoded((1,), 1, 0)] * 200)
    assert reservoir.tasks.tolist().count(0) < 4  # what the balanced buffer fixes: early tasks thinned out


def test_balanced_merge_keeps_the_earlier_task_better_than_the_original(tokenizer):
    """Two tasks in a one-slot pool: a small task, then a large one merged into its slot. Distilling with
    the old task weighted like the new one keeps more of the small task than the original merge."""
    small, large = synthetic_task(0, per_label=2), synthetic_task(1, per_label=24)
    kept = {}
    for name, settings in {"original": ORIGINAL, "balanced": {}}.items():
        learner = TaskLearner(
            make_backbone(tokenizer),
            tiny_config(pool_size=1, epochs=6, distill_epochs=2, buffer_size=8, **settings),
        )
        learner.learn_task("small", small)
        before = gold_log_likelihood(learner, "small", small)
        report = learner.learn_task("large", large)
        assert report.merged and report.slot == 0
        kept[name] = gold_log_likelihood(learner, "small", small) - before
        learner.close()
    assert kept["balanced"] > kept["original"]


def test_online_batches_improve_the_task_and_keep_the_others(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(pool_size=1, online_epochs=2))
    other, task = synthetic_task(2, per_label=4), synthetic_task(0, per_label=6)
    learner.learn_task("other", other)
    other_before = learner.evaluate("other", other)
    other_score = gold_log_likelihood(learner, "other", other)
    learner.learn_task("task", task[:2], epochs=1)  # the first mini-batch: a weak adapter
    first = gold_log_likelihood(learner, "task", task)
    slots = learner.method.slot_of_task.clone()
    reports = learner.learn_stream("task", [task[2:6], task[6:9], task[9:]])
    assert all(r.extra.get("online") and not r.merged for r in reports)  # updates, no new adapter or merge
    assert torch.equal(learner.method.slot_of_task, slots)
    assert gold_log_likelihood(learner, "task", task) > first  # more batches, better on the task
    assert (
        learner.evaluate("other", other) >= other_before - 0.25
    )  # the other task is not hurt beyond a bound
    assert gold_log_likelihood(learner, "other", other) > other_score - 1.0
    assert len(learner.tasks) == 2


def test_online_batches_with_replay_the_default_method(tokenizer):
    """``replay`` (the default method): later mini-batches of a learned task train the shared adapter on them
    and on replayed rows of every task, so the task improves and the other one is kept within a bound; the
    task stays one task and the state keeps its size."""
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method="replay"))
    other, task = synthetic_task(2, per_label=4), synthetic_task(0, per_label=6)
    learner.learn_task("other", other)
    other_before = learner.evaluate("other", other)
    learner.learn_task("task", task[:2], epochs=1)
    first = gold_log_likelihood(learner, "task", task)
    size = learner.state_bytes()
    learner.learn_stream("task", [task[2:6], task[6:9], task[9:]])
    assert gold_log_likelihood(learner, "task", task) > first
    assert learner.evaluate("other", other) >= other_before - 0.25
    assert len(learner.tasks) == 2 and learner.state_bytes() == size


def test_unknown_task_is_flagged_after_calibration_and_survives_a_checkpoint(tokenizer, tmp_path):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config())
    for k in range(2):
        learner.learn_task(f"t{k}", synthetic_task(k))
    held_out = [text for k in range(2) for text, _ in synthetic_task(k, per_label=3)]
    with pytest.raises(TaskError, match="calibrate_unknown"):
        learner.predict(held_out[0], allow_unknown=True)
    learner.calibrate_unknown(held_out, false_alarm_rate=0.0)
    assert UNKNOWN_TASK not in learner.predict_batch(held_out, allow_unknown=True)  # no false alarm at 0
    foreign = [" ".join(WORD_GROUPS[g]) for g in (6, 7)] + ["questions memory degrees", "answers learning"]
    flagged = learner.route(foreign, allow_unknown=True)
    assert flagged.count(UNKNOWN_TASK) >= len(foreign) // 2
    predictions = learner.predict_batch(foreign, allow_unknown=True)
    assert [p == UNKNOWN_TASK for p in predictions] == [r == UNKNOWN_TASK for r in flagged]
    assert all(p in learner.labels(r) for p, r in zip(predictions, flagged) if r != UNKNOWN_TASK)
    assert learner.predict(foreign[0]) != UNKNOWN_TASK  # without allow_unknown: always a label
    learner.save(tmp_path / "state")
    restored = TaskLearner(make_backbone(tokenizer), tiny_config())
    restored.load(tmp_path / "state")
    assert restored.route(foreign, allow_unknown=True) == flagged


def test_a_hundred_and_one_tasks_at_a_fixed_size(tokenizer):
    learner = TaskLearner(
        make_backbone(tokenizer),
        tiny_config(
            max_tasks=101,
            epochs=1,
            distill_epochs=1,
            transfer_samples=2,
            distill_rows_per_task=4,
            slot_choice="balanced",
        ),
    )
    sizes = set()
    for k in range(101):
        report = learner.learn_task(f"t{k}", synthetic_task(k, per_label=1))
        sizes.add((report.parameters, report.state_bytes))
    assert len(sizes) == 1  # bytes after the first task == after the 101st
    loads = [len(learner.method.tasks_of(s)) for s in range(2)]
    assert sorted(loads) == [50, 51]  # balanced slot choice spreads the tasks
    assert len(learner.route(["capital Veloria"])) == 1


@pytest.mark.skipif(not (DATA / "clinc150").is_dir(), reason="the shared data directory is not here")
def test_the_115_task_stream_builds_and_fits_its_profile():
    from continual_transformer.tasks.bench.profiles import profile_settings
    from continual_transformer.tasks.suites import load_suite

    tasks = load_suite("stream115", DATA, max_train_per_label=1, max_test_per_label=1)
    assert len(tasks) == 115 and all(len(t.labels) >= 2 for t in tasks)
    assert len({t.name for t in tasks}) == 115
    settings = profile_settings("stream115", quick=False)
    assert settings.learner.max_tasks >= 115 and settings.eval_every > 1
    intents = load_suite("intents15", DATA, max_train_per_label=60)
    assert len(intents) == 15 and all(2 <= len(t.labels) <= 10 for t in intents)
